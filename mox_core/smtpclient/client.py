"""SMTP client session over an already connected stream (RFC 5321), shared by every transport.

The session is given a connected ``(reader, writer)`` pair so that whoever dials (plain TCP, a
SOCKS proxy) is not our concern. Built on asyncio streams rather than aiosmtplib because the
details that matter here are the ones a general client hides: after STARTTLS the old plaintext
reader and everything it buffered are thrown away (RFC 3207 §4.2, reliability B.2 #11); message
bytes with a bare CR or LF are refused instead of "fixed" (B.1 #8); MAIL/RCPT/DATA are pipelined
(RFC 2920) and each RCPT reply becomes a per-recipient result; 452 after the first RCPT starts
a new transaction on the same connection (RFC 5321 §4.5.3.1.10).

Errors: everything that goes wrong is an :class:`SMTPClientError` whose ``permanent`` flag the
queue branches on: 5xx replies are permanent; 4xx, timeouts, lost connections and TLS failures
are temporary. TLS failures are :class:`SMTPTLSError`, so the MX loop can retry in plaintext.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog

from mox_core import logging as moxlog
from mox_core.outgoing.results import DeliveryStatus, RecipientResult
from mox_core.smtp.lines import only_crlf
from mox_core.smtpclient import sasl

__all__ = [
    "Extensions",
    "Reply",
    "SMTPClient",
    "SMTPClientError",
    "SMTPTLSError",
    "TLSMode",
    "Timeouts",
    "make_ssl_context",
    "open_client",
    "parse_extensions",
    "prepare_data",
]

log = structlog.get_logger(component="smtpclient")

_READ_LIMIT = 64 * 1024  # longest reply line we accept (RFC 5321 §4.5.3.1.5 says 512)
_MAX_REPLY_LINES = 500


class TLSMode(enum.Enum):
    """How a session uses TLS (reference 1a "TLS mode", 1c)."""

    SKIP = "skip"  # never STARTTLS (transport setting no_starttls)
    OPPORTUNISTIC = "opportunistic"  # STARTTLS if announced; certificate not checked
    REQUIRED_UNVERIFIED = "required-unverified"  # STARTTLS even if not announced; not checked
    REQUIRED_VERIFIED = "required-verified"  # STARTTLS required, PKIX against the host name
    IMMEDIATE = "immediate"  # implicit TLS right after connect (port 465), PKIX verified


class SMTPClientError(Exception):
    """A delivery problem, in the shape the queue needs (mox ``smtpclient.Error``).

    ``code``/``enhanced_code`` are the remote reply when there was one, else ``None`` (the
    enhanced code may be set for local decisions, e.g. ``5.3.4`` for a message too big).
    ``command`` is the SMTP step that failed ("greeting", "ehlo", "mail", "data", ...).
    """

    def __init__(self, permanent: bool, code: int | None, enhanced_code: str | None,
                 remote_host: str | None, text: str, *, command: str = "") -> None:
        self.permanent = permanent
        self.code = code
        self.enhanced_code = enhanced_code
        self.remote_host = remote_host
        self.text = text
        self.command = command
        super().__init__(text)

    def __str__(self) -> str:
        code = " ".join(str(x) for x in (self.code, self.enhanced_code) if x)
        where = f" ({self.remote_host})" if self.remote_host else ""
        return f"{code + ' ' if code else ''}{self.text}{where}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(permanent={self.permanent}, code={self.code}, "
                f"enhanced_code={self.enhanced_code!r}, remote_host={self.remote_host!r}, "
                f"text={self.text!r}, command={self.command!r})")

    def result(self, recipient: str) -> RecipientResult:
        status = DeliveryStatus.PERMANENT if self.permanent else DeliveryStatus.TEMPORARY
        return RecipientResult(recipient, status, self.code, self.enhanced_code,
                               self.remote_host, self.text)


class SMTPTLSError(SMTPClientError):
    """TLS could not be set up: handshake failed, or STARTTLS was refused or not offered."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds; defaults follow RFC 5321 §4.5.3.2 (greeting/MAIL/RCPT 5 min, DATA end 10 min)."""

    connect: float = 30.0  # TCP connect (whole budget per host; split over its IPs)
    command: float = 300.0  # each command reply, and the greeting
    data: float = 600.0  # writing the message plus the reply to the final dot
    tls_handshake: float = 60.0


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]  # text of each line, without "250-"

    @property
    def enhanced_code(self) -> str | None:
        """RFC 3463 code from the first line when its class matches the reply's (``5.1.1``)."""
        m = _ENHANCED.match(self.lines[0] if self.lines else "")
        if m and int(m.group(1)) == self.code // 100:
            return m.group(0).strip()
        return None

    @property
    def text(self) -> str:
        first = self.lines[0] if self.lines else ""
        if self.enhanced_code:
            first = first[len(self.enhanced_code):].lstrip()
        return " ".join([first, *self.lines[1:]]).strip()

    def __str__(self) -> str:
        return " ".join(str(x) for x in (self.code, self.enhanced_code, self.text) if x)


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


