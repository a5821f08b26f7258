"""The load-side commands: check, load, unload, status, test-crash and initramfs build.

Nothing here changes the system unless the command is ``load``, ``unload``, ``test-crash
--yes`` or ``initramfs build``; on a kernel without a crashkernel reservation every command
says so and changes nothing.

The CLI registers these commands in the capture kernel too, so this module's top level
imports only what argparse needs; each command imports its machinery when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..cliargs import config_args, load_config
from ..errors import ConfigError, LoadError

log = logging.getLogger(__name__)


# What ``load`` passes to the builder for the default image (see image_decision).
DEFAULT_COMPRESS = "zstd"


@dataclass
class ImageDecision:
    """Whether ``load`` builds the image, and why; and what it repairs."""

    path: str
    rebuild: list[str]  # reasons; empty: the image is up to date
    given: bool  # --initrd: used as it is, never rebuilt
    loose_modes: list[str]  # files or directories others can read

    def line(self) -> str:
        if self.given:
            state = "given with --initrd; used as it is"
        elif not self.rebuild:
            state = "up to date"
        elif self.rebuild == ["there is no image yet"]:
            state = "missing: load builds it"
        else:
            state = f"stale ({', '.join(self.rebuild)}): load rebuilds it"
        if self.loose_modes:
            state += f"; readable by others: {', '.join(self.loose_modes)} (load repairs it)"
        return state


def image_decision(
    cfg: Mapping[str, str], version: str, initrd: str | None, directory: str = ""
) -> ImageDecision:
    """What ``load`` does about the capture initramfs for ``cfg`` (reads only).

    The default image is rebuilt when anything it is built from differs from the record
    beside it (``rebuild.stale_reasons``): the effective configuration with ``--set``,
    our code, the interpreter, kernel, modules, keys and known_hosts.
    """
    if initrd:  # (also how the VM tests' first kernel loads: it has no builder)
        return ImageDecision(initrd, [], True, [])
    from .rebuild import image_inputs, record_path, stale_reasons
    from .system import INITRD_DIR, initrd_path

    directory = directory or INITRD_DIR
    path = os.path.join(directory, os.path.basename(initrd_path(version)))
    inputs = image_inputs(
        cfg,
        kernel_version=version,
        modules_root=None,
        compress=DEFAULT_COMPRESS,
        target_device="",
        target_fstype="",
    )
    loose = []
    for p, private_mode in ((directory, 0o700), (path, 0o600), (record_path(path), 0o600)):
        try:
            mode = os.lstat(p).st_mode & 0o777
        except OSError:
            continue
        if mode & ~private_mode:
            loose.append(f"{p} ({mode:o})")
    return ImageDecision(path, stale_reasons(path, inputs), False, loose)


def image_facts(
    cfg: Mapping[str, str],
    version: str,
    initrd: str | None,
    decision: ImageDecision | None = None,
) -> tuple[dict, str]:
    """What ``estimate`` needs to know about the image ({} if unknown), and a note.
    ``decision``: the image's, when the caller has it (it digests every input)."""
    from .rebuild import read_facts

    decision = decision or image_decision(cfg, version, initrd)
    if decision.given or not decision.rebuild:
        facts = read_facts(decision.path)
        if facts:
            return facts, f"image {decision.path}"
        return {}, f"{decision.path} has no record of its sizes (built by another tool?)"
    return {}, f"the image {decision.path} is {decision.line().split(':')[0]}"


def cmd_estimate(args: argparse.Namespace) -> int:
    import tempfile

    from .estimate import current_reservation, describe, estimate, machine_max_pfn
    from .system import System, pick_kernel

    cfg = load_config(args)
    version = pick_kernel(cfg["KDUMP_KERNELVER"], System())[0]
    facts, note = image_facts(cfg, version, args.initrd)
    if not facts:
        if args.initrd:
            raise LoadError(f"cannot estimate: {note}; build it with 'initramfs build'")
        # Build the image load would build, in a private temporary place (nothing changes).
        print(f"{note}: building one to measure it (as load would)", flush=True)
        with tempfile.TemporaryDirectory(prefix="kdump-estimate-") as tmp:
            report = _build(cfg, f"{tmp}/initrd.img", version, None, DEFAULT_COMPRESS, "", "")
        facts, note = report.facts, "a fresh image (not kept)"
    e = estimate(cfg, facts, machine_max_pfn())
    print(f"from {note}, kernel {version}")
    for line in describe(e, current_reservation()):
        print(line)
    return 0


