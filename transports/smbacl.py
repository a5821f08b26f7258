"""Owner-only access for what we create on an SMB share, through its security descriptor.

SMB has no Unix modes: a Samba server maps a new file's or directory's NT ACL from its
``create mask``/``directory mask`` and its umask (0755 and 0744 by default), so a dump
would be readable by every user of the server. After creating a file or directory, we read
its DACL; if it lets anyone but the owner in, we replace it with one protected ACE for the
owner (Samba stores that as a POSIX ACL: owner rwx, group and others nothing). A server
that already gives owner-only access (``force directory mode = 0700``) is left alone.

Security descriptors come from the server, so every offset and length is checked before
use (MS-DTYP 2.4.6 SECURITY_DESCRIPTOR, self-relative; 2.4.5 ACL; 2.4.4 ACE; 2.4.2 SID).
"""

from __future__ import annotations

import struct

from smbclient._io import SMBDirectoryIO, SMBFileIO, SMBFileTransaction
from smbprotocol.open import (
    SMB2QueryInfoRequest,
    SMB2QueryInfoResponse,
    SMB2SetInfoRequest,
    SMB2SetInfoResponse,
)

from kdump_capture.errors import TransportError

SMB2_0_INFO_SECURITY = 0x03
OWNER_SECURITY_INFORMATION = 0x1
DACL_SECURITY_INFORMATION = 0x4
READ_CONTROL = 0x00020000
WRITE_DAC = 0x00040000
FILE_ALL_ACCESS = 0x001F01FF
ACCESS_ALLOWED_ACE_TYPE = 0
INHERIT_ONLY_ACE = 0x08  # applies to children only, not to the object itself
SE_DACL_PRESENT = 0x0004
SE_DACL_PROTECTED = 0x1000  # no ACEs inherited from the parent
SE_SELF_RELATIVE = 0x8000
ACL_REVISION = 2

SD_HEADER = struct.Struct("<BBHIIII")  # revision, sbz1, control, owner/group/sacl/dacl offsets
ACL_HEADER = struct.Struct("<BBHHH")  # revision, sbz1, size, ace count, sbz2
ACE_HEADER = struct.Struct("<BBHI")  # type, flags, size, access mask
assert (SD_HEADER.size, ACL_HEADER.size, ACE_HEADER.size) == (20, 8, 8)
# A SID has at most 15 sub-authorities (MS-DTYP 2.4.2): 8 + 15 * 4 bytes.
SID_MAX = 68
# What we ask the server for: a descriptor with an owner and a DACL of a few dozen ACEs
# fits easily; a larger one is truncated by the server (STATUS_BUFFER_OVERFLOW) and refused.
QUERY_MAX = 64 << 10


class BadDescriptor(TransportError):
    """The server sent a security descriptor we cannot read."""


class NotApplied(TransportError):
    """The server took a new security descriptor without applying it."""


def _sid(buf: bytes, off: int) -> bytes:
    if off < SD_HEADER.size or off + 8 > len(buf):
        raise BadDescriptor(f"SID at {off} outside the {len(buf)}-byte descriptor")
    size = 8 + 4 * buf[off + 1]
    if buf[off] != 1 or size > SID_MAX or off + size > len(buf):
        raise BadDescriptor(f"bad SID at {off}")
    return bytes(buf[off : off + size])


def parse(sd: bytes) -> tuple[bytes | None, list[tuple[int, int, int, bytes]] | None]:
    """(owner SID, DACL as [(type, flags, mask, SID)], None if there is no DACL)."""
    if len(sd) < SD_HEADER.size:
        raise BadDescriptor(f"{len(sd)}-byte security descriptor")
    revision, _, control, owner_off, _, _, dacl_off = SD_HEADER.unpack_from(sd)
    if revision != 1 or not control & SE_SELF_RELATIVE:
        raise BadDescriptor(f"revision {revision}, control {control:#x}")
    owner = _sid(sd, owner_off) if owner_off else None
    if not control & SE_DACL_PRESENT or not dacl_off:
        return owner, None  # no DACL: everyone has every right
    if dacl_off < SD_HEADER.size or dacl_off + ACL_HEADER.size > len(sd):
        raise BadDescriptor(f"DACL at {dacl_off} outside the descriptor")
    _, _, acl_size, count, _ = ACL_HEADER.unpack_from(sd, dacl_off)
    end = dacl_off + acl_size
    if end > len(sd) or acl_size < ACL_HEADER.size:
        raise BadDescriptor(f"DACL of {acl_size} bytes at {dacl_off}")
    aces = []
    pos = dacl_off + ACL_HEADER.size
    for _ in range(count):
        if pos + ACE_HEADER.size > end:
            raise BadDescriptor(f"ACE at {pos} outside the DACL")
        kind, flags, size, mask = ACE_HEADER.unpack_from(sd, pos)
        if size < ACE_HEADER.size or pos + size > end:
            raise BadDescriptor(f"ACE of {size} bytes at {pos}")
        # Only the allow/deny ACEs carry a SID right after the mask; others are kept opaque.
        sid = _sid(sd, pos + ACE_HEADER.size) if kind in (0, 1) else b""
        aces.append((kind, flags, mask, sid))
        pos += size
    return owner, aces


