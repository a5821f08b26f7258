"""Command-line interface: ``kdump-capture save`` and friends."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import sys

from . import __version__
from .cliargs import config_args
from .cliargs import load_config as load
from .errors import (
    EXIT_CODES,
    ConfigError,
    IncompleteDump,
    Interrupted,
    KdumpError,
    NoDumpError,
    NotSupported,
    VerifyError,
    WatchdogStop,
)
from .features import check_unsupported
from .urls import redact

log = logging.getLogger("kdump_capture")


class RedactingFormatter(logging.Formatter):
    """Every log line, tracebacks included, goes through urls.redact before it is shown.

    Our own messages name targets by their redacted form already; this also covers what
    libraries (paramiko, smbprotocol, ftplib) put into exceptions and debug output.
    """

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one console line: names from a shared target or the crashed kernel may
        # hold newlines or escape sequences that would forge lines (a fake "Dump saved") or
        # drive the terminal. The traceback, added after this, keeps its lines.
        return escape_controls(super().formatMessage(record))


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as ``\\xNN``."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _setup_logging(debug: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("kdump: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("paramiko", "smbprotocol", "spnego", "botocore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # paramiko logs every failure of its reader thread as ERROR lines, a traceback each
    # (about 20 for a server that never sends its banner); our own error says what failed.
    logging.getLogger("paramiko.transport").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    # Even in debug mode, not a line per SMB message received: about 100 KB per GB dumped,
    # 9 s per GB of a 115200-baud serial console. Its INFO lines (a connect, a disconnect)
    # only in debug mode, as for the rest of smbprotocol.
    logging.getLogger("smbprotocol.transport").setLevel(logging.INFO if debug else logging.WARNING)


def transport_settings(cfg, replay_bytes: int | None = None, read_only: bool = False):
    """What the transports take from the configuration (save, recover and verify); the
    replay ring from MemAvailable unless given (memory.plan_buffers). ``read_only`` (list,
    verify): connecting creates no directory and wants no write access."""
    from transports.base import TransportSettings

    from . import memory

    if replay_bytes is None:
        replay_bytes = memory.plan_buffers(memory.mem_available(), memory.usable_cpus()).replay
    s3 = {
        "s3_access_key": cfg["KDUMP_S3_ACCESS_KEY"],
        "s3_secret_key": cfg["KDUMP_S3_SECRET_KEY"],
        "s3_region": cfg["KDUMP_S3_REGION"],
        "s3_ca_bundle": cfg["KDUMP_S3_CA_BUNDLE"],
    }
    return TransportSettings(
        timeout=float(max(cfg.net_timeout, 5)),
        ssh_identity=cfg.ssh_identity,
        host_key=cfg.host_key,
        debug=bool(cfg.verbose & 8),
        replay_bytes=replay_bytes,
        checksum=cfg.checksum,
        read_only=read_only,
        extra={k: v for k, v in s3.items() if v},
    )


def with_config_password(target, cfg):
    """``target`` with the password of the KDUMP_SAVEDIR entry for the same server and user,
    when the URL has none: list and verify take credentials from the configuration, so that
    a password never has to go on the command line (argv is readable by every user). S3
    too: a KDUMP_SAVEDIR of ``s3://KEY:SECRET@host/...`` gives its key and secret (the
    KDUMP_S3_* directives serve a URL without them)."""
    if target.password is not None or target.scheme == "file":
        return target
    server = (target.scheme, target.host.lower(), target.port)
    for t in cfg.savedir:
        same = (t.scheme, t.host.lower(), t.port) == server
        if same and t.password is not None and target.user in (None, t.user):
            return target.replace(user=t.user, password=t.password)
    return target


def make_plan(cfg):
    """Resolve the configuration into a SavePlan; unsupported settings fail here, early.
    Buffers are sized from MemAvailable now (memory.plan_buffers)."""
    from transports import transport_class

    from . import memory
    from .pipeline import SavePlan

    check_unsupported(cfg)
    targets = cfg.savedir
    for t in targets:
        try:
            transport_class(t.scheme)  # a configured scheme that cannot load fails now
        except NotSupported as e:
            raise NotSupported(f"{cfg.location('KDUMP_SAVEDIR')}: {t.redacted()}: {e}") from None
    buffers = memory.plan_buffers(memory.mem_available(), memory.usable_cpus())
    settings = transport_settings(cfg, buffers.replay)
    return SavePlan(
        targets=targets,
        dump_format=cfg.dumpformat,
        dump_level=cfg.dumplevel,
        keep_old_dumps=cfg.keep_old_dumps,
        free_disk_size=cfg.free_disk_size,
        settings=settings,
        buffers=buffers,
        hostname=cfg["KDUMP_HOSTNAME"],
        encrypt_to=cfg.encrypt_to,
        encrypt_summary=cfg.encrypt_summary,
    )


def _on_term(signum, frame):
    raise Interrupted(f"interrupted by signal {signum}")


def _on_watchdog(signum, frame):
    raise WatchdogStop(
        "stopped by the capture kernel's watchdog: no progress for KDUMP_SAVE_TIMEOUT seconds"
    )


def _sample_file(mib: int) -> str:
    """A temporary file holding the built-in synthetic sample vmcore (``save --sample``)."""
    import tempfile

    from .sample import write_demo

    fd, tmp = tempfile.mkstemp(prefix="kdump-sample-", suffix=".vmcore")
    os.close(fd)
    try:
        write_demo(tmp, mib)
    except BaseException:
        os.unlink(tmp)
        raise
    log.info("using a built-in synthetic %d MiB sample vmcore", mib)
    return tmp


def _pre_or_post_script(cfg, directive: str, env: dict[str, str], heartbeat) -> None:
    """Run KDUMP_PRESCRIPT or KDUMP_POSTSCRIPT; a failure stops the save only with
    KDUMP_CONTINUE_ON_ERROR=false. That includes hanging: when /init's watchdog stops the
    save while the script runs (no progress for KDUMP_SAVE_TIMEOUT seconds), the script
    is killed (scripts.run_script) and the save goes on, /init told so (heartbeat)."""
    from .scripts import check_script, run_script

    try:
        status = run_script(directive, cfg[directive], env)
    except WatchdogStop as e:
        if not cfg.continue_on_error:
            raise
        log.error("%s failed (%s); continuing (KDUMP_CONTINUE_ON_ERROR)", directive, e)
        heartbeat.resumed()
        return
    check_script(directive, status, cfg.continue_on_error)


def cmd_save(args: argparse.Namespace) -> int:
    from .memory import MemoryLog, mem_available, plan_buffers, usable_cpus

    memlog = MemoryLog(available=mem_available())
    memlog.mark("interpreter and CLI")
    from . import finish
    from .heartbeat import Heartbeat
    from .pipeline import save
    from .progress import make_progress
    from .scripts import check_transfer, run_script
    from .vmcore import find_source, open_vmcore

    memlog.mark("engine")
    cfg = load(args)
    _setup_logging(bool(cfg.verbose & 8))
    dumpdev = cfg["KDUMP_DUMPDEV"]
    # Before any command of the administrator's runs: the watchdog's SIGUSR1 or a SIGTERM
    # while KDUMP_TRANSFER or KDUMP_PRESCRIPT hangs is a failure with its message and exit
    # 130, the command stopped (scripts.run_script), not a death by signal.
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGUSR1, _on_watchdog)  # /init's watchdog (heartbeat.py)
    heartbeat = Heartbeat.from_env(os.environ)
    if cfg["KDUMP_TRANSFER"]:
        # The administrator's command replaces the whole built-in flow (SUSE semantics). Its
        # source as for the built-in save: --sample's, or --vmcore's checked (exit 3 when it
        # is missing, not a KDUMP_TRANSFER failure), or /proc/vmcore.
        tmp = _sample_file(args.sample_mib) if args.sample else None
        try:
            source = tmp or find_source(args.vmcore)
            env = {"KDUMP_VMCORE": source}
            status = run_script("KDUMP_TRANSFER", cfg["KDUMP_TRANSFER"], env)
        finally:
            if tmp:
                os.unlink(tmp)
        check_transfer(status)
        print("KDUMP_TRANSFER finished (exit status 0)")
        if finish.should_reboot(cfg.immediate_reboot, args.no_reboot, dumpdev):
            finish.reboot()
        return 0
    check_unsupported(cfg)
    plan = None if dumpdev else make_plan(cfg)
    if plan is not None:
        memlog.plan = plan.buffers
        memlog.mark("transport libraries")
    if cfg["KDUMP_PRESCRIPT"]:
        _pre_or_post_script(cfg, "KDUMP_PRESCRIPT", {}, heartbeat)
    heartbeat.beat(0, force=True)
    tmp = None
    failure: KdumpError | None = None
    try:
        if args.sample:
            source = tmp = _sample_file(args.sample_mib)
        else:
            source = find_source(args.vmcore)
        with open_vmcore(source, map_notes=True) as vm:
            log.info(
                "vmcore %s: %s bytes, kernel %s, %d CPUs",
                source,
                vm.size,
                vm.release or "?",
                vm.nr_cpus,
            )
            if dumpdev:
                from .dumpdev import write_dump

                buffers = plan_buffers(mem_available(), usable_cpus())
                progress = heartbeat.around(make_progress(cfg.verbose, style=args.progress))
                overwrite = bool(cfg.value("KDUMP_DUMPDEV_OVERWRITE"))
                header = write_dump(
                    vm, dumpdev, cfg.dumpformat, cfg.dumplevel, progress, buffers, overwrite
                )
            else:
                progress = heartbeat.around(make_progress(cfg.verbose, style=args.progress))
                result = save(vm, plan, progress, memlog)
    except Interrupted:
        raise  # stopped (a signal, the watchdog): the capture kernel is about to end it
    except KdumpError as e:
        if not (cfg["KDUMP_POSTSCRIPT"] and cfg.continue_on_error):
            raise
        failure = e  # SUSE runs the post-script after a failed save too
    finally:
        if tmp:
            os.unlink(tmp)
        log.info("%s", memlog.report())
    if failure is not None:
        log.error("the dump was not saved: %s; running KDUMP_POSTSCRIPT", failure)
        env = {"KDUMP_DUMP_STATUS": "failed", "KDUMP_DUMP_URL": "", "KDUMP_DUMP_DIR": ""}
        env["KDUMP_DUMP_DEVICE"] = ""
        _pre_or_post_script(cfg, "KDUMP_POSTSCRIPT", env, heartbeat)
        raise failure
    if dumpdev:
        print(f"Dump written to {dumpdev} ({header.data_size} bytes).")
        env = {"KDUMP_DUMP_DEVICE": dumpdev, "KDUMP_DUMP_URL": "", "KDUMP_DUMP_DIR": ""}
    else:
        print(f"Dump saved: {result.target}/{result.directory}")
        env = {"KDUMP_DUMP_URL": result.target, "KDUMP_DUMP_DIR": result.directory}
    env["KDUMP_DUMP_STATUS"] = "saved"
    if cfg["KDUMP_POSTSCRIPT"]:
        _pre_or_post_script(cfg, "KDUMP_POSTSCRIPT", env, heartbeat)
    if dumpdev:
        print(
            "Not rebooting (KDUMP_DUMPDEV is set): check the system from this console (fsck "
            "the filesystems, say), then leave it to reboot; in the system, `kdump-capture "
            "recover` (or kdump-capture-recover.service at boot) copies the dump to KDUMP_SAVEDIR"
        )
        return 0
    if finish.should_reboot(cfg.immediate_reboot, args.no_reboot, cfg["KDUMP_DUMPDEV"]):
        print("Rebooting (KDUMP_IMMEDIATE_REBOOT=yes)", flush=True)
        finish.reboot()
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from . import dumpdev

    cfg = load(args)
    _setup_logging(bool(cfg.verbose & 8))
    device = args.device or cfg["KDUMP_DUMPDEV"]
    if not device:
        if args.if_present:
            return 0  # nothing configured: the boot-time unit has nothing to do
        raise ConfigError("no dump device: set KDUMP_DUMPDEV or pass --device DEV")
    # systemd stopping the boot-time unit, or a shutdown: the partial copy is recorded as
    # failed on the target like any failure, and the exit is 130 with a message.
    signal.signal(signal.SIGTERM, _on_term)
    # Held until the end: the header is read (and marked recovered) by one recover at a time.
    held = dumpdev.hold_device(device)
    try:
        return _recover_held(args, cfg, device)
    finally:
        os.close(held)


def _recover_held(args: argparse.Namespace, cfg, device: str) -> int:
    from . import dumpdev
    from .errors import DumpDeviceError
    from .pipeline import save
    from .progress import make_progress

    header = dumpdev.read_header(device)
    if header is None:
        if args.if_present:
            print(f"{device}: no dump on the device")
            return 0
        raise DumpDeviceError(f"{device}: holds no kdump-capture dump (no header at offset 0)")
    if header.state == dumpdev.WRITING:
        raise DumpDeviceError(
            f"{device}: the dump on the device is incomplete: writing it was interrupted"
        )
    recovered = (dumpdev.RECOVERED, dumpdev.RECOVERED_INCOMPLETE)
    if header.state in recovered and not args.force:
        print(f"{device}: the dump was already recovered (use --force to copy it again)")
        return 0
    incomplete = header.state in dumpdev.INCOMPLETE_STATES
    if incomplete:
        log.warning(
            "%s: the dump on the device is incomplete (its source ended early when it was "
            "written): its %d bytes are saved as an incomplete dump",
            device,
            header.data_size,
        )
    plan = make_plan(cfg).replace(
        dump_format="raw",
        dump_level=0,
        source_label=dumpdev.describe(header),
        source_level=header.level,
    )
    with dumpdev.open_device_dump(device, header) as vm:
        try:
            result = save(vm, plan, make_progress(cfg.verbose, style=args.progress))
        except IncompleteDump as e:
            # Only all of an incomplete device dump, checked, counts as recovered; a copy
            # cut short for another reason leaves the device as it is.
            if not (incomplete and vm.verified):
                raise
            _mark_recovered(device, header, e.where or "the target")
            raise IncompleteDump(f"{device}: {e}") from None
    where = f"{result.target}/{result.directory}"
    _mark_recovered(device, header, where)
    print(f"Dump recovered from {device}: {where}")
    return 0


def _mark_recovered(device: str, header, where: str) -> None:
    """Mark the device's dump recovered; the copy at ``where`` is made already."""
    from . import dumpdev
    from .errors import DumpDeviceError

    try:
        dumpdev.mark_recovered(device, header)
    except DumpDeviceError as e:
        raise DumpDeviceError(
            f"dump copied to {where}; could not mark the device recovered: {e} (recover will "
            "copy it again next time unless the device becomes writable)"
        ) from None


