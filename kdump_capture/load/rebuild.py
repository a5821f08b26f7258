"""When the capture initramfs must be rebuilt: a record of everything it was built from.

The image holds the effective configuration (``--set`` overrides included), our engine, the
Python runtime, kernel modules, SSH keys and known_hosts, an s3:// target's CA files and this
host's name. A file's mtime cannot say whether
any of these changed (``--set`` has no file, a missing config has no mtime), so the builder
writes a digest of each input beside the image (``IMAGE.inputs.json``, mode 0600) and
``load`` rebuilds whenever one differs from what it computes now. Only digests are stored,
never values: the configuration may hold a password. The record also holds the image's
own SHA-256: an image replaced after its record was written (two builds at once, a copy by
hand) is not taken for the one the record describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .. import __version__

if TYPE_CHECKING:
    from pathlib import Path

# (Heavier imports wait inside the functions: the VM tests' first kernel reads records
# with a capture image's runtime, which packs only what the save needs.)

RECORD_SUFFIX = ".inputs.json"
RECORD_VERSION = 2  # 2: the image's SHA-256
# Sources the image is made of or built by (their digest covers our own code).
ENGINE_DIRS = ("kdump_capture", "transports", "initramfs")
# The compiled accelerator (kdump_capture/_speedups*.so) is packed as it is: rebuilt alone
# (an upgrade that changes only its C source, a rebuild once libzstd's headers are there)
# it must make the image stale as a changed .py does.
ENGINE_SUFFIXES = (".py", ".so")
ENGINE_FILES = ("initramfs/init",)


def project_root() -> Path:
    from pathlib import Path

    return Path(__file__).resolve().parent.parent.parent


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _file_parts(path: str) -> list[bytes]:
    """A file's name and content, or its name and ``absent`` (so a new file counts)."""
    try:
        with open(path, "rb") as f:
            return [path.encode(), f.read()]
    except OSError:
        return [path.encode(), b"absent"]