def _dump_device_problems(cfg: Mapping[str, str]) -> list[str]:
    """What the capture kernel would refuse about KDUMP_DUMPDEV: found by `check`, and
    refused by `load`, on the running system rather than after a crash."""
    if not cfg["KDUMP_DUMPDEV"]:
        return []
    from ..dumpdev import inspect_device
    from ..errors import DumpDeviceError

    try:
        inspect_device(cfg["KDUMP_DUMPDEV"])
    except DumpDeviceError as e:
        return [str(e)]
    return []


def reservation_check(
    cfg: Mapping[str, str], facts: Mapping[str, int], reserved: int
) -> tuple[int | None, str | None]:
    """The reservation this configuration's image (``facts``, its record) needs, None when
    unknown, and the warning when ``reserved`` is below it: ``check`` and ``load`` say it."""
    from .estimate import below_estimate, estimate, machine_max_pfn

    if not facts:
        return None, None
    need = estimate(cfg, facts, machine_max_pfn()).crashkernel
    return need, below_estimate(reserved, need)


def cmd_check(args: argparse.Namespace) -> int:
    from ..features import check_supported
    from .kexec import fit_problem
    from .system import System, readiness

    cfg = load_config(args)
    check_supported(cfg)
    r = readiness(cfg, System())
    decision = image_decision(cfg, r.version, None)
    r.image_state = decision.line()
    r.problems += _dump_device_problems(cfg)
    if r.reserved and (too_large := fit_problem(r.kernel, decision.path, r.reserved)):
        r.problems.append(too_large)
    need, warning = reservation_check(
        cfg, image_facts(cfg, r.version, None, decision)[0], r.reserved
    )
    r.estimate = need or 0
    if warning:
        r.warnings.append(warning)
    if not args.no_targets:
        import signal

        from ..cli import _on_term
        from .targets import probe_targets

        # A SIGTERM (a timeout's, systemd's) ends a probe as Ctrl-C does: its test
        # directory is deleted on the way out, not left on the target.
        signal.signal(signal.SIGTERM, _on_term)

        reports = probe_targets(cfg, args.write_test)
        r.targets = [t.line() for t in reports]
        failed = [t for t in reports if t.problem]
        if failed and len(failed) == len(reports):
            r.problems.append("no target in KDUMP_SAVEDIR works from here (see 'target:')")
        elif failed:
            r.warnings.append(
                f"{len(failed)} of the {len(reports)} targets in KDUMP_SAVEDIR failed here: "
                "a dump goes to the next one that works"
            )
    for line in r.lines():
        print(line)
    if r.problems:
        print("result: kdump is not possible here (nothing was changed)")
        return LoadError.exit_code
    print("result: ready to load")
    return 0


def prepare_image(cfg: Mapping[str, str], decision: ImageDecision, version: str) -> None:
    """Repair the modes of the default image and its directory; rebuild it when stale."""
    if decision.given:
        if not os.path.exists(decision.path):
            raise LoadError(f"initramfs {decision.path} does not exist")
        return
    from .. import private
    from .rebuild import record_path

    private.make_dir(os.path.dirname(decision.path), repair=True)
    for p in (decision.path, record_path(decision.path)):
        if os.path.exists(p) and private.repair_file(p):
            log.warning("%s was readable by others; it is 0600 now", p)
    if decision.rebuild:
        log.info("building %s: %s", decision.path, "; ".join(decision.rebuild))
        report = _build(cfg, decision.path, version, None, DEFAULT_COMPRESS, "", "")
        print(report.summary())


def cmd_load(args: argparse.Namespace) -> int:
    from ..features import check_supported
    from .system import NOT_RESERVED, System, readiness

    cfg = load_config(args)
    check_supported(cfg)
    system = System()
    r = readiness(cfg, system, args.initrd)
    kernel = args.kernel or r.kernel
    if not r.reserved:
        raise LoadError(NOT_RESERVED)
    problems = [p for p in r.problems if not (args.kernel and "capture kernel image" in p)]
    problems += _dump_device_problems(cfg)
    if problems:
        raise LoadError("; ".join(problems))
    with contextlib.ExitStack() as held:
        if not args.initrd:
            # One load at a time decides, builds and loads: of two at once (a package
            # hook's beside an admin's), the one that loads last loads its own image.
            from .. import private
            from .system import INITRD_DIR

            private.make_dir(INITRD_DIR, repair=True)
            try:
                held.enter_context(private.dir_lock(INITRD_DIR, what="another load"))
            except TimeoutError as e:
                raise LoadError(f"{e}; nothing was changed") from None
        return _load_locked(args, cfg, system, r, kernel)


