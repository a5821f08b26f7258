"""Reading ELF vmcores: synthetic samples, truncated and malformed files."""

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdump_capture.elf import EHDR, PHDR, PT_LOAD, Phdr, iter_notes, pack_note
from kdump_capture.errors import NoDumpError, VmcoreError
from kdump_capture.sample import SampleSpec, write_sample
from kdump_capture.vmcore import find_source, open_vmcore, parse_vmcoreinfo


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("vm") / "vmcore"
    write_sample(str(p), SampleSpec(ram_mib=8, cpus=3))
    return str(p)


def test_reads_sample(sample):
    with open_vmcore(sample) as vm:
        assert vm.kind == "elf"
        assert vm.nr_cpus == 3
        assert vm.release == "6.1.0-sample-amd64"
        assert vm.crash_time == 1764000000
        assert vm.page_size == 4096
        assert len(vm.loads) == 3
        assert vm.size == os.path.getsize(sample)
        assert vm.header_size % 4096 == 0


def test_truncated_names_offset(sample, tmp_path):
    cut = tmp_path / "cut"
    data = open(sample, "rb").read()
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(VmcoreError, match=r"offset 0x[0-9a-f]+: program header #3 .*truncated"):
        open_vmcore(str(cut))


def test_truncated_header(sample, tmp_path):
    cut = tmp_path / "cut"
    cut.write_bytes(open(sample, "rb").read()[:100])
    with pytest.raises(VmcoreError, match="file ends inside the program headers"):
        open_vmcore(str(cut))


@pytest.mark.parametrize(
    "patch, message",
    [
        ((0, b"\x7fELG"), "bad magic"),
        ((4, b"\x01"), "not ELF64"),
        ((5, b"\x02"), "not little-endian"),
        ((16, b"\x02\x00"), "not ET_CORE"),
    ],
)
def test_bad_headers(sample, tmp_path, patch, message):
    data = bytearray(open(sample, "rb").read(8192))
    off, b = patch
    data[off : off + len(b)] = b
    p = tmp_path / "bad"
    p.write_bytes(bytes(data))
    with pytest.raises(VmcoreError, match=message):
        open_vmcore(str(p))


def test_load_past_end(sample, tmp_path):
    data = bytearray(open(sample, "rb").read())
    ph = Phdr.unpack_from(data, EHDR.size + PHDR.size)  # first PT_LOAD
    assert ph.type == PT_LOAD
    bad = Phdr(ph.type, ph.flags, len(data) + 4096, ph.vaddr, ph.paddr, ph.filesz, ph.memsz, 0)
    data[EHDR.size + PHDR.size : EHDR.size + 2 * PHDR.size] = bad.pack()
    p = tmp_path / "bad"
    p.write_bytes(bytes(data))
    with pytest.raises(VmcoreError, match=r"offset 0x78: program header #1 \(PT_LOAD\)"):
        open_vmcore(str(p))


def _with_load(sample, tmp_path, paddr, filesz, memsz, name="bad"):
    """The sample with its last PT_LOAD (#3) changed."""
    data = bytearray(open(sample, "rb").read())
    at = EHDR.size + 3 * PHDR.size
    ph = Phdr.unpack_from(data, at)
    assert ph.type == PT_LOAD
    data[at : at + PHDR.size] = Phdr(
        ph.type, ph.flags, ph.offset, ph.vaddr, paddr, filesz, memsz, 0
    ).pack()
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return str(p), ph


@pytest.mark.parametrize("paddr, memsz", [(1 << 32, 1 << 60), ((1 << 64) - 4096, 8192)])
def test_a_load_past_any_physical_address_space(sample, tmp_path, paddr, memsz):
    """p_paddr + p_memsz went unchecked: 2^60 bytes of memory claimed by a 4 MiB file made
    the save walk empty bitmap windows for hours, and a sum past 2^64 was taken as is."""
    p, _ = _with_load(sample, tmp_path, paddr, 4096, memsz)
    with pytest.raises(VmcoreError, match=r"offset 0xe8: PT_LOAD #3 claims physical memory "):
        open_vmcore(p)


def test_memory_with_no_data_in_the_file_is_not_dumped(sample, tmp_path):
    """A PT_LOAD may claim more memory than the file holds (p_memsz > p_filesz: an ELF
    dump's excluded pages; a corrupt header's petabytes). Only the pages with data count:
    1 PiB claimed beyond 4 MiB of data took 80-100 s of empty windows, then asked for
    6 TiB of free space."""
    from kdump_capture.formats import make_writer

    p, ph = _with_load(sample, tmp_path, 1 << 32, 4096, 1 << 50)
    with open_vmcore(p) as vm:
        w = make_writer(vm, "compressed", 0, True)
        assert w.lower_bound() < 64 << 20
        assert max(q.paddr + q.filesz for q in vm.loads) == (1 << 32) + 4096


