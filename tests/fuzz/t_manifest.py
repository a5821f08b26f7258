"""Fuzz targets: manifest.json as another host may leave it on a shared target."""

from __future__ import annotations

from kdump_capture import checksum, manifest


def _manifest(data: bytes) -> None:
    m = manifest.parse(data, "fuzz/manifest.json")
    # What verify and rotation do with a parsed manifest must not fail either.
    for name, record in m.files.items():
        assert manifest.plain_name(name) and record.size >= 0
        assert len(record.digest) == checksum.ALGORITHMS[record.algorithm].hex_digits
    assert m.complete in (True, False)


TARGETS = {"manifest": _manifest}
