"""Build a real capture initramfs and check it: listing, contents, and that the packed
Python runs (chroot into the unpacked tree) with only .pyc files."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import zstandard

from initramfs import builder, cpio, runtime
from kdump_capture.cli import main as cli_main
from kdump_capture.config import load_config
from kdump_capture.errors import ConfigError

# Scripts and KDUMP_CONTINUE_ON_ERROR=no need /bin/sh: busybox gets packed.
SETTINGS = [
    "KDUMP_SAVEDIR=file:///var/crash",
    "KDUMP_CONTINUE_ON_ERROR=no",
    "KDUMP_POSTSCRIPT=echo done",
    "KDUMP_REQUIRED_PROGRAMS=true",
]
CFG = load_config(None, SETTINGS)
KVER = "9.9.9-test"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def fake_elf(mod: str) -> bytes:
    """A fake module's bytes: ELF magic and its name (without a compression suffix)."""
    return b"\x7fELF fake " + mod.encode()


# A module file compressed as kmod and the distributions do (.ko.xz: RHEL, SUSE, Debian 13;
# .ko.zst: Ubuntu 24.04; .ko.gz: older Arch).
COMPRESSORS = {
    "": lambda data: data,
    ".xz": lambda data: lzma.compress(data, check=lzma.CHECK_CRC32),
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
    ".gz": lambda data: gzip.compress(data),
}


def fake_modules_root(base: Path, suffixes: dict[str, str] | None = None) -> Path:
    """A modules tree for KVER under ``base``; ``suffixes`` compresses some modules
    (module name -> ".xz", ".zst" or ".gz")."""
    suffixes = suffixes or {}
    root = base / "lib/modules" / KVER
    dep = {
        "kernel/drivers/virtio/virtio_ring.ko": [],
        "kernel/drivers/virtio/virtio.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/drivers/virtio/virtio_pci.ko": ["kernel/drivers/virtio/virtio.ko"],
        "kernel/drivers/block/virtio_blk.ko": ["kernel/drivers/virtio/virtio.ko"],
        "kernel/drivers/net/virtio_net.ko": ["kernel/drivers/virtio/virtio.ko"],
        "kernel/fs/xfs/xfs.ko": [],
    }

    def name(mod: str) -> str:
        return mod + suffixes.get(Path(mod).stem, "")

    dep = {name(m): [name(d) for d in deps] for m, deps in dep.items()}
    for mod in dep:
        (root / mod).parent.mkdir(parents=True, exist_ok=True)
        ext = Path(mod).suffix if Path(mod).suffix != ".ko" else ""
        (root / mod).write_bytes(COMPRESSORS[ext](fake_elf(mod.removesuffix(ext))))
    (root / "modules.dep").write_text("".join(f"{m}: {' '.join(d)}\n" for m, d in dep.items()))
    (root / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    return root


def build_image(cfg, out, base: Path, root: Path | None = None, **kw) -> builder.BuildReport:
    """``initramfs build`` for the test kernel version, its fake modules made under ``base``
    (or those in ``root``), and a local target on a file system labelled "crash" (ext4
    unless ``target_fstype`` says)."""
    kw.setdefault("target_fstype", "ext4")
    return builder.build(
        cfg,
        str(out),
        kernel_version=KVER,
        modules_root=str(root or fake_modules_root(base)),
        target_device="LABEL=crash",
        **kw,
    )


def _packed_python(tree, *args: str) -> subprocess.CompletedProcess:
    """The image's own interpreter, run in the unpacked image (chroot), isolated."""
    return subprocess.run(
        [CHROOT, str(tree), "/usr/bin/python3", "-I", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin"},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("build")
    out = base / "images" / "initrd.img"  # the builder makes the directory
    old_umask = os.umask(0o022)  # as on a default system: files 644, directories 755
    try:
        report = build_image(CFG, out, base)
    finally:
        os.umask(old_umask)
    tree = base / "tree"
    tree.mkdir()
    raw = zstandard.ZstdDecompressor().stream_reader(out.read_bytes()).read()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=tree, check=True)
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True)
    return report, out, tree, listing.stdout.decode().split(), raw


def test_report_and_size_goals(built):
    report, out, _tree, _names, raw = built
    assert report.compressed == os.path.getsize(out)
    assert report.unpacked == len(raw)
    assert report.compressed <= 12 * 1024 * 1024
    assert report.unpacked <= 32 * 1024 * 1024
    text = report.summary()
    assert "MiB zstd" in text and "virtio_blk" in text


def test_image_is_private_and_records_its_inputs(built):
    """The image holds passwords and keys: 0600 in a 0700 directory under umask 022; the
    record beside it (0600) says what it was built from, so ``load`` can tell it is stale."""
    from kdump_capture.load import rebuild

    _report, out, _tree, _names, _raw = built
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.parent.stat().st_mode & 0o777 == 0o700
    record = Path(rebuild.record_path(str(out)))
    assert record.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, record.name])
    root = out.parent.parent / "lib/modules" / KVER  # as built (depmod not run again)
    args = dict(kernel_version=KVER, modules_root=str(root), compress="zstd")
    args.update(target_device="LABEL=crash", target_fstype="ext4")
    assert rebuild.stale_reasons(str(out), rebuild.image_inputs(CFG, **args)) == []
    moved = load_config(None, [*SETTINGS, "KDUMP_SAVEDIR=ftp://10.0.0.9/dumps"])
    assert rebuild.stale_reasons(str(out), rebuild.image_inputs(moved, **args)) == [
        "configuration changed"
    ]


