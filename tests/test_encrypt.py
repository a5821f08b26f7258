"""Encrypted dumps (issue 11): round trips through `age` and `kdump-capture decrypt` on
every transport, tampering, wrong keys, markers, the plain summary switch, the initramfs."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdump_capture import checksum
from tests.servers.targets import make_target
from tests.test_age import _unblock_later
from tests.test_save_network import run_save, write_config
from tests.test_summary import _marker_sample

from .helpers import cli, save_args

KINDS = ("file", "sftp", "ftp", "cifs", "s3")
ENCRYPTED = ["README.txt", "dmesg.txt.age", "manifest.json", "summary.txt.age", "vmcore.age"]


def _run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, check=False, **kw)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert _run("age-keygen", "-o", str(d / "age.key")).returncode == 0
    assert _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "ed")).returncode == 0
    assert (
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "other")).returncode == 0
    )
    text = (d / "age.key").read_text()
    pub = next(ln.split(": ")[1] for ln in text.splitlines() if "public key:" in ln)
    return {
        "age_pub": pub.strip(),
        "age_key": str(d / "age.key"),
        "ssh_pub": " ".join((d / "ed.pub").read_text().split()[:2]),
        "ssh_key": str(d / "ed"),
        "other_key": str(d / "other"),
        "secrets": [text.encode(), (d / "ed").read_bytes()],
    }


def fetch(target, dest: Path) -> Path:
    """The one dump directory on the target, copied here as the server holds it."""
    files = [f for f in target.files() if not os.path.basename(f).startswith(".")]
    dirs = {f.split("/")[0] for f in files}
    assert len(dirs) == 1, files
    [name] = dirs
    out = dest / name
    out.mkdir(parents=True)
    for f in files:
        (out / f.split("/", 1)[1]).write_bytes(target.read_back(f))
    return out


def _no_marker(d: Path, marker: str) -> None:
    for f in d.iterdir():
        assert marker.encode() not in f.read_bytes(), f"{f.name} holds the marker in plain text"


@pytest.mark.parametrize("kind", KINDS)
def test_encrypted_round_trip(kind, request, keys, tmp_path):
    marker = f"KDUMP-SECRET-{secrets.token_hex(8)}"
    sample = tmp_path / "vmcore"
    _marker_sample(sample, marker)
    target = make_target(kind, request)
    conf = write_config(
        tmp_path / "kdump",
        target,
        KDUMP_ENCRYPT_TO=f"{keys['age_pub']} {keys['ssh_pub']}",
        KDUMP_DUMPFORMAT="compressed",  # written flattened even on seekable targets
        KDUMP_DUMPLEVEL="31",
    )
    r = run_save(conf, str(sample))
    assert r.rc == 0, r.err
    assert marker not in r.out + r.err
    d = fetch(target, tmp_path / "fetched")
    assert sorted(os.listdir(d)) == ENCRYPTED
    _no_marker(d, marker)
    readme = (d / "README.txt").read_text()
    assert "Kernel panic" not in readme and "Crash summary  : encrypted" in readme
    assert "kdump-capture decrypt --identity KEY DIR" in readme and "age -d -i KEY" in readme
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["crash_summary"] == {"encrypted": True}
    assert manifest["encryption"]["recipients"] == [keys["age_pub"], keys["ssh_pub"]]
    # verify needs no key: locally and where the dump lies
    assert cli("verify", str(d)).rc == 0
    r = cli("verify", "--config", conf, f"{target.url}/{d.name}")
    assert r.rc == 0, r.err
    # Debian's age decrypts every file; the plaintext matches the manifest
    for name, info in manifest["files"].items():
        if not name.endswith(".age"):
            continue
        r = _run("age", "-d", "-i", keys["age_key"], str(d / name))
        assert r.returncode == 0, r.stderr
        assert len(r.stdout) == info["plaintext"]["size"]
        algorithm, want = checksum.recorded(info["plaintext"], name)
        h = checksum.new(algorithm)
        h.update(r.stdout)
        assert h.hexdigest() == want
        if name == "vmcore.age":  # flattened: makedumpfile -R rebuilds it
            flat = tmp_path / "by-age.flat"
            flat.write_bytes(r.stdout)
            rebuilt = tmp_path / "by-age.kdump"
            with open(flat, "rb") as f:
                assert _run("makedumpfile", "-R", str(rebuilt), stdin=f).returncode == 0
            out = tmp_path / "by-age.txt"
            assert _run("makedumpfile", "--dump-dmesg", str(rebuilt), str(out)).returncode == 0
            assert marker in out.read_text()
    # our decrypt, with the SSH key: checks both checksums and rearranges the vmcore
    r = cli("decrypt", "--identity", keys["ssh_key"], str(d))
    assert r.rc == 0, r.err
    assert "rearranged from the flattened format" in r.out
    assert (d / "vmcore").read_bytes()[:8] == b"KDUMP   "
    out = tmp_path / "ours.txt"
    assert _run("makedumpfile", "--dump-dmesg", str(d / "vmcore"), str(out)).returncode == 0
    assert marker in out.read_text() == (d / "dmesg.txt").read_text()
    assert f"Kernel panic - not syncing: {marker}" in (d / "summary.txt").read_text()
    for f in ("vmcore", "dmesg.txt", "summary.txt"):
        assert os.stat(d / f).st_mode & 0o777 == 0o600


def test_elf_memory_marker_and_real_sample(real_sample, keys, tmp_path):
    """ELF level 0: the marker written into memory is in the decrypted vmcore and nowhere
    in the dump directory; the real sysrq-c sample's log marker likewise."""
    marker = f"KDUMP-SECRET-{secrets.token_hex(8)}"
    sample = tmp_path / "vmcore"
    _marker_sample(sample, marker)
    enc = f"KDUMP_ENCRYPT_TO={keys['age_pub']}"
    for src, level, mark in ((sample, "0", marker), (real_sample.path, "31", real_sample.marker)):
        dumps = tmp_path / f"dumps-{level}"
        r = cli(*save_args(str(src), str(dumps), enc, f"KDUMP_DUMPLEVEL={level}"))
        assert r.rc == 0, r.err
        [d] = list(dumps.iterdir())
        _no_marker(d, mark)
        out = tmp_path / f"plain-{level}"
        out.mkdir()
        r = cli("decrypt", "-i", keys["age_key"], "-o", str(out), str(d))
        assert r.rc == 0, r.err
        assert sorted(os.listdir(out)) == ["dmesg.txt", "summary.txt", "vmcore"]
        assert mark in (out / "dmesg.txt").read_text()
        if level == "0":
            assert (out / "vmcore").read_bytes() == sample.read_bytes()
        else:
            summary = (out / "summary.txt").read_text()
            assert summary.startswith("Crash          : Kernel panic - not syncing: sysrq")
            r = cli("summary", str(out / "vmcore"))
            assert r.rc == 0 and r.out == summary


