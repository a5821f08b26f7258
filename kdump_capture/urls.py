"""Parse KDUMP_SAVEDIR target URLs (every scheme the SUSE tool and the 2009 seed document)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from .errors import UrlError

# Scheme as written -> canonical transport scheme. ssh and scp go through SFTP (paramiko):
# one implementation, resumable, and no remote shell commands.
SCHEMES: dict[str, str] = {
    "file": "file",
    "nfs": "nfs",
    "cifs": "cifs",
    "smb": "cifs",
    "ftp": "ftp",
    "ssh": "sftp",
    "sftp": "sftp",
    "scp": "sftp",
    # s3:// is https with verified certificates; s3+http:// is plain http
    "s3": "s3",
    "s3+http": "s3",
}
# S3 bucket names (the rules every store accepts for path-style requests).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)


@dataclass(frozen=True)
class Target:
    """One parsed dump target.

    ``path`` is absolute and percent-decoded. For CIFS the first path component is the
    share. ``password`` never appears in ``repr`` or ``redacted()``.
    """

    scheme: str
    spelled: str
    host: str = ""
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str = "/"

    def redacted(self) -> str:
        """The URL as a user would write it, with any password replaced by ``***``."""
        if self.scheme == "file":
            return f"file://{self.path}"
        auth = ""
        if self.user is not None:
            auth = quote(self.user, safe="")
            if self.password is not None:
                auth += ":***"
            auth += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.spelled}://{auth}{host}{port}{quote(self.path, safe='/:')}"

    def __str__(self) -> str:
        return self.redacted()

    @property
    def share(self) -> str:
        """CIFS share name: the first path component."""
        return self.path.strip("/").split("/", 1)[0]

    @property
    def share_path(self) -> str:
        """CIFS path below the share, without a leading slash."""
        parts = self.path.strip("/").split("/", 1)
        return parts[1] if len(parts) > 1 else ""


def parse_target(text: str) -> tuple[Target, list[str]]:
    """Parse one target URL. Returns the target and warnings to log.

    Raises UrlError with a message naming the offending part. Passwords are never
    echoed in error messages.
    """
    warnings: list[str] = []
    if not text:
        raise UrlError("empty target URL")
    if text.startswith("/"):
        warnings.append(f"KDUMP_SAVEDIR {text!r} has no scheme; treating it as file://{text}")
        return Target(scheme="file", spelled="file", path=_clean_path(unquote(text))), warnings
    m = _SCHEME_RE.match(text)
    if not m:
        raise UrlError(
            f"target {_scrub(text)!r} is not a URL; use file:///path, nfs://host/path, "
            "cifs://[user[:password]@]host/share/path, ftp://..., or sftp://..."
        )
    spelled = m.group(1).lower()
    rest = m.group(2)
    scheme = SCHEMES.get(spelled)
    if scheme is None:
        raise UrlError(
            f"target {_scrub(text)!r}: unknown scheme {spelled!r}; "
            f"known schemes: {', '.join(sorted(SCHEMES))}"
        )
    authority, _, path = rest.partition("/")
    path = "/" + path
    if "?" in path or "#" in path:
        raise UrlError(f"target {_scrub(text)!r}: query strings and fragments are not supported")

    user = password = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        u, sep, p = userinfo.partition(":")
        user = unquote(u)
        password = unquote(p) if sep else None
    host, port = _split_host_port(authority, text)
    host = unquote(host)

    if scheme == "file":
        if host and host != "localhost":
            raise UrlError(f"target {_scrub(text)!r}: a file URL cannot name a remote host")
        if user is not None:
            raise UrlError(f"target {_scrub(text)!r}: a file URL cannot carry a user")
        return Target(scheme="file", spelled="file", path=_clean_path(unquote(path))), warnings

    if scheme == "nfs" and not host:
        # The seed's form nfs:///server:/export/dir: the host sits in the path.
        m2 = re.match(r"^/([^/:]+):(/.*)$", path)
        if not m2:
            raise UrlError(
                f"target {_scrub(text)!r}: NFS needs a server: nfs://host/path or nfs:///host:/path"
            )
        host, path = unquote(m2.group(1)), m2.group(2)
    if not host:
        raise UrlError(f"target {_scrub(text)!r}: {spelled} needs a host name")
    path = _clean_path(unquote(path))
    if scheme == "cifs" and path == "/":
        raise UrlError(f"target {_scrub(text)!r}: CIFS needs a share: cifs://host/share[/path]")
    if scheme == "s3":
        bucket = path.strip("/").split("/", 1)[0]
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise UrlError(
                f"target {_scrub(text)!r}: S3 needs a bucket (3-63 of a-z 0-9 . -): "
                f"{spelled}://host[:port]/bucket[/prefix]"
            )
    return (
        Target(
            scheme=scheme,
            spelled=spelled,
            host=host,
            port=port,
            user=user,
            password=password,
            path=path,
        ),
        warnings,
    )


def parse_savedir(text: str) -> tuple[list[Target], list[str]]:
    """Parse KDUMP_SAVEDIR: one or more space-separated targets, tried in order."""
    items = text.split()
    if not items:
        raise UrlError("KDUMP_SAVEDIR is empty")
    targets: list[Target] = []
    warnings: list[str] = []
    for item in items:
        t, w = parse_target(item)
        targets.append(t)
        warnings.extend(w)
    return targets, warnings


def _split_host_port(authority: str, text: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise UrlError(f"target {_scrub(text)!r}: unterminated IPv6 address")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UrlError(f"target {_scrub(text)!r}: junk after IPv6 address")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = authority.partition(":")
    if port_text == "":
        return host, None
    if not re.fullmatch(r"[0-9]+", port_text) or not 0 < int(port_text) < 65536:
        raise UrlError(f"target {_scrub(text)!r}: the port is not a number 1-65535")
    return host, int(port_text)


def _clean_path(path: str) -> str:
    if "\0" in path:
        raise UrlError("target path contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UrlError(f"target path {path!r} must not contain '..'")
    return "/" + "/".join(parts)


def _scrub(text: str) -> str:
    """The URL text with any password removed, for error messages."""
    m = _SCHEME_RE.match(text)
    if not m:
        return text
    rest = m.group(2)
    at = rest.rfind("@")
    if at < 0:
        return text
    userinfo, tail = rest[:at], rest[at:]
    user = userinfo.split(":", 1)[0]
    return f"{m.group(1)}://{user}:***{tail}" if ":" in userinfo else text
