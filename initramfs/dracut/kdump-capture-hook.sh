#!/bin/sh
# dracut pre-pivot hook (no systemd): save the dump when this is a capture kernel.
[ -e /proc/vmcore ] && /usr/lib/kdump-capture/init