def test_plain_summary_only_when_allowed(keys, tmp_path):
    sample = tmp_path / "vmcore"
    _marker_sample(sample, "OOPS-HERE")
    enc = f"KDUMP_ENCRYPT_TO={keys['ssh_pub']}"
    r = cli(*save_args(str(sample), str(tmp_path / "d"), enc, "KDUMP_ENCRYPT_SUMMARY=yes"))
    assert r.rc == 0, r.err
    [d] = list((tmp_path / "d").iterdir())
    readme = (d / "README.txt").read_text()
    assert readme.split("\n\n")[1].startswith("Crash          : Kernel panic - not syncing: OOPS")
    assert json.loads((d / "manifest.json").read_text())["crash_summary"]["kind"] == "panic"
    assert "summary.txt.age" in os.listdir(d)


def test_a_transfer_command_is_refused_with_encryption(keys, tmp_path):
    """KDUMP_TRANSFER replaces the built-in save, which is what encrypts: the command got
    the plain vmcore (exit 0, the marker on the "target"). A config error, before it runs."""
    sample = tmp_path / "vmcore"
    _marker_sample(sample, "KDUMP-SECRET-TRANSFER")
    copy = tmp_path / "copied"
    conf = tmp_path / "kdump"
    conf.write_text(
        f'KDUMP_ENCRYPT_TO="{keys["age_pub"]}"\nKDUMP_TRANSFER=\'cp "$KDUMP_VMCORE" {copy}\'\n'
    )
    args = ["--config", str(conf), "--set", f"KDUMP_SAVEDIR=file://{tmp_path / 'd'}"]
    r = cli("save", *args, "--vmcore", str(sample), "--no-reboot")
    assert r.rc == 2, r.err
    assert f"{conf}:2: KDUMP_TRANSFER" in r.err and f"KDUMP_ENCRYPT_TO ({conf}:1)" in r.err
    assert "plain text" in r.err
    assert not copy.exists() and not (tmp_path / "d").exists()
    # the side that builds and loads the image refuses it too (the same configuration)
    assert cli("show-config", *args).rc == 2


