"""SMTP protocol: aiosmtpd's ``SMTP`` with a lean command path, a chunked DATA reader and AUTH.

The policy (accept or reject senders, recipients, messages) stays in an aiosmtpd handler
object with the usual async ``handle_MAIL``/``handle_RCPT``/``handle_DATA`` hooks; this class
only speaks the protocol. What it changes in aiosmtpd 1.4.6, and why:

* Speed (reference/performance-notes.md): aiosmtpd runs ``inspect.getmembers``/``dir`` over
  server and handler on every connection and builds a ``typing.Protocol`` class plus an
  ``email`` header parse for every MAIL/RCPT. Here the introspection is done once per class,
  and ``<local@domain>`` addresses (nearly all of them) are parsed with one regex; anything
  else goes through the same ``email`` parser aiosmtpd uses, so results are identical.
  Command transcripts are only logged when the ``trace`` level is on.
* DATA is read in big pieces (``readuntil(CRLF.CRLF)``, at most 64 KiB buffered) instead of
  line by line, then dot-unstuffed in one pass (RFC 5321 §4.5.2). Only CRLF.CRLF ends the
  data; a bare CR or LF anywhere (every SMTP smuggling form) or a NUL rejects the message
  after the real end, so a message is never split in two (reliability.md B.1).
* SIZE, a recipient limit (452 4.5.3), 500 5.5.2 for long lines, an idle timeout that sends
  421, and a total DATA deadline.
* AUTH with PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1 and SCRAM-SHA-256 from
  :mod:`mox_core.accounts.sasl`, only after TLS by default, with failed logins throttled per IP
  (mox limitauth: 10 per minute, then ``421`` and close; from the 4th failure on a
  connection each failure waits (n-3) × ``auth_failure_delay``).
* STARTTLS: aiosmtpd 1.4.6 already drops plaintext bytes pipelined after ``STARTTLS``
  (CVE-2024-34083) when TLS comes up; we keep that and refuse a second STARTTLS.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import inspect
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from email._header_value_parser import get_addr_spec, get_angle_addr
from typing import Any

import structlog
from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    MISSING,
    SMTP,
    TLSSetupException,
    login_always_fail,
    make_loop,
    sanitize,
    syntax,
)

from mox_core import afterreply
from mox_core import logging as mox_logging
from mox_core.accounts.sasl import (
    DEFAULT_AUTH_LIMITER,
    MECHANISMS,
    AuthFailureLimiter,
    CredentialStore,
    Mechanism,
    Step,
    new_mechanism,
)
from mox_core.smtp import codes
from mox_core.smtp.lines import only_crlf

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "MoxSMTP"]

log = structlog.get_logger(component="smtpserver")

DEFAULT_MAX_MESSAGE_SIZE = 2**25  # aiosmtpd's default, 32 MiB
# StreamReader limit: the most a command line may buffer before we give up, and the size of
# the pieces DATA is read in. The reader pauses the socket at twice this.
READER_LIMIT = 64 * 1024
# RFC 4954 §4: AUTH command and continuation lines may be 12288 octets.
AUTH_LINE_LIMIT = 12288
TERMINATOR = b"\r\n.\r\n"
# C0 controls except TAB, and DEL: never valid in a command (CR would inject into Received).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# RFC 5321 §4.1.2 Dot-string / atext (ASCII). Addresses made only of these match the fast
# path; for them the email package returns exactly the text between the brackets.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_FAST_ADDRESS = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})>")


# ---- once-per-class introspection ----------------------------------------------------------

_SMTP_FUNCS: dict[type, dict[str, Callable[..., Any]]] = {}
_HOOK_NAMES: dict[type, tuple[tuple[str, str], ...]] = {}
_EHLO_ARITY: dict[Any, int] = {}


def _smtp_functions(cls: type) -> dict[str, Callable[..., Any]]:
    """``{"MAIL": MoxSMTP.smtp_MAIL, ...}`` as plain functions, computed once per class."""
    funcs = _SMTP_FUNCS.get(cls)
    if funcs is None:
        funcs = _SMTP_FUNCS[cls] = {n[5:]: getattr(cls, n) for n in dir(cls) if n.startswith("smtp_")}
    return funcs


def _handler_hooks(handler: Any) -> dict[str, Callable[..., Any]]:
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


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn()


def _running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return make_loop()


class _DataCollector:
    """Collects raw DATA pieces; stops storing once the message is certainly too big.

    The unstuffed message is ``size - dots - 3`` bytes, ``dots`` counting CRLF "." in CRLF +
    data (the terminator's dot among them). Below the limit in received bytes nothing needs
    counting; past it, the dots are counted (from then on piece by piece), and when even
    ``size - dots - 2`` exceeds the limit the message is too big and storing stops.
    """

    __slots__ = ("counting", "dots", "limit", "pieces", "size", "tail", "too_big")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit or 0
        self.pieces: list[bytes] = []
        self.size = 0
        self.counting = False  # dots counted so far (only once size passed the limit)
        self.dots = 0
        self.tail = b"\r\n"  # last two bytes of CRLF + data
        self.too_big = False

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if not self.too_big:
            if self.counting:
                self.dots += piece.count(b"\r\n.") + (self.tail + piece[:2]).count(b"\r\n.")
            self.pieces.append(piece)
            if self.limit and self.size - 2 > self.limit:
                if not self.counting:
                    self.counting = True
                    self.dots = (b"\r\n" + b"".join(self.pieces)).count(b"\r\n.")
                if self.size - self.dots - 2 > self.limit:
                    self.too_big = True
                    self.pieces = []
        self.tail = (self.tail + piece[-2:])[-2:]


class MoxSMTP(SMTP):
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
    :param enable_smtputf8: offer SMTPUTF8 (RFC 6531); commands are then decoded as UTF-8.
    :param ident: text after the host name in the 220 greeting.
    """

    def __init__(
        self,
        handler: Any,
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
        enable_smtputf8: bool = True,
        ident: str = "ESMTP",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # SMTP.__init__ is deliberately not called: it does per-connection introspection.
        # Everything aiosmtpd's inherited methods read is set here instead.
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
        try:
            await self._command_loop()
        finally:
            afterreply.run(self._after_reply)  # what a session ending without a reply left

    async def _command_loop(self) -> None:
        self._trace = mox_logging.enabled("trace", "smtpserver")
        await self.push(codes.greeting(self.hostname, self.__ident__))
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
            except (ConnectionError, asyncio.IncompleteReadError):
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
        if self.tls_context and not self._tls_protocol:
            response.append("250-STARTTLS")
        if self.auth_mechanisms and (self._tls_protocol or not self._auth_require_tls):
            response.append("250-AUTH " + " ".join(self.auth_mechanisms))
        response.append("250 HELP")
        if self._ehlo_hook_ver is None:
            self.session.host_name = hostname
        else:
            response = await self._call_handler_hook("EHLO", hostname, response)
        await self.push("\r\n".join(response))

    @syntax("STARTTLS", when="tls_context")
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

    # ---- MAIL, RCPT ------------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Parse ``<address> params`` as aiosmtpd does, fast for plain dot-atom addresses."""
        if not arg:
            return "", ""
        m = _FAST_ADDRESS.match(arg)
        if m is not None:
            rest = arg[m.end():]
            if rest and (rest[0] not in " \t" or "(" in rest):
                return self._getaddr_slow(arg)  # a comment or odd spacing: let email decide
            addr, rest = m.group(1), rest.lstrip()  # email's get_cfws strips the same way
        elif arg.startswith("<>"):
            return "<>", arg[2:]  # email keeps the text after "<>" unstripped
        else:
            return self._getaddr_slow(arg)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def _getaddr_slow(self, arg: str) -> tuple[str | None, str | None]:
        try:
            if arg.lstrip().startswith("<"):
                address, rest = get_angle_addr(arg)
            else:
                address, rest = get_addr_spec(arg)
            addr = address.addr_spec
        except Exception:  # HeaderParseError, and IndexError for input like "<"
            return None, None
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def _syntax_error(self, keyword: str) -> str:
        if keyword == "FROM:":
            return codes.MAIL_SYNTAX_EXTENDED if self.session.extended_smtp else codes.MAIL_SYNTAX
        return codes.RCPT_SYNTAX_EXTENDED if self.session.extended_smtp else codes.RCPT_SYNTAX

    def _parse_path(self, arg: str | None, keyword: str) -> tuple[str, list[str]] | str:
        """MAIL/RCPT argument (``FROM:<addr> params``): the address and the options as
        aiosmtpd gives them to hooks (upper case); or the error reply."""
        arg = self._strip_command_keyword(keyword, arg) if arg is not None else None
        if arg is None:
            return self._syntax_error(keyword)
        address, rest = self._getaddr(arg)
        if address is None:
            return codes.MALFORMED_ADDRESS
        if not address or (not self.session.extended_smtp and rest):
            return self._syntax_error(keyword)
        return address, rest.upper().split() if rest else []

    def _parse_params(self, options: list[str], keyword: str) -> dict[str, Any] | str:
        """RFC 5321 §4.1.2 esmtp-params as a dict; or the error reply (501)."""
        params: dict[str, Any] = {}
        for word in options:
            key, eq, value = word.partition("=")
            if not key.isalnum() or (eq and not value):
                return self._syntax_error(keyword)
            if key in params:
                return codes.DUPLICATE_PARAMETER
            params[key] = value if eq else True
        return params

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        envelope = self.envelope
        if not self.session.host_name:
            await self.push(codes.HELO_FIRST)
            return
        parsed = self._parse_path(arg, "FROM:")
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        if envelope.mail_from:
            await self.push(codes.NESTED_MAIL)
            return
        address, mail_options = parsed
        params = self._parse_params(mail_options, "FROM:")
        if isinstance(params, str):
            await self.push(params)
            return
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            await self.push(codes.BAD_BODY)
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if smtputf8 is not True and smtputf8 is not False:
            await self.push(codes.SMTPUTF8_WITH_ARGUMENT)
            return
        if smtputf8 and not self.enable_SMTPUTF8:
            await self.push(codes.SMTPUTF8_DISABLED)
            return
        envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size is not None:
            if size is True or not (size.isascii() and size.isdigit()):
                await self.push(self._syntax_error("FROM:"))
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                await self.push(codes.SIZE_TOO_BIG)
                return
        if params:
            await self.push(codes.MAIL_PARAMETERS_UNKNOWN)
            return
        status = await self._call_handler_hook("MAIL", address, mail_options)
        if status is MISSING:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            status = codes.OK
        await self.push(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        if not self.session.host_name:
            await self.push(codes.HELO_FIRST)
            return
        if not envelope.mail_from:
            await self.push(codes.NEED_MAIL)
            return
        if len(envelope.rcpt_tos) >= self.max_recipients:
            await self.push(codes.TOO_MANY_RECIPIENTS)
            return
        parsed = self._parse_path(arg, "TO:")
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, rcpt_options = parsed
        params = self._parse_params(rcpt_options, "TO:")
        if isinstance(params, str):
            await self.push(params)
            return
        if params:  # no RCPT parameters are supported
            await self.push(codes.RCPT_PARAMETERS_UNKNOWN)
            return
        status = await self._call_handler_hook("RCPT", address, rcpt_options)
        if status is MISSING:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            status = codes.OK
        await self.push(status)

    # ---- DATA ------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if not self.session.host_name:
            await self.push(codes.HELO_FIRST)
            return
        if not self.envelope.rcpt_tos:
            await self.push(codes.NEED_RCPT)
            return
        if arg:
            await self.push(codes.DATA_SYNTAX)
            return
        await self.push(codes.START_DATA)
        self._in_data = True
        self._data_deadline = self.loop.time() + self._data_timeout
        self._reset_timeout(min(self._timeout_duration, self._data_timeout))
        try:
            result = await self._read_data()
        finally:
            self._in_data = False
        try:
            if isinstance(result, str):
                log.info("smtp_data_rejected", peer=self._peer_ip(), reply=result)
                await self.push(result)
                return
            self.envelope.content = self.envelope.original_content = result
            self._reset_timeout()
            status = await self._call_handler_hook("DATA")
            await self.push(codes.OK if status is MISSING else status)
        finally:
            self._set_post_data_state()

    async def _read_data(self) -> bytes | str:
        """Read message data up to CRLF.CRLF; return the unstuffed message or an error reply.

        Bytes after the terminator stay in the reader for the next command (pipelining).
        """
        reader = self._reader
        collector = _DataCollector(self.data_size_limit)
        # The CRLF ending the DATA line can be the start of the terminator (an empty message
        # is just ".\r\n"), and readuntil() cannot see bytes already consumed. So while the
        # stream so far ends in a prefix of CRLF.CRLF, read single bytes; after that no
        # terminator can straddle what was read and what readuntil() scans.
        recent = b"\r\n"
        while not recent.endswith(TERMINATOR):
            if not recent.endswith((b"\r", b"\r\n", b"\r\n.")):
                break
            byte = await reader.readexactly(1)
            collector.add(byte)
            recent = (recent + byte)[-5:]
        else:
            return self._finish_data(collector)
        while True:
            try:
                piece = await reader.readuntil(TERMINATOR)
            except asyncio.LimitOverrunError as exc:
                # No terminator in the buffered bytes: take all but the last 4 (they may start
                # it) and keep going. Over the size limit the collector discards them.
                collector.add(await reader.readexactly(exc.consumed))
                continue
            collector.add(piece)
            return self._finish_data(collector)

    def _finish_data(self, collector: _DataCollector) -> bytes | str:
        if collector.too_big:
            return codes.MESSAGE_TOO_BIG
        pieces = collector.pieces
        if len(pieces[-1]) >= 3:
            pieces[-1] = pieces[-1][:-3]  # drop ".\r\n"; its CRLF ends the last line
            raw = b"".join(pieces)
        else:
            raw = b"".join(pieces)[:-3]
        if not only_crlf(raw):
            return codes.BAD_LINE_ENDING_IN_DATA
        if b"\x00" in raw:
            return codes.NUL_IN_DATA
        content = raw
        if content.rfind(b"\r\n.") >= 0:  # a stuffed line (rfind: twice as fast as find here)
            content = content.replace(b"\r\n.", b"\r\n")
        if content[:1] == b".":
            content = content[1:]
        if self.data_size_limit and len(content) > self.data_size_limit:
            return codes.MESSAGE_TOO_BIG
        return content

    # ---- AUTH ------------------------------------------------------------------------------

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        session = self.session
        if not session.host_name:
            await self.push(codes.EHLO_FIRST)
            return
        if not session.extended_smtp:
            await self.push(codes.AUTH_NOT_RECOGNIZED)
            return
        if not self.auth_mechanisms or self.credential_store is None:
            await self.push(codes.AUTH_NOT_ENABLED)
            return
        if self._auth_require_tls and not self._tls_protocol:
            await self.push(codes.AUTH_ENCRYPTION_REQUIRED)
            return
        ip = self._peer_ip()
        if self.auth_limiter.blocked(ip):
            log.info("auth_throttled", peer=ip)
            await self.push(codes.AUTH_THROTTLED)
            self._close()
            return
        if session.authenticated:
            await self.push(codes.AUTH_ALREADY_DONE)
            return
        if self.envelope.mail_from:
            await self.push(codes.AUTH_DURING_MAIL)
            return
        args = arg.split() if arg else []
        if not 1 <= len(args) <= 2:
            await self.push(codes.AUTH_SYNTAX)
            return
        name = args[0].upper()
        if name not in self.auth_mechanisms:
            await self.push(codes.AUTH_UNKNOWN_MECHANISM)
            return
        initial: bytes | None = None
        if len(args) == 2:
            initial = b"" if args[1] == "=" else _b64decode(args[1])  # RFC 4954 §4: "=" is empty
            if initial is None:
                await self.push(codes.AUTH_BAD_BASE64)
                return
        mech = new_mechanism(name, self.credential_store, hostname=self.hostname)
        step = await self._mech_call(mech, mech.start, initial)
        while step.is_challenge:
            response = await self._auth_response(step.data)
            if response is None:
                return  # cancelled or unreadable; already answered
            step = await self._mech_call(mech, mech.step, response)
        if step.is_success:
            session.authenticated = True
            session.auth_data = step.username
            self.auth_limiter.succeeded(ip)
            afterreply.later(log.info, "auth_success", peer=ip, mechanism=name, username=step.username)
            await self.push(codes.AUTH_SUCCESS)
            return
        self._auth_failures += 1
        self.auth_limiter.failed(ip)
        log.info("auth_failed", peer=ip, mechanism=name, reason=step.reason)
        if self._auth_failures > 3 and self.auth_failure_delay > 0:
            await asyncio.sleep((self._auth_failures - 3) * self.auth_failure_delay)
        await self.push(codes.AUTH_BAD_BASE64 if step.malformed else codes.AUTH_BAD_CREDENTIALS)

    async def _mech_call(self, mech: Mechanism, fn: Callable[[Any], Step], arg: Any) -> Step:
        """Run a mechanism step; password hashing (PLAIN, LOGIN) goes to a worker thread."""
        if mech.cpu_heavy:
            return await asyncio.to_thread(fn, arg)
        return fn(arg)

    async def _auth_response(self, challenge: bytes) -> bytes | None:
        """Send ``334 base64(challenge)``, read the client's line (RFC 4954 §4)."""
        await self.push(codes.auth_challenge(base64.b64encode(challenge)))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            await self.push(codes.LINE_TOO_LONG)
            self._close()
            return None
        self._reset_timeout()
        line = line.strip()
        if len(line) > AUTH_LINE_LIMIT:
            await self.push(codes.LINE_TOO_LONG)
            return None
        if line == b"*":
            await self.push(codes.AUTH_ABORTED)
            return None
        decoded = _b64decode(line)
        if decoded is None:
            await self.push(codes.AUTH_BAD_BASE64)
        return decoded


def _b64decode(data: str | bytes) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