def library_id(path: str) -> str:
    """A packed system library's identity: size and mtime of the file its path leads to
    (a security update of libssl or libc replaces it)."""
    try:
        st = os.stat(path)
    except OSError:
        return "absent"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _stat_parts(path: str) -> list[bytes]:
    """A program's identity without reading it: real path, size and mtime."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return [real.encode(), b"absent"]
    return [real.encode(), f"{st.st_size}:{st.st_mtime_ns}".encode()]


def engine_digest(root: Path | None = None) -> str:
    """Our version, every source file the image is made of or built by, and our compiled
    extension."""
    root = root or project_root()
    files = [root / f for f in ENGINE_FILES]
    for d in ENGINE_DIRS:
        files += [p for p in (root / d).rglob("*") if p.suffix in ENGINE_SUFFIXES]
    parts = [__version__.encode()]
    for p in sorted(set(files)):
        parts += [str(p.relative_to(root)).encode(), p.read_bytes()]
    return _sha(parts)


def python_digest() -> str:
    """The interpreter and the installed distributions (their dist-info names hold versions)."""
    import sysconfig

    parts = [sys.version.encode(), *_stat_parts(sys.executable)]
    paths = sysconfig.get_paths()
    for d in sorted({paths["purelib"], paths["platlib"]}):
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".dist-info"))
        except OSError:
            names = []
        parts += [n.encode() for n in names]
    return _sha(parts)


def config_digest(cfg: Mapping[str, str]) -> str:
    """Every directive with its effective value (``--set`` included), order-independent."""
    return _sha(f"{k}={cfg[k]}".encode() for k in sorted(cfg))


def image_inputs(
    cfg: Mapping[str, str],
    *,
    kernel_version: str,
    modules_root: str | None,
    compress: str,
    target_device: str,
    target_fstype: str,
    extra_modules: tuple[str, ...] = (),
    home: str = "/root",
) -> dict[str, str]:
    """A digest per input of an image built with these arguments (what ``build`` takes)."""
    import shutil

    from initramfs import builder, kmods
    from kdump_capture.errors import ConfigError
    from kdump_capture.identity import local_identity
    from kdump_capture.urls import parse_savedir

    mroot = modules_root or f"/lib/modules/{kernel_version}"
    modules = _file_parts(f"{mroot}/modules.dep") + _file_parts(f"{mroot}/modules.builtin")
    # depmod rewrites modules.dep whenever modules are installed: modules rebuilt under the
    # same version (make modules_install, a same-ABI update) leave its text as it was.
    modules += _stat_parts(f"{mroot}/modules.dep")
    modules += [m.encode() for m in extra_modules]
    if modules_root is None and kernel_version == os.uname().release:
        storage, nics = kmods.host_drivers()  # the builder packs this machine's drivers
        modules += [m.encode() for m in (*storage, "|", *nics)]
    try:
        targets = parse_savedir(cfg["KDUMP_SAVEDIR"])[0]
    except Exception:  # the build itself reports a bad target; the digest only differs
        targets = []
    schemes = {t.scheme for t in targets}
    keys: list[bytes] = []
    if "sftp" in schemes:
        names = cfg["KDUMP_SSH_IDENTITY"].split() or list(builder.DEFAULT_IDENTITIES)
        for name in names:
            src = name if os.path.isabs(name) else os.path.join(home, ".ssh", name)
            for suffix in ("", ".pub", "-cert.pub"):
                keys += _file_parts(src + suffix)
    # What the builder takes from this host rather than from the configuration: the CA
    # files an s3:// target packs, and the host name it writes into KDUMP_HOSTNAME (a
    # renamed or cloned machine would otherwise name its dumps after the old name, and
    # rotate another host's dumps on a shared target).
    cas: list[bytes] = []
    if "s3" in schemes:
        try:
            for dest, src in sorted(builder.s3_files(cfg, targets).items()):
                cas += [dest.encode(), *_file_parts(src)]
        except ConfigError:  # the build reports it
            cas = [b"unusable"]
    # The resolver files an image that brings up the network carries (/etc/hosts, ...);
    # digested for every image: whether it brings up the network is the configuration's.
    resolver = [
        x for d, data in sorted(builder.resolver_files().items()) for x in (d.encode(), data)
    ]
    # The NIC a DEV:dhcp or DEV:static image looks for in the capture kernel, by the MAC
    # (and address) DEV has here: a replaced NIC or a new address must rebuild the image,
    # or the capture kernel looks for a NIC that is gone and no network target is reached.
    try:
        nic = builder.host_interface(builder.parse_netconfig(cfg["KDUMP_NETCONFIG"], True, 0))
        network = json.dumps(nic.as_dict(), sort_keys=True).encode()
    except Exception:  # the build itself reports it
        network = b"unusable"
    host = "" if cfg["KDUMP_HOSTNAME"] else local_identity()
    programs: list[bytes] = []
    for prog in ["busybox", *cfg["KDUMP_REQUIRED_PROGRAMS"].split()]:
        path = prog if os.path.isabs(prog) else shutil.which(prog)
        programs += _stat_parts(path) if path else [prog.encode(), b"absent"]
    return {
        "configuration": config_digest(cfg),
        "engine": engine_digest(),
        "python": python_digest(),
        "kernel": kernel_version,
        "kernel modules": _sha(modules),
        "ssh keys": _sha(keys),
        "known_hosts": _sha(_file_parts(os.path.join(home, ".ssh", "known_hosts"))),
        "CA certificates": _sha(cas),
        "host name": _sha([host.encode()]),
        "name resolution": _sha(resolver),
        "network interface": _sha([network]),
        "programs": _sha(programs),
        "build options": _sha(x.encode() for x in (compress, target_device, target_fstype)),
    }


def record_path(image: str) -> str:
    return image + RECORD_SUFFIX


def image_digest(image: str) -> str | None:
    """The SHA-256 of the image file, None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(image, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def write_record(
    image: str,
    inputs: Mapping[str, str],
    facts: Mapping[str, int] | None = None,
    digest: str | None = None,
    libraries: Iterable[str] = (),
) -> None:
    """Write the record beside ``image`` (0600, atomically): the digests of its inputs,
    the image's own SHA-256 (``digest``, or read from the file), facts about the image
    that ``estimate`` uses (sizes, measured import memory), and the identity (size and
    mtime) of each system library the image packs (``libraries``: host paths), which only
    the build itself finds."""
    from .. import private

    doc = {
        "version": RECORD_VERSION,
        "inputs": dict(inputs),
        "image": dict(facts or {}),
        "sha256": digest or image_digest(image),
        "libraries": {p: library_id(p) for p in sorted(set(libraries))},
    }
    private.write_file(record_path(image), json.dumps(doc, indent=1, sort_keys=True).encode())


def _read(image: str) -> dict | None:
    try:
        with open(record_path(image), "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
        return None
    return doc


def read_record(image: str) -> dict[str, str] | None:
    """The recorded input digests, or None."""
    doc = _read(image)
    inputs = doc.get("inputs") if doc else None
    if not isinstance(inputs, dict):
        return None
    return {str(k): str(v) for k, v in inputs.items()}


def read_facts(image: str) -> dict[str, int]:
    """The recorded facts about the image ({} when there are none)."""
    doc = _read(image)
    facts = doc.get("image") if doc else None
    if not isinstance(facts, dict):
        return {}
    return {str(k): v for k, v in facts.items() if isinstance(v, int) and v >= 0}


def _no_record(image: str) -> str:
    """Why there is no usable record beside ``image``: none at all, or one this version
    does not read (another version of kdump-capture wrote it, e.g. before an upgrade)."""
    path = record_path(image)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        doc = None
    if isinstance(doc, dict) and doc.get("version") != RECORD_VERSION:
        version = str(doc.get("version", "none"))[:20]
        return (
            f"its record ({path}) is of record version {version}, written by another "
            f"version of kdump-capture; this one reads version {RECORD_VERSION}"
        )
    return f"nothing records what it was built from ({path})"


def stale_reasons(image: str, inputs: Mapping[str, str]) -> list[str]:
    """Why ``image`` must be rebuilt for ``inputs``; empty when it is up to date."""
    if not os.path.exists(image):
        return ["there is no image yet"]
    recorded = read_record(image)
    if recorded is None:
        return [_no_record(image)]
    doc = _read(image) or {}
    if doc.get("sha256") != image_digest(image):
        return ["the image is not the one its record describes (replaced after its build)"]
    reasons = [f"{name} changed" for name in inputs if recorded.get(name) != inputs[name]]
    libraries = doc.get("libraries")
    if isinstance(libraries, dict):
        changed = [
            os.path.basename(str(p))
            for p, ident in libraries.items()
            if library_id(str(p)) != ident
        ]
        if changed:
            shown = ", ".join(changed[:4]) + (
                f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            )
            reasons.append(f"system libraries changed ({shown})")
    return reasons
