"""Fuzz targets: what an S3 store (or another host writing to it) sends back to the transport."""

from __future__ import annotations

from transports.s3 import error_code, parse_listing


def _listing(data: bytes) -> None:
    parse_listing(data)
    error_code(data)


TARGETS = {"s3_listing": _listing}