def cmd_show_config(args: argparse.Namespace) -> int:
    cfg = load(args)
    for line in cfg.redacted_lines():
        print(line)
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    """Mail about this host's new dumps (notify.py)."""
    from . import notify
    from .load.system import INITRD_DIR

    signal.signal(signal.SIGTERM, _on_term)
    cfg = load(args)
    _setup_logging(bool(cfg.verbose & 8))
    if not cfg["KDUMP_NOTIFICATION_TO"].strip():
        if args.if_configured:
            return 0
        raise ConfigError("KDUMP_NOTIFICATION_TO is empty: nobody to mail")
    notify.run(cfg, args.state or os.path.join(INITRD_DIR, notify.STATE_NAME))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a dump against its manifest: a local directory, or a dump's URL (streamed).

    Reads only the plain names the manifest lists inside the dump, as regular files (never
    through a link, never a FIFO), never more than the recorded size: both through a
    transport (the file transport for a directory).
    """
    from transports import open_transport
    from transports.base import TransportSettings
    from transports.file import FileTransport

    from . import policy
    from .urls import Target, parse_target

    signal.signal(signal.SIGTERM, _on_term)  # exit 130 with a message, as save and recover
    where = args.dumpdir
    if "://" not in where:
        dumpdir = os.path.abspath(where)
        if not os.path.isdir(dumpdir):
            raise VerifyError(f"{where}: not a directory")
        # Not connected: connecting would create the directory and want it writable.
        fs = FileTransport(Target("file", "file", path=dumpdir), TransportSettings())
        return _verify(where, fs, "")
    target, _ = parse_target(where)
    parent, _, name = target.path.rstrip("/").rpartition("/")
    if policy.parse_dump_name(name) is None:
        raise ConfigError(
            f"{target.redacted()}: the URL must end with a dump directory's name "
            "(HOST-YYYY-MM-DD-HH-MM-SS), e.g. the one 'save' printed"
        )
    cfg = load(args)
    _setup_logging(bool(cfg.verbose & 8))
    settings = transport_settings(cfg, read_only=True)
    target = with_config_password(target, cfg)
    with open_transport(target.replace(path=parent or "/"), settings) as tr:
        return _verify(target.redacted(), tr, name)


def _verify(label: str, tr, dumpdir: str) -> int:
    """Hash every file the manifest of ``dumpdir`` on ``tr`` lists, as it streams."""
    from . import checksum, manifest
    from .errors import ManifestError, TransportError
    from .report import AGE_SUFFIX, MANIFEST, README, VMCORE

    def rel(name: str) -> str:
        return f"{dumpdir}/{name}" if dumpdir else name

    names = {e.name for e in tr.listdir(dumpdir) if not e.is_dir}
    if not names:
        raise VerifyError(f"{label}: no such dump (nothing there)")
    if MANIFEST not in names:
        from . import policy

        name = dumpdir or os.path.basename(os.path.abspath(label))
        if policy.parse_dump_name(name) is None:
            # Another kdump's directory (Red Hat, SUSE, Debian): not "incomplete", just not
            # one with a manifest to check it against.
            raise VerifyError(
                f"{label}/{MANIFEST}: no manifest: not a dump this tool saved (or one whose "
                "save did not finish): nothing to verify it against"
            )
        raise VerifyError(f"{label}/{MANIFEST}: no manifest: the dump is incomplete")
    try:
        data = b"".join(tr.read(rel(MANIFEST), limit=manifest.MAX_BYTES))
    except TransportError as e:
        raise ManifestError(f"{label}/{MANIFEST}: unreadable manifest: {e}") from None
    where = f"{label}/{MANIFEST}"
    raw = manifest.document(data, where)
    doc = manifest.of_document(raw, where)
    # Every algorithm the manifest names must be usable before any file is read: xxh3-128
    # without the xxhash package is exit 9 with the install hint, not a half-done verify.
    hashers = {a: checksum.new(a) for a in sorted({r.algorithm for r in doc.files.values()})}
    bad = []
    for name, record in sorted(doc.files.items()):
        if name == README and name not in names:
            # The save writes it after the manifest; one that could not be written then
            # (the target full) leaves the dump complete: what it says is in the manifest.
            print(f"MISSING  {name} (the save could not write it; {MANIFEST} has its content)")
            continue
        h = hashers[record.algorithm].copy()
        size = 0
        try:
            # Never more than recorded: a bigger file fails at once, whatever its size.
            for chunk in tr.read(rel(name), limit=record.size):
                h.update(chunk)
                size += len(chunk)
        except (TransportError, FileNotFoundError) as e:
            bad.append(f"{name}: {e}")
            continue
        if size != record.size or h.hexdigest() != record.digest:
            bad.append(
                f"{name}: size {size} {record.algorithm} {h.hexdigest()} != recorded "
                f"{record.size} {record.digest}"
            )
        else:
            print(f"OK  {name}  {size} bytes  {record.algorithm}")
    # Files the manifest does not list are not checked, and said so: the plaintext that
    # `decrypt` leaves beside the .age files, a save's temporary file, or anything else.
    for name in sorted(names - doc.files.keys() - {MANIFEST}):
        print(f"NOT LISTED  {escape_controls(name)} (not in {MANIFEST}: not checked)")
    if not doc.complete:
        bad.append(f"dump status is {doc.status!r}: {doc.error}")
    elif not {VMCORE, VMCORE + AGE_SUFFIX} & doc.files.keys():
        # A complete save lists its vmcore, unless its format writes none ("none (dmesg
        # only)"): a manifest that says complete without one does not vouch for a dump.
        fmt = raw.get("dump_format")
        if not (isinstance(fmt, str) and fmt.startswith("none")):
            bad.append(f"{VMCORE}: not listed in {MANIFEST}, which says the dump is complete")
    if bad:
        raise VerifyError(f"{label}: " + "; ".join(bad))
    print(f"{label}: all files match {MANIFEST}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Every dump on a target, all hosts, newest first; reads only, changes nothing."""
    from transports import open_transport

    from .fleet import as_json, list_dumps
    from .urls import parse_target

    signal.signal(signal.SIGTERM, _on_term)  # exit 130 with a message, as save and recover
    target, _ = parse_target(args.target)
    cfg = load(args)
    _setup_logging(bool(cfg.verbose & 8))
    if target.scheme == "file" and not os.path.isdir(target.path):
        # connect() would create it: a listing changes nothing
        raise NoDumpError(f"{target.redacted()}: no such directory")
    target = with_config_password(target, cfg)
    settings = transport_settings(cfg, read_only=True)
    with open_transport(target, settings) as tr:
        items = list_dumps(tr)
    if not items and _missing_directory(target, settings):
        raise NoDumpError(f"{target.redacted()}: no such directory")
    if args.json:
        print(as_json(items))
        return 0
    if not items:
        print(f"{target.redacted()}: no dumps")
    for item in items:
        print(item.line())
    return 0


