"""Per-page helpers of the writers: pure-Python references of ``_speedups`` functions."""

from __future__ import annotations

import array

PAGE = 4096
ZERO_PAGE = bytes(PAGE)


def zero_mask_py(src, offsets: array.array) -> bytes:
    """One bit per page (LSB first), 1 = the page at ``src[offsets[i]:+PAGE]`` is all zero.

    The reference of ``_speedups.zero_pages``.
    """
    mask = bytearray((len(offsets) + 7) // 8)
    for i, o in enumerate(offsets):
        if bytes(src[o : o + PAGE]) == ZERO_PAGE:  # a memoryview compares item by item
            mask[i >> 3] |= 1 << (i & 7)
    return bytes(mask)