def test_tampered_and_wrong_key(keys, tmp_path):
    sample = tmp_path / "vmcore"
    _marker_sample(sample, "M")
    dumps = tmp_path / "d"
    r = cli(*save_args(str(sample), str(dumps), f"KDUMP_ENCRYPT_TO={keys['age_pub']}"))
    assert r.rc == 0, r.err
    [d] = list(dumps.iterdir())
    r = cli("decrypt", "-i", keys["other_key"], str(d))
    assert r.rc == 15, r.err
    assert "no identity given can decrypt it" in r.err and "wrong key" in r.err
    assert sorted(os.listdir(d)) == ENCRYPTED  # nothing written, no temporary left
    vm = d / "vmcore.age"
    data = bytearray(vm.read_bytes())
    data[len(data) // 2] ^= 0x01
    vm.write_bytes(bytes(data))
    assert cli("verify", str(d)).rc == 8
    r = cli("decrypt", "-i", keys["age_key"], str(d))
    assert r.rc == 8, r.err
    assert "was altered or truncated" in r.err
    assert not (d / "vmcore").exists()
    assert not [n for n in os.listdir(d) if n.startswith(".")]
    assert _run("age", "-d", "-i", keys["age_key"], str(vm)).returncode != 0
    # an unencrypted dump is not decrypted
    r = cli(*save_args(str(sample), str(tmp_path / "p")))
    [p] = list((tmp_path / "p").iterdir())
    assert cli("decrypt", "-i", keys["age_key"], str(p)).rc == 2


def test_initramfs_has_only_public_keys(keys, tmp_path):
    import zstandard

    from kdump_capture.config import load_config
    from tests.test_initramfs_build import CHROOT, build_image

    cfg = load_config(
        None,
        [
            "KDUMP_SAVEDIR=file:///var/crash",
            f"KDUMP_ENCRYPT_TO={keys['age_pub']} {keys['ssh_pub']}",
        ],
    )
    out = tmp_path / "initrd.img"
    build_image(cfg, out, tmp_path)
    raw = zstandard.ZstdDecompressor().stream_reader(out.read_bytes()).read()
    for secret in keys["secrets"]:
        for line in secret.splitlines():
            if len(line) > 20 and not line.startswith((b"#", b"-----")):
                assert line not in raw, "private key material in the initramfs"
    assert keys["age_pub"].encode() in raw and keys["ssh_pub"].encode() in raw
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=tree, check=True)
    code = (
        "from kdump_capture.config import load_config;"
        "from kdump_capture.age import encrypt_bytes;"
        "c = load_config('/etc/sysconfig/kdump');"
        "print(len(c.encrypt_to), encrypt_bytes(b'x', c.encrypt_to)[:21].decode())"
    )
    r = _run(CHROOT, str(tree), "/usr/bin/python3", "-I", "-c", code, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "age-encryption.org/v1"]


def test_encryption_stays_out_of_plain_images():
    from initramfs import runtime

    plain = set(runtime.entry_modules(["file"]))
    assert "kdump_capture.age" not in plain and not any(m.startswith("cryptography") for m in plain)
    assert "kdump_capture.age" in runtime.entry_modules(["file"], features=("encrypt",))


@pytest.fixture(scope="module")
def encrypted_dump(keys, tmp_path_factory):
    """One small encrypted dump directory (tests copy it before altering it)."""
    tmp = tmp_path_factory.mktemp("enc")
    sample = tmp / "vmcore"
    _marker_sample(sample, "M")
    r = cli(*save_args(str(sample), str(tmp / "d"), f"KDUMP_ENCRYPT_TO={keys['age_pub']}"))
    assert r.rc == 0, r.err
    [d] = list((tmp / "d").iterdir())
    return d


def _copy(d: Path, dest: Path) -> Path:
    shutil.copytree(d, dest)
    return dest


