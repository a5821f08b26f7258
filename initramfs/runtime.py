"""Collect the Python runtime a capture needs: interpreter, shared libraries, imported modules.

What to pack is computed, not listed by hand: a child interpreter imports the capture's entry
modules (our engine, the one transport the target uses, and every module our own code
imports anywhere, found by reading its source), then reports ``sys.modules``. Only those
modules are packed, as compiled ``.pyc`` files (no sources, so the capture kernel never
compiles at start-up), plus the extension modules they loaded and the shared libraries these
and the interpreter need (from ``ldd``). ELF files are stripped when ``strip`` exists.
"""

from __future__ import annotations

import ast
import encodings
import encodings.aliases
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kdump_capture.errors import ConfigError, NotSupported

log = logging.getLogger(__name__)

PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
# Where things go inside the archive (no leading slash). The interpreter finds its prefix
# from its own location: /usr/bin/python3 -> /usr/lib/pythonX.Y/os.pyc is the landmark.
DEST_BIN = "usr/bin"
DEST_STDLIB = f"usr/lib/{PYVER}"
DEST_DYNLOAD = f"usr/lib/{PYVER}/lib-dynload"
DEST_SITE = f"usr/lib/{PYVER}/site-packages"
DEST_LIBDIR = "usr/lib/x86_64-linux-gnu"
# The first entry of the interpreter's default sys.path ({prefix}/lib/pythonXY.zip).
PYZIP = f"usr/lib/python{sys.version_info.major}{sys.version_info.minor}.zip"

# Modules the interpreter looks up by name at run time, which importing the entry modules
# does not reveal: codecs (the console and files use ascii/latin-1/utf-8), the stdlib
# landmark os (frozen in the binary, yet getpath needs its file to find the prefix), and
# what start-up imports (site; runpy for ``python3 -m``: the probe runs with -S and -c).
LATE_IMPORTS = (
    "os",
    "site",
    "runpy",
    "zlib",  # zipimport inflates the modules in PYZIP
    "encodings.aliases",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
)
# socket.getaddrinfo encodes every host name given as str with the "idna" codec, whose
# module needs unicodedata (1.1 MB) for names that are not ASCII. Packed only when a
# configured host is not ASCII; otherwise kdump_capture.idna answers for ASCII names.
IDNA_IMPORTS = ("encodings.idna",)

# Optional imports that the packages try and do without: blocked in the probe (the import
# raises ImportError there exactly as it will in the capture kernel), so nothing they
# would pull in is packed. name -> why it is not needed.
BLOCKED = {
    # paramiko.config tries invoke for "Match exec" in ssh_config files; we pass none. It
    # would add asyncio, ssl + libssl, unittest.mock and PyYAML (about 3 MB).
    "invoke": "paramiko ssh_config 'Match exec' (unused)",
    # ftplib's optional FTPS classes (FTP_TLS); no transport speaks TLS. Saves _ssl and
    # libssl (1 MB). A transport that needs ssl fails the build (its import fails here).
    "ssl": "ftplib FTP_TLS (unused)",
    # The capture kernel's save prints progress as plain lines (``--progress lines``):
    # tqdm would add itself, unicodedata (1.1 MB) and importlib.metadata's dependencies.
    "tqdm": "progress bar (the capture kernel prints lines)",
    # zipfile's optional codecs (importlib.metadata reads dist-info directories, never
    # zip members): liblzma, libbz2 and their modules, 0.35 MB.
    "bz2": "zipfile bzip2 members (unused)",
    "lzma": "zipfile lzma members (unused)",
    # cryptography's OpenSSH key serialization tries bcrypt (0.5 MB) for encrypted keys;
    # paramiko imports it outright, so an SFTP image gets it back (see collect).
    "bcrypt": "encrypted OpenSSH keys in cryptography (optional there)",
}

