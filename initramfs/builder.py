"""Build the capture initramfs: Python runtime, our packages, kernel modules, config, /init.

``build`` is the whole job; ``init_plan`` (pure) decides what /init will do in the capture
kernel (modules to load, network, mounts, finish action) from the configuration, so /init
itself reads one small JSON file and needs no config parser.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kdump_capture import config, heartbeat, private
from kdump_capture.bounds import read_small_file
from kdump_capture.errors import ConfigError, LoadError, NotSupported, TargetSettingError
from kdump_capture.features import network_needed
from kdump_capture.identity import local_identity
from kdump_capture.load import rebuild
from kdump_capture.urls import Target, parse_savedir, quote

from . import cpio, kmods, runtime

log = logging.getLogger(__name__)

PLAN_PATH = "etc/kdump-capture/init.json"
CONFIG_PATH = "etc/sysconfig/kdump"
MOUNT_BASE = "/kdump/mnt"
# Seconds /init waits for the dump device's node (a target's disk: the same, in /init).
DEVICE_TIMEOUT = 30
INIT_SOURCE = Path(__file__).with_name("init")
# Python's boolean spellings in sysconfig files: SUSE 2.x accepts exactly these.
TRUE = {"yes", "true", "1", "on"}


def is_true(value: str) -> bool:
    return value.strip().lower() in TRUE


@dataclass(frozen=True)
class NetConfig:
    """How /init brings up IPv4: ``mode`` is none, dhcp or static."""

    mode: str = "none"
    ifname: str = ""
    mac: str = ""
    address: str = ""
    prefix: int = 0
    gateway: str = ""
    timeout: int = 30

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_netconfig(value: str, needed: bool, timeout: int) -> NetConfig:
    """KDUMP_NETCONFIG -> NetConfig (pure).

    ``auto`` (or empty) = DHCP on the first interface that gets a link; ``DEV:MODE[:force]``
    with MODE dhcp/dhcp4/auto/static; ``:force`` brings the network up even for a local
    target. ``DEV:static`` takes the address DEV has on the building host (filled in by
    the caller), as SUSE's kdump does. The configuration admits nothing else
    (``config.NETCONFIG``).
    """
    value = value.strip()
    if value in ("", "auto"):
        return NetConfig("dhcp", timeout=timeout) if needed else NetConfig(timeout=timeout)
    if value == "auto:force":  # the configuration admits :force after auto too
        return NetConfig("dhcp", timeout=timeout)
    dev, _, rest = value.partition(":")
    mode, _, flag = rest.partition(":")
    if not (needed or flag == "force"):
        return NetConfig(timeout=timeout)
    if dev == "auto":
        dev = ""
    if mode in ("dhcp", "dhcp4", "auto", ""):
        return NetConfig("dhcp", ifname=dev, timeout=timeout)
    if mode in ("dhcp6", "auto6"):
        raise NotSupported(f"KDUMP_NETCONFIG={value!r}: IPv6 set-up is not supported yet")
    if mode != "static" or flag not in ("", "force"):
        raise ConfigError(f"KDUMP_NETCONFIG={value!r}: unknown mode {rest!r}")
    return NetConfig("static", ifname=dev, timeout=timeout)


def host_static_address(ifname: str) -> NetConfig:
    """Address, prefix, gateway and MAC of ``ifname`` on this host (for ``DEV:static``)."""
    try:
        addrs = json.loads(
            subprocess.run(
                ["ip", "-j", "-4", "addr", "show", "dev", ifname],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        routes = json.loads(
            subprocess.run(
                ["ip", "-j", "-4", "route", "show", "default", "dev", ifname],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        info = addrs[0]["addr_info"][0]
    except (OSError, subprocess.CalledProcessError, IndexError, KeyError, ValueError) as e:
        raise ConfigError(f"KDUMP_NETCONFIG: cannot read the address of {ifname}: {e}") from None
    return NetConfig(
        "static",
        ifname=ifname,
        mac=host_mac(ifname),  # `ip -4 addr` leaves the link's address out
        address=info["local"],
        prefix=int(info["prefixlen"]),
        gateway=routes[0].get("gateway", "") if routes else "",
    )


def host_interface(net: NetConfig) -> NetConfig:
    """``net`` with what the building host knows of its interface: for ``DEV:static`` the
    address DEV has here (host_static_address); for ``DEV:dhcp`` DEV's MAC address.

    A capture kernel has no udev to rename interfaces: the NIC that is ens3 here is eth0
    there. /init finds it by its MAC (``pick_interface``), by name only when DEV is not an
    interface of this host (an image built for another machine).
    """
    if net.mode == "static":
        return NetConfig(**{**host_static_address(net.ifname).as_dict(), "timeout": net.timeout})
    if net.mode == "dhcp" and net.ifname:
        return NetConfig(**{**net.as_dict(), "mac": host_mac(net.ifname)})
    return net


def host_mac(ifname: str) -> str:
    """``ifname``'s MAC address on this host, or "" when it has none here."""
    try:
        with open(f"/sys/class/net/{ifname}/address", encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""


# Where this host's resolver configuration is read from: systemd-resolved's own file first
# (/etc/resolv.conf then names only its stub, 127.0.0.53, which no capture kernel runs).
RESOLV_SOURCES = ("/run/systemd/resolve/resolv.conf", "/etc/resolv.conf")
HOSTS_SOURCE = "/etc/hosts"
# A resolver configuration is a few lines; a larger file is not one to carry into RAM.
RESOLVER_FILE_LIMIT = 1 << 20


def resolver_files(
    hosts: str = HOSTS_SOURCE, resolv: tuple[str, ...] = RESOLV_SOURCES
) -> dict[str, bytes]:
    """/etc files for name resolution in the capture kernel (archive path -> content).

    A target named by a host name must resolve there as it does here: this host's
    /etc/hosts; its name servers, search domains and options (loopback servers left out:
    no local resolver runs there; a DHCP lease's servers replace these); and an
    nsswitch.conf that reads the hosts file before DNS (glibc's default without one asks
    DNS first and never reads the file when the server answers "no such name").
    """
    files = {"etc/nsswitch.conf": b"hosts: files dns\n"}
    try:
        files["etc/hosts"] = read_small_file(hosts, RESOLVER_FILE_LIMIT)
    except (OSError, ValueError):
        pass  # the build says so
    for path in resolv:
        try:
            text = read_small_file(path, RESOLVER_FILE_LIMIT).decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        kept = []
        for line in text.splitlines():
            words = line.split()
            if not words or words[0] not in ("nameserver", "search", "domain", "options"):
                continue
            if words[0] == "nameserver" and (len(words) < 2 or _loopback(words[1])):
                continue
            kept.append(" ".join(words) + "\n")
        if kept:
            files["etc/resolv.conf"] = "".join(kept).encode()
        break
    return files


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.partition("%")[0]).is_loopback
    except ValueError:
        return False


