"""SMTP protocol: aiosmtpd's ``SMTP`` with a lean command path, a chunked DATA reader and AUTH.

The policy (accept or reject senders, recipients, messages) stays in an aiosmtpd handler
object with the usual async ``handle_MAIL``/``handle_RCPT``/``handle_DATA`` hooks
(:class:`mox_core.smtpserver.handler.Handler`); :class:`MoxSMTP` only speaks the protocol.
Its commands live in four modules: this one (connection, timeouts, the command loop, EHLO,
STARTTLS), :mod:`.mailrcpt` (MAIL, RCPT), :mod:`.datareader` (DATA) and :mod:`.auth` (AUTH).
The reply texts are :mod:`mox_core.smtp.codes`.

Why a subclass of aiosmtpd's ``SMTP``, and what it costs
---------------------------------------------------------
MoxSMTP reuses aiosmtpd's connection lifecycle (``connection_made``, ``connection_lost``,
``eof_received``), its STARTTLS upgrade (``smtp_STARTTLS`` switches the transport and
``connection_made`` then empties the reader buffer, which is the fix for CVE-2024-34083:
plaintext commands pipelined after STARTTLS are dropped, not run inside TLS), its session and
envelope objects, the handler-hook call, and the simple commands HELO, NOOP, RSET, QUIT, HELP,
VRFY, EXPN. Those are the parts where aiosmtpd's code is right and not slow; rewriting them
would mean owning the TLS switch and its security fix.

The cost: ``SMTP.__init__`` is not called (it does per-connection introspection, see below),
so ``MoxSMTP.__init__`` sets every attribute aiosmtpd's ``__init__`` sets, which are private
to aiosmtpd and may change in any release. So pyproject.toml pins aiosmtpd to the tested
version (``==1.4.6``), and tests/test_aiosmtpd_guard.py fails, naming the attribute or method,
when aiosmtpd's ``__init__`` sets an attribute MoxSMTP does not, or when a method MoxSMTP
inherits, calls or overrides changes its signature or its code. Moving to a new aiosmtpd:
bump the pin, run that test, read the changes it names, adapt MoxSMTP, update its records.

What MoxSMTP changes in aiosmtpd 1.4.6, and why:

* Speed: aiosmtpd runs ``inspect.getmembers``/``dir`` over
  server and handler on every connection and builds a ``typing.Protocol`` class plus an
  ``email`` header parse for every MAIL/RCPT. Here the introspection is done once per class,
  and ``<local@domain>`` addresses (nearly all of them) are parsed with one regex; anything
  else goes through the same ``email`` parser aiosmtpd uses, so results are identical.
  Command transcripts are only logged when the ``trace`` level is on.
* DATA is read in big pieces instead of line by line, and only CRLF.CRLF ends it: a bare CR
  or LF (every SMTP smuggling form) or a NUL rejects the message after its real end, so a
  message is never split in two (:mod:`.datareader`).
* SIZE, a recipient limit (452 4.5.3), 500 5.5.2 for long lines, an idle timeout that sends
  421, and a total DATA deadline.
* AUTH with PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1 and SCRAM-SHA-256 from
  :mod:`mox_core.accounts.sasl`, only after TLS by default, with failed logins throttled per
  client address (:mod:`.auth`).
* STARTTLS: aiosmtpd's, as above; a second STARTTLS, or one after AUTH, is refused.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import structlog
from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    SMTP,
    TLSSetupException,
    login_always_fail,
    make_loop,
    sanitize,
    syntax,
)

from mox_core import afterreply
from mox_core import logging as mox_logging
from mox_core.accounts.sasl import DEFAULT_AUTH_LIMITER, MECHANISMS, AuthFailureLimiter, CredentialStore
from mox_core.metrics import ServiceMetrics
from mox_core.smtp import codes
from mox_core.smtpserver.auth import AUTH_LINE_LIMIT, AuthCommand
from mox_core.smtpserver.datareader import DataCommand
from mox_core.smtpserver.mailrcpt import MailRcptCommands
from mox_core.smtpserver.sessionlimit import SessionLimit

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "MoxSMTP"]

log = structlog.get_logger(component="smtpserver")

DEFAULT_MAX_MESSAGE_SIZE = 2**25  # aiosmtpd's default, 32 MiB
# StreamReader limit: the most a command line may buffer before we give up, and the size of
# the pieces DATA is read in. The reader pauses the socket at twice this.
READER_LIMIT = 64 * 1024
# C0 controls except TAB, and DEL: never valid in a command (CR would inject into Received).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


# ---- once-per-class introspection ----------------------------------------------------------

_SMTP_FUNCS: dict[type, dict[str, Callable[..., Any]]] = {}
_HOOK_NAMES: dict[type, tuple[tuple[str, str], ...]] = {}
_EHLO_ARITY: dict[object, int] = {}


def _smtp_functions(cls: type) -> dict[str, Callable[..., Any]]:
    """``{"MAIL": MoxSMTP.smtp_MAIL, ...}`` as plain functions, computed once per class."""
    funcs = _SMTP_FUNCS.get(cls)
    if funcs is None:
        funcs = _SMTP_FUNCS[cls] = {n[5:]: getattr(cls, n) for n in dir(cls) if n.startswith("smtp_")}
    return funcs


def _handler_hooks(handler: object) -> dict[str, Callable[..., Any]]:
    """The handler's ``handle_*`` hooks, as aiosmtpd finds them with ``dir`` (class names are
    cached; attributes set on the instance itself are looked at every time, it is cheap)."""
    cls = type(handler)
    names = _HOOK_NAMES.get(cls)
    if names is None:
        names = _HOOK_NAMES[cls] = tuple((n[7:], n) for n in dir(cls) if n.startswith("handle_"))
    hooks = {cmd: getattr(handler, attr) for cmd, attr in names}
    own = getattr(handler, "__dict__", None)
    if own:
        for attr, value in own.items():
            if attr.startswith("handle_"):
                hooks[attr[7:]] = value
    return hooks


def _ehlo_hook_version(hook: Callable[..., Any] | None) -> str | None:
    if hook is None:
        return None
    func = getattr(hook, "__func__", hook)
    arity = _EHLO_ARITY.get(func)
    if arity is None:
        arity = _EHLO_ARITY[func] = len(inspect.signature(hook).parameters)
    if arity != 5:
        raise RuntimeError("handle_EHLO must take (server, session, envelope, hostname, responses)")
    return "new"


_fqdn = functools.cache(socket.getfqdn)


class _Hangup(Exception):
    """The session is over (the reply is sent, the connection closed): leave the command loop."""


def _running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return make_loop()


class MoxSMTP(MailRcptCommands, DataCommand, AuthCommand, SMTP):
    """aiosmtpd SMTP protocol for mox; create one per connection (``loop.create_server``).

    :param handler: the policy object with aiosmtpd ``handle_*`` hooks (``handle_MAIL``,
        ``handle_RCPT``, ``handle_DATA``, optionally ``handle_EHLO`` with five arguments and
        ``handle_exception``). ``handle_DATA`` sees ``envelope.content`` and
        ``envelope.original_content`` as the same dot-unstuffed ``bytes``, and
        ``session.authenticated``/``session.auth_data`` (the user name) after AUTH.
    :param max_message_size: largest message in bytes, advertised as ``SIZE``; larger ones
        get 552 5.3.4 (at MAIL when declared, else after the final dot). None: no limit.
    :param max_recipients: accepted recipients per transaction; more get 452 4.5.3.
    :param idle_timeout: seconds to wait for a command (or for more DATA bytes) before
        sending 421 and closing. RFC 5321 §4.5.3.2 asks for at least 300.
    :param data_timeout: total seconds one DATA transfer may take (mox: 30 minutes).
    :param credential_store: where AUTH finds accounts; None disables AUTH.
    :param auth_require_tls: AUTH only inside TLS (not advertised and 538 before TLS).
        Turn off only for tests or listeners behind a TLS-terminating proxy.
    :param tls_context: server-side context for STARTTLS; None: no STARTTLS.
    :param require_starttls: refuse everything but EHLO/NOOP/QUIT/STARTTLS before TLS (530).
    :param hostname: our name in the greeting and EHLO; default: the machine's FQDN.
    :param auth_mechanisms: mechanisms to offer, in EHLO order; default all of
        :data:`mox_core.accounts.sasl.MECHANISMS`.
    :param auth_limiter: failed-login counter shared by all connections; default a
        process-wide one (10 failures per IP per minute).
    :param auth_failure_delay: seconds per failure beyond the third on one connection to wait
        before answering 535 (mox); 0 disables.
    :param metrics: the counts of this listener's service (sessions open, failed logins).
    :param enable_smtputf8: offer SMTPUTF8 (RFC 6531); commands are then decoded as UTF-8.
    :param ident: text after the host name in the 220 greeting.
    :param session_limit: open sessions per client address, shared by the connections of a
        listener's service; a session over the limit gets 421 4.7.0 and is closed.
    """

    def __init__(
        self,
        handler: object,
        *,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        max_recipients: int = 1000,
        idle_timeout: float = 300.0,
        data_timeout: float = 1800.0,
        credential_store: CredentialStore | None = None,
        auth_require_tls: bool = True,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        hostname: str | None = None,
        auth_mechanisms: Iterable[str] | None = None,
        auth_limiter: AuthFailureLimiter | None = None,
        auth_failure_delay: float = 1.0,
        metrics: ServiceMetrics | None = None,
        enable_smtputf8: bool = True,
        ident: str = "ESMTP",
        loop: asyncio.AbstractEventLoop | None = None,
        session_limit: SessionLimit | None = None,
    ) -> None:
        # SMTP.__init__ is deliberately not called: it does per-connection introspection.
        # Every attribute it sets is set here instead, so that no inherited method finds one
        # missing (tests/test_aiosmtpd_guard.py checks). Not set: _call_limit_base and
        # _call_limit_default, which aiosmtpd sets only with a command call limit and reads
        # only in its _handle_client, replaced here.
        self.loop = loop or _running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=READER_LIMIT, loop=self.loop),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.__ident__ = ident
        self.event_handler = handler
        self.data_size_limit = max_message_size
        self.max_recipients = max_recipients
        self.enable_SMTPUTF8 = enable_smtputf8
        self._decode_data = False
        self.command_size_limits: dict[str, int] = {}
        self.hostname = hostname or _fqdn()
        self.tls_context = tls_context
        self.require_starttls = bool(tls_context and require_starttls)
        self._timeout_duration = idle_timeout
        self._data_timeout = data_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._in_data = False
        self._data_deadline = 0.0
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = auth_require_tls
        self._auth_required = False
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_methods = {}  # aiosmtpd's auth_* registry; our smtp_AUTH does not use it
        self._enforce_call_limit = False
        self.credential_store = credential_store
        names = tuple(m.upper() for m in auth_mechanisms) if auth_mechanisms is not None else tuple(MECHANISMS)
        for name in names:
            if name not in MECHANISMS:
                raise ValueError(f"unknown AUTH mechanism {name!r}; known: {', '.join(MECHANISMS)}")
        self.auth_mechanisms: tuple[str, ...] = names if credential_store is not None else ()
        self.auth_limiter = auth_limiter or DEFAULT_AUTH_LIMITER
        self.auth_failure_delay = auth_failure_delay
        self._auth_failures = 0
        self._handle_hooks = _handler_hooks(handler)
        self._ehlo_hook_ver = _ehlo_hook_version(self._handle_hooks.get("EHLO"))
        self._smtp_methods = _smtp_functions(type(self))
        self._trace = False
        self._after_reply = afterreply.Pending(None)  # afterreply.later() of this session
        self.metrics = metrics  # sessions open, failed logins (mox_core.metrics)
        self.session_limit = session_limit

    # ---- timeouts --------------------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Moving a deadline is a float store; the timer is only re-armed when it fires early.
        # (aiosmtpd cancels and re-creates a TimerHandle on every command.)
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        if self.loop.time() + 0.001 < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        log.info("smtp_timeout", peer=self._peer_ip(), in_data=self._in_data)
        try:
            self.transport.write(codes.IDLE_TIMEOUT.encode("ascii") + b"\r\n")
        except Exception:  # the write is a courtesy; closing is what matters
            pass
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_data:  # bytes of a message in transfer count as activity
            self._deadline = min(self.loop.time() + self._timeout_duration, self._data_deadline)
        super().data_received(data)

    # ---- output ----------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii", "replace")
        if self._trace:
            log.trace("smtp_reply", line=status)
        self._writer.write(status + b"\r\n")
        if self._after_reply:  # the reply is in the socket: the client is reading it now
            afterreply.run(self._after_reply)
        await self._writer.drain()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)

    # ---- command loop ----------------------------------------------------------------------

    async def _handle_client(self) -> None:
        self._after_reply = afterreply.collect()
        key = self.session_limit.acquire(self._peer_ip()) if self.session_limit else None
        if self.session_limit is not None and key is None:  # the address has all it may have
            log.info("smtp_too_many_sessions", peer=self._peer_ip())
            await self.push(codes.TOO_MANY_SESSIONS)
            self._close()
            return
        sessions = self.metrics.sessions if self.metrics is not None else None
        if sessions is not None:
            sessions.inc()
        try:
            await self._command_loop()
        finally:
            if sessions is not None:
                sessions.dec()
            if key is not None:
                self.session_limit.release(key)
            afterreply.run(self._after_reply)  # what a session ending without a reply left

    async def _improper_pipelining(self, after: str) -> NoReturn:
        """Refuse a client that did not wait for a reply it had to wait for (RFC 2920 §3.1;
        Postfix's ``smtpd_forbid_unauth_pipelining``): answer 554, log it, close. What it sent
        ahead is never run."""
        pending = bytes(self._reader._buffer[:100])  # type: ignore[attr-defined]
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        log.info("smtp_improper_pipelining", peer=self._peer_ip(), after=after, input=sanitize(pending))
        await self.push(codes.IMPROPER_PIPELINING)
        self._close()
        raise _Hangup

    async def _greet(self) -> bool:
        """The 220 greeting; False (and 554) for a client that talked first (RFC 5321 §3.1)."""
        await asyncio.sleep(0)  # once per connection: bytes that came with it reach the reader
        if self._reader._buffer:  # type: ignore[attr-defined]
            try:
                await self._improper_pipelining("CONNECT")
            except (_Hangup, ConnectionError):
                return False
        await self.push(codes.greeting(self.hostname, self.__ident__))
        return True

    async def _command_loop(self) -> None:
        self._trace = mox_logging.enabled("trace", "smtpserver")
        if not await self._greet():
            return
        reader = self._reader
        bogus_budget = BOGUS_LIMIT
        while self.transport is not None:
            try:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    # No LF in READER_LIMIT bytes: answer and close (mox), memory stays bounded.
                    await self.push(codes.LINE_TOO_LONG)
                    self._close()
                    return
                line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                if self._trace:
                    log.trace("smtp_command", line=sanitize(line))
                if not line:
                    await self.push(codes.BAD_SYNTAX)
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push(codes.BAD_SYNTAX)
                    continue
                # more bytes already here: commands sent ahead, which only EHLO allows
                if reader._buffer and not self.session.extended_smtp and command != "QUIT":  # type: ignore[attr-defined]
                    await self._improper_pipelining(command)
                max_size = (self.command_size_limits.get(command, self.command_size_limit)
                            if self.session.extended_smtp else self.command_size_limit)
                if len(line) > max_size:
                    await self.push(codes.LINE_TOO_LONG)
                    continue
                if _CONTROL.search(line) is not None:
                    await self.push(codes.COMMAND_CONTROL_CHARS)
                    continue
                arg: str | None = None
                if arg_bytes:
                    arg_bytes = arg_bytes.strip()
                    try:
                        arg = arg_bytes.decode("utf-8" if self.enable_SMTPUTF8 else "ascii")
                    except UnicodeDecodeError:
                        await self.push(codes.BAD_UTF8 if self.enable_SMTPUTF8
                                        else codes.STRICT_ASCII)
                        continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push(codes.SECURITY_REFUSED)
                    continue
                if (self.require_starttls and not self._tls_protocol
                        and command not in ALLOWED_BEFORE_STARTTLS):
                    await self.push(codes.MUST_STARTTLS)
                    continue
                method = self._smtp_methods.get(command)
                if method is None:
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        await self.push(codes.TOO_MANY_UNRECOGNIZED)
                        self._close()
                        return
                    await self.push(codes.unrecognized_command(command))
                    continue
                self._reset_timeout()
                await method(self, arg)
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except (_Hangup, ConnectionError, asyncio.IncompleteReadError):
                self._close()
                return
            except Exception as error:
                if isinstance(error, TLSSetupException):
                    log.info("starttls_failed", peer=self._peer_ip(), error=str(error.__cause__))
                    self._close()
                    self.connection_lost(error)
                    return
                await self.push(await self._exception_status(error))

    async def _exception_status(self, error: Exception) -> str:
        """Reply for an exception from a policy hook: what the handler's ``handle_exception``
        returns, else a temporary 451 with the traceback in the log (an unexpected error never
        refuses a message permanently: the client keeps it and retries)."""
        hook = self._handle_hooks.get("exception")
        if hook is not None:
            try:
                return await hook(error)
            except Exception:
                log.exception("smtp_handle_exception_failed")
                return codes.INTERNAL_ERROR
        log.exception("smtp_policy_exception", peer=self._peer_ip())
        return codes.INTERNAL_ERROR

    # ---- EHLO, STARTTLS --------------------------------------------------------------------

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push(codes.EHLO_SYNTAX)
            return
        self._set_rset_state()
        self.session.extended_smtp = True
        response = ["250-" + self.hostname]
        mail_limit = self.command_size_limit + 14  # RFC 1869 §4.1.2: " BODY=8BITMIME"
        if self.data_size_limit:
            response.append(f"250-SIZE {self.data_size_limit}")
            mail_limit += 26  # RFC 1870 §3
        response.append("250-8BITMIME")
        if self.enable_SMTPUTF8:
            response.append("250-SMTPUTF8")
            mail_limit += 10  # RFC 6531 §3.4
        self.command_size_limits = {"MAIL": mail_limit, "AUTH": AUTH_LINE_LIMIT}
        response.append("250-PIPELINING")  # RFC 2920
        response.append("250-ENHANCEDSTATUSCODES")  # RFC 2034: our replies carry them
        if self.starttls_offered:
            response.append("250-STARTTLS")
        if self.auth_offered:
            response.append("250-AUTH " + " ".join(self.auth_mechanisms))
        response.append("250 HELP")
        if self._ehlo_hook_ver is None:
            self.session.host_name = hostname
        else:
            response = await self._call_handler_hook("EHLO", hostname, response)
        await self.push("\r\n".join(response))

    # What HELP lists (aiosmtpd's smtp_HELP asks _syntax_available, which reads the attribute
    # named by a command's ``when``): only what EHLO would offer on this connection now.
    @property
    def starttls_offered(self) -> bool:
        return bool(self.tls_context) and not self._tls_protocol

    @property
    def auth_offered(self) -> bool:
        return bool(self.auth_mechanisms) and bool(self._tls_protocol or not self._auth_require_tls)

    @syntax("STARTTLS", when="starttls_offered")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            await self.push(codes.TLS_ALREADY_ACTIVE)
            return
        if self.session.authenticated:
            await self.push(codes.STARTTLS_AFTER_AUTH)
            return
        # aiosmtpd switches the transport; connection_made() then clears the reader buffer,
        # dropping anything the client pipelined after STARTTLS in plaintext (RFC 3207 §5).
        await SMTP.smtp_STARTTLS(self, arg)