# Libraries glibc loads with dlopen, which ldd cannot see: libgcc_s unwinds a thread that
# exits (zstandard, paramiko and our pipeline run threads; without it glibc aborts with
# "libgcc_s.so.1 must be installed for pthread_exit to work").
DLOPENED_LIBS = ("libgcc_s.so.1",)
# The name service modules the image's nsswitch.conf names (hosts: files dns), packed when
# this host has them: glibc before 2.34 (SLES 15: 2.31) loads them with dlopen, and without
# them resolves no name at all, not even from /etc/hosts; later glibc has them built in
# (the files are small stubs).
NSS_LIBS = ("libnss_files.so.2", "libnss_dns.so.2")

# What importlib.metadata reads of a distribution (version, entry points, names).
DIST_FILES = ("METADATA", "entry_points.txt", "top_level.txt")

# Our modules that only one configured feature needs, with the third-party packages they
# bring: left out of the probe (and so out of the image) unless the feature is on. age
# (KDUMP_ENCRYPT_TO) needs `cryptography`, 11 MiB unpacked, which a file target would not
# carry otherwise.
# decrypt runs on an admin's machine, never in a capture kernel, but its lazy import of age
# would pull cryptography (11 MiB) into every image: it belongs to the feature too.
# xxh3sum (KDUMP_CHECKSUM=xxh3, the default) is the only importer of `xxhash` (0.1 MiB): an
# image with KDUMP_CHECKSUM=sha256 has no use for it.
# notify (mail at the next boot) runs on the running system only, never in a capture kernel:
# no image turns it on, so smtplib, email and ssl stay out of every image.
FEATURE_MODULES = {
    "encrypt": ("kdump_capture.age", "kdump_capture.decrypt"),
    "xxh3": ("kdump_capture.xxh3sum",),
    "notify": ("kdump_capture.notify",),
}

# Our own top-level packages shipped into site-packages.
OWN_PACKAGES = ("kdump_capture", "transports")


@dataclass
class Payload:
    """Files for the archive: destination path (no leading slash) -> bytes or host path."""

    files: dict[str, bytes | str] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    #: the host file a packed system library came from (its stripped copy is in ``files``):
    #: the image record keeps their identities, so that an update of one rebuilds the image
    libraries: dict[str, str] = field(default_factory=dict)

    def add(self, dest: str, src: bytes | str, mode: int = 0o644) -> None:
        self.files[dest] = src
        self.modes[dest] = mode


def project_root() -> Path:
    """The directory holding our packages (kdump_capture, transports)."""
    import kdump_capture

    return Path(kdump_capture.__file__).resolve().parent.parent


def imports_in_source(path: Path) -> set[str]:
    """Absolute module names imported anywhere in one source file (also inside functions)."""
    tree = ast.parse(path.read_bytes(), str(path))
    name = module_name_for(path) if path.suffix == ".py" else "__main__"
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod:
                names.add(mod)
                # "from pkg import sub" may name a submodule
                names.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    return names