@dataclass
class Extensions:
    """What EHLO announced (RFC 5321 §4.1.1.1 and the extension RFCs)."""

    esmtp: bool = False
    starttls: bool = False  # RFC 3207
    pipelining: bool = False  # RFC 2920
    size: int | None = None  # RFC 1870; 0 means no fixed limit
    eightbitmime: bool = False  # RFC 6152
    smtputf8: bool = False  # RFC 6531
    enhancedstatuscodes: bool = False  # RFC 2034
    requiretls: bool = False  # RFC 8689
    auth: tuple[str, ...] = ()  # RFC 4954
    rcptmax: int | None = None  # RFC 9422 LIMITS
    names: set[str] = field(default_factory=set)


_FLAGS = {"STARTTLS": "starttls", "PIPELINING": "pipelining", "8BITMIME": "eightbitmime",
          "SMTPUTF8": "smtputf8", "ENHANCEDSTATUSCODES": "enhancedstatuscodes", "REQUIRETLS": "requiretls"}


def parse_extensions(lines: Sequence[str]) -> Extensions:
    """Parse the EHLO reply lines after the first (the greeting line)."""
    ext = Extensions(esmtp=True)
    for line in lines:
        words = line.split()
        if not words:
            continue
        name, args = words[0].upper(), words[1:]
        ext.names.add(name)
        if name in _FLAGS:  # parameters ignored (SMTPUTF8 may have some, reference 1a)
            setattr(ext, _FLAGS[name], True)
        elif name == "SIZE":
            ext.size = int(args[0]) if args and args[0].isdigit() else 0
        elif name == "AUTH":
            ext.auth = tuple(dict.fromkeys(a.upper() for a in args))
        elif name == "LIMITS":
            ext.rcptmax = _parse_limits(args)
    return ext


def _parse_limits(args: Sequence[str]) -> int | None:
    """RCPTMAX of ``LIMITS``; the whole extension is ignored when malformed (RFC 9422 §5)."""
    seen: dict[str, int] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        key = key.upper()
        if not eq or key in seen or not re.fullmatch(r"[0-9]{1,6}", value) or int(value) == 0:
            return None
        seen[key] = int(value)
    return seen.get("RCPTMAX")


