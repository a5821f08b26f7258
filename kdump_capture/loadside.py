"""The production-kernel side: check, load, unload, status, test-crash and initramfs build.

Loading uses the kexec_file_load system call with KEXEC_FILE_ON_CRASH (the kernel verifies
and places the image itself), and falls back to the ``kexec`` binary with KEXEC_OPTIONS
where the call is unavailable. Nothing here changes the system unless the command is
``load``, ``unload``, ``test-crash --yes`` or ``initramfs build``; on a kernel without a
crashkernel reservation every command says so and changes nothing.

This module is imported by the CLI in the capture kernel too, so its top level stays small:
the initramfs builder and ctypes are imported only where used.
"""

from __future__ import annotations

import argparse
import errno
import gzip
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import speedups
from .errors import ConfigError, LoadError

log = logging.getLogger(__name__)

INITRD_DIR = "/var/lib/kdump-capture"

# The seed tutorial's message, word for word (kdump's init script printed it).
NOT_RESERVED = (
    "Memory for crashkernel is not reserved Please reserve memory by passing "
    '"crashkernel=X@Y" parameter to the kernel Then try loading kdump kernel'
)

SYS_KEXEC_FILE_LOAD = 320  # x86_64
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4

# Options of the running kernel's command line that must not reach the capture kernel:
# the reservation itself, the root and resume devices and init programs of the production
# system (the capture kernel runs our initramfs), CPU and memory limits we set ourselves,
# and huge-page/CMA reservations that the small capture memory cannot hold.
DROP_OPTIONS = frozenset(
    {
        "crashkernel",
        "root",
        "rootflags",
        "rootfstype",
        "ro",
        "rw",
        "resume",
        "resume_offset",
        "init",
        "rdinit",
        "initrd",
        "BOOT_IMAGE",
        "nr_cpus",
        "maxcpus",
        "mem",
        "hugepages",
        "hugepagesz",
        "default_hugepagesz",
        "hugetlb_cma",
        "cma",
        "kexec_jump_back_entry",
    }
)
DROP_PREFIXES = ("rd.", "systemd.", "kdump_capture.")

# What a capture kernel needs (as RHEL and SUSE add them): reset devices left running by
# the crashed kernel, poll interrupts that may never arrive, no memory cgroup / NUMA / THP
# bookkeeping in a tiny reservation, no device-dump areas, and reboot 10 s after a panic
# of the capture kernel itself instead of hanging.
CAPTURE_OPTIONS = (
    "irqpoll",
    "reset_devices",
    "cgroup_disable=memory",
    "mce=off",
    "numa=off",
    "acpi_no_memhotplug",
    "transparent_hugepage=never",
    "novmcoredd",
    "cma=0",
    "hugetlb_cma=0",
    "panic=10",
)

REQUIRED_CONFIG = ("CONFIG_CRASH_DUMP", "CONFIG_PROC_VMCORE", "CONFIG_SYSFS")


def _key(option: str) -> str:
    return option.split("=", 1)[0]


def kernel_words(text: str, strict: bool = True) -> list[str]:
    """Split a kernel command line the way the kernel does (lib/cmdline.c next_arg).

    Blanks separate options except inside double quotes, which stay in the option (they
    are the kernel's to remove); single quotes mean nothing to the kernel. An unbalanced
    double quote raises ValueError when ``strict`` (a value from our configuration), and
    runs to the end of the line as the kernel takes it otherwise (/proc/cmdline).
    """
    words: list[str] = []
    word: list[str] = []
    quoted_at = -1
    for i, ch in enumerate(text):
        if ch == '"':
            quoted_at = -1 if quoted_at >= 0 else i
        if ch.isspace() and quoted_at < 0:
            if word:
                words.append("".join(word))
                word = []
            continue
        word.append(ch)
    if quoted_at >= 0 and strict:
        raise ValueError(f'unbalanced double quote (the " at character {quoted_at + 1})')
    if word:
        words.append("".join(word))
    return words


def kexec_words(options: str) -> list[str]:
    """KEXEC_OPTIONS as argv words (shell quoting); ValueError for an unbalanced quote."""
    try:
        return shlex.split(options)
    except ValueError:
        raise ValueError("unbalanced quote") from None


