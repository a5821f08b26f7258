"""Fuzz targets: target URLs (KDUMP_SAVEDIR)."""

from __future__ import annotations

from kdump_capture.urls import parse_savedir


def _savedir(data: bytes) -> None:
    parse_savedir(data.decode("utf-8", "surrogateescape"))


TARGETS = {"savedir": _savedir}
