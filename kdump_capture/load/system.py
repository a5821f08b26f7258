"""Can this machine do kdump: the kernel's configuration and reservation, the capture kernel
to use, and what ``check`` reports. Reads only; changes nothing."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import speedups
from .kexec import capture_cmdline, image_release, kernel_words, kexec_words

INITRD_DIR = "/var/lib/kdump-capture"

# The seed tutorial's message, word for word (kdump's init script printed it).
NOT_RESERVED = (
    "Memory for crashkernel is not reserved Please reserve memory by passing "
    '"crashkernel=X@Y" parameter to the kernel Then try loading kdump kernel'
)

REQUIRED_CONFIG = ("CONFIG_CRASH_DUMP", "CONFIG_PROC_VMCORE", "CONFIG_SYSFS")


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


def version_key(name: str) -> list:
    """Sort key that orders kernel versions as numbers: 5.10 after 5.9 (not before, as
    text)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def pick_kernel(kernelver: str, system: System) -> tuple[str, str]:
    """(version, image path) of the capture kernel for KDUMP_KERNELVER.

    Empty: the newest ``-kdump`` kernel in /boot if there is one, else the running kernel.
    An absolute path names the image itself; anything else is a version. The version of an
    image (whose modules the capture image packs) is what the image says
    (``kexec.image_release``): SUSE's ``/boot/vmlinuz`` is a link to the newest kernel
    installed, which need not be the running one.
    """
    kv = kernelver.strip()
    if kv.startswith("/"):
        return image_release(kv) or system.release, kv
    if not kv:
        try:
            kdumps = sorted(
                (
                    n
                    for n in os.listdir(system.boot)
                    if n.startswith("vmlinuz-") and n.endswith("-kdump")
                ),
                key=version_key,
            )
        except OSError:
            kdumps = []
        kv = kdumps[-1].removeprefix("vmlinuz-") if kdumps else system.release
    return kv, f"{system.boot}/vmlinuz-{kv}"


def initrd_path(version: str) -> str:
    return f"{INITRD_DIR}/initrd-{version}.img"


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
    #: what ``load`` will do about the initramfs (set by the commands)
    image_state: str = ""
    #: the crashkernel= estimate in bytes, when the image is known (set by ``check``)
    estimate: int = 0
    #: a line per KDUMP_SAVEDIR target, as ``check`` tried it (load.targets)
    targets: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        mib = self.reserved / (1024 * 1024)
        initrd_state = self.image_state or (
            "present" if os.path.exists(self.initrd) else "missing: load builds it"
        )
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
        if self.estimate:
            need = self.estimate >> 20
            out.append(f"estimate:       crashkernel={need}M (see kdump-capture estimate)")
        out += self.targets
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"problem: {p}" for p in self.problems]
        return out


def check_load_values(cfg: Mapping[str, str]) -> None:
    """ConfigError (exit 2, naming FILE:LINE when ``cfg`` is a Config) for a command line
    or KEXEC_OPTIONS that cannot be split into words (an unbalanced quote).

    load_config checks the same with the same functions; this keeps ``load`` and ``check``
    from failing with a traceback on a mapping that did not come from it.
    """
    from ..config import Config
    from ..errors import ConfigError

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
