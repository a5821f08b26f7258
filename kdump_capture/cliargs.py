"""Options every command that reads the configuration shares (--config, --set), and reading
the configuration from them. Used by the save-side CLI and the load side alike."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("kdump_capture")

DEFAULT_CONFIG = "/etc/sysconfig/kdump"


def config_args(p: argparse.ArgumentParser) -> None:
    """--config and --set, shared by every command that reads the configuration."""
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"sysconfig file (default {DEFAULT_CONFIG}; missing: built-in defaults)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        dest="overrides",
        help="override a directive (repeatable)",
    )


def load_config(args: argparse.Namespace):
    """The effective configuration of ``--config`` and ``--set``; warnings are logged."""
    from .config import load_config as parse

    cfg = parse(args.config, args.overrides)
    for w in cfg.warnings:
        log.warning("%s", w)
    return cfg
