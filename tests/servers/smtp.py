"""A throw-away SMTP server on 127.0.0.1 (aiosmtpd, a real SMTP implementation: EHLO,
STARTTLS, AUTH PLAIN/LOGIN) that keeps what it receives, for `kdump-capture notify`.

``tls``: STARTTLS with a certificate for 127.0.0.1 signed by a CA made here (``ca_file``;
clients trust it through SSL_CERT_FILE). ``user``/``password``: AUTH is required, and only
after STARTTLS (aiosmtpd's auth_require_tls). ``refuse``: every RCPT is answered 550.
``delay``: seconds each DATA waits before its answer (a slow server).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage

from .common import LOOPBACK, free_port
from .s3 import make_tls


@dataclass
class SmtpServer:
    host: str
    port: int
    ca_file: str = ""
    user: str = ""
    password: str = ""
    received: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)  # user names that logged in

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class _Handler:
    def __init__(self, server: SmtpServer, refuse: bool, delay: float = 0.0) -> None:
        self.server = server
        self.refuse = refuse
        self.delay = delay

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.delay:
            import asyncio

            await asyncio.sleep(self.delay)
        self.server.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.server.received.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 Message accepted"


@contextlib.contextmanager
def smtpd(
    workdir: str,
    tls: bool = False,
    user: str = "",
    password: str = "",
    refuse: bool = False,
    delay: float = 0.0,
) -> Iterator[SmtpServer]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    port = free_port()
    server = SmtpServer(LOOPBACK, port, user=user, password=password)
    kwargs: dict = {}
    if tls:
        ca, cert, key = make_tls(workdir)
        server.ca_file = ca
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        kwargs["tls_context"] = context
    if user:

        def authenticator(smtp, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and (
                auth_data.login.decode(),
                auth_data.password.decode(),
            ) == (user, password)
            if ok:
                server.logins.append(user)
            return AuthResult(success=ok)

        kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=True)
    controller = Controller(
        _Handler(server, refuse, delay), hostname=LOOPBACK, port=port, ready_timeout=10, **kwargs
    )
    controller.start()
    try:
        yield server
    finally:
        controller.stop()