def test_decrypt_reads_the_manifest_and_stored_files_as_verify_does(keys, encrypted_dump, tmp_path):
    """decrypt had a manifest reader of its own: 16 MiB, no nesting bound (100,000 '[' was
    a RecursionError, exit 1), and it opened manifest.json and NAME.age blocking (a FIFO
    waited for a writer for good) and a linked NAME.age was 'no crash dump' (exit 3)."""
    deep = _copy(encrypted_dump, tmp_path / "deep")
    (deep / "manifest.json").write_text('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    r = cli("decrypt", "-i", keys["age_key"], str(deep))
    assert r.rc == 4 and "values" in r.err and "internal error" not in r.err, r.err
    big = _copy(encrypted_dump, tmp_path / "big")
    doc = json.loads((big / "manifest.json").read_text())
    doc["notes"] = ["x" * 1000] * 2000
    (big / "manifest.json").write_text(json.dumps(doc))
    r = cli("decrypt", "-i", keys["age_key"], str(big))
    assert r.rc == 4 and "larger than" in r.err, r.err
    untyped = _copy(encrypted_dump, tmp_path / "untyped")
    doc = json.loads((untyped / "manifest.json").read_text())
    doc["status"] = ["complete"]
    (untyped / "manifest.json").write_text(json.dumps(doc))
    r = cli("decrypt", "-i", keys["age_key"], str(untyped))
    assert r.rc == 4 and "'status'" in r.err, r.err
    linked = _copy(encrypted_dump, tmp_path / "linked")
    os.rename(linked / "dmesg.txt.age", tmp_path / "elsewhere.age")
    os.symlink(tmp_path / "elsewhere.age", linked / "dmesg.txt.age")
    r = cli("decrypt", "-i", keys["age_key"], str(linked))
    assert r.rc == 8 and "a symbolic link" in r.err, r.err
    for name, rc in (("manifest.json", 4), ("vmcore.age", 8)):
        d = _copy(encrypted_dump, tmp_path / f"fifo-{name}")
        os.unlink(d / name)
        os.mkfifo(d / name)
        _unblock_later(d / name)  # without the fix: read as empty instead of hanging
        r = cli("decrypt", "-i", keys["age_key"], str(d), timeout=60)
        assert r.rc == rc and "a FIFO; only regular files are read" in r.err, r.err
        assert not (d / "vmcore").exists()


def _encrypted_dir(d: Path, keys, files: dict[str, bytes | int], status: str = "complete") -> Path:
    """A dump directory holding ``files`` (name: plaintext, or a size of zeros) encrypted to
    the age key, with the manifest a save writes for them."""
    from kdump_capture.age import Encryptor, parse_recipients

    d.mkdir()
    entries = {}
    for name, plain in files.items():
        stored, plain_hash = checksum.new(checksum.XXH3), checksum.new(checksum.XXH3)
        size = [0]
        with open(d / f"{name}.age", "wb") as f:

            def out(view, f=f, stored=stored, size=size):
                stored.update(view)
                size[0] += f.write(view)

            enc = Encryptor(parse_recipients(keys["age_pub"]), out, plain_hash)
            if isinstance(plain, int):
                zeros = bytes(1 << 20)
                for _ in range(plain >> 20):
                    enc.write(zeros)
            else:
                enc.write(plain)
            enc.finish()
        entries[f"{name}.age"] = {
            "size": size[0],
            **checksum.entry(checksum.XXH3, stored.hexdigest()),
            "plaintext": {
                "name": name,
                "size": enc.plain_size,
                **checksum.entry(checksum.XXH3, plain_hash.hexdigest()),
            },
        }
    doc = {"status": status, "error": None if status == "complete" else "cut", "files": entries}
    (d / "manifest.json").write_text(json.dumps(doc))
    return d


def test_sigterm_during_decrypt_leaves_no_plaintext(keys, tmp_path):
    """SIGTERM killed decrypt silently (exit 143) and left the partial plaintext behind under
    its temporary name (134 MB of a 376 MB vmcore in the review)."""
    import time

    d = _encrypted_dir(tmp_path / "dump", keys, {"vmcore": 768 << 20})
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    argv = ["decrypt", "-i", keys["age_key"], "-o", str(out), str(d)]
    p = subprocess.Popen(
        [sys.executable, "-m", "kdump_capture", *argv], env=env, stderr=subprocess.PIPE, text=True
    )
    end = time.monotonic() + 60
    while not os.listdir(out) and time.monotonic() < end and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "decrypt ended before it could be stopped"
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err, err
    assert os.listdir(out) == []


def test_a_killed_decrypts_plaintext_is_removed_by_the_next(keys, tmp_path):
    """SIGKILL (or a power cut) left a decrypt's partial plaintext under its temporary name
    for good (0600, hidden, hundreds of MB of memory). The next decrypt into that directory
    removes it, and only it: not a file another decrypt is writing (it holds a lock on it
    while it exists), not a link, a FIFO or another user's file under such a name."""
    import fcntl
    import time

    d = _encrypted_dir(tmp_path / "dump", keys, {"vmcore": 768 << 20})
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def start(dumpdir: Path) -> subprocess.Popen:
        argv = ["decrypt", "-i", keys["age_key"], "-o", str(out), str(dumpdir)]
        return subprocess.Popen(
            [sys.executable, "-m", "kdump_capture", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def temporary() -> list[str]:
        return [n for n in os.listdir(out) if n.startswith(".vmcore.decrypt-")]

    def written() -> int:
        return sum(os.stat(out / n).st_size for n in temporary())

    p = start(d)
    end = time.monotonic() + 60
    while not written() and time.monotonic() < end and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "decrypt ended before it could be killed"
    p.kill()
    p.communicate(timeout=60)
    [left] = temporary()
    # What the next decrypt must leave alone under names like its own:
    busy = out / ".vmcore.decrypt-0123456789ab"  # another decrypt's, still being written
    busy_fd = os.open(busy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(busy_fd, fcntl.LOCK_EX)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"keep")
    os.symlink(elsewhere, out / ".dmesg.txt.decrypt-0123456789ab")
    os.mkfifo(out / ".summary.txt.decrypt-0123456789ab")
    theirs = out / ".vmcore.rearrange-0123456789ab"
    theirs.write_bytes(b"another user's")
    os.chown(theirs, 65534, 65534)
    # a small dump decrypted into the same directory meanwhile
    small = _encrypted_dir(tmp_path / "small", keys, {"dmesg.txt": b"log\n"})
    r = cli("decrypt", "-i", keys["age_key"], "-o", str(out), str(small))
    assert r.rc == 0, r.err
    assert f"removed {left} (" in r.err and "a decrypt that was killed" in r.err, r.err
    assert not (out / left).exists()
    assert busy.exists() and theirs.exists() and elsewhere.read_bytes() == b"keep"
    assert (out / ".dmesg.txt.decrypt-0123456789ab").is_symlink()
    assert (out / ".summary.txt.decrypt-0123456789ab").exists()
    assert r.err.count("removed") == 1
    os.close(busy_fd)
    os.unlink(busy)
    # A decrypt running while another starts in the same directory keeps its file.
    p = start(d)
    while not temporary() and time.monotonic() < end and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "decrypt ended before another could start"
    r = cli("decrypt", "-i", keys["age_key"], "-o", str(out), str(small))
    assert r.rc == 0 and "removed" not in r.err, r.err
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert os.path.getsize(out / "vmcore") == 768 << 20
    assert temporary() == []


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
@pytest.mark.parametrize("name", ["vmcore", "dmesg.txt"])
def test_an_output_name_taken_by_a_directory_or_fifo_is_refused_first(
    name, kind, keys, encrypted_dump, tmp_path
):
    """A directory or FIFO named like an output was found only once that file was decrypted
    (the whole vmcore first): exit 6, or exit 2 with rearrange's "name a file", the other
    files decrypted beside it; a FIFO named dmesg.txt was replaced. Now exit 2 first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if kind == "directory" else os.mkfifo(out / name)
    r = cli("decrypt", "-i", keys["age_key"], "-o", str(out), str(encrypted_dump))
    assert r.rc == 2, r.err
    assert f"{out / name}: a {kind}: decrypt writes a regular file" in r.err
    assert "nothing was decrypted" in r.err
    assert os.listdir(out) == [name]


@pytest.mark.parametrize(
    "command", [("dmesg", "vmcore.age"), ("dmesg", "dmesg.txt.age"), ("rearrange", "vmcore.age")]
)
def test_commands_that_read_a_dump_say_an_age_file_is_encrypted(command, encrypted_dump, tmp_path):
    """`dmesg vmcore.age` said "not an ELF, kdump-compressed or flattened dump", `rearrange`
    "not a flattened dump (signature b'age-encrypti')", where `summary` said to decrypt it."""
    verb, name = command
    out = [str(tmp_path / "out")] if verb == "rearrange" else []
    r = cli(verb, str(encrypted_dump / name), *out)
    assert r.rc == 4, r.err
    assert f"{name}: encrypted (age); decrypt it first (kdump-capture decrypt" in r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("status", ["incomplete", "failed"])
def test_decrypting_a_dump_that_is_not_complete_says_so(status, keys, tmp_path):
    """decrypt of an INCOMPLETE dump (the source ended half way) printed 'vmcore: ... OK' and
    exited 0: with --output the half vmcore stood alone, nothing saying it was cut short."""
    files = {"dmesg.txt": b"log\n", "vmcore": b"ELF half"} if status == "incomplete" else {}
    d = _encrypted_dir(tmp_path / "dump", keys, {**files, "summary.txt": b"x"}, status)
    out = tmp_path / "out"
    out.mkdir()
    r = cli("decrypt", "-i", keys["age_key"], "-o", str(out), str(d))
    assert r.rc == 13, r.err
    assert f"the dump is {status.upper()} (manifest.json: cut)" in r.err
    assert ("holds only what was saved" if files else "there is no vmcore") in r.err
    assert sorted(os.listdir(out)) == sorted(
        n.removesuffix(".age") for n in os.listdir(d) if n.endswith(".age")
    )


def test_an_output_that_cannot_be_written_is_named(keys, tmp_path):
    """A full --output directory, or a directory where an output goes, failed naming the
    stored file ("vmcore.age: No space left on device", exit 6), not the output."""
    from tests.servers.common import tmpfs

    d = _encrypted_dir(tmp_path / "dump", keys, {"dmesg.txt": b"log\n", "vmcore": 4 << 20})
    taken = tmp_path / "taken"
    (taken / "dmesg.txt").mkdir(parents=True)
    r = cli("decrypt", "-i", keys["age_key"], "-o", str(taken), str(d))
    # since stop 34 refused before anything is decrypted (exit 2), as an output argument is
    assert r.rc == 2 and f"{taken}/dmesg.txt: a directory: decrypt writes" in r.err, r.err
    assert os.listdir(taken) == ["dmesg.txt"]
    with tmpfs(str(tmp_path / "small"), "2m") as small:
        r = cli("decrypt", "-i", keys["age_key"], "-o", small, str(d))
        assert r.rc == 5 and f"decrypting to {small}/vmcore: No space left" in r.err, r.err
        assert os.listdir(small) == ["dmesg.txt"]  # no partial vmcore left


@pytest.mark.parametrize("name", [".bashrc", "README.txt", "manifest.json"])
def test_decrypt_writes_only_the_names_a_dump_encrypts(name, keys, tmp_path):
    """A manifest (on a shared target, another host's) listing '.bashrc.age', encrypted to
    a public key read from any other manifest, made `decrypt -o ~` replace ~/.bashrc."""
    d = _encrypted_dir(tmp_path / "dump", keys, {name: b"echo pwned\n"})
    home = tmp_path / "home"
    home.mkdir()
    (home / name).write_text("mine\n")
    r = cli("decrypt", "-i", keys["age_key"], "-o", str(home), str(d))
    assert r.rc == 4 and "is not a file a dump encrypts" in r.err, r.err
    assert os.listdir(home) == [name] and (home / name).read_text() == "mine\n"


@pytest.mark.parametrize("plaintext", [None, [1], {"size": "6"}, {"size": -1}, {"size": 1.5}])
def test_a_plaintext_record_of_the_wrong_shape_is_a_malformed_manifest(plaintext, keys, tmp_path):
    """A missing or wrong-typed plaintext record was exit 8 ("verification failed"), a
    wrong-typed size only after decrypting the whole file, and a size of "6" then read
    "size 6 ...; recorded 6 ...": a manifest not of ours is exit 4, before anything."""
    d = _encrypted_dir(tmp_path / "dump", keys, {"dmesg.txt": b"a log\n"})
    doc = json.loads((d / "manifest.json").read_text())
    entry = doc["files"]["dmesg.txt.age"]
    if plaintext is None:
        del entry["plaintext"]
    elif isinstance(plaintext, dict):
        entry["plaintext"].update(plaintext)
    else:
        entry["plaintext"] = plaintext
    (d / "manifest.json").write_text(json.dumps(doc))
    r = cli("decrypt", "-i", keys["age_key"], str(d))
    assert r.rc == 4 and "dmesg.txt.age" in r.err, r.err
    assert not (d / "dmesg.txt").exists()