def test_what_a_killed_build_left_goes_with_the_next_build(tmp_path):
    """A build killed while it wrote left IMAGE.tmp.PID.RAND (0600, but holding the
    target's password or SSH key) for good. The next build of that image removes such
    files of ours (never through a link), while it holds the image's directory."""
    out = tmp_path / "images" / "initrd.img"
    out.parent.mkdir(mode=0o700)
    left = out.parent / "initrd.img.tmp.4242.0badc0de"
    left.write_bytes(b"password")
    left_record = out.parent / "initrd.img.inputs.json.tmp.4242.0badc0de"
    left_record.write_bytes(b"{}")
    other = tmp_path / "other"
    other.write_bytes(b"not ours to delete")
    link = out.parent / "initrd.img.tmp.1.0000abcd"
    link.symlink_to(other)
    # an admin's copy under a name that only begins like ours (with --output in /boot)
    kept = out.parent / "initrd.img.tmp.before-upgrade"
    kept.write_bytes(b"the admin's")
    build_image(CFG, out, tmp_path)
    assert not left.exists() and not left_record.exists()
    assert other.read_bytes() == b"not ours to delete" and link.is_symlink()
    assert kept.read_bytes() == b"the admin's"
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, "initrd.img.inputs.json", link.name, kept.name]
    )


def test_layout(built):
    _report, _out, tree, names, _raw = built
    for must in (
        "init",
        "dev/console",
        "usr/bin/python3",
        "etc/sysconfig/kdump",
        "etc/kdump-capture/init.json",
        "usr/lib/python3.11/os.pyc",
    ):
        assert must in names
    assert os.access(tree / "init", os.X_OK)
    # glibc before 2.34 resolves no name without its NSS modules (dlopen: ldd misses them)
    for nss in ("libnss_files.so.2", "libnss_dns.so.2"):
        if runtime.find_system_lib(nss):
            assert f"{runtime.DEST_LIBDIR}/{nss}" in names
    sources = [n for n in names if n.endswith(".py")]
    assert sources == [], "only compiled .pyc files are packed"
    # modules for a local ext4 target: storage, no network, no unneeded filesystems
    mods = [n for n in names if n.endswith(".ko")]
    assert any(n.endswith("virtio_blk.ko") for n in mods)
    assert not any(n.endswith(("virtio_net.ko", "xfs.ko")) for n in mods)


