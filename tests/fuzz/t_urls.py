"""Fuzz targets: target URLs (KDUMP_SAVEDIR) and their redaction."""

from __future__ import annotations

from kdump_capture.urls import parse_savedir, redact


def _savedir(data: bytes) -> None:
    parse_savedir(data.decode("utf-8", "surrogateescape"))


def _redact(data: bytes) -> None:
    """redact() takes any text (it runs on every log line): never fails, and is stable."""
    text = data.decode("utf-8", "surrogateescape")
    once = redact(text)
    assert redact(once) == once, "redact is not idempotent"
    targets, _ = parse_savedir(text)
    for t in targets:
        shown = f"{t} {t!r}"
        if t.password and len(t.password) >= 4 and t.password not in text.replace(t.password, ""):
            assert t.password not in shown, "a parsed password is shown"


TARGETS = {"savedir": _savedir, "url_redact": _redact}
