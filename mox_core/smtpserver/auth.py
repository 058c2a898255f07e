"""AUTH (RFC 4954): the command and its challenge/response exchange.

Mixed into :class:`mox_core.smtpserver.protocol.MoxSMTP` (whose ``__init__`` sets the state
these methods use). The mechanisms (PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1, SCRAM-SHA-256) are
:mod:`mox_core.accounts.sasl`'s; aiosmtpd's own AUTH machinery (``auth_*`` methods, the
authenticator callback) is not used. AUTH is only offered inside TLS unless the listener says
otherwise. Failed logins are throttled per client address as mox does: after 10 failures in a
minute (:class:`mox_core.accounts.sasl.AuthFailureLimiter`, shared by all connections) the
answer is ``421`` and the connection is closed; and from the 4th failure on one connection
each failure waits (n-3) × ``auth_failure_delay`` before its 535.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import structlog
from aiosmtpd.smtp import syntax

from mox_core import afterreply
from mox_core.accounts.sasl import AuthFailureLimiter, CredentialStore, Mechanism, Step, new_mechanism
from mox_core.smtp import codes

if TYPE_CHECKING:
    from aiosmtpd.smtp import Envelope, Session

    from mox_core.metrics import ServiceMetrics

__all__ = ["AUTH_LINE_LIMIT", "AuthCommand"]

log = structlog.get_logger(component="smtpserver")

# RFC 4954 §4: AUTH command and continuation lines may be 12288 octets.
AUTH_LINE_LIMIT = 12288

_T = TypeVar("_T")


class AuthCommand:
    """``smtp_AUTH``: the exchange with one of :attr:`auth_mechanisms`."""

    # Set by MoxSMTP.__init__ and aiosmtpd's connection_made; listed for the reader.
    session: Session
    envelope: Envelope
    hostname: str
    credential_store: CredentialStore | None
    auth_mechanisms: tuple[str, ...]
    auth_limiter: AuthFailureLimiter
    auth_failure_delay: float
    _auth_failures: int
    metrics: ServiceMetrics | None
    _auth_require_tls: bool
    _reader: asyncio.StreamReader
    _tls_protocol: object | None  # aiosmtpd's SSLProtocol once STARTTLS has completed

    @syntax("AUTH <mechanism>", when="auth_offered")  # HELP lists AUTH only where EHLO offers it
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
        if self.metrics is not None:
            self.metrics.auth_failures.inc()
        log.info("auth_failed", peer=ip, mechanism=name, reason=step.reason)
        if self._auth_failures > 3 and self.auth_failure_delay > 0:
            await asyncio.sleep((self._auth_failures - 3) * self.auth_failure_delay)
        await self.push(codes.AUTH_BAD_BASE64 if step.malformed else codes.AUTH_BAD_CREDENTIALS)

    async def _mech_call(self, mech: Mechanism, fn: Callable[[_T], Step], arg: _T) -> Step:
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
