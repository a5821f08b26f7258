"""Registry of dump transports by URL scheme, imported lazily with install hints."""

from __future__ import annotations

import importlib
import sys
from types import MappingProxyType

from kdump_capture.errors import NotSupported
from kdump_capture.urls import Target

from .base import Transport, TransportSettings

# Canonical scheme -> (module:class, hint when its import fails). Imported on first use,
# so the capture kernel only loads the transport its target needs.
_REGISTRY: dict[str, tuple[str, str]] = {
    "file": ("transports.file:FileTransport", ""),
    "nfs": ("transports.nfs:NfsTransport", ""),
    "cifs": ("transports.cifs:CifsTransport", "install smbprotocol: pip install smbprotocol"),
    "ftp": ("transports.ftp:FtpTransport", ""),
    "sftp": ("transports.sftp:SftpTransport", "install paramiko: pip install paramiko"),
    "s3": ("transports.s3:S3Transport", "install botocore: pip install botocore"),
}
registry = MappingProxyType(_REGISTRY)

# paramiko.config imports invoke, when it is installed, only to run ssh_config "Match exec"
# lines, and we read no ssh_config. On a host that has invoke (fabric's) it cost each SFTP
# save 60 ms of start-up (with asyncio and unittest.mock). The capture image never packs
# it (initramfs/runtime.py BLOCKED); a save on the host does without it alike. Here, not in
# transports.sftp: this package is imported before any of its modules.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]


def transport_class(scheme: str) -> type[Transport]:
    """The transport class for a canonical scheme; raises NotSupported with a hint."""
    try:
        spec, hint = _REGISTRY[scheme]
    except KeyError:
        raise NotSupported(
            f"the {scheme!r} target scheme is not supported yet by this build"
        ) from None
    modname, _, clsname = spec.partition(":")
    try:
        module = importlib.import_module(modname)
    except ImportError as e:
        raise NotSupported(f"the {scheme} transport cannot load ({e}); {hint}") from e
    return getattr(module, clsname)


def open_transport(target: Target, settings: TransportSettings) -> Transport:
    """An unconnected transport for ``target``."""
    return transport_class(target.scheme)(target, settings)
