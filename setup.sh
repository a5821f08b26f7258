#!/usr/bin/env bash
# One-time set-up on a fresh Debian 12 machine (run as root): the system packages the
# tests and the VM harness use, then this package with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
if command -v apt-get >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        gcc libc6-dev binutils make file cpio zstd kmod busybox-static e2fsprogs util-linux \
        qemu-system-x86 qemu-utils \
        makedumpfile crash kexec-tools \
        openssh-server openssh-client \
        samba smbclient vsftpd curl \
        nfs-ganesha nfs-ganesha-vfs \
        >/dev/null
fi
python3 -m pip install -q -e '.[test]'
echo "setup done"
