#!/usr/bin/env bash
# One-time set-up on a fresh Debian 12 machine (run as root): the system packages the
# tests and the VM harness use, then this package with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
if command -v apt-get >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        gcc libc6-dev zlib1g-dev libzstd-dev binutils make file time cpio zstd kmod busybox-static e2fsprogs util-linux \
        btrfs-progs liblzo2-dev \
        qemu-system-x86 qemu-utils \
        makedumpfile crash kexec-tools dracut-core systemd \
        openssh-server openssh-client \
        samba smbclient vsftpd curl faketime \
        age xxhash \
        nfs-ganesha nfs-ganesha-vfs rpcbind iproute2 \
        >/dev/null
fi
if ! python3 -m pip --version >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
# Debian's own python3 refuses system-wide pip installs (PEP 668); this tool runs as root in
# the capture kernel and on the host, so install it system-wide there as well.
if ! python3 -m pip install -q -e '.[test,bench]' 2>/tmp/kdump-capture-pip.err; then
    if grep -q externally-managed /tmp/kdump-capture-pip.err; then
        python3 -m pip install -q --break-system-packages -e '.[test,bench]'
    else
        cat /tmp/kdump-capture-pip.err >&2
        exit 1
    fi
fi
echo "setup done"
