"""SMTP client session over an already connected stream (RFC 5321), shared by every transport.

The session is given a connected ``(reader, writer)`` pair so that whoever dials (plain TCP, a
SOCKS proxy) is not our concern. Built on asyncio streams rather than aiosmtplib because the
details that matter here are the ones a general client hides: after STARTTLS the old plaintext
reader and everything it buffered are thrown away (RFC 3207 §4.2: the client discards what it
learnt before TLS; bytes that arrived with the 220 may be a man in the middle's injected
replies); message bytes with a bare CR or LF are refused instead of "fixed" (a next hop
could read them as a line ending and see the data end early: SMTP smuggling); MAIL/RCPT/DATA
are pipelined (RFC 2920) and each RCPT reply becomes a per-recipient result; 452 after the
first RCPT starts a new transaction on the same connection (RFC 5321 §4.5.3.1.10).

Errors: everything that goes wrong is an :class:`SMTPClientError` whose ``permanent`` flag the
queue branches on: 5xx replies are permanent; 4xx, timeouts, lost connections and TLS failures
are temporary. TLS failures are :class:`SMTPTLSError`, so the MX loop can retry in plaintext.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import structlog

from mox_core import logging as moxlog
from mox_core.outgoing.results import DeliveryStatus, RecipientResult
from mox_core.smtpclient import sasl, wire
from mox_core.smtpclient.errors import SMTPClientError, SMTPTLSError
from mox_core.smtpclient.tls import TLSMode, make_ssl_context
from mox_core.smtpclient.wire import Extensions, Reply, Timeouts, ascii_domain, needs_smtputf8, parse_extensions

__all__ = ["SMTPClient", "Timeouts", "open_client"]

log = structlog.get_logger(component="smtpclient")

_READ_LIMIT = 64 * 1024  # longest reply line we accept (RFC 5321 §4.5.3.1.5 says 512)
_MAX_REPLY_LINES = 500


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
        only at level traceauth, as mox does."""
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
            self._broken = True  # no session to end politely: the handshake did not complete
            raise self._error(False, f"TLS certificate verification failed: {exc.verify_message or exc}",
                              command="tls", cls=SMTPTLSError) from None
        except (ssl.SSLError, OSError, ConnectionError, TimeoutError, EOFError) as exc:
            self._broken = True
            raise self._error(False, f"TLS handshake failed: {exc or type(exc).__name__}",
                              command="tls", cls=SMTPTLSError) from None
        if transport is None:
            self._broken = True
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
        # permanent iff the server then sent 5xx, as mox does
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
        8-bit data; direct delivery sends anyway (both as mox does).
        """
        self.data_sent = False
        if not recipients:
            return []
        ext = self.extensions
        try:
            body = wire.prepare_data(data)
        except ValueError as exc:
            raise SMTPClientError(True, None, "5.6.0", None, str(exc), command="data") from None
        if ext.size and len(data) > ext.size:  # RFC 1870 §6
            raise self._error(True, f"message of {len(data)} bytes exceeds the {ext.size} bytes the "
                              "server accepts (SIZE)", command="mail")
        utf8 = smtputf8 or any(needs_smtputf8(a) for a in [mail_from, *recipients])
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
        sender = mail_from if utf8 else ascii_domain(mail_from)
        mail_line = f"MAIL FROM:<{sender}>{params}"

        results: list[RecipientResult | None] = [None] * len(recipients)
        pending = [(i, r if utf8 else ascii_domain(r)) for i, r in enumerate(recipients)]
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
        for n, ((i, addr), reply) in enumerate(zip(batch, rcpt_replies, strict=False)):
            # RFC 5321 §4.5.3.1.10: 452 after the first means "no more in this transaction";
            # a 552 means the same without pipelining (RFC 821's code for too many recipients,
            # which that section says to treat as temporary)
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
        await self._message(body, accepted, results)
        return results, retry

    async def _message(self, body: bytes, accepted: list[int], results: dict[int, RecipientResult]) -> None:
        """Send the message data; the reply to the final dot becomes the accepted recipients'
        results. Without a reply (lost connection, timeout) the server may have taken the
        message (RFC 1047): the error says that a retry can deliver a duplicate."""
        if moxlog.enabled("tracedata", "smtpclient"):
            self._log.debug("smtp_data", _level="tracedata", size=len(body))
        self.data_sent = True
        await self._write(body, self.timeouts.data, "message data")
        try:
            final = await self._read_reply("data", self.timeouts.data)
        except SMTPClientError as exc:
            exc.text += "; the server may have taken the message: a retry can deliver a duplicate"
            self._log.warning("smtp_no_reply_after_data", error=str(exc), duplicate_risk=True)
            raise
        self._in_transaction = False
        if final.code == 250:
            for i in accepted:
                results[i] = RecipientResult(results[i].recipient, DeliveryStatus.DELIVERED, final.code,
                                             final.enhanced_code, self.remote_host, final.text)
        else:
            err = self._reply_error(final, "message refused", "data")
            for i in accepted:
                results[i] = err.result(results[i].recipient)

    # ---------------------------------------------------------------- teardown

    async def quit(self) -> None:
        """Polite QUIT (RFC 5321 §4.1.1.10), then close; errors are ignored."""
        try:
            await self._write(b"QUIT\r\n", 5.0, "quit")
            await self._read_reply("quit", 5.0)
        except SMTPClientError:
            pass
        await self.close()

    async def hang_up(self, error: SMTPClientError | None = None) -> None:
        """End the session after giving up on it (because of ``error``): QUIT when the server
        is still in step with us (it refused something: no matching AUTH mechanism, a refused
        MAIL FROM, ...), as Postfix and mox do; just close a connection that broke or that the
        server is closing (421, RFC 5321 §3.8)."""
        if self._broken or (error is not None and error.code == 421):
            await self.close()
        else:
            await self.quit()

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

    When setup fails the session is ended: with QUIT if the server refused something, else
    the connection is closed.
    """
    client = SMTPClient(reader, writer, **options)
    try:
        await client.setup()
    except SMTPClientError as exc:
        await client.hang_up(exc)
        raise
    except BaseException:
        await client.close()
        raise
    return client