def _missing_directory(target, settings) -> bool:
    """Whether a network target's directory is not there, as its parent's listing says.

    A listing is [] for a missing directory and an empty one alike: a mistyped path read
    "no dumps". Asked only when nothing was listed. S3 (a prefix is never missing) and NFS
    (the parent may lie outside the export) are not asked, nor a share's root; a parent that
    cannot be listed leaves the empty listing as it is.
    """
    from transports import open_transport

    from .errors import TransportError

    parent, _, name = target.path.rstrip("/").rpartition("/")
    if target.scheme not in ("sftp", "ftp", "cifs") or not name:
        return False
    if target.scheme == "cifs" and not target.share_path:
        return False
    try:
        with open_transport(target.replace(path=parent or "/"), settings) as tr:
            entries = tr.listdir("")
    except TransportError:
        return False
    return not any(e.name == name and (e.is_dir or e.is_link) for e in entries)


def cmd_dmesg(args: argparse.Namespace) -> int:
    from .dumpfile import open_dump

    with open_dump(args.dump) as dump:
        text = dump.dmesg()
    sys.stdout.write(text)
    if dump.incomplete:
        raise IncompleteDump(
            f"{args.dump}: the dump is incomplete: {dump.incomplete}; the log above is what "
            "it holds"
        )
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    from .age import load_identities
    from .decrypt import decrypt_dir

    # exit 130 with a message, as save: the partial plaintext under its temporary name goes
    signal.signal(signal.SIGTERM, _on_term)
    identities = [i for path in args.identity for i in load_identities(path)]
    for d in decrypt_dir(args.dumpdir, identities, args.output):
        how = ", rearranged from the flattened format" if d.rearranged else ""
        print(f"{d.name}: {d.size} bytes, plaintext {d.algorithm} {d.digest} OK{how}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from .summary import summary_of

    incomplete: list[str] = []
    summary = summary_of(args.dump, incomplete=incomplete)
    if args.json:
        import json

        print(json.dumps(summary.as_dict(), indent=2))
    else:
        sys.stdout.write(summary.text())
    if incomplete:
        raise IncompleteDump(
            f"{incomplete[0]}: the dump is incomplete: {incomplete[1]}; the summary above is "
            "from what it holds"
        )
    return 0


def _file_error(e: OSError, source: str | None, output: str) -> KdumpError:
    """An OSError of a command that reads ``source`` and writes ``output``, as our error.

    Cannot open the input: exit 3, as for `save --vmcore` and `dmesg`. Cannot create the
    output (missing directory, permission): exit 2, a bad argument. Writing it failed:
    exit 5 when the disk is full, else 6.
    """
    from .errors import FreeSpaceError, NoDumpError, TransportError

    reason = e.strerror or str(e)
    if source is not None and e.filename == source:
        return NoDumpError(f"{source}: cannot open: {reason}")
    if e.filename is not None:  # open and create name the file; write errors name none
        return ConfigError(f"{output}: cannot create: {reason}")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FreeSpaceError(f"writing {output}: {reason}")
    return TransportError(f"writing {output}: {reason}")


def cmd_rearrange(args: argparse.Namespace) -> int:
    from .formats.flat import rearrange

    if os.path.islink(args.output):
        # The result would replace the link, not write through it: /dev/stdout (as root)
        # is a link, and the output must be seekable anyway.
        raise ConfigError(
            f"{args.output}: a link: rearrange would replace it with the dump (it needs a "
            "seekable file, not standard output); name the file itself"
        )
    try:
        size = rearrange(args.flat, args.output)
    except OSError as e:
        raise _file_error(e, args.flat, args.output) from e
    print(f"{args.output}: {size} bytes")
    return 0


# make-sample holds no more than a chunk in memory, but the file is this big: 1 TiB (sparse
# samples of several GiB are what the memory benchmarks use).
SAMPLE_MAX_MIB = 1 << 20


def cmd_make_sample(args: argparse.Namespace) -> int:
    from .sample import SampleSpec, write_sample

    if not 1 <= args.mib <= SAMPLE_MAX_MIB:
        raise ConfigError(f"--mib {args.mib}: must be between 1 and {SAMPLE_MAX_MIB}")
    try:
        size = write_sample(args.output, SampleSpec(ram_mib=args.mib, sparse=args.sparse))
    except OSError as e:
        raise _file_error(e, None, args.output) from e
    print(f"{args.output}: synthetic vmcore, {size} bytes")
    return 0


def progress_arg(p: argparse.ArgumentParser) -> None:
    from .progress import PROGRESS_STYLES

    p.add_argument(
        "--progress",
        choices=PROGRESS_STYLES,
        default="auto",
        help="progress display (KDUMP_VERBOSE bit 2): a bar, plain lines (a line per 10%% "
        "or 10 s, for serial consoles), or auto: a bar on a terminal",
    )


# Commands defined here; the load-side ones (check, load, ...) come from kdump_capture/load,
# which the capture kernel's save does not need to import (gzip, subprocess, shlex, ...).
CORE_COMMANDS = (
    "save",
    "recover",
    "show-config",
    "verify",
    "list",
    "decrypt",
    "summary",
    "dmesg",
    "rearrange",
    "make-sample",
)


def build_parser(load_side: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdump-capture",
        description="Save a crashed kernel's memory (/proc/vmcore) to local or network storage.",
        epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in sorted(EXIT_CODES.items())),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("save", help="save the crash dump (run by the capture kernel's init)")
    config_args(p)
    p.add_argument(
        "--vmcore", metavar="FILE", help="source (default /proc/vmcore, else /dev/oldmem)"
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="save a built-in synthetic sample vmcore instead (a demo)",
    )
    p.add_argument("--sample-mib", type=int, default=64, help=argparse.SUPPRESS)
    progress_arg(p)
    p.add_argument(
        "--no-reboot", action="store_true", help="never reboot afterwards, whatever the config says"
    )
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("recover", help="copy a dump from KDUMP_DUMPDEV to KDUMP_SAVEDIR")
    config_args(p)
    p.add_argument("--device", metavar="DEV", help="dump device (default: KDUMP_DUMPDEV)")
    p.add_argument("--force", action="store_true", help="copy a dump recovered before again")
    progress_arg(p)
    p.add_argument(
        "--if-present",
        action="store_true",
        help="exit 0 quietly when the device holds no dump (for boot-time units)",
    )
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("show-config", help="print the effective configuration (no passwords)")
    config_args(p)
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser(
        "verify",
        help="check a saved dump against its manifest checksums, in a directory or where it "
        "lies on a target (URL: the target URL plus the dump's name; credentials from --config)",
    )
    config_args(p)
    p.add_argument("dumpdir", metavar="DUMPDIR|URL")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "list",
        help="list every dump on a target (all hosts, newest first): host, crash time, "
        "kernel, status, format, size, panic line (credentials from --config)",
    )
    config_args(p)
    p.add_argument("target", metavar="TARGET_URL")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "notify",
        help="mail KDUMP_NOTIFICATION_TO about this host's dumps saved since the last mail "
        "(run at boot by kdump-capture-notify.service)",
    )
    config_args(p)
    p.add_argument(
        "--state",
        metavar="FILE",
        default="",
        help="what was mailed already (default /var/lib/kdump-capture/notified.json)",
    )
    p.add_argument(
        "--if-configured",
        action="store_true",
        help="exit 0 quietly when KDUMP_NOTIFICATION_TO is empty (for boot-time units)",
    )
    p.set_defaults(func=cmd_notify)

    p = sub.add_parser("dmesg", help="print the kernel log of a dump (ELF, compressed, flattened)")
    p.add_argument("dump", metavar="DUMP")
    p.set_defaults(func=cmd_dmesg)

    p = sub.add_parser(
        "decrypt",
        help="decrypt an encrypted dump directory (NAME.age -> NAME), checking the manifest's "
        "checksums; a flattened vmcore is rebuilt",
    )
    p.add_argument(
        "--identity",
        "-i",
        action="append",
        required=True,
        metavar="KEY",
        help="age identity file (AGE-SECRET-KEY-1...) or SSH private key (repeatable)",
    )
    p.add_argument("--output", "-o", metavar="DIR", help="write here (default: DUMPDIR)")
    p.add_argument("dumpdir", metavar="DUMPDIR")
    p.set_defaults(func=cmd_decrypt)

    p = sub.add_parser(
        "summary",
        help="why the machine crashed: panic line, task, RIP, trace, taint (any dump file, "
        "a dmesg.txt or a dump directory)",
    )
    p.add_argument("dump", metavar="DUMP")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("rearrange", help="rebuild a flattened dump (like makedumpfile -R)")
    p.add_argument("flat", metavar="FLAT")
    p.add_argument("output", metavar="OUT")
    p.set_defaults(func=cmd_rearrange)

    p = sub.add_parser("make-sample", help="write a synthetic ELF vmcore (for tests and demos)")
    p.add_argument("output", metavar="FILE")
    p.add_argument("--mib", type=int, default=64, help="RAM size in MiB (default 64)")
    p.add_argument("--sparse", action="store_true", help="all-zero RAM as file holes (fast, big)")
    p.set_defaults(func=cmd_make_sample)

    if load_side:
        from .load.commands import add_subcommands

        add_subcommands(sub)  # check, load, unload, status, test-crash, initramfs
    return parser