def imports_in_file(path: str) -> set[str]:
    """Absolute imports anywhere in a third-party source file (relative ones resolved by
    the importing package are seen when that package is imported; they are skipped)."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
    return names


def module_name_for(path: Path) -> str:
    rel = path.resolve().relative_to(project_root()).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def transport_module(scheme: str) -> str:
    """The module implementing ``scheme``, from the transport registry (not imported)."""
    from transports import registry

    try:
        spec, _hint = registry[scheme]
    except KeyError:
        raise NotSupported(
            f"the {scheme!r} target scheme is not supported yet by this build"
        ) from None
    return spec.partition(":")[0]


# Load-side modules a capture image's runtime imports: the CLI registers the load commands
# (the package and ``commands``), and check, status, test-crash and ``load --initrd`` run
# from the image's runtime in the VM tests' first kernel (``system``, ``kexec``). Imports
# inside their functions are not followed, and the rest of the load side (building images,
# the rebuild decision, the estimate) is never imported from an image.
LOAD_SIDE = "kdump_capture.load"
LOAD_SIDE_IMPORTED = tuple(f"{LOAD_SIDE}{m}" for m in ("", ".commands", ".system", ".kexec"))


def disabled_modules(features: Iterable[str]) -> set[str]:
    """Our modules of the features that are not configured (FEATURE_MODULES)."""
    on = set(features)
    return {m for f, ms in FEATURE_MODULES.items() if f not in on for m in ms}


def entry_modules(schemes: Iterable[str], features: Iterable[str] = ()) -> list[str]:
    """What the capture side imports: our engine modules, the targets' transports, /init,
    and every module those sources import anywhere (lazy imports inside functions too).

    ``features`` (keys of FEATURE_MODULES) that are configured: the modules of the others
    are neither imported nor scanned.
    """
    root = project_root()
    off = disabled_modules(features)
    tmods = {transport_module(s) for s in schemes}
    sources = sorted((root / "kdump_capture").rglob("*.py"))
    sources += [root / "transports" / "__init__.py", root / "transports" / "base.py"]
    sources += [(root / Path(*t.split("."))).with_suffix(".py") for t in sorted(tmods)]
    # /init runs with the same interpreter: its imports must be packed too.
    mods: set[str] = imports_in_source(Path(__file__).with_name("init"))
    for src in sources:
        name = module_name_for(src)
        if name in LOAD_SIDE_IMPORTED:
            mods.add(name)
        elif name.startswith(LOAD_SIDE + ".") or name in off:
            continue
        elif not name.endswith(".__main__"):  # importing __main__ would run the CLI
            mods.add(name)
            mods.update(imports_in_source(src))
    # Other transports are imported only if a target uses their scheme.
    allowed = {"transports", "transports.base", *tmods}

    def wanted(m: str) -> bool:
        if m.endswith(".__main__") or m in off:
            return False
        if any(m.startswith(n + ".") for n in off):  # "from .age import X" names age.X
            return False
        if m.startswith(LOAD_SIDE + ".") and m not in LOAD_SIDE_IMPORTED:
            return False
        if m.startswith("transports."):
            return m in allowed or m.rpartition(".")[0] in allowed
        return True

    return sorted(m for m in mods if wanted(m))


# Runs with -S: site would process the host's .pth files (setuptools' distutils hack, an
# editable install's finder), whose imports the capture kernel never makes.
PROBE = r"""
import importlib, json, sys
sys.path.insert(0, ROOT)
sys.path.extend(SITE)
for blocked in BLOCKED:
    sys.modules[blocked] = None  # "import blocked" raises ImportError
failed = {}
for name in NAMES:
    try:
        importlib.import_module(name)
    except Exception as e:  # an optional import (another OS, another feature) may fail
        failed[name] = f"{type(e).__name__}: {e}"
mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
# Distribution metadata of the imported third-party packages: some read their own version
# (importlib.metadata) at import time.
dists = {}
try:
    from importlib import metadata
    tops = {n.partition(".")[0] for n in mods}
    for top, names in metadata.packages_distributions().items():
        if top in tops:
            for dname in names:
                d = metadata.distribution(dname)
                dists[dname] = str(getattr(d, "_path", ""))
except Exception as e:
    failed["importlib.metadata"] = repr(e)
json.dump({"modules": mods, "dists": dists, "failed": failed, "path": sys.path,
           "stdlib": STDLIB, "dynload": DYNLOAD}, sys.stdout)