def test_plan_and_config(built):
    _report, _out, tree, _names, _raw = built
    plan = json.loads((tree / "etc/kdump-capture/init.json").read_text())
    assert plan["network"]["mode"] == "none"
    assert plan["mounts"] == [{"source": "LABEL=crash", "fstype": "ext4", "target": "/kdump/mnt0"}]
    assert plan["on_success"] == "reboot" and plan["on_failure"] == "shell"
    loaded = [os.path.basename(m) for m in plan["modules"]]
    assert (
        loaded.index("virtio_ring.ko") < loaded.index("virtio.ko") < loaded.index("virtio_blk.ko")
    )
    for m in plan["modules"]:
        assert (tree / m.lstrip("/")).exists() or (tree / "usr" / m.lstrip("/")).exists()
    conf = (tree / "etc/sysconfig/kdump").read_text()
    assert "KDUMP_SAVEDIR='file:///kdump/mnt0/var/crash'\n" in conf
    assert "KDUMP_IMMEDIATE_REBOOT='yes'\n" in conf


def test_compressed_modules_are_packed_as_the_elf_files_the_kernel_loads(tmp_path):
    """Distributions compress their modules (.ko.xz, .ko.zst, .ko.gz). /init loads with
    finit_module(2) and no MODULE_INIT_COMPRESSED_FILE, which a kernel before 5.17 (RHEL 9)
    does not know at all: a compressed file fails there ("Exec format error") and the
    target's disk or NIC never comes up. The image holds them unpacked, as .ko."""
    suffixes = {"virtio_ring": ".zst", "virtio": ".gz", "virtio_blk": ".xz"}
    out = tmp_path / "initrd.img"
    root = fake_modules_root(tmp_path, suffixes)
    build_image(CFG, out, tmp_path, root)
    raw = zstandard.ZstdDecompressor().stream_reader(out.read_bytes()).read()
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=tree, check=True)
    plan = json.loads((tree / "etc/kdump-capture/init.json").read_text())
    loaded = [os.path.basename(m) for m in plan["modules"]]
    assert loaded == ["virtio_ring.ko", "virtio.ko", "virtio_pci.ko", "virtio_blk.ko"]
    for m in plan["modules"]:
        rel = m.removeprefix(f"/usr/lib/modules/{KVER}/")
        assert (tree / m.lstrip("/")).read_bytes() == fake_elf(rel)
    assert not [n for n in tree.rglob("*") if n.suffix in (".xz", ".zst", ".gz")]


def test_an_ext3_target_gets_the_ext4_module_that_mounts_it(tmp_path):
    """mountinfo says ext3 for an ext3 file system, which the ext4 module mounts (``alias
    fs-ext3 ext4`` in modules.alias): the image had no file system module at all."""
    root = fake_modules_root(tmp_path)
    (root / "kernel/fs/ext4").mkdir(parents=True)
    (root / "kernel/fs/ext4/ext4.ko").write_bytes(fake_elf("kernel/fs/ext4/ext4.ko"))
    with open(root / "modules.dep", "a") as f:
        f.write("kernel/fs/ext4/ext4.ko:\n")
    (root / "modules.builtin").write_text("kernel/fs/vfat/vfat.ko\n")
    (root / "modules.alias").write_text("alias fs-ext4 ext4\nalias fs-ext3 ext4\n")
    out = tmp_path / "initrd.img"
    report = build_image(CFG, out, tmp_path, root, target_fstype="ext3")
    assert "ext4" in report.kernel_modules


@pytest.mark.parametrize(
    ("savedir", "fstype", "message"),
    [
        ("file:///var/crash", "btrfs", "no driver for the btrfs filesystem"),
        ("nfs://server/dumps", "", "no driver for the NFS client .*; NFSv4 or NFSv3"),
    ],
)
def test_a_target_whose_driver_the_kernel_lacks_fails_the_build(tmp_path, savedir, fstype, message):
    """A filesystem or NFS client that is neither a module nor built in: the image could
    not write the target at the crash. The build fails (exit 2) naming what is missing."""
    cfg = load_config(None, [f"KDUMP_SAVEDIR={savedir}"])
    out = tmp_path / "initrd.img"
    root = fake_modules_root(tmp_path)
    with pytest.raises(ConfigError, match=message):
        builder.build(
            cfg,
            str(out),
            kernel_version=KVER,
            modules_root=str(root),
            target_device="LABEL=crash" if fstype else "",
            target_fstype=fstype,
        )
    assert not out.exists()