def _load_locked(args, cfg, system, r, kernel) -> int:
    from .kexec import announce_load, fit_problem, kexec_file_unload, load_command, load_image
    from .rebuild import read_facts

    decision = image_decision(cfg, r.version, args.initrd)
    prepare_image(cfg, decision, r.version)
    # Before anything is unloaded: the kernel frees the loaded capture kernel before it
    # tries a new one, so a load that cannot fit would leave the machine without kdump.
    too_large = fit_problem(kernel, r.initrd, r.reserved)
    if too_large:
        raise LoadError(f"{too_large}; the loaded capture kernel was left as it is")
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
    # at boot, the unit's journal is where an administrator sees it before a crash does
    warning = reservation_check(cfg, read_facts(decision.path), r.reserved)[1]
    if warning:
        log.warning("%s", warning)
    announce_load(load_command(how, kernel, r.initrd, r.cmdline), cfg.verbose)
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    from .kexec import kexec_file_unload
    from .system import System

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


def last_dump(cfg) -> str:
    """This host's newest dump on any KDUMP_SAVEDIR target (as ``list`` reads it: bounded,
    read-only, within KDUMP_NET_TIMEOUT per operation), or why there is none."""
    import time

    from ..fleet import own_dumps as find

    try:
        _host, found = find(cfg)
    except ConfigError as e:
        return f"unknown ({e})"
    dated = [p for p in found if p.item.crash_time is not None]
    if not dated:
        return "none"
    p = max(dated, key=lambda p: (p.item.crash_time, p.item.directory))
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(p.item.crash_time))
    return f"{p.target.rstrip('/')}/{p.item.directory} ({p.item.status}, {when}, {p.item.panic})"


def cmd_status(args: argparse.Namespace) -> int:
    from .system import System

    cfg = load_config(args)
    system = System()
    loaded = system.crash_loaded()
    size = system.crash_size()
    targets = cfg["KDUMP_SAVEDIR"]
    print(f"loaded:      {'yes' if loaded else 'no'}")
    print(
        "reservation: "
        + (f"{size / (1024 * 1024):.0f} MiB" if size else "none: kdump is not possible here")
    )
    from ..urls import parse_savedir

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
    from .system import System

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
    from ..features import check_supported
    from .system import System, pick_kernel

    cfg = load_config(args)
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
    p = sub.add_parser("check", help="report whether this kernel can do kdump and the targets work")
    config_args(p)
    p.add_argument(
        "--write-test",
        action="store_true",
        help="also write, read back and delete a small file on each target",
    )
    p.add_argument("--no-targets", action="store_true", help="do not connect to the targets")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("load", help="load the capture kernel (kexec_file_load, crash flag)")
    config_args(p)
    p.add_argument("--kernel", metavar="FILE", help="capture kernel image (default from config)")
    p.add_argument("--initrd", metavar="FILE", help="use this initramfs instead of building one")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser(
        "estimate", help="recommend crashkernel= for this machine and configuration (measured)"
    )
    config_args(p)
    p.add_argument("--initrd", metavar="FILE", help="estimate for this image (built by us)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("unload", help="unload the capture kernel")
    config_args(p)
    p.set_defaults(func=cmd_unload)

    p = sub.add_parser("status", help="loaded or not, reservation, target, last dump")
    config_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("test-crash", help="crash this machine now to test kdump (needs --yes)")
    config_args(p)
    p.add_argument("--yes", action="store_true", help="really crash the machine")
    p.set_defaults(func=cmd_test_crash)

    p = sub.add_parser("initramfs", help="capture initramfs commands")
    isub = p.add_subparsers(dest="initramfs_command", required=True, metavar="COMMAND")
    b = isub.add_parser("build", help="build the capture initramfs")
    config_args(b)
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