def test_empty_and_missing(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with pytest.raises(VmcoreError, match="empty"):
        open_vmcore(str(p))
    with pytest.raises(NoDumpError):
        find_source(str(tmp_path / "nope"))


IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000a0000-000fffff : PCI Bus 0000:00
00100000-3ffdffff : System RAM
  01000000-01e02516 : Kernel code
  2b000000-3effffff : Crash kernel
3ffe0000-3fffffff : Reserved
fd000000-fdffffff : PCI Bus 0000:00
100000000-13fffffff : System RAM
"""


def test_raw_oldmem_style_char_device(tmp_path):
    # /dev/zero stands in for /dev/oldmem: a character device without an ELF header. Its
    # size is the end of System RAM in /proc/iomem; only RAM is read, holes are zeros.
    iomem = tmp_path / "iomem"
    iomem.write_text(IOMEM)
    with open_vmcore("/dev/zero", iomem=str(iomem)) as vm:
        assert vm.kind == "raw" and vm.size == 0x140000000
        assert vm.ram == [(0x1000, 0x9FC00), (0x100000, 0x3FFE0000), (0x100000000, 0x140000000)]
        assert vm.pread(16, 0) == bytes(16)


def test_raw_char_device_without_memory_map_is_refused(tmp_path):
    # Read as a user other than root, /proc/iomem shows only zeros: no size, no copy.
    iomem = tmp_path / "iomem"
    iomem.write_text("00000000-00000000 : System RAM\n00000000-00000000 : Reserved\n")
    with pytest.raises(VmcoreError, match="lists no System RAM"):
        open_vmcore("/dev/zero", iomem=str(iomem))
    with pytest.raises(VmcoreError, match="lists no System RAM"):
        open_vmcore("/dev/zero", iomem=str(tmp_path / "missing"))


def test_notes_round_trip():
    blob = pack_note(b"CORE", 1, b"x" * 336) + pack_note(b"VMCOREINFO", 0, b"A=1\nB=2\n")
    notes = iter_notes(blob)
    assert [(n.name, n.type, len(n.desc)) for n in notes] == [
        (b"CORE", 1, 336),
        (b"VMCOREINFO", 0, 8),
    ]
    assert blob[notes[1].offset : notes[1].offset + 8] == b"A=1\nB=2\n"


def test_note_past_end():
    blob = struct.pack("<III", 5, 1000, 1) + b"CORE\0\0\0\0"
    with pytest.raises(ValueError, match="past the end"):
        iter_notes(blob)


@settings(max_examples=200)
@given(st.binary(max_size=600))
def test_parser_never_crashes_on_garbage(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("g") / "x"
    p.write_bytes(b"\x7fELF\x02\x01\x01" + data)
    try:
        open_vmcore(str(p)).close()
    except VmcoreError:
        pass


@given(
    st.dictionaries(
        st.from_regex(r"[A-Z_()a-z.]{1,20}", fullmatch=True),
        st.from_regex(r"[0-9a-fx]{0,16}", fullmatch=True),
    )
)
def test_vmcoreinfo_parse(d):
    text = "".join(f"{k}={v}\n" for k, v in d.items())
    assert parse_vmcoreinfo(text) == d


def test_views_map_whole_2_mib_blocks(sample, monkeypatch):
    """Windows start and end at 2 MiB file offsets (a regular file's large page-cache
    folios then map with one PMD each); a scan in 1 MiB batches from an odd page maps each
    block at most twice, and every view holds the file's bytes."""
    import mmap as mmap_mod

    from kdump_capture import vmcore as vmcore_mod

    maps = []
    real = mmap_mod.mmap

    def counting(fd, length, *a, offset=0, **kw):
        maps.append((offset, length))
        return real(fd, length, *a, offset=offset, **kw)

    monkeypatch.setattr(vmcore_mod.mmap, "mmap", counting)
    win = vmcore_mod.MAP_WINDOW
    with open_vmcore(sample) as vm, open(sample, "rb") as f:
        size = os.path.getsize(sample)
        pos = 5 * 4096
        while pos + (1 << 20) <= size:
            v = vm.view(pos, 1 << 20)
            assert v is not None
            f.seek(pos)
            assert bytes(v[:4096]) == f.read(4096)
            f.seek(pos + (1 << 20) - 4096)
            assert bytes(v[-4096:]) == f.read(4096)
            pos += 1 << 20
    assert maps
    for off, length in maps:
        assert off % win == 0
        assert (off + length) % win == 0 or off + length == size
    blocks = -(-size // win)
    assert sum(length for _, length in maps) <= 2 * blocks * win