def test_packed_python_runs_from_pyc_only(built):
    """The runtime is complete: the packed interpreter starts, finds its stdlib and imports
    the capture modules, with no compiler work (no sources present)."""
    _report, _out, tree, _names, _raw = built
    code = (
        "import sys, hashlib, transports.file, kdump_capture.urls;"
        "print('hello', sys.prefix, hashlib.sha256(b'').hexdigest()[:8])"
    )
    r = _packed_python(tree, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hello", "/usr", "e3b0c442"]


def test_the_load_commands_run_from_the_packed_runtime(built):
    """The VM tests' first kernel runs `kdump-capture load --initrd` from a capture image's
    runtime, which has no builder: a check that imported initramfs.builder for one helper
    made every VM cycle fail ("No module named 'initramfs.builder'")."""
    _report, _out, tree, _names, _raw = built
    code = (
        "from kdump_capture import features\n"
        "from kdump_capture.config import load_config\n"
        "cfg = load_config(None, ['KDUMP_SAVEDIR=ftp://h/d', 'KDUMP_COMMANDLINE_APPEND=quiet'])\n"
        "features.check_supported(cfg)\n"
        "import kdump_capture.load.commands, kdump_capture.load.system\n"
        "print('ok')\n"
    )
    r = _packed_python(tree, "-c", code)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr
    # `status` (the first kernel prints it): it reads the targets as `list` does, and once
    # did so through notify, which imports email: "No module named 'email'"
    r = _packed_python(
        tree,
        "-m",
        "kdump_capture",
        "status",
        "--config",
        "/dev/null",
        "--set",
        "KDUMP_SAVEDIR=file:///tmp/none",
    )
    assert "last dump:   none" in r.stdout and "internal error" not in r.stderr, r.stderr


def test_pure_modules_come_deflated_from_the_zip(built):
    """.pyc files of the stdlib and of pure packages live in python311.zip (a third of their
    size in RAM), compiled without docstrings and column tables; no progress bar, no
    unicodedata (host names are ASCII: kdump_capture.idna stands in for the codec)."""
    _report, _out, tree, names, _raw = built
    assert not [
        n
        for n in names
        if n.startswith("usr/lib/python3.11/")
        and n.endswith(".pyc")
        and n != "usr/lib/python3.11/os.pyc"
        and "site-packages" not in n
    ]
    assert not [n for n in names if "tqdm/" in n or "unicodedata" in n or "idna" in n]
    code = (
        "import socket, kdump_capture.urls as u, transports.file as f\n"
        "print(u.__file__, f.__doc__, u.parse_savedir.__doc__)\n"
        "line = list(u.parse_savedir.__code__.co_positions())[0]\n"
        "print(line[2], line[3])\n"
        "try:\n    socket.getaddrinfo('127.0.0.1', 9)\nexcept LookupError as e:\n    print(e)\n"
        "import kdump_capture.idna as i; i.register()\n"
        "print(socket.getaddrinfo('127.0.0.1', 9)[0][4])\n"
        "try:\n    socket.getaddrinfo('b\\u00fccher.example', 9)\n"
        "except UnicodeError as e:\n    print('refused', 'no IDNA support' in str(e))\n"
        "from kdump_capture import speedups\n"
        "print(speedups.describe().split(' (')[0], speedups.module().__file__)\n"
    )
    r = _packed_python(tree, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "/usr/lib/python311.zip/kdump_capture/urls.pyc None None",
        "None None",
        "unknown encoding: idna",
        "('127.0.0.1', 9)",
        "refused True",
        # the package is zipped, its accelerator on disk beside the zip
        "compiled accelerator /usr/lib/python3.11/site-packages/kdump_capture/"
        + next(n for n in names if "/_speedups." in n).rpartition("/")[2],
    ]


def test_init_imports_resolve_in_the_packed_runtime(built):
    _report, _out, tree, _names, _raw = built
    r = _packed_python(
        tree, "-c", "import ctypes, fcntl, json, random, socket, struct; print('ok')"
    )
    assert r.stdout.strip() == "ok", r.stderr


def test_shell_and_required_programs_are_packed(built):
    _report, _out, tree, names, _raw = built
    assert "usr/bin/busybox" in names and os.readlink(tree / "usr/bin/sh") == "busybox"
    assert "usr/bin/true" in names
    r = subprocess.run(
        [CHROOT, str(tree), "/usr/bin/sh", "-c", "/usr/bin/true && echo ok"],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "ok", r.stderr


def _image_with_python() -> cpio.Archive:
    """What the builder has packed before KDUMP_REQUIRED_PROGRAMS: the interpreter of /init
    and of the save, and busybox with its applets."""
    arc = cpio.Archive()
    builder.base_layout(arc)
    arc.add_file("usr/bin/python3.11", b"\x7fELF the packed interpreter", 0o755)
    arc.add_symlink("usr/bin/python3", "python3.11")
    arc.add_file("usr/bin/busybox", Path(shutil.which("busybox")).read_bytes(), 0o755)
    for applet in builder.BUSYBOX_APPLETS:
        arc.add_symlink(f"usr/bin/{applet}", "busybox")
    return arc


def test_a_required_program_never_replaces_the_captures_own_interpreter(tmp_path, monkeypatch):
    """A python3 found first in PATH (a /usr/local/bin/python3 wrapper, say) silently
    replaced /usr/bin/python3, /init's interpreter: the image was built, and the capture
    kernel could not start /init at the crash. Now the build refuses it, naming both."""
    local = tmp_path / "bin"
    local.mkdir()
    (local / "python3").write_text('#!/bin/sh\nexec /usr/bin/python3.11 "$@"\n')
    (local / "python3").chmod(0o755)
    monkeypatch.setenv("PATH", f"{local}:{os.environ['PATH']}")
    arc = _image_with_python()
    with pytest.raises(ConfigError, match=r"python3: the capture image has its own /usr/bin/py"):
        builder.add_programs(arc, ["python3"])
    assert arc.get("usr/bin/python3").data == b"python3.11"
    # The same file as the image's own is no conflict; a busybox applet may be replaced by
    # the full program, and the same program named twice is packed once.
    assert builder.add_programs(arc, ["busybox"]) >= 1
    true = shutil.which("true")
    builder.add_programs(arc, ["mkdir", "true", true])
    assert arc.get("usr/bin/mkdir").data == Path(shutil.which("mkdir")).read_bytes()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../bin/true", "a relative path"),
        ("/", "/ is not an executable file"),  # was IsADirectoryError: exit 1, "a bug"
        ("/etc/passwd", "/etc/passwd is not an executable file"),
    ],
)
def test_a_required_program_that_is_no_program_is_a_config_error(name, message):
    with pytest.raises(ConfigError, match=f"KDUMP_REQUIRED_PROGRAMS: {name}: .*{message}"):
        builder.add_programs(cpio.Archive(), [name])