def capture_cmdline(proc_cmdline: str, commandline: str, append: str, cpus: int = 1) -> str:
    """The capture kernel's command line (pure).

    Base: KDUMP_COMMANDLINE when set (taken as written), else the running kernel's command
    line without the options in DROP_OPTIONS/DROP_PREFIXES. Then ``nr_cpus`` (KDUMP_CPUS;
    0 = no limit) and CAPTURE_OPTIONS, each only if the base or KDUMP_COMMANDLINE_APPEND
    does not set it already, then KDUMP_COMMANDLINE_APPEND last (the kernel takes the last
    value of a repeated option). Raises ValueError for an unbalanced double quote in
    ``commandline`` or ``append``.
    """
    if commandline.strip():
        base = kernel_words(commandline)
    else:
        words = kernel_words(proc_cmdline, strict=False)
        if "--" in words:  # arguments for the production system's init: not ours
            words = words[: words.index("--")]
        base = [o for o in words if _key(o) not in DROP_OPTIONS and not o.startswith(DROP_PREFIXES)]
    tail = kernel_words(append)
    given = {_key(o) for o in base + tail}
    extra = [f"nr_cpus={cpus}"] if cpus > 0 else []
    extra += CAPTURE_OPTIONS
    extra = [o for o in extra if _key(o) not in given]
    # "--" ends kernel options: everything after it goes to init; ours must precede it.
    if "--" in base:
        i = base.index("--")
        base, init_args = base[:i], base[i:]
    else:
        init_args = []
    return " ".join(base + extra + tail + init_args)


def parse_kernel_config(text: str) -> dict[str, str]:
    """``CONFIG_X=y`` lines -> {"CONFIG_X": "y"} (``# CONFIG_X is not set`` is absent)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, _, v = line.partition("=")
            out[k] = v.strip()
    return out


def check_kernel_config(cfg: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(problems, warnings) for kdump with this kernel configuration (pure)."""
    problems, warnings = [], []
    if cfg.get("CONFIG_KEXEC_FILE") != "y" and cfg.get("CONFIG_KEXEC") != "y":
        problems.append("neither CONFIG_KEXEC_FILE nor CONFIG_KEXEC is set")
    for name in REQUIRED_CONFIG:
        if cfg.get(name) != "y":
            problems.append(f"{name} is not set")
    if cfg.get("CONFIG_DEBUG_INFO") != "y":
        warnings.append("CONFIG_DEBUG_INFO is not set: crash needs a separate debug kernel")
    return problems, warnings


@dataclass(frozen=True)
class System:
    """Where this host's kernel interfaces live (other roots are for tests)."""

    proc: str = "/proc"
    sys: str = "/sys"
    boot: str = "/boot"
    release: str = field(default_factory=lambda: os.uname().release)

    def read(self, path: str) -> str | None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def crash_size(self) -> int:
        text = self.read(f"{self.sys}/kernel/kexec_crash_size")
        return int(text.strip() or "0") if text else 0

    def crash_loaded(self) -> bool:
        return (self.read(f"{self.sys}/kernel/kexec_crash_loaded") or "0").strip() == "1"

    def cmdline(self) -> str:
        return (self.read(f"{self.proc}/cmdline") or "").strip()

    def kernel_config(self, version: str) -> tuple[str, dict[str, str]]:
        """(where it came from, parsed config); ({}, "") when none is found."""
        if version == self.release:
            try:
                with gzip.open(f"{self.proc}/config.gz", "rt") as f:
                    return f"{self.proc}/config.gz", parse_kernel_config(f.read())
            except OSError:
                pass
        path = f"{self.boot}/config-{version}"
        text = self.read(path)
        return (path, parse_kernel_config(text)) if text is not None else ("", {})


def pick_kernel(kernelver: str, system: System) -> tuple[str, str]:
    """(version, image path) of the capture kernel for KDUMP_KERNELVER.

    Empty: the newest ``-kdump`` kernel in /boot if there is one, else the running kernel.
    An absolute path names the image itself; anything else is a version.
    """
    kv = kernelver.strip()
    if kv.startswith("/"):
        name = os.path.basename(kv)
        version = name.split("-", 1)[1] if name.startswith("vmlinuz-") else system.release
        return version, kv
    if not kv:
        try:
            kdumps = sorted(
                n
                for n in os.listdir(system.boot)
                if n.startswith("vmlinuz-") and n.endswith("-kdump")
            )
        except OSError:
            kdumps = []
        kv = kdumps[-1].removeprefix("vmlinuz-") if kdumps else system.release
    return kv, f"{system.boot}/vmlinuz-{kv}"


