"""The checksums a dump's files are recorded with: XXH3-128 (the default) or SHA-256.

The manifest names the algorithm of every file (``"algorithm"``, with the digest under the
algorithm's own name); an entry without one is SHA-256, as every manifest before
KDUMP_CHECKSUM was. The table here is the only list of what is known: an algorithm a
manifest names that is not in it is refused, never guessed.

XXH3-128 comes from the ``xxhash`` package (python-xxhash, the reference C library's
binding, a dependency of the project), imported only through ``xxh3sum`` so that a capture
image with KDUMP_CHECKSUM=sha256 leaves it out (initramfs.runtime.FEATURE_MODULES).

Why XXH3-128 by default: on the one CPU of a capture kernel SHA-256 (1.8 GB/s with SHA-NI)
cost more than the whole of `cp` + `sync` of an unfiltered ELF dump and more than a
reference client's whole upload (bench/RESULTS.md); XXH3-128 adds about 0.02 s per GB to
the 0.10 s of reading it. Both detect corruption, neither authenticates (whoever rewrites a
file can rewrite the manifest), so the cryptographic hash bought nothing the manifest can
promise.
"""

from __future__ import annotations

import hashlib
import re

from .errors import ManifestError, NotSupported
from .record import Record

SHA256 = "sha256"
XXH3 = "xxh3-128"


# typing.TYPE_CHECKING without importing typing, which costs the capture's start-up ~3 ms
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Hasher(Protocol):
        """What hashlib's objects and xxhash's have in common, and all we use of them."""

        def update(self, data: bytes | memoryview, /) -> None: ...
        def hexdigest(self) -> str: ...
        def copy(self) -> Hasher: ...


class Algorithm(Record):
    __slots__ = ("name", "config", "hex_digits", "what")

    def __init__(
        self,
        name: str,  # as the manifest records it
        config: str,  # the KDUMP_CHECKSUM value that selects it
        hex_digits: int,
        what: str,  # for messages and show-config
    ) -> None:
        self.name = name
        self.config = config
        self.hex_digits = hex_digits
        self.what = what


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(SHA256, "sha256", 64, "SHA-256 (hashlib)"),
        Algorithm(XXH3, "xxh3", 32, "XXH3-128 (the xxhash package)"),
    )
}
BY_CONFIG: dict[str, str] = {a.config: a.name for a in ALGORITHMS.values()}
INSTALL_HINT = "pip install xxhash, or apt-get install python3-xxhash"

_HEX = re.compile(r"[0-9a-f]+")


def new(name: str) -> Hasher:
    """A fresh hash object for ``name`` (a key of ALGORITHMS); NotSupported (exit 9) when
    its module is missing, before a byte is written."""
    if name == SHA256:
        return hashlib.sha256()
    if name == XXH3:
        try:
            from .xxh3sum import xxh3_128
        except ImportError as e:
            raise NotSupported(
                f"checksum {XXH3} needs the xxhash package ({e}); {INSTALL_HINT}"
            ) from None
        return xxh3_128()
    raise NotSupported(f"unknown checksum algorithm {name[:40]!r}")


def from_config(value: str) -> str:
    """The algorithm a KDUMP_CHECKSUM value (already validated by config) selects."""
    return BY_CONFIG[value]


def recorded(entry: dict, where: str) -> tuple[str, str]:
    """(algorithm, hex digest) of one file's manifest entry, validated: the entry is
    untrusted. No ``"algorithm"``: SHA-256 (manifests written before there was a choice)."""
    name = entry.get("algorithm", SHA256)
    if not isinstance(name, str):
        raise ManifestError(f"{where}: 'algorithm' is not a string")
    algo = ALGORITHMS.get(name)
    if algo is None:
        shown = ascii(name[:40])
        raise ManifestError(
            f"{where}: unknown checksum algorithm {shown} (known: {', '.join(ALGORITHMS)})"
        )
    digest = entry.get(name)
    if not isinstance(digest, str) or len(digest) != algo.hex_digits or not _HEX.fullmatch(digest):
        raise ManifestError(
            f"{where}: {name!r} is missing or not {algo.hex_digits} lowercase hex digits"
        )
    return name, digest


def entry(name: str, digest: str) -> dict:
    """The manifest's record of a digest: the algorithm named, the digest under its name
    (so a SHA-256 entry still has the ``"sha256"`` key older readers look for)."""
    return {"algorithm": name, name: digest}