def test_two_required_programs_of_one_name_are_refused(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "tool").write_text(f"#!/bin/sh\necho {d}\n")
        (tmp_path / d / "tool").chmod(0o755)
    with pytest.raises(ConfigError, match="two programs would be /usr/bin/tool"):
        builder.add_programs(cpio.Archive(), [str(tmp_path / "a/tool"), str(tmp_path / "b/tool")])


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def _unpack(arc, tree: Path) -> Path:
    """``arc`` unpacked into the new directory ``tree``, as the kernel unpacks an image."""
    tree.mkdir()
    raw = io.BytesIO()
    arc.write(raw)
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw.getvalue(), cwd=tree, check=True)
    return tree


def test_a_required_script_gets_its_interpreter(tmp_path):
    """A script of KDUMP_REQUIRED_PROGRAMS was packed without the interpreter its #! line
    names: in the capture kernel "sh: tool: not found" (exit 127), at the crash. Now the
    interpreter is packed at that path with its libraries (through /usr/bin/env too), and
    the scripts run in the image (chroot into its unpacked tree)."""
    bash = _script(
        tmp_path / "bashtool", '#!/bin/bash\necho "bash tool ran: ${BASH_VERSINFO[0]}"\n'
    )
    env = _script(tmp_path / "envtool", "#!/usr/bin/env -S bash -e\necho env tool ran\n")
    sh = _script(tmp_path / "shtool", "#!/bin/sh\necho sh tool ran\n")
    arc = _image_with_python()
    builder.add_programs(arc, [bash, env, sh])
    assert arc.get("usr/bin/bash") is not None and arc.get("usr/bin/env") is not None
    assert arc.get("usr/bin/sh").data == b"busybox"  # the image's own sh does
    tree = _unpack(arc, tmp_path / "tree")
    r = subprocess.run(
        [CHROOT, str(tree), "/usr/bin/sh", "-c", "bashtool && envtool && shtool"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin"},
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("bash tool ran: ") and lines[0][-1].isdigit(), r.stdout
    assert lines[1:] == ["env tool ran", "sh tool ran"], r.stdout


def test_a_required_program_named_by_its_path_is_there_in_the_image(tmp_path):
    """KDUMP_REQUIRED_PROGRAMS=/usr/local/sbin/notify packed it at /usr/bin/notify only: a
    KDUMP_POSTSCRIPT (or KDUMP_TRANSFER) naming it by the same path was "not found"
    (exit 127) in the capture kernel. Now it is at its path too."""
    tool = _script(tmp_path / "notify", "#!/bin/sh\necho notified\n")
    arc = _image_with_python()
    builder.add_programs(arc, [tool])
    tree = _unpack(arc, tmp_path / "tree")
    r = subprocess.run(
        [CHROOT, str(tree), "/usr/bin/sh", "-c", f"{tool} && notify"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["notified", "notified"]


def test_a_required_script_whose_interpreter_is_missing_fails_the_build(tmp_path):
    tool = _script(tmp_path / "tool", "#!/opt/nowhere/bin/tclsh\nputs hi\n")
    with pytest.raises(ConfigError, match="tool: its interpreter /opt/nowhere/bin/tclsh not"):
        builder.add_programs(cpio.Archive(), [tool])
    tool = _script(tmp_path / "tool2", "#!/usr/bin/env no-such-interpreter-here\n")
    with pytest.raises(ConfigError, match="tool2: no-such-interpreter-here, which its /usr/bi"):
        builder.add_programs(cpio.Archive(), [tool])


def test_a_transfer_whose_program_is_not_in_the_image_fails_the_build(tmp_path, caplog):
    """KDUMP_TRANSFER=/usr/local/sbin/upload without it in KDUMP_REQUIRED_PROGRAMS built an
    image in which the command was "not found" (exit 127): no dump at the crash, and
    nothing said so before. Now the build fails naming it (a pre/post script: a warning)."""
    tool = _script(tmp_path / "upload", '#!/bin/sh\ncp "$KDUMP_VMCORE" /x\n')
    transfer = f'KDUMP_TRANSFER={tool} "$KDUMP_VMCORE"'
    cfg = load_config(None, ["KDUMP_SAVEDIR=file:///var/crash", transfer])
    with pytest.raises(ConfigError, match=f"KDUMP_TRANSFER: {tool} is not in the capture image"):
        build_image(cfg, tmp_path / "img", tmp_path)
    assert not (tmp_path / "img").exists()

    def check(*settings: str, programs: tuple[str, ...] = ()) -> None:
        arc = _image_with_python()
        builder.add_programs(arc, list(programs))
        builder.check_commands(load_config(None, list(settings)), arc)

    check(transfer, programs=(tool,))
    check('KDUMP_TRANSFER=A=1 cp "$KDUMP_VMCORE" /x')  # busybox's cp
    check('KDUMP_TRANSFER=cd /x && ./upload "$KDUMP_VMCORE"')  # not told without a shell
    check("KDUMP_PRESCRIPT=echo hi", "KDUMP_POSTSCRIPT=sleep 1; exit 0")
    with pytest.raises(ConfigError, match="KDUMP_TRANSFER: curl is not in the capture image"):
        check('KDUMP_TRANSFER=curl -T "$KDUMP_VMCORE" ftp://backup/')
    caplog.clear()
    check("KDUMP_POSTSCRIPT=/usr/local/bin/notify-crash --now", "KDUMP_PRESCRIPT=logger hi")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "KDUMP_PRESCRIPT: logger is not in the capture image, where the command would fail "
        "(not found); add it to KDUMP_REQUIRED_PROGRAMS",
        "KDUMP_POSTSCRIPT: /usr/local/bin/notify-crash is not in the capture image, where the "
        "command would fail (not found); add it to KDUMP_REQUIRED_PROGRAMS",
    ]


def test_cli_builds_with_config_and_set(tmp_path, capsys):
    conf = tmp_path / "kdump"
    conf.write_text('KDUMP_SAVEDIR="ftp://user:pw@10.0.2.2/dumps"\n')
    out = tmp_path / "ftp.img"
    rc = cli_main(
        [
            "initramfs",
            "build",
            "--config",
            str(conf),
            "--output",
            str(out),
            "--kernel-version",
            KVER,
            "--modules-root",
            str(fake_modules_root(tmp_path)),
            "--compress",
            "gzip",
            "--set",
            "KDUMP_NET_TIMEOUT=7",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "MiB gzip" in text and "virtio_net" in text and "busybox" not in text
    raw = subprocess.run(["gzip", "-dc", str(out)], capture_output=True, check=True).stdout
    tree = tmp_path / "t"
    tree.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=tree, check=True)
    plan = json.loads((tree / "etc/kdump-capture/init.json").read_text())
    assert plan["network"] == {
        "mode": "dhcp",
        "ifname": "",
        "mac": "",
        "address": "",
        "prefix": 0,
        "gateway": "",
        "timeout": 7,
    }
    assert not any(tree.rglob("xfs.ko"))
    with zipfile.ZipFile(tree / "usr/lib/python311.zip") as z:
        names = z.namelist()
    assert "transports/ftp.pyc" in names and "transports/sftp.pyc" not in names


def test_xxhash_is_packed_and_works_only_with_xxh3(built, tmp_path):
    """KDUMP_CHECKSUM=xxh3 (the default): the packed interpreter hashes with XXH3-128 (the
    xxhash package travels); an image with KDUMP_CHECKSUM=sha256 has no xxhash and says so as
    NotSupported, not a traceback."""
    code = (
        "from kdump_capture import checksum\n"
        "try:\n"
        "    h = checksum.new('xxh3-128')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "else:\n"
        "    h.update(b'abc'); print(h.hexdigest())\n"
    )

    def run(tree: Path) -> str:
        r = _packed_python(tree, "-c", code)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    _report, _out, tree, names, _raw = built
    assert [n for n in names if "/xxhash/" in n and "_xxhash" in n]
    assert run(tree) == "06b05ab6733a618578af5f94892f3950"  # xxh128sum of "abc"
    out = tmp_path / "sha256.img"
    builder.build(
        load_config(None, [*SETTINGS, "KDUMP_CHECKSUM=sha256"]),
        str(out),
        kernel_version=KVER,
        modules_root=str(fake_modules_root(tmp_path)),
        target_device="LABEL=crash",
        target_fstype="ext4",
    )
    tree = tmp_path / "tree"
    tree.mkdir()
    raw = zstandard.ZstdDecompressor().stream_reader(out.read_bytes()).read()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=tree, check=True)
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True)
    assert not [n for n in listing.stdout.decode().split() if "/xxhash/" in n]
    assert run(tree).startswith("NotSupported checksum xxh3-128 needs the xxhash package")


def test_local_paths_are_packed_as_the_urls_they_are(tmp_path):
    """The builder wrote the decoded path into the packed KDUMP_SAVEDIR: "/var/crash dumps"
    split into two targets and failed the capture kernel's configuration (exit 2 at the
    crash), "%2541" came back as "%41" and saved elsewhere, "?" and "#" were refused."""
    savedirs = ["file:///var/crash%20dumps/%2541", "file:///var/cr%3Fash%23"]
    cfg = load_config(None, [f"KDUMP_SAVEDIR={' '.join(savedirs)}", "KDUMP_CHECKSUM=sha256"])
    out = tmp_path / "initrd.img"
    build_image(cfg, out, tmp_path, compress="gzip")
    raw = gzip.decompress(out.read_bytes())
    subprocess.run(["cpio", "-idm", "--quiet", "etc/sysconfig/kdump"], input=raw, cwd=tmp_path)
    packed = load_config(str(tmp_path / "etc/sysconfig/kdump"))
    assert [t.path for t in packed.savedir] == [
        "/kdump/mnt0/var/crash dumps/%41",
        "/kdump/mnt1/var/cr?ash#",
    ]


def test_a_packed_config_that_would_not_load_fails_the_build():
    text = builder.capture_config(CFG, {"KDUMP_HOSTNAME": "-web01"})
    with pytest.raises(
        ConfigError, match=r"would not load there: /etc/sysconfig/kdump of the image:"
    ):
        builder.check_packed_config(text, ["/kdump/mnt0/var/crash"])
    # what the builder wrote for the host's "/var/crash%41": the capture kernel reads "crashA"
    text = builder.capture_config(CFG, {"KDUMP_SAVEDIR": "file:///kdump/mnt0/var/crash%41"})
    with pytest.raises(ConfigError, match="names .* instead of"):
        builder.check_packed_config(text, ["/kdump/mnt0/var/crash%41"])
    builder.check_packed_config(text, ["/kdump/mnt0/var/crashA"])


def test_a_dump_device_image_packs_what_the_device_needs(tmp_path):
    """KDUMP_DUMPDEV: the save writes the device only. The image has the disk drivers and
    busybox for the console it stays on (KDUMP_IMMEDIATE_REBOOT=yes notwithstanding), no
    transport, filesystem or network driver for KDUMP_SAVEDIR (which only ``recover``
    uses, on the host), and the save's device code imports in the packed runtime."""
    cfg = load_config(
        None, ["KDUMP_SAVEDIR=file:///var/crash sftp://u@h/d", "KDUMP_DUMPDEV=/dev/vdb"]
    )
    out = tmp_path / "initrd.img"
    report = builder.build(
        cfg, str(out), kernel_version=KVER, modules_root=str(fake_modules_root(tmp_path))
    )
    tree = tmp_path / "tree"
    tree.mkdir()
    raw = zstandard.ZstdDecompressor().stream_reader(out.read_bytes()).read()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=tree, check=True)
    names = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True)
    names = names.stdout.decode().split()
    plan = json.loads((tree / "etc/kdump-capture/init.json").read_text())
    assert plan["dump_device"]["path"] == "/dev/vdb"
    assert plan["mounts"] == [] and plan["network"]["mode"] == "none"
    assert plan["on_success"] == "shell" and plan["shell"] == "/usr/bin/sh"
    assert "usr/bin/busybox" in names
    mods = [os.path.basename(n) for n in names if n.endswith(".ko")]
    assert "virtio_blk.ko" in mods and "virtio_net.ko" not in mods and "xfs.ko" not in mods
    assert not [n for n in names if "paramiko" in n or n.startswith("root/.ssh")]
    conf = (tree / "etc/sysconfig/kdump").read_text()
    assert "KDUMP_DUMPDEV='/dev/vdb'\n" in conf
    r = _packed_python(tree, "-c", "import kdump_capture.cli, kdump_capture.dumpdev; print('ok')")
    assert r.stdout.strip() == "ok", r.stderr
    assert "dump device /dev/vdb" in report.extras


