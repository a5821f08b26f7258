"""Parse KDUMP_SAVEDIR target URLs (every scheme the SUSE tool and the 2009 seed document)."""

from __future__ import annotations

import re

from .errors import UrlError
from .record import Record

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


def unquote(text: str) -> str:
    """``urllib.parse.unquote``, imported only for text with a %-escape: a plain file://
    target then never loads urllib.parse and ipaddress (~5 ms of the capture's start-up)."""
    if "%" not in text:
        return text  # what urllib.parse.unquote returns for it
    from urllib.parse import unquote as percent_decode

    return percent_decode(text)


def quote(text: str, safe: str) -> str:
    """``urllib.parse.quote`` (for the URLs of network targets only; see ``unquote``)."""
    from urllib.parse import quote as percent_encode

    return percent_encode(text, safe=safe)


class Target(Record):
    """One parsed dump target.

    ``path`` is absolute and percent-decoded. For CIFS the first path component is the
    share. ``password`` never appears in ``repr``, ``str`` or ``redacted()``.
    """

    __slots__ = ("scheme", "spelled", "host", "port", "user", "password", "path")
    _unshown = ("password",)

    def __init__(
        self,
        scheme: str,
        spelled: str,
        host: str = "",
        port: int | None = None,
        user: str | None = None,
        password: str | None = None,
        path: str = "/",
    ) -> None:
        self.scheme = scheme
        self.spelled = spelled
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.path = path

    def redacted(self) -> str:
        """The URL as a user would write it, with any password replaced by ``***``.

        The result goes through ``redact`` too: a path may hold ``x:y@`` (a mistyped
        ``file:///user:pw@host/x`` is a valid file path) and is then shown as a password.
        """
        return redact(self._unredacted_text())

    def _unredacted_text(self) -> str:
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

    def __repr__(self) -> str:
        return f"Target({self.redacted()!r})"

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
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes (surrogate escapes from argv)
            raise UrlError(f"target {redact(text)!a}: not valid UTF-8") from None
    if text.startswith("/"):
        shown = redact(text)
        warnings.append(f"KDUMP_SAVEDIR {shown!r} has no scheme; treating it as file://{shown}")
        return Target(scheme="file", spelled="file", path=_clean_path(unquote(text))), warnings
    m = _SCHEME_RE.match(text)
    if not m:
        raise UrlError(
            # The hint shows no "user:password@": the redaction would mangle it.
            f"target {redact(text)!r} is not a URL; use file:///path, nfs://host/path, "
            "cifs://host/share/path, ftp://host/path or sftp://host/path (user and password "
            "go before the host; scp-style user@host:/path is sftp://user@host/path)"
        )
    spelled = m.group(1).lower()
    rest = m.group(2)
    scheme = SCHEMES.get(spelled)
    if scheme is None:
        raise UrlError(
            f"target {redact(text)!r}: unknown scheme {spelled!r}; "
            f"known schemes: {', '.join(sorted(SCHEMES))}"
        )
    authority, _, path = rest.partition("/")
    path = "/" + path
    if "?" in path or "#" in path:
        raise UrlError(f"target {redact(text)!r}: query strings and fragments are not supported")
    if "@" in path:
        # "ftp://u:pa/ss@host/x" would otherwise connect to host "pa" or "u" with a piece of
        # the password as path: an "@" after the host is taken for a mistyped password.
        raise UrlError(
            f"target {redact(text)!r}: '@' after the host; percent-encode '@' and '/' in "
            "passwords and paths (%40, %2F)"
        )

    user = password = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        u, sep, p = userinfo.partition(":")
        user = unquote(u)
        password = unquote(p) if sep else None
    host, port = _split_host_port(authority, text)
    host = unquote(host)
    if any(c.isspace() or not c.isprintable() or c in "/\\@" for c in host):
        # "h%0Ax" passed as a host: the error it met later printed the raw newline
        raise UrlError(
            f"target {redact(text)!r}: the host may not hold blanks, control characters, "
            "'/', '\\' or '@'"
        )

    if scheme == "file":
        if host and host != "localhost":
            raise UrlError(f"target {redact(text)!r}: a file URL cannot name a remote host")
        if user is not None:
            raise UrlError(f"target {redact(text)!r}: a file URL cannot carry a user")
        return Target(scheme="file", spelled="file", path=_clean_path(unquote(path))), warnings

    if scheme == "nfs" and not host:
        # The seed's form nfs:///server:/export/dir: the host sits in the path.
        m2 = re.match(r"^/([^/:]+):(/.*)$", path)
        if not m2:
            raise UrlError(
                f"target {redact(text)!r}: NFS needs a server: nfs://host/path or nfs:///host:/path"
            )
        host, path = unquote(m2.group(1)), m2.group(2)
    if not host:
        raise UrlError(f"target {redact(text)!r}: {spelled} needs a host name")
    path = _clean_path(unquote(path))
    if scheme == "cifs" and path == "/":
        raise UrlError(f"target {redact(text)!r}: CIFS needs a share: cifs://host/share[/path]")
    if scheme == "s3":
        bucket = path.strip("/").split("/", 1)[0]
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise UrlError(
                f"target {redact(text)!r}: S3 needs a bucket (3-63 of a-z 0-9 . -): "
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
    for n, item in enumerate(items[1:], 2):
        if "@" in item and "://" not in item and not item.startswith("/"):
            # "ftp://u:open sesame@host/x": a blank in a user name or password splits the
            # URL in two, and either half's error showed the other piece of the password.
            # Neither is shown (an scp-style second target is refused as before, unshown).
            raise UrlError(
                f"target {n} of {len(items)} (not shown) has an '@' but no scheme:// of its "
                "own: is there a blank in a user name or password? Percent-encode it as %20"
            )
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
            raise UrlError(f"target {redact(text)!r}: unterminated IPv6 address")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UrlError(f"target {redact(text)!r}: junk after IPv6 address")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = authority.partition(":")
    if port_text == "":
        return host, None
    if not re.fullmatch(r"[0-9]+", port_text) or not 0 < int(port_text) < 65536:
        # Not shown: in "ftp://user:password" (no "@host") the password reads as the port.
        raise UrlError(f"target {redact(text)!r}: the port is not a number 1-65535")
    return host, int(port_text)


def _clean_path(path: str) -> str:
    if "\0" in path:
        raise UrlError("target path contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UrlError(f"target path {redact(path)!r} must not contain '..'")
    return "/" + "/".join(parts)


# A scheme and the two or more slashes after it ("ftp://", "ftp:///"). With one slash or
# none, "name:" may be a user (scp-style "ftp:/pw@host:/x" has user "ftp", password "/pw"),
# so it stays part of userinfo and the whole of "ftp:/user:pw" is hidden.
# Quotes and brackets before it are kept: messages show URLs as repr() or in <...>.
_PREFIX_RE = re.compile(r"[\"'(<\[]*[A-Za-z][A-Za-z0-9+.-]*://+")
_TOKEN_RE = re.compile(r"\S+")


def redact(text: str) -> str:
    """``text`` with every password of every target in it replaced by ``***``.

    The one redaction used for anything that may carry a target: URL and config errors,
    show-config, logs (cli's log formatter), README.txt and manifest.json. It works on
    arbitrary text, not only on valid URLs: each whitespace-separated word that contains
    an ``@`` is taken as ``[scheme:[//]]userinfo@rest``, where userinfo runs to the last
    ``@`` (passwords may contain ``@``, ``/`` and ``:``), and everything in userinfo after
    its first ``:`` is replaced. That covers ``scheme://user:pw@host``, ``scheme:/user:pw@``
    and ``scheme:user:pw@`` (both shown as ``scheme:***@``), scp-style ``user:pw@host:/path``,
    percent-encoded passwords (the encoded text is replaced as a whole), several targets
    in one value, and garbage around them. In a word without ``@``, a port that is not a
    number is replaced too (``ftp://user:pw/x``, the ``@host`` forgotten). It may replace
    more than a password (``ftp://host:21/a:b@c`` becomes ``ftp://host:***@c``), never
    less. A password containing whitespace must be percent-encoded (``%20``): unencoded,
    it is not one word of KDUMP_SAVEDIR.
    """
    if "@" not in text and "://" not in text:
        return text
    return _TOKEN_RE.sub(lambda m: _redact_word(m.group()), text)


# "scheme://host:port" where the port is not a number: in "ftp://user:password" (the
# "@host" forgotten) the password reads as a port.
# The scheme is a whole run of scheme characters (the lookbehind), whatever it starts
# with ("1.ftp://u:pw/x" is masked too): tried at every position of a long run of letters,
# the search took time quadratic in the word's length.
_BAD_PORT_RE = re.compile(
    r"(?<![A-Za-z0-9+.-])([A-Za-z0-9+.-]*://[^/@\[\]:]*:)([^/@]*?)(['\")>,;:.]*(?:/|$))"
)
# A word longer than this that may hold a target is not shown at all: nothing in a URL is
# this long, and a server's megabytes of text (an S3 Message) took redaction hours.
MAX_WORD = 2048


def _mask_port(m: re.Match[str]) -> str:
    port = m.group(2)
    if re.fullmatch(r"[0-9]*|\*\*\*", port):
        return m.group()
    return f"{m.group(1)}***{m.group(3)}"


def _redact_word(word: str) -> str:
    if len(word) > MAX_WORD and ("@" in word or "://" in word):
        return f"[{len(word)} characters not shown]"
    at = word.rfind("@")
    if at < 0:
        return _BAD_PORT_RE.sub(_mask_port, word)
    # What follows the last "@" may hold another target (two joined by an escaped
    # separator, as in a repr): its non-numeric port is masked as in a word without "@".
    head, tail = word[:at], _BAD_PORT_RE.sub(_mask_port, word[at:])
    prefix = ""
    m = _PREFIX_RE.match(head)
    if m:
        prefix, head = head[: m.end()], head[m.end() :]
    colon = head.find(":")
    if colon < 0:
        return f"{prefix}{head}{tail}"
    return f"{prefix}{head[: colon + 1]}***{tail}"
