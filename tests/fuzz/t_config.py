"""Fuzz targets: the sysconfig parser (parse_sysconfig) and the whole load (load_config),
expansion included, on arbitrary bytes; --set overrides; the load-side word splitters."""

from __future__ import annotations

import os

from kdump_capture.config import load_config, parse_sysconfig
from kdump_capture.errors import ConfigError
from kdump_capture.loadside import kernel_words, kexec_words


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _parse(data: bytes) -> None:
    # A scope like load_config's: expansions of names not assigned in the file.
    parse_sysconfig(_text(data), "fuzz", {"KDUMP_SAVEDIR": "file:///var/crash", "X": "x" * 64})


def _load(data: bytes) -> None:
    """The file as load_config reads it (bytes: UTF-8 decoding is part of what is tested),
    through a memfd so that nothing touches the disk."""
    fd = os.memfd_create("kdump-fuzz")
    try:
        os.write(fd, data)
        cfg = load_config(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    cfg.redacted_lines()  # show-config of whatever was accepted


def _set(data: bytes) -> None:
    """Each line one --set NAME=VALUE, then show-config."""
    cfg = load_config(None, _text(data).split("\n"))
    cfg.redacted_lines()


def _words(data: bytes) -> None:
    text = _text(data)
    for split in (kernel_words, kexec_words):
        try:
            split(text)
        except ValueError as e:  # what config.py turns into a ConfigError
            raise ConfigError(str(e)) from None
    kernel_words(text, strict=False)  # /proc/cmdline: never refuses


TARGETS = {
    "config_parse": _parse,
    "config_load": _load,
    "config_set": _set,
    "cmdline_words": _words,
}
