"""`kdump-capture notify`: mail at the next boot about the dumps saved since the last mail.

SUSE kdump 2.x sends this mail from the running system after the crash, not from the
capture kernel (``kdump-notify.service``): the capture kernel has one chance and no mail
server of its own, and a mail is no use before the machine is back. So does this command,
run at boot by ``kdump-capture-notify.service`` after the dump device is recovered.

For every ``KDUMP_SAVEDIR`` target it lists this host's dumps (``fleet.list_dumps``: only
the directories named as this host's are looked into, every manifest read bounded and
cleaned, as ``list`` does) and mails ``KDUMP_NOTIFICATION_TO``
(and ``KDUMP_NOTIFICATION_CC``) one message per dump not mailed before: its status, crash
time, kernel, panic line and where it lies (the URL without its password). What was mailed
is recorded in a state file (0600), so each dump is mailed once; a dump the mail server did
not take is mailed at the next run. The first run (no state file) mails only the dumps of
the last ``FIRST_RUN_DAYS`` days, so that enabling notification does not mail a target's
whole history; later runs mail what is newer than ``WINDOW_DAYS``.

SMTP: ``KDUMP_SMTP_SERVER`` is ``host`` or ``host:port`` (default localhost, port 25; 465 is
TLS from the start). STARTTLS is used whenever the server offers it, with the system's CAs;
with ``KDUMP_SMTP_USER`` the login needs TLS (STARTTLS or port 465): the password is never
sent in clear, never logged and never printed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from email.message import EmailMessage

from .errors import ConfigError, TransportError
from .fleet import OwnDump as Pending
from .fleet import own_dumps as find

log = logging.getLogger(__name__)

STATE_NAME = "notified.json"
FIRST_RUN_DAYS = 7
WINDOW_DAYS = 30
KEEP_SENT = 1000  # names remembered (oldest go first)
STATE_LIMIT = 1 << 20
REPLY_LIMIT = 64 << 10  # bytes of one SMTP reply (a real server's longest, EHLO, is < 1 KiB)


def read_state(path: str) -> list[str] | None:
    """The keys already mailed, or None when there is no state yet (the first run)."""
    from .bounds import read_small_file

    try:
        data = read_small_file(path, STATE_LIMIT)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the notification state: {e.strerror}") from None
    except ValueError as e:  # larger than STATE_LIMIT, or not a regular file (a FIFO)
        log.warning("%s; not a notification state of ours; starting afresh", e)
        return None
    try:
        doc = json.loads(data)
        sent = doc["sent"]
        if not isinstance(sent, list) or not all(isinstance(k, str) for k in sent):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        log.warning("%s: not a notification state of ours; starting afresh", path)
        return None
    return sent


def write_state(path: str, sent: list[str]) -> None:
    from . import private

    private.make_dir(os.path.dirname(path) or ".")
    doc = {"version": 1, "sent": sent[-KEEP_SENT:]}
    private.write_file(path, json.dumps(doc, indent=1).encode())


def pending(found: Iterable[Pending], sent: list[str] | None, now: float) -> list[Pending]:
    """The dumps to mail, oldest first: not mailed yet, and not older than the window."""
    days = FIRST_RUN_DAYS if sent is None else WINDOW_DAYS
    since = now - days * 86400
    done = set(sent or ())
    out = [
        p
        for p in found
        if p.key not in done and p.item.crash_time is not None and p.item.crash_time >= since
    ]
    return sorted(out, key=lambda p: (p.item.crash_time or 0, p.item.directory))


def compose(host: str, p: Pending, sender: str, to: str, cc: list[str]) -> EmailMessage:
    item = p.item
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(item.crash_time or 0))
    saved = item.status == "complete"
    head = (
        f"A kernel crash dump of {host} was saved."
        if saved
        else f"{host} crashed, and its dump was NOT saved completely (status {item.status}:"
        " the dump directory's README.txt and dmesg.txt say why)."
    )
    level = "" if item.level is None else f" -d {item.level}"
    lines = [
        head,
        "",
        f"status:      {item.status}" + (f" ({item.note})" if item.note else ""),
        f"crash time:  {when}",
        f"kernel:      {item.kernel}",
        f"panic:       {item.panic}",
        f"dump:        {p.target.rstrip('/')}/{item.directory}",
        f"format:      {item.format}{level}",
        f"size:        {item.size / (1 << 20):.1f} MiB",
        "",
        f"kdump-capture list {p.target} shows it beside the others; kdump-capture summary",
        "and kdump-capture verify read it where it is copied to.",
        "",
        "-- ",
        "kdump-capture notify (KDUMP_NOTIFICATION_TO)",
    ]
    msg = EmailMessage()
    msg["Subject"] = f"kdump: {host} crashed" + ("" if saved else f" ({item.status})")
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg.set_content("\n".join(lines) + "\n")
    return msg


def addresses(name: str, value: str) -> list[str]:
    """The mail addresses in KDUMP_NOTIFICATION_TO or _CC: separated by blanks, commas or
    line ends (SUSE's mailx takes a blank-separated list), or ``Name <addr>, ...``. A blank
    between two addresses put only the first in the envelope (the other never mailed, while
    the output said it was), and a line end was an internal error; anything that is not
    one address is a ConfigError naming it."""
    from email.utils import getaddresses

    flat = " ".join(value.split())
    if "<" in flat:
        found = [a for _, a in getaddresses([flat])]
    else:
        found = flat.replace(",", " ").split()
    for a in found:
        local, at, domain = a.rpartition("@")
        bad = not a or any(c in a for c in '<>()[]",;:\\') or not a.isprintable()
        if bad or " " in a or (at and not (local and domain)):
            raise ConfigError(f"{name}: {a or flat!r} is not a mail address")
    if "<" in flat and not found:
        raise ConfigError(f"{name}: no mail address in {flat!r}")
    return found


def smtp_server(value: str) -> tuple[str, int]:
    """(host, port) of KDUMP_SMTP_SERVER: ``host``, ``host:port`` or ``[v6]:port``."""
    value = value.strip() or "localhost"
    host, port = value, "25"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or "25"
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"KDUMP_SMTP_SERVER {value!r}: not host or host:port")
    return host, int(port)


class _ReplyOverrun(OSError):
    """A reply longer than REPLY_LIMIT, or not complete within the timeout: smtplib's
    getreply turns it into SMTPServerDisconnected and closes the connection."""


class _ReplyReader:
    """What smtplib's getreply reads a reply from, in place of ``sock.makefile()``: lines
    from the socket itself, each reply bounded in bytes and in time. smtplib alone reads a
    reply's continuation lines (``250-...``) for as long as a server sends them (a hostile
    one sent 24 GiB in 9 minutes, until the OOM killer came) and only bounds each recv, so
    a server giving a byte a second held it for good, SIGTERM included (QUIT read again)."""

    def __init__(self, smtp) -> None:
        self.smtp = smtp
        self.sock = smtp.sock
        self.buf = b""

    def readline(self, limit: int) -> bytes:
        smtp = self.smtp
        while True:
            end = self.buf.find(b"\n", 0, limit)
            if end >= 0 or len(self.buf) >= limit:
                n = end + 1 if end >= 0 else limit
                line, self.buf = self.buf[:n], self.buf[n:]
                smtp.reply_bytes += len(line)
                if smtp.reply_bytes > REPLY_LIMIT:
                    raise _ReplyOverrun(f"a reply longer than {REPLY_LIMIT >> 10} KiB")
                return line
            left = smtp.reply_deadline - time.monotonic()
            late = _ReplyOverrun(f"no whole reply within {smtp.timeout:.0f} s")
            if left <= 0:
                raise late
            self.sock.settimeout(min(left, smtp.timeout))
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                raise late from None
            finally:
                self.sock.settimeout(smtp.timeout)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk

    def close(self) -> None:
        pass


def _bounded(base):
    """``base`` (smtplib.SMTP or SMTP_SSL) with each reply bounded (``_ReplyReader``)."""

    class Bounded(base):
        reply_deadline = 0.0
        reply_bytes = 0

        def getreply(self):
            if self.sock is None:
                import smtplib

                raise smtplib.SMTPServerDisconnected("the connection is closed")
            if self.file is None:  # new, or after STARTTLS: nothing read in clear is kept
                self.file = _ReplyReader(self)
            self.reply_deadline = time.monotonic() + self.timeout
            self.reply_bytes = 0
            return super().getreply()

    return Bounded


def send(messages: list[EmailMessage], cfg, timeout: float, went: list[int]) -> None:
    """Send ``messages`` through one SMTP session, appending the index of each the server
    took to ``went``; a failure raises TransportError (exit 6) naming the server and what it
    said."""
    import smtplib
    import ssl

    host, port = smtp_server(cfg["KDUMP_SMTP_SERVER"])
    user, password = cfg["KDUMP_SMTP_USER"], cfg["KDUMP_SMTP_PASSWORD"]
    where = f"SMTP server {host}:{port}"
    context = ssl.create_default_context()
    try:
        if port == 465:
            smtp = _bounded(smtplib.SMTP_SSL)(host, port, timeout=timeout, context=context)
        else:
            smtp = _bounded(smtplib.SMTP)(host, port, timeout=timeout)
        with smtp:
            smtp.ehlo()
            if port != 465 and smtp.has_extn("starttls"):
                smtp.starttls(context=context)
                smtp.ehlo()
            elif port != 465 and user:
                raise TransportError(
                    f"{where} does not offer STARTTLS: KDUMP_SMTP_USER's password is not "
                    "sent in clear (use a server with STARTTLS, or port 465)"
                )
            if user:
                try:
                    smtp.login(user, password)
                except smtplib.SMTPServerDisconnected:
                    raise TransportError(
                        f"{where} closed the connection at the login of {user!r} "
                        "(a wrong user name or password?)"
                    ) from None
            for i, msg in enumerate(messages):
                smtp.send_message(msg)
                went.append(i)
    except TransportError:
        raise
    except smtplib.SMTPAuthenticationError as e:
        raise TransportError(f"{where} refused the login of {user!r}: {_reply(e)}") from None
    except smtplib.SMTPException as e:
        raise TransportError(
            f"{where}: {_reply(e)} ({len(went)} of {len(messages)} sent)"
        ) from None
    except ssl.SSLError as e:
        raise TransportError(f"{where}: TLS failed: {e.reason or e}") from None
    except OSError as e:
        raise TransportError(f"{where}: {e.strerror or e}") from None


def _reply(e: Exception) -> str:
    refused = getattr(e, "recipients", None)  # SMTPRecipientsRefused: {address: (code, text)}
    if isinstance(refused, dict) and refused:
        parts = []
        for address, answer in list(refused.items())[:4]:
            code, text = answer if isinstance(answer, tuple) and len(answer) == 2 else ("", b"")
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
            parts.append(f"{address}: {code} {' '.join(text.split())[:120]}")
        return "recipients refused: " + "; ".join(parts)
    code = getattr(e, "smtp_code", None)
    text = getattr(e, "smtp_error", b"")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    shown = " ".join(str(text).split())[:200]
    if not code and not shown:  # SMTPServerDisconnected and the like: no reply, a reason
        shown = " ".join(str(e).split())[:200]
    return f"{code} {shown}" if code else (shown or type(e).__name__)


LOCK_WAIT = 300.0  # seconds a run waits for another to end


def _one_at_a_time(state_path: str) -> int:
    """A descriptor holding an exclusive flock(2) on ``STATE.lock`` (0600, never through a
    link), so that two runs at once (the boot-time unit and an admin's) do not both mail
    the same dumps. The kernel frees it when the process ends. ConfigError when another run
    holds it for more than LOCK_WAIT seconds."""
    from . import private

    private.make_dir(os.path.dirname(os.path.abspath(state_path)))
    path = state_path + ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the notification lock: {e.strerror}") from None
    if private.flock_wait(fd, LOCK_WAIT):
        return fd
    os.close(fd)
    raise ConfigError(
        f"{path}: another 'kdump-capture notify' has been running for more than "
        f"{LOCK_WAIT:.0f} s; nothing was mailed"
    )


def run(cfg, state_path: str, now: float | None = None) -> int:
    """Mail what is pending; returns how many were mailed. One run at a time (a second
    waits, then mails only what the first did not)."""
    held = _one_at_a_time(state_path)
    try:
        return _run(cfg, state_path, now)
    finally:
        os.close(held)


def _run(cfg, state_path: str, now: float | None) -> int:
    now = time.time() if now is None else now
    if not addresses("KDUMP_NOTIFICATION_TO", cfg["KDUMP_NOTIFICATION_TO"]):  # before targets
        raise ConfigError("KDUMP_NOTIFICATION_TO holds no mail address")
    addresses("KDUMP_NOTIFICATION_CC", cfg["KDUMP_NOTIFICATION_CC"])
    sent = read_state(state_path)
    host, found = find(cfg)
    todo = pending(found, sent, now)
    done = list(sent or ())
    if not todo:
        if sent is None:
            write_state(state_path, done)  # later runs use the longer window
        print("no new dumps to mail about")
        return 0
    to = ", ".join(addresses("KDUMP_NOTIFICATION_TO", cfg["KDUMP_NOTIFICATION_TO"]))
    cc = addresses("KDUMP_NOTIFICATION_CC", cfg["KDUMP_NOTIFICATION_CC"])
    sender = f"root@{host}"
    messages = [compose(host, p, sender, to, cc) for p in todo]
    went: list[int] = []
    try:
        send(messages, cfg, float(max(cfg.net_timeout, 5)), went)
    finally:
        # What the server took is recorded even when a later message failed.
        done += [todo[i].key for i in went]
        write_state(state_path, done)
        for i in went:
            p = todo[i]
            print(f"mailed {to}: {p.target.rstrip('/')}/{p.item.directory} ({p.item.status})")
    return len(went)