def dump_device(cfg: Mapping[str, str]) -> str:
    """KDUMP_DUMPDEV, or "" (pure)."""
    return cfg.get("KDUMP_DUMPDEV", "").strip()


def finish_actions(cfg: Mapping[str, str]) -> tuple[str, str]:
    """(after success, after failure): reboot, poweroff or shell (pure).

    A dump written to KDUMP_DUMPDEV is copied from the console (``kdump-capture recover``)
    after the administrator has checked the system: no reboot after it, whatever
    KDUMP_IMMEDIATE_REBOOT says (as ``save`` itself does).
    """
    reboot = is_true(cfg["KDUMP_IMMEDIATE_REBOOT"]) and not dump_device(cfg)
    success = "reboot" if reboot else "shell"
    failure = "reboot" if is_true(cfg["KDUMP_CONTINUE_ON_ERROR"]) else "shell"
    return success, failure


@dataclass(frozen=True)
class FileMount:
    source: str  # /dev/vda1, UUID=..., LABEL=...
    fstype: str
    target: str
    subdir: str  # the dump directory below the mount, relative

    @property
    def path(self) -> str:
        """The dump directory as the capture kernel sees it."""
        return f"{self.target}/{self.subdir}".rstrip("/")


def find_mount(path: str, mountinfo: str) -> tuple[str, str, str]:
    """(mount point, source, fstype) of the filesystem holding ``path`` (pure)."""
    best = ("", "", "")
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mnt = fields[4].replace("\\040", " ")
        post = line.split(" - ", 1)[1].split()
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best[0]):
            best = (mnt, post[1], post[0])
    return best


def file_mount(target: Target, device: str, fstype: str, n: int = 0) -> FileMount:
    """Where /init mounts the local target's filesystem and the dump path below it."""
    path = target.path
    if device:
        return FileMount(device, fstype, f"{MOUNT_BASE}{n}", path.strip("/"))
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mnt, source, fs = find_mount(path, f.read())
    if not source.startswith("/dev/"):
        raise ConfigError(
            f"cannot tell which disk holds {path} (it is on {fs or 'nothing'} {source}); "
            "pass --target-device DEVICE (e.g. LABEL=crash or UUID=...)"
        )
    uuid = subprocess.run(
        ["blkid", "-o", "value", "-s", "UUID", source], capture_output=True, text=True
    ).stdout.strip()
    rel = os.path.relpath(path, mnt).removeprefix(".")
    return FileMount(f"UUID={uuid}" if uuid else source, fstype or fs, f"{MOUNT_BASE}{n}", rel)


def dump_device_warning(path: str) -> str:
    """Why the capture kernel may not find KDUMP_DUMPDEV's node, or "" (pure but for the
    link test). Our image has no udev: only the kernel's own names (/dev/sdb, /dev/nvme0n1p3)
    come up there, never a link such as /dev/disk/by-id/... (a dracut-built image runs udev
    and has them: a warning, not an error)."""
    link = os.path.islink(path)
    if path.startswith("/dev/") and "/disk/" not in path and not link:
        return ""
    target = f" (here a link to {os.path.realpath(path)})" if link else ""
    return (
        f"KDUMP_DUMPDEV={path}{target}: the capture kernel of this image has no udev links "
        "and will wait for it in vain; name the device as the kernel does, e.g. /dev/sdb "
        "(a dracut-built image, which runs udev, has the links)"
    )


