"""XXH3-128 through the xxhash package: the only module that imports it (see checksum).

Kept apart so that the capture initramfs builder packs ``xxhash`` only when
KDUMP_CHECKSUM=xxh3, the default (initramfs.runtime.FEATURE_MODULES["xxh3"]).
"""

from __future__ import annotations

from xxhash import xxh3_128

__all__ = ["xxh3_128"]
