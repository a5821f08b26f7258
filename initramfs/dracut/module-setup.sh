#!/bin/bash
# dracut module "kdump-capture": the same capture pieces in a distro-built initramfs.
# Install as /usr/lib/dracut/modules.d/99kdump-capture/ and build the capture image with
#   dracut --add kdump-capture --no-hostonly-cmdline /boot/initrd-$(uname -r)-kdump
# It packs what `kdump-capture initramfs build` packs (Python runtime, our packages, kernel
# modules, config, SSH files) and runs our /init program as a service in the initrd (or as a
# cmdline hook without systemd), which saves the dump and reboots, powers off or opens a
# shell as configured.

# engine.conf (written by `kdump-capture initramfs dracut-module`) names the interpreter that
# has our packages: pip installs the kdump-capture script outside dracut's search path.
_engine() {
    KDUMP_CAPTURE_PYTHON=
    # shellcheck disable=SC1091
    [ -r "$moddir/engine.conf" ] && . "$moddir/engine.conf"
    [ -n "$KDUMP_CAPTURE_PYTHON" ] && [ -x "$KDUMP_CAPTURE_PYTHON" ] || {
        derror "kdump-capture: $moddir/engine.conf names no interpreter;" \
            "install the module with: kdump-capture initramfs dracut-module"
        return 1
    }
}

check() {
    _engine || return 1
    "$KDUMP_CAPTURE_PYTHON" -c 'import kdump_capture' || return 1
    require_binaries cpio gzip || return 1
    return 255 # only when asked for with --add
}

depends() {
    echo base
    return 0
}

# The payload holds the target's password and SSH key: its temporary copies go on every
# path out, failures included (a full $TMPDIR must not leave them behind).
_payload() {
    local tmp=$1 tree=$1/tree
    mkdir -p "$tree" || return 1
    if ! "$KDUMP_CAPTURE_PYTHON" -m kdump_capture initramfs build --output "$tmp/payload.img" \
        --compress gzip --kernel-version "$kernel" --modules-root "$srcmods" \
        --config "${KDUMP_CONFIG:-/etc/sysconfig/kdump}"; then
        derror "kdump-capture: building the capture payload failed"
        return 1
    fi
    if ! (set -o pipefail && cd "$tree" && gzip -dc "$tmp/payload.img" | cpio -idm --quiet); then
        derror "kdump-capture: unpacking the capture payload failed"
        return 1
    fi
    # dracut owns /init, /dev and the merged-/usr symlinks; ours go to their own place.
    mkdir -p "$initdir/usr/lib/kdump-capture" &&
        cp "$tree/init" "$initdir/usr/lib/kdump-capture/init" &&
        chmod 0755 "$initdir/usr/lib/kdump-capture/init" &&
        rm -rf "$tree/init" "$tree/dev" "$tree/bin" "$tree/sbin" "$tree/lib" "$tree/lib64" \
            "$tree/usr/sbin" &&
        cp -a "$tree/." "$initdir/"
}

install() {
    local tmp rc
    _engine || return 1
    tmp=$(mktemp -d) || return 1
    _payload "$tmp"
    rc=$?
    rm -rf "$tmp"
    [ "$rc" -eq 0 ] || return 1

    if dracut_module_included "systemd"; then
        inst_simple "$moddir/kdump-capture-save.service" \
            "$systemdsystemunitdir/kdump-capture-save.service"
        mkdir -p "$initdir/$systemdsystemunitdir/initrd.target.wants"
        ln_r "$systemdsystemunitdir/kdump-capture-save.service" \
            "$systemdsystemunitdir/initrd.target.wants/kdump-capture-save.service"
        local unit
        for unit in emergency.service dracut-emergency.service initrd-switch-root.service \
            initrd-cleanup.service; do
            inst_simple "$moddir/capture-kernel.conf" \
                "$systemdsystemunitdir/$unit.d/50-kdump-capture.conf"
        done
    else
        inst_hook cmdline 00 "$moddir/kdump-capture-hook.sh"
    fi
}