def init_plan(
    cfg: Mapping[str, str],
    targets: list[Target],
    module_files: list[str],
    net: NetConfig,
    mounts: list[FileMount],
    shell: str,
) -> dict:
    """What /init does, as plain data (pure).

    With KDUMP_DUMPDEV the save writes the device and nothing else: no target is mounted
    and no network brought up (the dump device is there for when KDUMP_SAVEDIR's filesystem
    or network is broken, and waiting for it would only delay the dump); /init waits for
    the device instead.
    """
    success, failure = finish_actions(cfg)
    device = dump_device(cfg)
    if device:
        net, mounts = NetConfig(timeout=net.timeout), []
    return {
        "version": 1,
        "target": device or " ".join(t.redacted() for t in targets),
        "modules": module_files,
        "network": net.as_dict(),
        "mounts": [{"source": m.source, "fstype": m.fstype, "target": m.target} for m in mounts],
        # The kernel creates the node when it has found the disk, as it does for a target's.
        "dump_device": {"path": device, "timeout": DEVICE_TIMEOUT} if device else {},
        # /init finishes (unmount, then reboot/poweroff/shell) itself, so save must not.
        "save": [
            "/usr/bin/python3",
            "-I",
            "-m",
            "kdump_capture",
            "save",
            "--no-reboot",
            # The console is a terminal, but a redrawn bar shows nothing in a serial log.
            "--progress",
            "lines",
            "--config",
            "/" + CONFIG_PATH,
        ],
        "on_success": success,
        "on_failure": failure,
        # /init stops a save that makes no progress for this long (heartbeat.py)
        "watchdog": {
            "timeout": heartbeat.watchdog_timeout(
                int(cfg.get("KDUMP_SAVE_TIMEOUT") or 0), int(cfg.get("KDUMP_NET_TIMEOUT") or 30)
            ),
            "grace": heartbeat.GRACE,
        },
        "shell": shell,
        "env": {"HOME": "/root", "PATH": "/usr/bin", "TMPDIR": "/tmp"},
    }


BUSYBOX_APPLETS = (
    "sh", "ls", "cat", "cp", "mv", "rm", "mkdir", "mount", "umount", "ip", "dmesg", "ps",
    "reboot", "poweroff",
)  # fmt: skip


def needs_shell(cfg: Mapping[str, str]) -> bool:
    """Whether the capture kernel needs /bin/sh: scripts to run, or a shell to open (pure)."""
    scripts = any(cfg[k].strip() for k in ("KDUMP_PRESCRIPT", "KDUMP_POSTSCRIPT", "KDUMP_TRANSFER"))
    return scripts or "shell" in finish_actions(cfg)


def _required_program(prog: str, what: str) -> str:
    """Host path of a KDUMP_REQUIRED_PROGRAMS entry (``what`` in messages): a name found in
    PATH, or absolute."""
    if "/" in prog and not os.path.isabs(prog):
        raise ConfigError(
            f"KDUMP_REQUIRED_PROGRAMS: {what}: a relative path (it would depend on the "
            "directory the image is built from); give a name found in PATH or an absolute path"
        )
    path = prog if os.path.isabs(prog) else shutil.which(prog)
    if not path or not os.path.exists(path):
        raise ConfigError(f"KDUMP_REQUIRED_PROGRAMS: {what} not found")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ConfigError(f"KDUMP_REQUIRED_PROGRAMS: {what}: {path} is not an executable file")
    return path


def image_path(path: str) -> str:
    """Where an absolute path of this host is in the image, whose /bin, /sbin, /usr/sbin,
    /lib and /lib64 are symlinks into /usr (base_layout); no leading slash."""
    name = os.path.normpath(path).lstrip("/")
    for link, target in (
        ("bin/", "usr/bin/"),
        ("sbin/", "usr/bin/"),
        ("usr/sbin/", "usr/bin/"),
        ("lib/", "usr/lib/"),
        ("lib64/", "usr/lib64/"),
    ):
        if name.startswith(link):
            return target + name[len(link) :]
    return name