def make_ssl_context(*, verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """Client TLS context: TLS >= 1.2; PKIX and host name checked when ``verify``.

    ``ca_file`` adds CAs to the system's (mox ``AdditionalToSystem``), for test CAs and
    private smarthosts.
    """
    if verify:
        ctx = ssl.create_default_context()
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


_BARE_CR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def prepare_data(data: bytes) -> bytes:
    """DATA payload: dot-stuffed (RFC 5321 §4.5.2), ending in CRLF, plus ``.\\r\\n``.

    Raises ``ValueError`` for a bare CR or LF: such bytes could be read as a line ending by
    the next hop and so end the data early (SMTP smuggling, reliability B.1 #8); fixing them
    silently would change a signed message, so callers normalise line endings before queueing.
    """
    m = None if only_crlf(data) else _BARE_CR_LF.search(data)  # the regex: 60 us per 2 KB
    if m:
        what = "carriage return" if data[m.start():m.start() + 1] == b"\r" else "newline"
        raise ValueError(f"message contains bare {what} at offset {m.start()}, refusing to send")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if data.rfind(b"\r\n.") >= 0:  # (rfind: twice as fast as replace's search when there is none)
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + b".\r\n"


def _needs_smtputf8(address: str) -> bool:
    localpart = address.rpartition("@")[0] if "@" in address else address
    return not localpart.isascii()


def _ascii_domain(address: str) -> str:
    """IDNA-encode the domain so the address can go out without SMTPUTF8 (RFC 5890)."""
    localpart, at, domain = address.rpartition("@")
    if not at or domain.isascii() or domain.startswith("["):
        return address
    try:
        return f"{localpart}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address


class SMTPClient:
    """One SMTP session. Use :func:`open_client`, then :meth:`deliver` (repeatedly), :meth:`quit`.

    ``remote_host`` names the peer in errors and results (the MX or smarthost name);
    ``tls_server_name`` is what the certificate is checked against (default ``remote_host``).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 remote_host: str, ehlo_name: str, tls_mode: TLSMode = TLSMode.OPPORTUNISTIC,
                 tls_server_name: str | None = None, ca_file: str | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 auth: sasl.AuthCredentials | None = None, timeouts: Timeouts = Timeouts()) -> None:
        self._reader = reader
        self._writer = writer
        self._old_writers: list[asyncio.StreamWriter] = []  # keep alive: __del__ would close the socket
        self.remote_host = remote_host
        self.ehlo_name = ehlo_name
        self.tls_mode = tls_mode
        self.tls_server_name = tls_server_name or remote_host
        self.ca_file = ca_file
        self._ssl_context = ssl_context
        self.auth = auth
        self.timeouts = timeouts
        self.extensions = Extensions()
        self.tls_active = False
        self.tls_verified = False
        self.authenticated = False
        self._in_transaction = False
        self._broken = False  # a read or write failed: the session cannot be used again
        self.data_sent = False  # message data was written during the last deliver()
        self.opened_at = time.monotonic()
        self._log = log.bind(remote=remote_host)

    @property
    def broken(self) -> bool:
        """A read or write failed (or timed out): the connection is unusable."""
        return self._broken

    @property
    def reusable(self) -> bool:
        """Whether another transaction may be started on this session (see :class:`SessionCache`)."""
        return not (self._broken or self._in_transaction or self._writer.is_closing()
                    or self._reader.at_eof() or self._reader.exception() is not None)

    # ---------------------------------------------------------------- low level

    def _error(self, permanent: bool, text: str, reply: Reply | None = None, *, command: str = "",
               cls: type[SMTPClientError] = SMTPClientError) -> SMTPClientError:
        if reply is not None:
            text = f"{text}: {reply}" if text else str(reply.text)
            return cls(permanent, reply.code, reply.enhanced_code, self.remote_host, text, command=command)
        return cls(permanent, None, None, self.remote_host, text, command=command)

    def _reply_error(self, reply: Reply, what: str, command: str) -> SMTPClientError:
        return self._error(reply.code // 100 == 5, what, reply, command=command)

    async def _write(self, data: bytes, timeout: float, command: str) -> None:
        try:
            self._writer.write(data)
            if self._writer.transport.get_write_buffer_size():
                # not all taken by the kernel at once: wait (bounded) until it is
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
        except TimeoutError:
            self._broken = True
            raise self._error(False, f"timeout writing {command}", command=command) from None
        except (OSError, ConnectionError) as exc:
            self._broken = True
            raise self._error(False, f"connection lost writing {command}: {exc}", command=command) from None
        except BaseException:
            self._broken = True
            raise

    async def _read_reply(self, command: str, timeout: float | None = None) -> Reply:
        """Read one reply; protocol violations and lost connections are temporary errors."""
        try:
            return await self._read_reply_inner(command, timeout)
        except BaseException:
            self._broken = True  # out of step with the server, or disconnected
            raise

    async def _read_reply_inner(self, command: str, timeout: float | None) -> Reply:
        lines: list[str] = []
        code: int | None = None
        try:
            async with asyncio.timeout(timeout or self.timeouts.command):
                while True:
                    raw = await self._reader.readuntil(b"\n")
                    line = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
                    if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                        raise self._error(False, f"malformed reply to {command}: {line[:100]!r}", command=command)
                    this = int(line[:3])
                    if code is not None and this != code:
                        raise self._error(False, f"inconsistent codes in multi-line reply to {command}", command=command)
                    code = this
                    lines.append(line[4:])
                    if len(lines) > _MAX_REPLY_LINES:
                        raise self._error(False, f"reply to {command} has too many lines", command=command)
                    if len(line) == 3 or line[3] == " ":
                        break
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            why = {TimeoutError: "timeout waiting for reply", asyncio.IncompleteReadError: "connection closed "
                   "while waiting for reply", asyncio.LimitOverrunError: "too long reply line"}.get(
                type(exc), f"connection lost ({exc}) while waiting for reply")
            raise self._error(False, f"{why} to {command}", command=command) from None
        assert code is not None
        reply = Reply(code, tuple(lines))
        if moxlog.enabled("trace", "smtpclient"):
            self._log.debug("smtp_reply", _level="trace", command=command, reply=str(reply))
        return reply

    async def _command(self, line: str, command: str, *, secret: bool = False) -> Reply:
        """Send one command line and read its reply. ``secret`` lines (AUTH data) are logged
        only at level traceauth (reference section 4, "Edge cases")."""
        if moxlog.enabled("trace", "smtpclient"):
            shown = line
            if secret and not moxlog.enabled("traceauth", "smtpclient"):
                shown = "AUTH ***" if line.startswith("AUTH ") else "***"
            self._log.debug("smtp_command", _level="trace", line=shown)
        await self._write(line.encode("utf-8") + b"\r\n", self.timeouts.command, command)
        return await self._read_reply(command)

    # ---------------------------------------------------------------- session setup

    async def setup(self) -> None:
        """Greeting, EHLO, STARTTLS (per ``tls_mode``), EHLO again, AUTH (if credentials)."""
        if self.tls_mode is TLSMode.IMMEDIATE:
            await self._start_tls(verify=True)
        greeting = await self._read_reply("greeting")
        if greeting.code != 220:  # RFC 5321 §4.2: 554 means "no SMTP service here"
            raise self._reply_error(greeting, "unexpected greeting", "greeting")
        await self._hello()
        want_tls = self.tls_mode in (TLSMode.REQUIRED_UNVERIFIED, TLSMode.REQUIRED_VERIFIED) or (
            self.tls_mode is TLSMode.OPPORTUNISTIC and self.extensions.starttls)
        if want_tls and not self.tls_active:
            reply = await self._command("STARTTLS", "starttls")
            if reply.code != 220:
                raise self._error(reply.code // 100 == 5 and self.tls_mode is not TLSMode.OPPORTUNISTIC,
                                  "STARTTLS refused", reply, command="starttls", cls=SMTPTLSError)
            await self._start_tls(verify=self.tls_mode is TLSMode.REQUIRED_VERIFIED)
            # RFC 3207 §4.2: forget everything learned before TLS and ask again
            self.extensions = Extensions()
            await self._hello()
        if self.auth is not None:
            await self._authenticate()

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self.ehlo_name}", "ehlo")
        if reply.code == 250:
            self.extensions = parse_extensions(reply.lines[1:])
            return
        if reply.code in (500, 501, 502, 503, 504):  # RFC 5321 §3.2: fall back to HELO
            reply = await self._command(f"HELO {self.ehlo_name}", "helo")
            if reply.code == 250:
                self.extensions = Extensions()
                return
        raise self._reply_error(reply, "hello refused", "ehlo")

    async def _start_tls(self, *, verify: bool) -> None:
        """Wrap the connection in TLS with a *new* reader.

        The old reader may hold bytes the server (or a man in the middle) sent after the 220
        in plaintext; keeping it would let them pass as replies from inside TLS (STARTTLS
        response injection, CVE-2011-0411 client side). A fresh StreamReader starts empty.
        """
        ctx = self._ssl_context or make_ssl_context(verify=verify, ca_file=self.ca_file)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        server_name = self.tls_server_name.strip("[]") or None
        self._old_writers.append(self._writer)  # its protocol is about to be replaced
        try:
            await self._writer.drain()
            transport = await loop.start_tls(
                self._writer.transport, protocol, ctx, server_hostname=server_name,
                ssl_handshake_timeout=self.timeouts.tls_handshake)
        except ssl.SSLCertVerificationError as exc:
            raise self._error(False, f"TLS certificate verification failed: {exc.verify_message or exc}",
                              command="tls", cls=SMTPTLSError) from None
        except (ssl.SSLError, OSError, ConnectionError, TimeoutError, EOFError) as exc:
            raise self._error(False, f"TLS handshake failed: {exc or type(exc).__name__}",
                              command="tls", cls=SMTPTLSError) from None
        if transport is None:
            raise self._error(False, "TLS handshake failed: connection closed", command="tls", cls=SMTPTLSError)
        protocol.connection_made(transport)
        self._reader = reader
        self._writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self.tls_active = True
        self.tls_verified = ctx.verify_mode == ssl.CERT_REQUIRED
        ssl_object = transport.get_extra_info("ssl_object")
        self._log.debug("tls_established", version=ssl_object.version() if ssl_object else None,
                        verified=self.tls_verified)

    async def _authenticate(self) -> None:
        """RFC 4954 AUTH exchange with the mechanism chosen by :func:`sasl.select_mechanism`."""
        assert self.auth is not None
        try:
            mech = sasl.select_mechanism(self.auth, self.extensions.auth, tls=self.tls_active)
        except sasl.PlainWithoutTLS as exc:
            raise self._error(False, str(exc), command="auth") from None
        except (sasl.NoMatchingMechanism, ValueError) as exc:
            raise self._error(True, str(exc), command="auth") from None
        initial = mech.initial()
        line = f"AUTH {mech.name}"
        if initial is not None:  # RFC 4954 §4: "=" is an empty initial response
            line += " " + (base64.b64encode(initial).decode() if initial else "=")
        reply = await self._command(line, "auth", secret=True)
        while True:
            if reply.code == 235:
                if not mech.complete:
                    raise self._error(False, "server completed authentication earlier than client expected",
                                      reply, command="auth")
                self.authenticated = True
                self._log.debug("authenticated", mechanism=mech.name)
                return
            if reply.code != 334:
                raise self._reply_error(reply, f"authentication with {mech.name} failed", "auth")
            if len(reply.lines) != 1:
                await self._abort_auth("multi-line 334 continuation")
            try:
                challenge = base64.b64decode(reply.lines[0].strip(), validate=True)
            except ValueError:
                await self._abort_auth("malformed base64 data in authentication continuation response")
            try:
                response = mech.respond(challenge)
            except sasl.SASLError as exc:
                await self._abort_auth(str(exc))
            reply = await self._command(base64.b64encode(response).decode(), "auth", secret=True)

    async def _abort_auth(self, why: str) -> NoReturn:
        reply = await self._command("*", "auth")  # RFC 4954 §4: the server answers 501
        # permanent iff the server then sent 5xx, as mox (reference section 4, Errors)
        raise self._error(reply.code // 100 == 5, f"client aborted authentication: {why}", command="auth")

    # ---------------------------------------------------------------- transactions

    async def deliver(self, mail_from: str, recipients: Sequence[str], data: bytes, *,
                      smtputf8: bool = False, has_8bit: bool = False,
                      require_8bitmime: bool = False) -> list[RecipientResult]:
        """Send one message to ``recipients``; one result per recipient, in order.

        Raises :class:`SMTPClientError` when nothing was delivered and the problem is not
        per recipient (refused MAIL, lost connection, message refused before any transaction).
        A later transaction's failure (after RCPTMAX batching or a 452) becomes the results of
        the recipients not yet done. ``require_8bitmime``: smarthosts must announce 8BITMIME for
        8-bit data (reference 1c); direct delivery sends anyway (1a).
        """
        self.data_sent = False
        if not recipients:
            return []
        ext = self.extensions
        try:
            body = prepare_data(data)
        except ValueError as exc:
            raise SMTPClientError(True, None, "5.6.0", None, str(exc), command="data") from None
        if ext.size and len(data) > ext.size:  # RFC 1870 §6
            raise self._error(True, f"message of {len(data)} bytes exceeds the {ext.size} bytes the "
                              "server accepts (SIZE)", command="mail")
        utf8 = smtputf8 or any(_needs_smtputf8(a) for a in [mail_from, *recipients])
        if utf8 and not ext.smtputf8:  # RFC 6531 §3.4: cannot downgrade; another MX may do it
            raise self._error(False, "message needs SMTPUTF8 but the server does not support it", command="mail")
        if has_8bit and not ext.eightbitmime and require_8bitmime:
            raise self._error(True, "message has 8-bit data but the server does not announce 8BITMIME",
                              command="mail")
        params = ""
        if ext.size is not None:
            params += f" SIZE={len(data)}"
        if ext.eightbitmime:
            params += " BODY=8BITMIME" if has_8bit else " BODY=7BIT"
        if utf8:
            params += " SMTPUTF8"
        sender = mail_from if utf8 else _ascii_domain(mail_from)
        mail_line = f"MAIL FROM:<{sender}>{params}"

        results: list[RecipientResult | None] = [None] * len(recipients)
        pending = [(i, r if utf8 else _ascii_domain(r)) for i, r in enumerate(recipients)]
        batch_size = ext.rcptmax or len(pending)
        first = True
        while pending:
            batch, rest = pending[:batch_size], pending[batch_size:]
            try:
                done, retry = await self._transaction(mail_line, batch, body)
            except SMTPClientError as exc:
                if first:
                    raise
                for i, _ in pending:
                    results[i] = exc.result(recipients[i])
                break
            first = False
            for i, res in done.items():
                results[i] = RecipientResult(recipients[i], res.status, res.code, res.enhanced_code,
                                             res.remote_host, res.text)
            pending = retry + rest
        return [r for r in results if r is not None]

    def _rcpt_result(self, recipient: str, reply: Reply) -> RecipientResult:
        if reply.code == 250 or reply.code == 251:
            status = DeliveryStatus.DELIVERED
        elif reply.code // 100 == 5:
            status = DeliveryStatus.PERMANENT
        else:
            status = DeliveryStatus.TEMPORARY
        return RecipientResult(recipient, status, reply.code, reply.enhanced_code, self.remote_host, reply.text)

    async def _transaction(self, mail_line: str, batch: list[tuple[int, str]], body: bytes,
                           ) -> tuple[dict[int, RecipientResult], list[tuple[int, str]]]:
        """One MAIL/RCPT/DATA. Returns results by index and the recipients to retry at once."""
        if self._in_transaction:
            reply = await self._command("RSET", "rset")
            if reply.code != 250:
                raise self._reply_error(reply, "RSET refused", "rset")
            self._in_transaction = False
        results: dict[int, RecipientResult] = {}
        retry: list[tuple[int, str]] = []
        accepted: list[int] = []
        rcpt_lines = [f"RCPT TO:<{addr}>" for _, addr in batch]
        pipelined = self.extensions.pipelining
        if pipelined:  # RFC 2920 §3.1: DATA may end the group; replies come in order
            cmds = [mail_line, *rcpt_lines, "DATA"]
            await self._write("".join(c + "\r\n" for c in cmds).encode("utf-8"), self.timeouts.command, "mail")
            mail_reply = await self._read_reply("mail")
            try:
                rcpt_replies = [await self._read_reply("rcpt") for _ in batch]
                data_reply = await self._read_reply("data")
            except SMTPClientError:
                if mail_reply.code == 421:  # RFC 5321 §3.8: closing; report the server's reason
                    raise self._reply_error(mail_reply, "MAIL FROM refused", "mail") from None
                raise
        else:
            mail_reply = await self._command(mail_line, "mail")
            rcpt_replies = []
            data_reply = None
            if mail_reply.code == 250:
                for n, line in enumerate(rcpt_lines):
                    reply = await self._command(line, "rcpt")
                    rcpt_replies.append(reply)
                    if n > 0 and reply.code in (452, 552):
                        break
        if mail_reply.code != 250:
            if data_reply is not None and data_reply.code == 354:  # server misbehaves: end empty data
                await self._write(b".\r\n", self.timeouts.command, "data")
                await self._read_reply("data")
                self._in_transaction = True
            raise self._reply_error(mail_reply, "MAIL FROM refused", "mail")
        self._in_transaction = True
        for n, ((i, addr), reply) in enumerate(zip(batch, rcpt_replies)):
            # RFC 5321 §4.5.3.1.10: 452 after the first means "no more in this transaction";
            # a 552 means the same without pipelining (historic 552 use, reference 1a)
            if n > 0 and (reply.code == 452 or (reply.code == 552 and not pipelined)):
                retry.append((i, addr))
                continue
            results[i] = self._rcpt_result(addr, reply)
            if results[i].status is DeliveryStatus.DELIVERED:
                accepted.append(i)
        if not pipelined:
            retry += batch[len(rcpt_replies):]
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                await self._write(b".\r\n", self.timeouts.command, "data")
                await self._read_reply("data")
            return results, retry
        if data_reply is None:
            data_reply = await self._command("DATA", "data")
        if data_reply.code != 354:
            err = self._reply_error(data_reply, "DATA refused", "data")
            for i in accepted:
                results[i] = err.result(results[i].recipient)
            return results, retry
        if moxlog.enabled("tracedata", "smtpclient"):
            self._log.debug("smtp_data", _level="tracedata", size=len(body))
        self.data_sent = True
        await self._write(body, self.timeouts.data, "message data")
        final = await self._read_reply("data", self.timeouts.data)
        self._in_transaction = False
        if final.code == 250:
            for i in accepted:
                results[i] = RecipientResult(results[i].recipient, DeliveryStatus.DELIVERED, final.code,
                                             final.enhanced_code, self.remote_host, final.text)
        else:
            err = self._reply_error(final, "message refused", "data")
            for i in accepted:
                results[i] = err.result(results[i].recipient)
        return results, retry

    # ---------------------------------------------------------------- teardown

    async def quit(self) -> None:
        """Polite QUIT (RFC 5321 §4.1.1.10), then close; errors are ignored."""
        try:
            await self._write(b"QUIT\r\n", 5.0, "quit")
            await self._read_reply("quit", 5.0)
        except SMTPClientError:
            pass
        await self.close()

    async def close(self) -> None:
        """Close the connection (the TLS layer first, so it can send its close_notify)."""
        if self._writer not in self._old_writers:
            try:
                self._writer.close()
                async with asyncio.timeout(2.0):
                    await self._writer.wait_closed()
            except Exception:
                pass
        # the plaintext writers' protocol was replaced by TLS: nothing would wake wait_closed()
        for w in self._old_writers:
            w.close()


async def open_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **options: Any) -> SMTPClient:
    """Build an :class:`SMTPClient` (``options`` as its constructor) and run :meth:`~SMTPClient.setup`.

    The connection is closed when setup fails.
    """
    client = SMTPClient(reader, writer, **options)
    try:
        await client.setup()
    except BaseException:
        await client.close()
        raise
    return client