def initrd_path(version: str) -> str:
    return f"{INITRD_DIR}/initrd-{version}.img"


def needs_rebuild(initrd: str, config_path: str | None) -> bool:
    try:
        built = os.stat(initrd).st_mtime
    except OSError:
        return True
    if not config_path:
        return False
    try:
        return os.stat(config_path).st_mtime > built
    except OSError:
        return False


# ------------------------------------------------------------------ kexec


def kexec_file_load(kernel: str, initrd: str, cmdline: str, flags: int) -> None:
    """The kexec_file_load(2) system call; raises OSError with the kernel's errno."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ifd = os.open(initrd, os.O_RDONLY | os.O_CLOEXEC)
        try:
            arg = cmdline.encode() + b"\0"
            rc = libc.syscall(
                ctypes.c_long(SYS_KEXEC_FILE_LOAD),
                ctypes.c_int(kfd),
                ctypes.c_int(ifd),
                ctypes.c_ulong(len(arg)),
                ctypes.c_char_p(arg),
                ctypes.c_ulong(flags),
            )
            if rc != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        finally:
            os.close(ifd)
    finally:
        os.close(kfd)


def kexec_file_unload() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(
        ctypes.c_long(SYS_KEXEC_FILE_LOAD),
        ctypes.c_int(-1),
        ctypes.c_int(-1),
        ctypes.c_ulong(0),
        ctypes.c_char_p(None),
        ctypes.c_ulong(KEXEC_FILE_UNLOAD | KEXEC_FILE_ON_CRASH),
    )
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def kexec_binary_argv(
    kexec: str, kernel: str, initrd: str, cmdline: str, options: str
) -> list[str]:
    """The fallback command: ``kexec -p`` with KEXEC_OPTIONS (pure)."""
    return [
        kexec,
        "-p",
        *kexec_words(options),
        f"--initrd={initrd}",
        f"--command-line={cmdline}",
        kernel,
    ]


# Errors of kexec_file_load after which the kexec binary may still succeed: the call does
# not exist or is refused for this image format/kernel, as opposed to a problem the binary
# would hit too (no reservation, image too large for it).
FALLBACK_ERRNOS = {errno.ENOSYS, errno.ENOEXEC, errno.EKEYREJECTED, errno.EPERM}


def load_image(kernel: str, initrd: str, cmdline: str, kexec_options: str) -> str:
    """Load the capture kernel; returns how ("kexec_file_load" or the kexec command)."""
    try:
        kexec_file_load(kernel, initrd, cmdline, KEXEC_FILE_ON_CRASH)
        return "kexec_file_load"
    except OSError as e:
        first = e
    kexec = shutil.which("kexec")
    if first.errno not in FALLBACK_ERRNOS or kexec is None:
        raise LoadError(f"kexec_file_load failed: {first.strerror}") from None
    argv = kexec_binary_argv(kexec, kernel, initrd, cmdline, kexec_options)
    log.info("kexec_file_load failed (%s); trying %s", first.strerror, shlex.join(argv))
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise LoadError(
            f"kexec_file_load failed ({first.strerror}) and {kexec} failed: {r.stderr.strip()}"
        )
    return shlex.join(argv)


# ------------------------------------------------------------------ checks


@dataclass
class Readiness:
    """What ``check`` found; ``problems`` empty means kdump can be loaded here."""

    version: str
    kernel: str
    initrd: str
    cmdline: str
    reserved: int
    loaded: bool
    config_source: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        mib = self.reserved / (1024 * 1024)
        initrd_state = "present" if os.path.exists(self.initrd) else "missing: load builds it"
        out = [
            f"capture kernel: {self.kernel} ({self.version})",
            f"kernel config:  {self.config_source or 'not found'}",
            "reservation:    "
            + (f"{mib:.0f} MiB (crashkernel=)" if self.reserved else "none (no crashkernel=)"),
            f"initramfs:      {self.initrd} ({initrd_state})",
            f"command line:   {self.cmdline}",
            f"loaded:         {'yes' if self.loaded else 'no'}",
            f"page loops:     {speedups.describe()}",
        ]
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"problem: {p}" for p in self.problems]
        return out


def check_load_values(cfg: Mapping[str, str]) -> None:
    """ConfigError (exit 2, naming FILE:LINE when ``cfg`` is a Config) for a command line
    or KEXEC_OPTIONS that cannot be split into words (an unbalanced quote).

    load_config checks the same with the same functions; this keeps ``load`` and ``check``
    from failing with a traceback on a mapping that did not come from it.
    """
    from .config import Config

    splitters = {
        "KDUMP_COMMANDLINE": kernel_words,
        "KDUMP_COMMANDLINE_APPEND": kernel_words,
        "KEXEC_OPTIONS": kexec_words,
    }
    for name, split in splitters.items():
        try:
            split(cfg[name])
        except ValueError as e:
            if isinstance(cfg, Config):
                raise cfg.error(name, str(e)) from None
            raise ConfigError(f"{name}: {e}") from None


def readiness(cfg: Mapping[str, str], system: System, initrd: str | None = None) -> Readiness:
    check_load_values(cfg)
    version, kernel = pick_kernel(cfg["KDUMP_KERNELVER"], system)
    try:
        cpus = int(cfg["KDUMP_CPUS"])
    except (KeyError, ValueError):
        cpus = 1
    r = Readiness(
        version=version,
        kernel=kernel,
        initrd=initrd or initrd_path(version),
        cmdline=capture_cmdline(
            system.cmdline(), cfg["KDUMP_COMMANDLINE"], cfg["KDUMP_COMMANDLINE_APPEND"], cpus
        ),
        reserved=system.crash_size(),
        loaded=system.crash_loaded(),
        config_source="",
    )
    source, kconfig = system.kernel_config(version)
    r.config_source = source
    if kconfig:
        problems, warnings = check_kernel_config(kconfig)
        r.problems += problems
        r.warnings += warnings
    else:
        r.warnings.append(f"no kernel config found ({system.proc}/config.gz, /boot/config-*)")
    if not os.path.exists(kernel):
        r.problems.append(f"capture kernel image {kernel} does not exist")
    if not r.reserved:
        r.problems.insert(0, NOT_RESERVED)
    return r


# ------------------------------------------------------------------ commands


def _config(args: argparse.Namespace):
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    for w in cfg.warnings:
        log.warning("%s", w)
    return cfg


# Load-side directives this engine does not implement, with the value that means "off"
# (checked by check, load and initramfs build; a capture kernel never refuses a dump over them).
LOAD_UNSUPPORTED = {
    "KDUMP_UPDATE_BOOTLOADER": (
        "writing crashkernel= into the boot loader (add crashkernel= to the kernel command "
        "line yourself; `kdump-capture check` shows the reservation)"
    ),
    "KDUMP_CRASHKERNEL": (
        "setting the crashkernel= reservation from the configuration (add crashkernel= "
        "to the kernel command line yourself)"
    ),
}


def check_supported(cfg) -> None:
    """NotSupported (exit 9) for any feature, of either side, that this build cannot honour.

    Also the dump side's: an image loaded with such a configuration would fail in the
    capture kernel, when it is too late to fix it.
    """
    from .cli import check_unsupported

    for name, what in LOAD_UNSUPPORTED.items():
        if cfg.value(name):  # "" or a false boolean means the feature is off
            raise cfg.not_supported(name, what)
    check_unsupported(cfg)


# KDUMP_VERBOSE bits that SUSE's loader honours: the load command line to syslog, and to stdout.
VERBOSE_SYSLOG = 1
VERBOSE_STDOUT = 4
SYSLOG_SOCKET = "/dev/log"
KMSG = "/dev/kmsg"
# syslog priority: facility user (1 << 3) | severity notice (5)
SYSLOG_PRI = 13


def announce_load(line: str, verbose: int, socket_path: str = SYSLOG_SOCKET, kmsg: str = KMSG):
    """Report the load command line as KDUMP_VERBOSE asks (SUSE: bits 1 and 4 on load).

    Bit 4 prints it; bit 1 sends it to syslog through ``socket_path``, or when no syslog
    listens there (early boot, a minimal or capture system) to the kernel log via ``kmsg``.
    Logging is best effort: it never stops a load.
    """
    if verbose & VERBOSE_STDOUT:
        print(f"load command: {line}", flush=True)
    if not verbose & VERBOSE_SYSLOG:
        return
    import socket

    msg = f"kdump-capture[{os.getpid()}]: load command: {line}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(socket_path)
            s.send(f"<{SYSLOG_PRI}>{msg}".encode())
        return
    except OSError as e:
        log.debug("syslog at %s: %s; using %s", socket_path, e.strerror, kmsg)
    try:
        fd = os.open(kmsg, os.O_WRONLY | os.O_CLOEXEC)
        try:
            # /dev/kmsg takes one record per write, at most 1 KiB of it shown (LOG_LINE_MAX)
            os.write(fd, f"<{SYSLOG_PRI}>{msg}\n".encode()[:1024])
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot log the load command to syslog or %s: %s", kmsg, e.strerror)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_supported(cfg)
    r = readiness(cfg, System())
    for line in r.lines():
        print(line)
    if r.problems:
        print("result: kdump is not possible here (nothing was changed)")
        return LoadError.exit_code
    print("result: ready to load")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_supported(cfg)
    system = System()
    r = readiness(cfg, system, args.initrd)
    kernel = args.kernel or r.kernel
    if not r.reserved:
        raise LoadError(NOT_RESERVED)
    problems = [p for p in r.problems if not (args.kernel and "capture kernel image" in p)]
    if problems:
        raise LoadError("; ".join(problems))
    if needs_rebuild(r.initrd, args.config if not args.initrd else None):
        if args.initrd:
            raise LoadError(f"initramfs {r.initrd} does not exist")
        report = _build(cfg, r.initrd, r.version, None, "zstd", "", "")
        print(report.summary())
    if system.crash_loaded():
        try:
            kexec_file_unload()
        except OSError as e:
            log.info("unloading the previous capture kernel failed: %s", e.strerror)
    how = load_image(kernel, r.initrd, r.cmdline, cfg["KEXEC_OPTIONS"])
    if not system.crash_loaded():
        raise LoadError(f"{how} returned success but {system.sys}/kernel/kexec_crash_loaded is 0")
    print(f"loaded capture kernel {kernel} with {r.initrd} ({how})")
    print(f"command line: {r.cmdline}")
    announce_load(load_command(how, kernel, r.initrd, r.cmdline), cfg.verbose)
    return 0


def load_command(how: str, kernel: str, initrd: str, cmdline: str) -> str:
    """The load as one line: the kexec command when the binary loaded it, else the call."""
    if how != "kexec_file_load":
        return how  # load_image returns the kexec binary's command line
    return (
        f"kexec_file_load kernel={shlex.quote(kernel)} initrd={shlex.quote(initrd)} "
        f"cmdline={shlex.quote(cmdline)} flags=KEXEC_FILE_ON_CRASH"
    )


def cmd_unload(args: argparse.Namespace) -> int:
    system = System()
    if not system.crash_loaded():
        print("no capture kernel is loaded (nothing was changed)")
        return 0
    try:
        kexec_file_unload()
    except OSError as e:
        raise LoadError(f"unloading the capture kernel failed: {e.strerror}") from None
    print("capture kernel unloaded")
    return 0


def last_dump(cfg: Mapping[str, str]) -> str:
    from .urls import parse_savedir

    try:
        targets, _ = parse_savedir(cfg["KDUMP_SAVEDIR"])
    except ConfigError as e:
        return f"unknown ({e})"
    t = targets[0]
    if t.scheme != "file":
        return f"not checked ({t.scheme} target)"
    try:
        dirs = sorted(d for d in os.listdir(t.path) if os.path.isdir(os.path.join(t.path, d)))
    except OSError:
        return "none"
    return os.path.join(t.path, dirs[-1]) if dirs else "none"


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    system = System()
    loaded = system.crash_loaded()
    size = system.crash_size()
    targets = cfg["KDUMP_SAVEDIR"]
    print(f"loaded:      {'yes' if loaded else 'no'}")
    print(
        "reservation: "
        + (f"{size / (1024 * 1024):.0f} MiB" if size else "none: kdump is not possible here")
    )
    from .urls import parse_savedir

    shown = " ".join(t.redacted() for t in parse_savedir(targets)[0])
    print(f"target:      {shown}")
    print(f"last dump:   {last_dump(cfg)}")
    return 0 if loaded else LoadError.exit_code


def cmd_test_crash(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            "test-crash crashes this machine at once (sysrq-c) to test kdump; "
            "run it again with --yes to do so"
        )
        return 2
    system = System()
    if not system.crash_loaded():
        raise LoadError(
            "no capture kernel is loaded: a crash now would save nothing; "
            "run 'kdump-capture load' first (nothing was changed)"
        )
    print("crashing the kernel now (sysrq-c)", flush=True)
    os.sync()
    with open(f"{system.proc}/sys/kernel/sysrq", "w") as f:
        f.write("1")
    with open(f"{system.proc}/sysrq-trigger", "w") as f:
        f.write("c")
    return 1  # not reached when the crash happens


def _build(cfg, output, version, modules_root, compress, device, fstype):
    from initramfs.builder import build

    return build(
        cfg,
        output,
        kernel_version=version,
        modules_root=modules_root,
        compress=compress,
        target_device=device,
        target_fstype=fstype,
    )


def cmd_initramfs_build(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_supported(cfg)
    version = args.kernel_version or pick_kernel(cfg["KDUMP_KERNELVER"], System())[0]
    report = _build(
        cfg,
        args.output,
        version,
        args.modules_root,
        args.compress,
        args.target_device,
        args.target_fstype,
    )
    print(report.summary())
    return 0


def cmd_initramfs_dracut_module(args: argparse.Namespace) -> int:
    from initramfs.dracut_module import install

    for path in install(args.dest):
        print(path)
    return 0


def add_subcommands(sub) -> None:
    """Register check, load, unload, status, test-crash and initramfs on the CLI."""
    from .cli import config_args as _config_args

    p = sub.add_parser("check", help="report whether this kernel can do kdump (changes nothing)")
    _config_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("load", help="load the capture kernel (kexec_file_load, crash flag)")
    _config_args(p)
    p.add_argument("--kernel", metavar="FILE", help="capture kernel image (default from config)")
    p.add_argument("--initrd", metavar="FILE", help="use this initramfs instead of building one")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("unload", help="unload the capture kernel")
    _config_args(p)
    p.set_defaults(func=cmd_unload)

    p = sub.add_parser("status", help="loaded or not, reservation, target, last dump")
    _config_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("test-crash", help="crash this machine now to test kdump (needs --yes)")
    _config_args(p)
    p.add_argument("--yes", action="store_true", help="really crash the machine")
    p.set_defaults(func=cmd_test_crash)

    p = sub.add_parser("initramfs", help="capture initramfs commands")
    isub = p.add_subparsers(dest="initramfs_command", required=True, metavar="COMMAND")
    b = isub.add_parser("build", help="build the capture initramfs")
    _config_args(b)
    b.add_argument("--output", required=True, metavar="FILE")
    b.add_argument("--kernel-version", metavar="VER", help="default: the capture kernel's")
    b.add_argument("--modules-root", metavar="DIR", help="default /lib/modules/VER")
    b.add_argument("--compress", choices=("zstd", "gzip"), default="zstd")
    b.add_argument(
        "--target-device",
        default="",
        metavar="DEV",
        help="filesystem of a local target (LABEL=, UUID= or /dev/...); default: the one "
        "holding KDUMP_SAVEDIR on this host",
    )
    b.add_argument("--target-fstype", default="", metavar="TYPE", help="e.g. ext4 (default: probe)")
    b.set_defaults(func=cmd_initramfs_build)
    d = isub.add_parser(
        "dracut-module", help="install the dracut module kdump-capture (for dracut --add)"
    )
    d.add_argument(
        "--dest",
        default="/usr/lib/dracut/modules.d/99kdump-capture",
        metavar="DIR",
        help="module directory (default %(default)s)",
    )
    d.set_defaults(func=cmd_initramfs_dracut_module)
    # "initramfs" alone would have no handler; argparse requires the sub-command.
    p.set_defaults(func=cmd_initramfs_build)