"""


def probe(names: list[str], python: str = sys.executable, blocked: Iterable[str] = ()) -> dict:
    """Import ``names`` in a fresh isolated interpreter; report what got loaded."""
    paths = sysconfig.get_paths()
    site = sorted({paths["purelib"], paths["platlib"]})
    code = (
        PROBE.replace("ROOT", repr(str(project_root())))
        .replace("SITE", repr(site))
        .replace("NAMES", repr(names))
        .replace("BLOCKED", repr(sorted(blocked)))
        .replace("STDLIB", "__import__('sysconfig').get_paths()['stdlib']")
        .replace("DYNLOAD", "__import__('sysconfig').get_config_var('DESTSHARED')")
    )
    proc = subprocess.run(
        [python, "-I", "-S", "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    if proc.returncode != 0:
        raise ConfigError(f"import probe failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


CODEC_CALLS = ("encode", "decode", "lookup", "getencoder", "getdecoder")


def codec_modules(sources: Iterable[str]) -> set[str]:
    """``encodings.*`` modules for the codec names these sources use as literals.

    Codecs are looked up by name at run time (``s.encode("utf-16-le")`` in smbprotocol),
    so no import shows them; the literal arguments of encode/decode calls and
    ``encoding=`` keywords do.
    """
    names: set[str] = set()
    for path in sources:
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), path)
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            args: list[ast.expr] = []
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.func.attr in CODEC_CALLS:
                    args += node.args[:1]
                args += [k.value for k in node.keywords if k.arg == "encoding"]
            elif isinstance(node, ast.arguments):  # def f(..., encoding="utf-16-le")
                params = node.posonlyargs + node.args
                defaults = dict(
                    zip(params[len(params) - len(node.defaults) :], node.defaults, strict=True)
                )
                defaults.update(
                    (a, d)
                    for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)
                    if d is not None
                )
                args += [d for a, d in defaults.items() if a.arg == "encoding"]
            names.update(
                a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            )
    mods = set()
    for name in names:
        # the lookup encodings.search_function does: normalise, then the alias table
        norm = encodings.normalize_encoding(name).lower()
        module = encodings.aliases.aliases.get(norm) or norm.replace(".", "_")
        if importlib.util.find_spec(f"encodings.{module}") is not None:
            mods.add(f"encodings.{module}")
    return mods


# Compiles sources to .pyc files (PEP 552 header: magic, flags 0 = timestamp-based, source
# mtime and size; the capture kernel has no sources, so they are never compared) in a
# child interpreter: ``-X no_debug_ranges`` leaves out
# the column tables of Python 3.11 code objects, and docstrings are dropped from the tree
# (asserts stay, unlike -OO). Together about a quarter off every .pyc, on disk and in RAM
# once imported; tracebacks keep their line numbers. Nothing in the packed code reads
# __doc__ (checked for our packages and the transports' libraries).
COMPILER = r"""
import ast, importlib.util, json, marshal, os, struct, sys
def strip(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.copy_location(ast.Pass(), body[0])]
    return tree
for src, dest, out in json.load(sys.stdin):
    with open(src, "rb") as f:
        data = f.read()
    tree = strip(ast.parse(data, src))
    code = compile(tree, "/" + dest.removesuffix("c"), "exec", dont_inherit=True)
    st = os.stat(src)
    head = struct.pack("<4sIII", importlib.util.MAGIC_NUMBER, 0, int(st.st_mtime) & 0xFFFFFFFF,
                       len(data) & 0xFFFFFFFF)
    with open(out, "wb") as f:
        f.write(head + marshal.dumps(code))