def test_an_image_for_another_architecture_is_refused(tmp_path, monkeypatch):
    """/init uses x86_64's system call numbers (finit_module is 313 there, another call on
    arm64): an image built on arm64 loaded no module at the crash. The build refuses it
    (exit 9) before anything is written."""
    from kdump_capture.errors import NotSupported

    builder.check_architecture("x86_64")
    with pytest.raises(NotSupported) as e:
        builder.check_architecture("aarch64")
    assert "x86_64 only" in str(e.value) and "aarch64" in str(e.value)
    assert e.value.exit_code == 9
    real = os.uname()
    monkeypatch.setattr(builder.os, "uname", lambda: os.uname_result((*real[:4], "aarch64")))
    with pytest.raises(NotSupported):
        build_image(CFG, tmp_path / "img", tmp_path)
    assert not (tmp_path / "img").exists()


def test_the_record_names_the_system_libraries_the_image_packs(built):
    import json

    from kdump_capture.load import rebuild

    _report, out, _tree, _names, _raw = built
    doc = json.loads(Path(rebuild.record_path(str(out))).read_text())
    names = {os.path.basename(p) for p in doc["libraries"]}
    assert "libc.so.6" in names and any(n.startswith("libz.so.1") for n in names), names
    assert all(v != "absent" for v in doc["libraries"].values())