class OutputError(KdumpError):
    """Standard output could not be written: exit 5 when its filesystem is full, else 6."""

    def __init__(self, e: OSError) -> None:
        super().__init__(f"writing standard output: {e.strerror or e}")
        self.exit_code = 5 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 6


class GuardedOutput:
    """``sys.stdout`` whose write errors are OutputError: what a command prints (a listing,
    a log, verify's lines) going to a full filesystem or a closed pipe is an error with its
    exit code, not an internal one."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            raise OutputError(e) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise OutputError(e) from None

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _drop_output(stream) -> None:
    """After a write error on ``stream``: point its descriptor at /dev/null, so that the
    interpreter's last flush of what is still buffered fails no more (exit 120, a traceback)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass  # no descriptor (a test's capture): nothing is flushed at exit either


def main(argv: list[str] | None = None) -> int:
    from . import idna

    idna.register()  # before any host name is resolved (capture images may lack the codec)
    _setup_logging(False)
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(load_side=not (words and words[0] in CORE_COMMANDS))
    args = parser.parse_args(argv)
    stdout = sys.stdout
    if stdout is not None and getattr(args, "func", None) in (cmd_save, cmd_recover):
        from .progress import TolerantOutput

        # What a save or a recover prints reports on the dump; it never decides its outcome.
        sys.stdout = TolerantOutput(stdout)
    elif stdout is not None:
        sys.stdout = GuardedOutput(stdout)
    try:
        rc = args.func(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # inside: the last lines of a listing fail here, if anywhere
        return rc
    except OutputError as e:
        _drop_output(stdout)
        print(f"kdump-capture: error: {e}", file=sys.stderr)
        return e.exit_code
    except KdumpError as e:
        log.debug("traceback", exc_info=True)
        print(f"kdump-capture: error: {escape_controls(redact(str(e)))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kdump-capture: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except Exception as e:  # a bug: one line, traceback only when debugging
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            log.exception("internal error")
        print(
            f"kdump-capture: internal error: {type(e).__name__}: {redact(str(e))}", file=sys.stderr
        )
        return 1
    finally:
        if sys.stdout is not stdout:
            sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