def others_allowed(owner: bytes | None, dacl: list[tuple[int, int, int, bytes]] | None) -> bool:
    """Whether the DACL lets anyone but the owner do anything to the object itself."""
    if dacl is None:
        return True
    return any(
        kind == ACCESS_ALLOWED_ACE_TYPE and mask and sid != owner and not flags & INHERIT_ONLY_ACE
        for kind, flags, mask, sid in dacl
    ) or any(kind not in (0, 1) for kind, _, _, _ in dacl)


def owner_only(owner: bytes) -> bytes:
    """A self-relative descriptor with a protected DACL: full access for ``owner`` only."""
    ace = ACE_HEADER.pack(ACCESS_ALLOWED_ACE_TYPE, 0, ACE_HEADER.size + len(owner), FILE_ALL_ACCESS)
    ace += owner
    acl = ACL_HEADER.pack(ACL_REVISION, 0, ACL_HEADER.size + len(ace), 1, 0) + ace
    control = SE_DACL_PRESENT | SE_DACL_PROTECTED | SE_SELF_RELATIVE
    return SD_HEADER.pack(1, 0, control, 0, 0, 0, SD_HEADER.size) + acl


def _query(tx: SMBFileTransaction) -> None:
    req = SMB2QueryInfoRequest()
    req["info_type"] = SMB2_0_INFO_SECURITY
    req["output_buffer_length"] = QUERY_MAX
    req["additional_information"] = OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION
    req["file_id"] = tx.raw.fd.file_id

    def receive(request) -> bytes:
        resp = SMB2QueryInfoResponse()
        resp.unpack(tx.raw.fd.connection.receive(request)["data"].get_value())
        return resp["buffer"].get_value()

    tx += (req, receive)


def _set(tx: SMBFileTransaction, sd: bytes) -> None:
    req = SMB2SetInfoRequest()
    req["info_type"] = SMB2_0_INFO_SECURITY
    req["additional_information"] = DACL_SECURITY_INFORMATION
    req["file_id"] = tx.raw.fd.file_id
    req["buffer"] = sd

    def receive(request) -> None:
        SMB2SetInfoResponse().unpack(tx.raw.fd.connection.receive(request)["data"].get_value())

    tx += (req, receive)


def restrict(path: str, is_dir: bool, **kw) -> bool:
    """Make ``path`` (a UNC path we just created) accessible to its owner only.

    Returns True if its DACL had to be replaced. Raises smbprotocol's errors (the caller
    converts them) and BadDescriptor.
    """
    cls = SMBDirectoryIO if is_dir else SMBFileIO

    def query() -> tuple[bytes | None, list | None]:
        with SMBFileTransaction(cls(path, mode="r", desired_access=READ_CONTROL, **kw)) as tx:
            _query(tx)
        return parse(tx.results[0])

    owner, dacl = query()
    if not others_allowed(owner, dacl):
        return False
    if owner is None:
        raise BadDescriptor("the server reports no owner")
    with SMBFileTransaction(cls(path, mode="r", desired_access=WRITE_DAC, **kw)) as tx:
        _set(tx, owner_only(owner))
    # Samba with "nt acl support = no" (and other servers without ACLs) answers success and
    # changes nothing: the vmcore stayed 0744. Only what the server shows afterwards counts.
    if others_allowed(*query()):
        raise NotApplied("the server accepted an owner-only ACL but did not apply it")
    return True
