"""How much crashkernel= this machine and configuration need, from measurements.

Like ``kdumpctl estimate``, but added up from what was measured rather than guessed:

- the capture image's unpacked size (it stays in RAM: rootfs is tmpfs; the kernel modules
  among it are deleted once loaded, and then take about as much as loaded modules): from
  the record the builder writes beside the image;
- what the save's interpreter and imports take: measured by the builder, which imports the
  image's own modules with the interpreter it packs (``runtime.measure_save_imports``);
- the engine's buffers for the configured transport and format at their floor
  (``memory.FLOOR``: the save sizes them from MemAvailable and never goes below it);
- the bitmaps for this machine's RAM (``formats.filter.bitmap_memory``);
- the capture kernel itself and /init (``memory.KERNEL_RESERVED``, ``KERNEL_AND_INIT``,
  ``SAVE_SLACK``: measured in the capture kernel by bench/capture_fitness.py);
- and at least what unpacking the image takes: rootfs is tmpfs, which the kernel sizes at
  boot to half of its memory, so twice the unpacked image in whole pages, plus the
  compressed image and ``memory.ROOTFS_BOOT``.

The sum is rounded up to a multiple of 16 MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import memory
from ..errors import ConfigError

MIB = memory.MIB
PAGE = 4096


@dataclass
class Estimate:
    """The parts (bytes, in order) and the reservation they add up to."""

    parts: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def crashkernel(self) -> int:
        """The recommended reservation in bytes (a multiple of 16 MiB)."""
        return memory.round_up(self.total)

    def lines(self) -> list[str]:
        out = [f"  {name:<50} {n / MIB:6.1f} MiB" for name, n in self.parts]
        out.append(f"  {'total':<50} {self.total / MIB:6.1f} MiB")
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"recommended: crashkernel={self.crashkernel // MIB}M")
        return out


def machine_max_pfn(iomem: str = "/proc/iomem", meminfo: str = "/proc/meminfo") -> int:
    """Page frames up to the end of this machine's highest RAM (what the bitmaps cover).

    /proc/iomem shows the addresses to root; otherwise MemTotal (a lower bound) is used.
    """
    top = 0
    try:
        with open(iomem) as f:
            for line in f:
                if line.startswith(" ") or "System RAM" not in line:
                    continue
                start, _, end = line.split(":")[0].strip().partition("-")
                if int(end, 16) > int(start, 16):  # non-root readers see zeros
                    top = max(top, int(end, 16) + 1)
    except (OSError, ValueError):
        top = 0
    if not top:
        top = memory.read_meminfo(meminfo).get("MemTotal", 0)
    return (top + PAGE - 1) // PAGE


def estimate(
    cfg: Mapping[str, str], facts: Mapping[str, int], max_pfn: int, scheme: str | None = None
) -> Estimate:
    """The reservation for ``cfg`` with an image described by ``facts`` (pure)."""
    from ..formats.filter import bitmap_memory
    from ..urls import parse_savedir

    for key in ("unpacked", "save_imports"):
        if key not in facts:
            raise ConfigError(f"the image record has no {key!r}: rebuild the image")
    if scheme is None:
        targets, _ = parse_savedir(cfg["KDUMP_SAVEDIR"])
        # a fallback list: the target that needs the most
        schemes = [t.scheme for t in targets]
        scheme = max(schemes, key=lambda s: sum(_buffers(cfg, s, max_pfn * PAGE).values()))
    fmt = cfg["KDUMP_DUMPFORMAT"].strip().lower()
    level = _level(cfg)
    e = Estimate()
    e.parts.append(("capture kernel (code, data, struct pages)", memory.KERNEL_RESERVED))
    e.parts.append(("kernel allocations and /init", memory.KERNEL_AND_INIT))
    # /init deletes the module files once loaded, but the loaded modules take about as much
    # kernel memory (the estimate was 16M short for NFS, whose client is 7 MB of modules).
    modules = facts.get("kernel_modules", 0)
    e.parts.append(("unpacked image (rootfs in RAM)", facts["unpacked"] - modules))
    e.parts.append(("kernel modules (loaded)", modules))
    e.parts.append(("save: interpreter and imports (measured)", facts["save_imports"]))
    e.parts.append((f"save: {scheme} session", memory.SESSION.get(scheme, MIB)))
    for name, n in _buffers(cfg, scheme, max_pfn * PAGE).items():
        e.parts.append((f"save: {name}", n))
    if fmt in memory.KDUMP_FORMATS or (fmt == "elf" and level):
        bitmaps = bitmap_memory(max_pfn)
        if fmt == "elf":
            bitmaps += bitmaps // 2  # the ELF writer keeps a copy of the second bitmap
        e.parts.append((f"save: bitmaps for {max_pfn * PAGE / (1 << 30):.1f} GiB", bitmaps))
    e.parts.append(("kernel growth during the save (sockets, cache)", memory.SAVE_SLACK))
    # While the kernel unpacks the image, the compressed one is still in memory too; and
    # rootfs (tmpfs) takes at most half of what the kernel has then: the unpacked image,
    # each file in whole pages, must fit in that half.
    compressed = facts.get("compressed", 0)
    unpack = memory.KERNEL_RESERVED + compressed + facts["unpacked"]
    rootfs = memory.ROOTFS_BOOT + compressed + 2 * facts.get("rootfs", facts["unpacked"])
    if max(unpack, rootfs) > e.total:
        e.parts.append(
            (
                "more to unpack the image (rootfs: half of the memory at boot)",
                max(unpack, rootfs) - e.total,
            )
        )
    return e


def _level(cfg: Mapping[str, str]) -> int:
    try:
        return int(cfg["KDUMP_DUMPLEVEL"])
    except ValueError:
        return 0


def _buffers(cfg: Mapping[str, str], scheme: str, ram: int) -> dict[str, int]:
    """The save's buffers at their floor, for a vmcore about as large as ``ram``."""
    fmt = cfg["KDUMP_DUMPFORMAT"].strip().lower()
    return memory.save_buffers(scheme, fmt, _level(cfg), memory.FLOOR, ram)


def below_estimate(reserved: int, need: int) -> str | None:
    """``check``'s warning when a reservation is below the estimate (pure)."""
    if not reserved or reserved >= need:
        return None
    return (
        f"the reservation ({reserved >> 20} MiB) is below the estimate for this "
        f"configuration (crashkernel={need >> 20}M): a dump may be OOM-killed; "
        "see 'kdump-capture estimate'"
    )


def current_reservation(sysfs: str = "/sys") -> int:
    try:
        with open(f"{sysfs}/kernel/kexec_crash_size") as f:
            return int(f.read().strip() or "0")
    except (OSError, ValueError):
        return 0


def describe(e: Estimate, reserved: int) -> list[str]:
    """The breakdown, the recommendation and how it compares with the reservation."""
    out = ["crashkernel= estimate for this machine and configuration:", *e.lines()]
    if reserved:
        verdict = "enough" if reserved >= e.crashkernel else "BELOW the estimate"
        out.append(f"current reservation: {reserved // MIB} MiB ({verdict})")
    else:
        out.append("current reservation: none (no crashkernel=)")
    return out
