#!/bin/busybox sh
# vmkit sample guest init. First boot: fill memory with known content, load the
# capture kernel with kexec_file_load, crash. Capture boot (this same script, from
# capture.cpio): copy /proc/vmcore raw onto /dev/vda and power off.
# Lines starting with VMKIT- are read by tests/vmkit/sample.py on the host.
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/sbin:/bin

fail() {
    echo "VMKIT-FAIL: $*"
    poweroff -f
    sleep 5
    exit 1
}

. /etc/vmkit.conf || fail "no /etc/vmkit.conf"

for ko in $MODULES; do
    insmod "/lib/modules/$ko" || fail "insmod $ko"
done

wait_dev() {
    # Devices appear when the virtio drivers probe; give them up to 10 s.
    n=0
    while [ ! -b "$1" ]; do
        n=$((n + 1))
        [ $n -gt 100 ] && fail "block device $1 did not appear"
        sleep 0.1
    done
}

if grep -q "vmkit_stage=capture" /proc/cmdline; then
    echo "VMKIT-STAGE capture"
    [ -e /proc/vmcore ] || fail "no /proc/vmcore in the capture kernel"
    size=$(stat -c %s /proc/vmcore)
    echo "VMKIT-VMCORE-SIZE $size"
    wait_dev /dev/vda
    disk=$(blockdev --getsize64 /dev/vda)
    [ "$size" -le "$disk" ] || fail "/proc/vmcore ($size bytes) larger than /dev/vda ($disk bytes)"
    grep -E "^(MemTotal|MemAvailable)" /proc/meminfo
    dd if=/proc/vmcore of=/dev/vda bs=1M || fail "dd /proc/vmcore to /dev/vda"
    sync
    echo "VMKIT-CAPTURE-DONE"
    poweroff -f
    sleep 5
    exit 1
fi

echo "VMKIT-STAGE first"
wait_dev /dev/vdb
# Page cache: buffered reads of the data disk are cached in the block device mapping.
# Keep fd 3 open until the crash: the last close of a block device drops its cache.
exec 3</dev/vdb || fail "opening /dev/vdb"
dd if=/dev/vdb of=/dev/null bs=1M || fail "reading /dev/vdb"
memfill pattern "$ANON_MIB" /tmp/anon.ready &
memfill zero "$ZERO_MIB" /tmp/zero.ready &
n=0
while [ ! -e /tmp/anon.ready ] || [ ! -e /tmp/zero.ready ]; do
    n=$((n + 1))
    [ $n -gt 1200 ] && fail "memfill did not finish in 120 s"
    sleep 0.1
done
grep -E "^(MemTotal|MemFree|Buffers|Cached|AnonPages)" /proc/meminfo
echo "$MARKER" >/dev/kmsg
dmesg | grep -q "$MARKER" || fail "marker not in dmesg"
kexec-load /boot/vmlinuz /boot/capture.cpio "$CAPTURE_CMDLINE" || fail "kexec_file_load of the capture kernel"
loaded=$(cat /sys/kernel/kexec_crash_loaded)
[ "$loaded" = 1 ] || fail "kexec_crash_loaded is $loaded after kexec_file_load"
echo "VMKIT-CRASH-SIZE $(cat /sys/kernel/kexec_crash_size)"
echo "VMKIT-CRASHING"
echo 1 >/proc/sys/kernel/sysrq
echo c >/proc/sysrq-trigger
fail "still alive after sysrq-c"