"""


def compile_pycs(
    items: Iterable[tuple[str, str]], tmpdir: str, python: str = sys.executable
) -> dict[str, str]:
    """Compile (source, archive dest) pairs into ``tmpdir``; returns dest -> .pyc file."""
    jobs = []
    out: dict[str, str] = {}
    for i, (src, dest) in enumerate(items):
        path = os.path.join(tmpdir, f"{i}.pyc")
        jobs.append((src, dest, path))
        out[dest] = path
    proc = subprocess.run(
        [python, "-X", "no_debug_ranges", "-I", "-S", "-c", COMPILER],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise ConfigError(f"compiling the capture code failed: {proc.stderr.strip()[-2000:]}")
    return out


def zip_pure_modules(payload: Payload) -> int:
    """Move the .pyc files of the standard library and of every package without extension
    modules into PYZIP, deflated; returns how many moved.

    The image stays in RAM (rootfs), and .pyc files deflate to about a third: 2.5 MB less
    for an SFTP image. zipimport reads one module at a time. A package holding an extension
    module stays on disk: its ``__path__`` must find the .so beside its .pyc files (but for
    kdump_capture, whose accelerator is loaded by file name). The stdlib landmark ``os.pyc``
    stays on disk too (getpath looks for the file).
    """
    site, stdlib = DEST_SITE + "/", DEST_STDLIB + "/"
    # Ours is the exception: kdump_capture.speedups loads its _speedups*.so from disk by
    # name when the package itself comes from the zip.
    native = {
        d[len(site) :].split("/")[0]
        for d in payload.files
        if d.startswith(site) and d.endswith(".so")
    } - {"kdump_capture"}
    entries: dict[str, bytes | str] = {}
    for dest in sorted(payload.files):
        if not dest.endswith(".pyc") or dest == f"{stdlib}os.pyc":
            continue
        if dest.startswith(site):
            rel = dest[len(site) :]
            if rel.split("/")[0] in native:
                continue
        elif dest.startswith(stdlib) and not dest.startswith(DEST_DYNLOAD + "/"):
            rel = dest[len(stdlib) :]
        else:
            continue
        entries[rel] = payload.files.pop(dest)
        payload.modes.pop(dest, None)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for rel, src in sorted(entries.items()):
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible
            z.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    if entries:
        payload.add(PYZIP, buf.getvalue())
    return len(entries)


# What ``kdump-capture save`` imports in a capture kernel (cli.cmd_save and what it calls),
# besides the target's transport: measured by measure_save_imports.
SAVE_MODULES = (
    "kdump_capture.cli",
    "kdump_capture.load.commands",
    "kdump_capture.idna",
    "kdump_capture.memory",
    "kdump_capture.finish",
    "kdump_capture.pipeline",
    "kdump_capture.progress",
    "kdump_capture.sample",
    "kdump_capture.scripts",
    "kdump_capture.vmcore",
    "kdump_capture.dmesg",
    "kdump_capture.report",
    "kdump_capture.formats.elf",
    "kdump_capture.formats.kdump",
    "kdump_capture.formats.filter",
)
MEASURE = r"""
import sys
R = ROOT
sys.path[:] = [f"{R}/PYZIP", f"{R}/STDLIB", f"{R}/DYNLOAD", f"{R}/SITE"]
def anon():
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * PAGE
base = anon()
import importlib
for name in NAMES:
    importlib.import_module(name)
from transports import transport_class
for scheme in SCHEMES:
    transport_class(scheme)