def script_interpreter(data: bytes) -> tuple[str, str]:
    """(interpreter, program it runs) of a script's ``#!`` line: ("/bin/bash", ""), or for
    ``#!/usr/bin/env [-S] perl -w``: ("/usr/bin/env", "perl"); ("", "") for no script."""
    if not data.startswith(b"#!"):
        return "", ""
    words = data[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if not words:
        return "", ""
    if os.path.basename(words[0]) != "env":
        return words[0], ""
    name = next((w for w in words[1:] if not w.startswith("-") and "=" not in w), "")
    return words[0], name


def add_programs(arc: cpio.Archive, programs: list[str]) -> int:
    """Copy programs (found in PATH or absolute) to /usr/bin with their shared libraries,
    one named by its absolute path at that path too (a symlink), and a script's
    interpreter (its ``#!`` line's, at that path) when the image has none.

    A program may replace a busybox applet (``ip``, ``mount``: the full program instead),
    never a file the capture itself runs: /usr/bin/python3 is /init's interpreter and the
    save's, so another one there (a /usr/local/bin/python3 found first in PATH, say) would
    leave the capture kernel without a working /init, at the crash.
    """
    applets = {f"usr/bin/{a}" for a in BUSYBOX_APPLETS}
    packed: dict[str, str] = {}  # image path -> the host file packed there
    # (the host program or name, where it goes in the image, what it is for messages,
    # whether a script needs it: any file already there will do)
    todo = [(prog, f"usr/bin/{os.path.basename(prog)}", prog, False) for prog in programs]
    while todo:
        prog, dest, what, interpreter = todo.pop(0)
        if interpreter and (dest in packed or dest in arc):
            continue  # the image has it: busybox's sh, its own python3, a program packed
        path = _required_program(prog, what)
        real = os.path.realpath(path)
        data = Path(path).read_bytes()
        if dest in packed:
            if packed[dest] != real:
                raise ConfigError(
                    f"KDUMP_REQUIRED_PROGRAMS: two programs would be /{dest} in the capture "
                    f"kernel: {packed[dest]} and {real}"
                )
            continue
        own = arc.get(dest)
        if own is not None and dest not in applets and own.data != data:
            raise ConfigError(
                f"KDUMP_REQUIRED_PROGRAMS: {prog}: the capture image has its own /{dest}, "
                f"which the capture itself needs; {path} cannot replace it (leave {prog} out)"
            )
        packed[dest] = real
        arc.add_file(dest, data, 0o755)
        there = image_path(prog) if os.path.isabs(prog) else dest
        if there != dest:
            # Named by its path, as a script command names it (KDUMP_POSTSCRIPT=/usr/local/
            # sbin/notify): there too, or that command is "not found" in the capture kernel.
            if there in arc:
                raise ConfigError(
                    f"KDUMP_REQUIRED_PROGRAMS: {what}: the capture image has its own /{there}"
                )
            arc.add_symlink(there, f"/{dest}")
        # A script runs only when its interpreter is in the image at the path its #! line
        # names: else "not found" in the capture kernel, at the crash.
        shebang, name = script_interpreter(data)
        if shebang:
            if not os.path.isabs(shebang):
                raise ConfigError(
                    f"KDUMP_REQUIRED_PROGRAMS: {what}: its #! interpreter {shebang} is not "
                    "an absolute path"
                )
            todo.append((shebang, image_path(shebang), f"{what}: its interpreter {shebang}", True))
        if name:
            runs = f"{what}: {name}, which its {shebang} runs"
            todo.append((name, f"usr/bin/{name}", runs, True))
    n = len(packed)
    for name, lib in runtime.shared_libs(sorted(set(packed.values()))).items():
        dest = "usr" + name if name.startswith("/") else f"{runtime.DEST_LIBDIR}/{name}"
        if dest not in arc:
            arc.add_file(dest, Path(lib).read_bytes(), 0o755)
            n += 1
    return n


# What busybox's sh runs without a program: a command starting with one is not checked.
SH_OWN = frozenset(
    ". : [ [[ alias bg break cd chdir command continue echo eval exec exit export false fg "
    "getopts hash help history jobs kill let local printf pwd read readonly return set shift "
    "source test times trap true type ulimit umask unalias unset wait if then else elif fi "
    "case esac for while until do done function select time ! { }".split()
)


def command_program(command: str) -> str:
    """The program a KDUMP_PRESCRIPT/POSTSCRIPT/TRANSFER command line starts with, or ""
    when that cannot be told without running a shell (a builtin, an expansion, a keyword)
    (pure)."""
    import shlex

    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return ""
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        words.pop(0)  # NAME=value before the command
    if not words or words[0] in SH_OWN or any(c in words[0] for c in "$`*?[]{}()<>|&;~\\"):
        return ""
    return words[0]


def check_commands(cfg: Mapping[str, str], arc: cpio.Archive) -> None:
    """A command whose program is not in the image fails in the capture kernel ("not found",
    exit 127), at the crash: a KDUMP_TRANSFER one fails the build (it would save nothing),
    a KDUMP_PRESCRIPT/POSTSCRIPT one is a warning (the save goes on without it, unless
    KDUMP_CONTINUE_ON_ERROR=false)."""
    for directive in ("KDUMP_TRANSFER", "KDUMP_PRESCRIPT", "KDUMP_POSTSCRIPT"):
        prog = command_program(cfg[directive])
        if not prog or ("/" in prog and not os.path.isabs(prog)):
            continue
        there = image_path(prog) if "/" in prog else f"usr/bin/{prog}"
        if there in arc:
            continue
        msg = (
            f"{directive}: {prog} is not in the capture image, where the command would fail "
            f"(not found); add it to KDUMP_REQUIRED_PROGRAMS"
        )
        if directive == "KDUMP_TRANSFER":
            raise ConfigError(f"{msg}: with KDUMP_TRANSFER no dump would be saved")
        log.warning("%s", msg)


def sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def capture_config(cfg: Mapping[str, str], rewrite: Mapping[str, str]) -> str:
    """The effective configuration as the capture kernel reads it: every directive with its
    value (overrides from --set included), local paths rewritten to where /init mounts."""
    lines = ["# Effective kdump configuration, written by 'kdump-capture initramfs build'."]
    lines += [f"{k}={sh_quote(rewrite.get(k, cfg[k]))}" for k in cfg]
    return "\n".join(lines) + "\n"


# What a key, known_hosts or CA bundle may hold (the system bundle is about 200 KiB).
MAX_CONFIG_FILE = 16 << 20


def _config_file(path: str, what: str) -> bytes:
    """A file the configuration names, read as the packer's input: a regular file of sane
    size (a FIFO waited for good, /dev/zero filled memory)."""
    try:
        return read_small_file(path, MAX_CONFIG_FILE)
    except OSError as e:
        raise ConfigError(f"{what}: {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def check_packed_config(text: str, local_paths: list[str]) -> None:
    """ConfigError unless ``text`` loads as the capture kernel will load it, with its local
    targets at ``local_paths``: a value the builder rewrote (a path, the host name) must not
    first fail, or mean another directory, in the capture kernel at the crash."""
    with tempfile.TemporaryDirectory(prefix="kdump-config-") as tmp:
        path = os.path.join(tmp, "kdump")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(text)
        try:
            packed = config.load_config(path)
        except ConfigError as e:
            where = f"/{CONFIG_PATH} of the image"
            raise ConfigError(
                f"the configuration packed for the capture kernel would not load there: "
                f"{str(e).replace(path, where)}"
            ) from None
    got = [t.path for t in packed.savedir if t.scheme == "file"]
    if got != local_paths:
        raise ConfigError(
            f"the configuration packed for the capture kernel names {got} instead of "
            f"{local_paths} (a bug in 'initramfs build'; please report it)"
        )


@dataclass
class BuildReport:
    output: str
    compress: str
    compressed: int
    unpacked: int
    python_modules: int
    extensions: int
    libraries: int
    kernel_modules: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: what ``estimate`` needs (also in the record beside the image): sizes in bytes
    facts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        mb = 1024 * 1024
        mods = ", ".join(self.kernel_modules) or "none"
        return (
            f"initramfs {self.output}: {self.compressed / mb:.1f} MiB {self.compress}, "
            f"{self.unpacked / mb:.1f} MiB unpacked, built in {self.seconds:.1f} s\n"
            f"  python: {self.python_modules} modules (.pyc), {self.extensions} extension "
            f"modules, {self.libraries} shared libraries\n"
            f"  kernel modules: {mods}\n"
            f"  also: {', '.join(self.extras) or 'nothing else'}"
        )


def compress_bytes(data: bytes, method: str) -> bytes:
    if method == "zstd":
        import zstandard

        # Level 19 packs ~25% smaller than the default level. The kernel's unpacker
        # allocates the frame's window while it unpacks: level 19 would ask for 8 MiB of a
        # reservation that is tight then; a 1 MiB window costs 0.2 MiB of size (10.4 -> 10.6
        # MiB for an SFTP image).
        params = zstandard.ZstdCompressionParameters.from_level(19, window_log=20, threads=-1)
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    if method == "gzip":
        return gzip.compress(data, 9, mtime=0)
    raise ConfigError(f"unknown compression {method!r} (zstd or gzip)")


def base_layout(arc: cpio.Archive) -> None:
    for d in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "mnt", "kdump", "var/crash"):
        arc.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    # The kernel opens /dev/console before /init runs, so the node must be in the archive.
    arc.add_chardev("dev/console", 5, 1)
    arc.add_chardev("dev/null", 1, 3, 0o666)
    arc.add_chardev("dev/kmsg", 1, 11, 0o644)
    for link, tgt in (
        ("bin", "usr/bin"),
        ("sbin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("usr/sbin", "bin"),
    ):
        arc.add_symlink(link, tgt)


def add_payload(arc: cpio.Archive, payload: runtime.Payload) -> None:
    for dest, src in payload.files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        arc.add_file(dest, data, payload.modes.get(dest, 0o644))
    for link, tgt in payload.symlinks.items():
        arc.add_symlink(link, tgt)


# Where the image holds the system's shared libraries (libc, libssl, libz, ...).
SYSTEM_LIBS = ("usr/lib/x86_64", "usr/lib64")


def image_features(cfg: Mapping[str, str]) -> tuple[str, ...]:
    """The configured features whose libraries the image must carry (keys of
    runtime.FEATURE_MODULES): `cryptography` for KDUMP_ENCRYPT_TO (only public keys travel),
    `xxhash` for KDUMP_CHECKSUM=xxh3 (the default, also where the mapping has no value)."""
    features = []
    if cfg.get("KDUMP_ENCRYPT_TO", "").strip():
        features.append("encrypt")
    default = config.BY_NAME["KDUMP_CHECKSUM"].default
    if (cfg.get("KDUMP_CHECKSUM", "").strip() or default).lower() == "xxh3":
        features.append("xxh3")
    return tuple(features)


def add_own_packages(payload: runtime.Payload, schemes: list[str], tmpdir: str) -> int:
    """Our packages as .pyc: all of the engine, the transport base and the targets' ones."""
    root = runtime.project_root()
    tmods = [runtime.transport_module(s).split(".")[1] for s in schemes]
    sources = list((root / "kdump_capture").rglob("*.py"))
    sources += [root / "transports" / f for f in ("__init__.py", "base.py")]
    sources += [root / "transports" / f"{t}.py" for t in dict.fromkeys(tmods)]
    items = [(str(src), f"{runtime.DEST_SITE}/{src.relative_to(root)}c") for src in sources]
    for dest, path in runtime.compile_pycs(items, tempfile.mkdtemp(dir=tmpdir)).items():
        payload.add(dest, Path(path).read_bytes())
    return len(items)


# Identities paramiko tries when KDUMP_SSH_IDENTITY is empty, in ~/.ssh.
DEFAULT_IDENTITIES = ("id_rsa", "id_ecdsa", "id_ed25519")


def ssh_files(cfg: Mapping[str, str], home: str) -> tuple[dict[str, str], dict]:
    """SSH identity and known-host files to pack, and the config values to rewrite.

    Identities are relative to ``home``/.ssh or absolute; each is packed under /root/.ssh
    with its .pub. known_hosts is packed whole from ``home``/.ssh/known_hosts when present.
    """
    files: dict[str, str] = {}
    names = cfg["KDUMP_SSH_IDENTITY"].split()
    if not names:
        names = [n for n in DEFAULT_IDENTITIES if os.path.exists(os.path.join(home, ".ssh", n))]
    packed = []
    for name in names:
        src = name if os.path.isabs(name) else os.path.join(home, ".ssh", name)
        if not os.path.exists(src):
            raise ConfigError(f"KDUMP_SSH_IDENTITY: {src} does not exist")
        dest = f"root/.ssh/{os.path.basename(src)}"
        files[dest] = src
        for suffix in (".pub", "-cert.pub"):
            if os.path.exists(src + suffix):
                files[dest + suffix] = src + suffix
        packed.append("/" + dest)
    known = os.path.join(home, ".ssh", "known_hosts")
    if os.path.exists(known):
        files["root/.ssh/known_hosts"] = known
    rewrite = {"KDUMP_SSH_IDENTITY": " ".join(packed)} if packed else {}
    return files, rewrite


def s3_files(cfg: Mapping[str, str], targets: list[Target]) -> dict[str, str]:
    """CA files an https (``s3://``) target needs in the capture kernel: the system's bundle
    where OpenSSL looks by default, and KDUMP_S3_CA_BUNDLE under its own path."""
    import ssl

    files: dict[str, str] = {}
    if not any(t.scheme == "s3" and t.spelled == "s3" for t in targets):
        return files
    paths = ssl.get_default_verify_paths()
    system = paths.openssl_cafile if os.path.exists(paths.openssl_cafile) else paths.cafile
    if system and os.path.exists(system):
        files[paths.openssl_cafile.lstrip("/")] = os.path.realpath(system)
    bundle = cfg["KDUMP_S3_CA_BUNDLE"].strip()
    if bundle:
        from transports.base import load_ca_bundle

        try:  # as the capture kernel will load it: a file of no certificates fails there
            load_ca_bundle(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), bundle)
        except TargetSettingError as e:
            raise ConfigError(str(e)) from None
        files[bundle.lstrip("/")] = bundle
    return files


# /init loads modules and sets routes with x86_64's system call numbers and structures
# (finit_module is 313 there, another call on arm64), and the runtime is packed from
# x86_64's library directory: an image built elsewhere would fail only at the crash.
ARCHITECTURES = ("x86_64",)


def check_architecture(machine: str | None = None) -> None:
    machine = machine or os.uname().machine
    if machine not in ARCHITECTURES:
        raise NotSupported(
            f"the capture image is built for {', '.join(ARCHITECTURES)} only (its /init "
            f"uses that architecture's system calls); this machine is {machine}"
        )


def build(
    cfg: Mapping[str, str],
    output: str,
    *,
    kernel_version: str | None = None,
    modules_root: str | None = None,
    compress: str = "zstd",
    target_device: str = "",
    target_fstype: str = "",
    extra_modules: tuple[str, ...] = (),
    home: str = "/root",
) -> BuildReport:
    """Build the capture initramfs for ``cfg`` into ``output`` (written atomically)."""
    started = time.monotonic()
    check_architecture()
    inputs = rebuild.image_inputs(
        cfg,
        kernel_version=kernel_version or os.uname().release,
        modules_root=modules_root,
        compress=compress,
        target_device=target_device,
        target_fstype=target_fstype,
        extra_modules=extra_modules,
        home=home,
    )
    targets, _warnings = parse_savedir(cfg["KDUMP_SAVEDIR"])
    # With a dump device the save writes the device and nothing else (init_plan): no
    # transport, no target's disk, filesystem or network; KDUMP_SAVEDIR is for ``recover``.
    device = dump_device(cfg)
    if device and (warning := dump_device_warning(device)):
        log.warning("%s", warning)
    schemes = [] if device else list(dict.fromkeys(t.scheme for t in targets))
    kver = kernel_version or os.uname().release
    mroot = modules_root or f"/lib/modules/{kver}"
    if compress not in ("zstd", "gzip"):
        raise ConfigError(f"unknown compression {compress!r} (zstd or gzip)")
    index = kmods.ModuleIndex.load(mroot)

    arc = cpio.Archive(mtime=int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    base_layout(arc)
    extras: list[str] = []

    features = image_features(cfg)
    with tempfile.TemporaryDirectory(prefix="kdump-initramfs-") as tmp:
        idna = not all(t.host.isascii() for t in targets)
        payload = runtime.collect(schemes, tmp, idna=idna, features=features)
        add_own_packages(payload, schemes, tmp)
        pyc = sum(1 for f in payload.files if f.endswith(".pyc"))
        runtime.zip_pure_modules(payload)
        add_payload(arc, payload)
        fmt = cfg["KDUMP_DUMPFORMAT"].strip().lower()
        interpreter, imports = runtime.measure_save_imports(
            payload, schemes, fmt, tmp, features=features
        )
    ext = sum(1 for f in payload.files if f.endswith(".so") and "/python3" in f)
    libs = sum(1 for f in payload.files if f.startswith(SYSTEM_LIBS))
    # The host files behind them: an update of one (libssl, libc) makes the image stale.
    host_libs = sorted(payload.libraries.values())

    # Local targets: which filesystem /init mounts, and the path below it.
    rewrite: dict[str, str] = {}
    mounts: list[FileMount] = []
    savedirs: list[str] = []
    pairs = zip(cfg["KDUMP_SAVEDIR"].split(), targets, strict=True)
    for text, t in [] if device else pairs:
        if t.scheme != "file":
            savedirs.append(text)  # as written: the redacted form would lose a password
            continue
        m = file_mount(t, target_device, target_fstype, len(mounts))
        mounts.append(m)
        # Encoded as the URL it is: a space would split it in two, '%' '?' '#' change it.
        savedirs.append("file://" + quote(m.path, safe="/"))
    if mounts:
        rewrite["KDUMP_SAVEDIR"] = " ".join(savedirs)
    # A capture kernel has no host name of its own: carry this machine's (SUSE writes
    # /etc/hostname.kdump), so that its dumps on a shared target carry its name.
    if not cfg["KDUMP_HOSTNAME"] and (name := local_identity()):
        rewrite["KDUMP_HOSTNAME"] = name

    # Kernel modules, in load order.
    needed = any(network_needed(s, cfg["KDUMP_RUNLEVEL"]) for s in schemes)
    # For the running kernel, the drivers this machine uses (host only); for another
    # kernel (or when none are modules here), drivers for common hardware.
    storage, nics = kmods.STORAGE, kmods.NETWORK
    if kver == os.uname().release and modules_root is None:
        host_storage, host_nics = kmods.host_drivers()
        storage = host_storage or storage
        nics = host_nics or nics
    # A dump device needs its disk's driver only.
    wanted: list[str] = [*storage, *extra_modules] if device else []
    for s in schemes:
        fstypes = [m.fstype for m in mounts] if s == "file" else [""]
        for fs in fstypes:
            fs_modules = index.filesystem_modules(fs) if fs else []
            wanted += kmods.wanted_modules(s, needed, fs, extra_modules, storage, nics, fs_modules)
    missing, unknown = kmods.missing_drivers(index, [m.fstype for m in mounts], "nfs" in schemes)
    if missing:
        raise ConfigError(
            f"kernel {kver} has no driver for {'; '.join(missing)}: neither a module in "
            f"{mroot}/modules.dep nor built in ({mroot}/modules.builtin), so the capture "
            "kernel could not write the target; install that kernel's extra modules package "
            "(e.g. kernel-modules-extra, linux-modules-extra-VER) or choose another target"
        )
    if unknown:
        log.warning(
            "%s/modules.builtin is missing: cannot tell whether kernel %s has %s built in; "
            "the capture kernel cannot write the target without it",
            mroot,
            kver,
            "; ".join(unknown),
        )
    names = index.resolve(list(dict.fromkeys(wanted)))
    module_files = []
    module_bytes = 0
    for name in names:
        rel, data = kmods.module_image(index.paths[name], index.file(name))
        rel = f"usr/lib/modules/{kver}/{rel}"
        arc.add_file(rel, data)
        module_files.append("/" + rel)
        module_bytes += len(data)

    # Network.
    try:
        timeout = int(cfg["KDUMP_NET_TIMEOUT"])
    except ValueError:
        raise ConfigError(
            f"KDUMP_NET_TIMEOUT={cfg['KDUMP_NET_TIMEOUT']!r} is not a number"
        ) from None
    net = parse_netconfig(cfg["KDUMP_NETCONFIG"], needed, timeout)
    if device:
        net = NetConfig(timeout=timeout)  # not even for KDUMP_NETCONFIG's :force (init_plan)
        extras.append(f"dump device {device}")
    net = host_interface(net)  # DEV's address (static) or MAC (dhcp) on this host

    if net.mode != "none":
        files = resolver_files()
        for dest, data in files.items():
            arc.add_file(dest, data, 0o644)
        if "etc/hosts" not in files:
            log.warning("%s is not packed: target host names resolve by DNS only", HOSTS_SOURCE)
        extras.append("name resolution (/etc/hosts, resolv.conf)")

    if "sftp" in schemes:
        files, ssh_rewrite = ssh_files(cfg, home)
        for dest, src in files.items():
            arc.add_file(dest, _config_file(src, "KDUMP_SSH_IDENTITY or known_hosts"), 0o600)
        rewrite.update(ssh_rewrite)
        extras.append(f"ssh files ({len(files)})")

    if "s3" in schemes:
        files = s3_files(cfg, targets)
        for dest, src in files.items():
            arc.add_file(dest, _config_file(src, "CA certificates"), 0o644)
        if files:
            extras.append(f"CA certificates ({len(files)} files)")

    # busybox (static: no libraries) for /bin/sh: a rescue shell when the config may open
    # one, and the shell that runs KDUMP_PRESCRIPT/POSTSCRIPT/TRANSFER. Neither needed: left
    # out (2 MB).
    shell = ""
    busybox = shutil.which("busybox")
    if needs_shell(cfg):
        if busybox is None:
            raise ConfigError(
                "the configuration needs a shell in the capture kernel (scripts or a rescue "
                "shell); install busybox (package busybox-static)"
            )
        arc.add_file("usr/bin/busybox", Path(busybox).read_bytes(), 0o755)
        for applet in BUSYBOX_APPLETS:
            arc.add_symlink(f"usr/bin/{applet}", "busybox")
        shell = "/usr/bin/sh"
        extras.append("busybox (/bin/sh)")

    # KDUMP_REQUIRED_PROGRAMS: extra programs with the libraries they need.
    programs = cfg["KDUMP_REQUIRED_PROGRAMS"].split()
    if programs:
        n = add_programs(arc, programs)
        extras.append(f"programs: {' '.join(programs)} ({n} files)")
    check_commands(cfg, arc)

    plan = init_plan(cfg, targets, module_files, net, mounts, shell)
    arc.add_file(PLAN_PATH, json.dumps(plan, indent=1).encode())
    packed_config = capture_config(cfg, rewrite)
    # With a dump device KDUMP_SAVEDIR stays as written: only ``recover`` on the host uses it.
    local = [t.path for t in targets if t.scheme == "file"] if device else [m.path for m in mounts]
    check_packed_config(packed_config, local)
    arc.add_file(CONFIG_PATH, packed_config.encode(), 0o600)
    arc.add_file("init", INIT_SOURCE.read_bytes(), 0o755)
    extras.append(f"config (/{CONFIG_PATH})")

    raw = io.BytesIO()
    unpacked = arc.write(raw)
    packed = compress_bytes(raw.getvalue(), compress)
    # The image holds the target's password and the SSH private key: 0600 in a 0700
    # directory (when we create it) from the first byte. The old record of its inputs goes
    # before the image is replaced and the new one after, so an interrupted build leaves
    # an image that ``load`` rebuilds.
    # Two builds of the same image at once (a package hook's `load` beside an admin's)
    # publish one after the other, each its image and then its record; the record carries
    # the image's SHA-256 besides. What a killed build left (IMAGE.tmp.*: the secrets
    # too) goes.
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        private.make_dir(out_dir)
    record = rebuild.record_path(output)
    facts = {
        "compressed": len(packed),
        "unpacked": unpacked,
        # in rootfs (tmpfs, whole pages per file), which is half of the memory at boot
        "rootfs": arc.page_bytes(),
        # /init deletes them once loaded: not in RAM while the save runs
        "kernel_modules": module_bytes,
        "interpreter": interpreter,
        "save_imports": imports,
    }
    try:
        with private.dir_lock(out_dir, what=f"building {output}"):
            for path in private.remove_leftovers(output) + private.remove_leftovers(record):
                log.info("removed %s, left by a build that was killed", path)
            if os.path.lexists(record):
                os.unlink(record)
            private.write_file(output, packed)
            rebuild.write_record(
                output, inputs, facts, hashlib.sha256(packed).hexdigest(), host_libs
            )
    except TimeoutError as e:
        raise LoadError(f"cannot write the image: {e}") from None
    return BuildReport(
        output=output,
        compress=compress,
        compressed=len(packed),
        unpacked=unpacked,
        python_modules=pyc,
        extensions=ext,
        libraries=libs,
        kernel_modules=names,
        extras=extras,
        seconds=time.monotonic() - started,
        facts=facts,
    )
