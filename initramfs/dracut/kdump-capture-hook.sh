#!/bin/sh
# dracut cmdline hook (no systemd): in a capture kernel, save the dump and finish as
# configured; our init does not return (it reboots, powers off or opens a shell).
# It runs this early because right after the cmdline hooks dracut refuses to go on without
# root=, and later hooks wait for the root device and end in an emergency shell when it is
# missing; a capture kernel needs no root, and our init loads its own kernel modules and
# brings up its own network.
[ -e /proc/vmcore ] && /usr/lib/kdump-capture/init