print(base, anon())
"""


def measure_save_imports(
    payload: Payload,
    schemes: Iterable[str],
    fmt: str,
    tmpdir: str,
    python: str = sys.executable,
    features: Iterable[str] = (),
) -> tuple[int, int]:
    """(interpreter, interpreter + the save's imports): resident anonymous bytes of this
    interpreter importing what a save imports, from the image's own modules.

    The packed interpreter is this one, so the figure is what the capture kernel's save
    takes before it allocates anything for the dump (``kdump-capture estimate``).
    ``features`` (keys of FEATURE_MODULES) that are configured: their modules are imported
    too (``encrypt`` brings `cryptography`, about 5 MiB in a save).
    """
    root = tempfile.mkdtemp(prefix="measure-", dir=tmpdir)
    for dest, src in payload.files.items():
        if not dest.startswith((DEST_STDLIB, PYZIP)):
            continue
        path = os.path.join(root, dest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(src, bytes):
            with open(path, "wb") as f:
                f.write(src)
        else:
            os.symlink(os.path.realpath(src), path)
    names = list(SAVE_MODULES) + (["zstandard"] if fmt == "zstd" else [])
    names += [m for f in features for m in FEATURE_MODULES[f]]
    code = (
        MEASURE.replace("ROOT", repr(root))
        .replace("PYZIP", PYZIP)
        .replace("STDLIB", DEST_STDLIB)
        .replace("DYNLOAD", DEST_DYNLOAD)
        .replace("SITE", DEST_SITE)
        .replace("PAGE", str(os.sysconf("SC_PAGE_SIZE")))
        .replace("NAMES", repr(names))
        .replace("SCHEMES", repr(sorted(schemes)))
    )
    proc = subprocess.run(
        [python, "-I", "-S", "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    if proc.returncode != 0:
        raise ConfigError(f"the capture code does not import: {proc.stderr.strip()[-2000:]}")
    base, total = (int(x) for x in proc.stdout.split())
    return base, total


def _dest_for(file: str, own_root: str, stdlib: str, dynload: str) -> str | None:
    """Archive path for a module file, or None when it is not ours to pack (frozen, built-in)."""
    f = os.path.realpath(file)
    if f.startswith(own_root + os.sep):
        return f"{DEST_SITE}/{os.path.relpath(f, own_root)}"
    if f.startswith(dynload + os.sep):
        return f"{DEST_DYNLOAD}/{os.path.relpath(f, dynload)}"
    site_dirs = [
        os.path.realpath(p)
        for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    ]
    for sd in site_dirs:
        if f.startswith(sd + os.sep):
            return f"{DEST_SITE}/{os.path.relpath(f, sd)}"
    if f.startswith(stdlib + os.sep):
        return f"{DEST_STDLIB}/{os.path.relpath(f, stdlib)}"
    return None


def shared_libs(elf_paths: Iterable[str]) -> dict[str, str]:
    """Shared libraries needed by ELF files: name as ldd prints it -> resolved host path.

    The dynamic linker itself is returned under its absolute path (PT_INTERP).
    """
    found: dict[str, str] = {}
    ldd = shutil.which("ldd")
    if ldd is None:
        raise NotSupported("ldd is needed to collect shared libraries (package libc-bin)")
    for path in elf_paths:
        out = subprocess.run([ldd, path], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            line = line.strip()
            if "=>" in line:
                name, _, rest = line.partition("=>")
                lib = rest.strip().split(" (")[0].strip()
                if lib.startswith("/"):
                    found[name.strip()] = lib
            elif line.startswith("/"):
                lib = line.split(" (")[0]
                found[lib] = lib
    return found


def find_system_lib(name: str) -> str | None:
    """Host path of a shared library by soname, from the dynamic linker's cache."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        left, _, path = line.partition("=>")
        if left.strip().startswith(name + " ") and "x86-64" in left:
            return path.strip()
    return None


def strip_into(src: str, tmpdir: str) -> str:
    """A stripped copy of an ELF file (or the original when strip is unavailable/fails)."""
    strip = shutil.which("strip")
    if strip is None:
        return src
    out = os.path.join(tmpdir, f"{len(os.listdir(tmpdir))}-{os.path.basename(src)}")
    r = subprocess.run([strip, "--strip-unneeded", "-o", out, src], capture_output=True)
    return out if r.returncode == 0 else src


def collect(
    schemes: Iterable[str],
    tmpdir: str,
    python: str = sys.executable,
    idna: bool = False,
    features: Iterable[str] = (),
) -> Payload:
    """The Python runtime for a capture whose targets use ``schemes``; ``idna``: a target
    host name is not ASCII (see IDNA_IMPORTS); ``features`` (keys of FEATURE_MODULES) that
    the configuration turns on."""
    schemes = set(schemes)
    late = LATE_IMPORTS + (IDNA_IMPORTS if idna else ())
    names = sorted(set(entry_modules(schemes, features=features)) | set(late))
    root = project_root()
    blocked = set(BLOCKED)
    if "sftp" in schemes and "cifs" not in schemes:
        # SFTP images carry cryptography, which links its own OpenSSL; _hashlib would add
        # the system libcrypto (4.7 MB) next to it. hashlib then uses its builtin SHA-256:
        # slower (~0.4 vs ~1.9 GB/s) but far above an SSH upload's rate, and it runs on a
        # helper thread. CIFS keeps _hashlib: spnego needs ssl, which loads libcrypto anyway.
        blocked.add("_hashlib")
    while True:
        report = probe(names, python, blocked)
        broken = {}
        for name, err in sorted(report["failed"].items()):
            # Our own module exists but does not import: the capture would fail. (A missing
            # one is an optional feature not in this build, or an attribute, not a module.)
            base = root / Path(*name.split("."))
            exists = base.with_suffix(".py").exists() or (base / "__init__.py").exists()
            if name.partition(".")[0] in OWN_PACKAGES and exists:
                broken[name] = err
            else:
                log.debug("probe: import %s failed (%s); left out", name, err)
        # A blocked import that is not optional for these targets (spnego needs ssl for
        # CIFS): unblock it and probe again.
        needed = {b for b in blocked for err in broken.values() if f"import of {b} halted" in err}
        if not needed:
            break
        log.debug("probe: %s is needed by this target; packing it", ", ".join(sorted(needed)))
        blocked -= needed
    if broken:
        name, err = next(iter(broken.items()))
        raise ConfigError(f"the capture code cannot be imported: {name}: {err}")
    # Two things no import at start-up shows, found in the sources of what was imported:
    # codecs named as literals (encodings.* only need codecs), and the lazy imports inside
    # functions of the third-party packages (spnego imports a cryptography backend when it
    # first signs). Both are imported too, until nothing new turns up.
    stdlib_dir = os.path.realpath(report["stdlib"]) + os.sep
    for _ in range(4):
        modules = report["modules"]
        sources = [f for f in modules.values() if f and f.endswith(".py")]
        tops = {n.partition(".")[0] for n, f in modules.items() if f}
        lazy = {
            m
            for f in sources
            if not os.path.realpath(f).startswith(stdlib_dir) or "site-packages" in f
            for m in imports_in_file(f)
            if m.partition(".")[0] in tops and m.partition(".")[0] not in blocked
        }
        codecs = codec_modules(sources) - (set() if idna else set(IDNA_IMPORTS))
        extra = (codecs | lazy) - set(modules) - set(names)
        extra -= disabled_modules(features)
        if not extra:
            break
        names = sorted(set(names) | extra)
        report = probe(names, python, blocked)
    own_root = os.path.realpath(str(project_root()))
    stdlib = os.path.realpath(report["stdlib"])
    dynload = os.path.realpath(report["dynload"])
    payload = Payload()
    elves: list[str] = []
    sources: list[tuple[str, str]] = []
    for name, file in sorted(report["modules"].items()):
        if not file:
            continue
        dest = _dest_for(file, own_root, stdlib, dynload)
        if dest is None:
            continue
        payload.modules.append(name)
        if dest.endswith(".py"):
            sources.append((file, dest + "c"))
        elif dest.endswith(".so"):
            payload.add(dest, strip_into(file, tmpdir), 0o755)
            elves.append(file)
        else:
            payload.add(dest, file)
    pycdir = tempfile.mkdtemp(prefix="pyc-", dir=tmpdir)
    for dest, path in compile_pycs(sources, pycdir, python).items():
        payload.add(dest, path)
    for dist_path in sorted(set(report.get("dists", {}).values())):
        dest = _dest_for(os.path.join(dist_path, "METADATA"), own_root, stdlib, dynload)
        if not dist_path.endswith(".dist-info") or dest is None:
            continue
        for fname in DIST_FILES:
            src = os.path.join(dist_path, fname)
            if os.path.exists(src):
                payload.add(f"{os.path.dirname(dest)}/{fname}", src)
    # The stdlib landmark must exist as a file even though os is frozen into the binary.
    if f"{DEST_STDLIB}/os.pyc" not in payload.files:
        raise ConfigError("the import probe did not report os.py; cannot place the stdlib")
    exe = os.path.realpath(python)
    payload.add(f"{DEST_BIN}/{PYVER}", strip_into(exe, tmpdir), 0o755)
    payload.symlinks[f"{DEST_BIN}/python3"] = PYVER
    elves.append(exe)
    libs = shared_libs(elves)
    for name in DLOPENED_LIBS:
        path = find_system_lib(name)
        if path is None:
            raise NotSupported(f"{name} not found on this host (ldconfig -p)")
        libs.setdefault(name, path)
    for name in NSS_LIBS:
        path = find_system_lib(name)
        if path is not None:
            libs.setdefault(name, path)
    for name, lib in libs.items():
        if name.startswith("/"):
            # the dynamic linker: keep its absolute path (PT_INTERP), under /usr
            dest = "usr" + name if not name.startswith("/usr/") else name[1:]
        else:
            dest = f"{DEST_LIBDIR}/{name}"
        payload.add(dest, strip_into(os.path.realpath(lib), tmpdir), 0o755)
        payload.libraries[dest] = os.path.realpath(lib)
    return payload
