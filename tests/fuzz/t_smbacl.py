"""Fuzz target: security descriptors an SMB server sends (transports/smbacl.py)."""

from __future__ import annotations

from transports import smbacl


def _descriptor(data: bytes) -> None:
    owner, dacl = smbacl.parse(data)
    if smbacl.others_allowed(owner, dacl) and owner is not None:
        # what we would set instead: the owner alone (the descriptor sets no owner field)
        _, ours = smbacl.parse(smbacl.owner_only(owner))
        assert ours == [(0, 0, 0x1F01FF, owner)] and not smbacl.others_allowed(owner, ours)


TARGETS = {"smb_descriptor": _descriptor}
