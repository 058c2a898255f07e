"""Server side of the SASL mechanisms SMTP AUTH offers, as small synchronous state machines.

Each mechanism object handles one authentication exchange. The protocol layer (which owns
base64, ``334`` continuation lines and ``*`` cancellation, RFC 4954 §4) calls
:meth:`Mechanism.start` with the initial response (or None), then :meth:`Mechanism.step` with
each client response, until a :class:`Step` says success or failure. No I/O happens here
except the :class:`CredentialStore` lookup, so the machines are easy to test and the protocol
can run the slow ones (password hashing) in a worker thread.

Mechanisms: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login), CRAM-MD5 (RFC 2195),
SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677). No ``-PLUS`` channel-binding variants:
stdlib ``ssl`` exposes only ``tls-unique``, which TLS 1.3 lacks, and the ``tls-exporter``
binding (RFC 9266) is not reachable from Python's ssl module; a SCRAM client asking for
channel binding (gs2 flag ``p``) fails.

Failures never say whether the user exists: unknown users go through the same work (a dummy
scrypt hash, a dummy CRAM-MD5 key, SCRAM with a salt derived from the user name so that it is
stable across attempts) and end in the same failure.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Protocol

from scramp import ScramMechanism
from scramp.utils import ScramException

from mox_core.accounts.passwords import (
    SCRAM_SHA1_ITERATIONS,
    SCRAM_SHA256_ITERATIONS,
    ScramKeys,
    StoredCredentials,
    verify_cram_md5,
    verify_password,
)

__all__ = [
    "DEFAULT_AUTH_LIMITER",
    "MECHANISMS",
    "AuthFailureLimiter",
    "CramMD5",
    "CredentialStore",
    "Login",
    "Mechanism",
    "Plain",
    "ScramSHA1",
    "ScramSHA256",
    "Step",
    "StepKind",
    "new_mechanism",
]


class CredentialStore(Protocol):
    """Where mechanisms find an account's stored credentials.

    ``lookup`` is synchronous and must be cheap (an in-memory dict, a cached config): it runs
    during the SMTP exchange. It may be called from a worker thread (PLAIN and LOGIN run off
    the event loop because of the password hash), so it must be thread-safe. Return None for
    an unknown user.
    """

    def lookup(self, username: str) -> StoredCredentials | None: ...


class StepKind(Enum):
    CHALLENGE = "challenge"
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True)
class Step:
    """Outcome of one mechanism step.

    ``data``: the challenge to send (the protocol base64-encodes them in a ``334`` line).
    ``username``: set on success. ``reason``: for logs only, never sent to the client.
    ``malformed``: the client's data did not follow the mechanism's syntax (a 501, not 535).
    """

    kind: StepKind
    data: bytes = b""
    username: str | None = None
    reason: str = ""
    malformed: bool = False

    @classmethod
    def challenge(cls, data: bytes) -> Step:
        return cls(StepKind.CHALLENGE, data=data)

    @classmethod
    def success(cls, username: str) -> Step:
        return cls(StepKind.SUCCESS, username=username)

    @classmethod
    def failure(cls, reason: str, *, malformed: bool = False) -> Step:
        return cls(StepKind.FAILURE, reason=reason, malformed=malformed)

    @property
    def is_challenge(self) -> bool:
        return self.kind is StepKind.CHALLENGE

    @property
    def is_success(self) -> bool:
        return self.kind is StepKind.SUCCESS


class Mechanism:
    """One server-side authentication exchange. Subclasses set ``name``.

    ``cpu_heavy`` tells the protocol to run :meth:`start`/:meth:`step` in a worker thread.
    """

    name: ClassVar[str] = ""
    cpu_heavy: ClassVar[bool] = False

    def __init__(self, store: CredentialStore, *, hostname: str = "localhost") -> None:
        self.store = store
        self.hostname = hostname
        self._done = False

    def start(self, initial_response: bytes | None) -> Step:
        """Begin the exchange; ``initial_response`` is None when the client sent none."""
        raise NotImplementedError

    def step(self, response: bytes) -> Step:
        """Handle the client's answer to the previous challenge."""
        raise NotImplementedError

    def _finish(self, step: Step) -> Step:
        self._done = True
        return step

    def _after_done(self) -> Step:
        return Step.failure("exchange already finished", malformed=True)


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _check_password(store: CredentialStore, username: str, password: str) -> Step:
    creds = store.lookup(username) if username else None
    if verify_password(creds, password):
        return Step.success(username)
    return Step.failure("unknown user" if creds is None else "bad password")


class Plain(Mechanism):
    """PLAIN (RFC 4616): one message ``authzid NUL authcid NUL passwd``.

    An authzid other than empty or the authcid is refused: we have no notion of acting for
    another user (mox: "cannot assume other role").
    """

    name = "PLAIN"
    cpu_heavy = True

    def start(self, initial_response: bytes | None) -> Step:
        if initial_response is None:
            return Step.challenge(b"")
        return self._finish(self._verify(initial_response))

    def step(self, response: bytes) -> Step:
        if self._done:
            return self._after_done()
        return self._finish(self._verify(response))

    def _verify(self, message: bytes) -> Step:
        parts = message.split(b"\x00")
        if len(parts) != 3:
            return Step.failure("PLAIN message needs exactly two NULs", malformed=True)
        decoded = [_utf8(p) for p in parts]
        authzid, authcid, passwd = decoded
        if authzid is None or authcid is None or passwd is None:
            return Step.failure("PLAIN message is not UTF-8", malformed=True)
        if not authcid:
            return Step.failure("empty authcid", malformed=True)
        if authzid and authzid != authcid:
            # Still costs a hash run, so the reply timing says nothing either.
            verify_password(None, passwd)
            return Step.failure("cannot assume other role")
        return _check_password(self.store, authcid, passwd)


class Login(Mechanism):
    """LOGIN (draft-murchison-sasl-login-00): user name, then password, each on request.

    The user name may come as initial response (``AUTH LOGIN dXNlcg==``, what smtplib sends).
    """

    name = "LOGIN"
    cpu_heavy = True

    def __init__(self, store: CredentialStore, *, hostname: str = "localhost") -> None:
        super().__init__(store, hostname=hostname)
        self._username: str | None = None

    def start(self, initial_response: bytes | None) -> Step:
        if initial_response is None:
            return Step.challenge(b"Username:")
        return self._take_username(initial_response)

    def step(self, response: bytes) -> Step:
        if self._done:
            return self._after_done()
        if self._username is None:
            return self._take_username(response)
        password = _utf8(response)
        if password is None:
            return self._finish(Step.failure("password is not UTF-8", malformed=True))
        return self._finish(_check_password(self.store, self._username, password))

    def _take_username(self, data: bytes) -> Step:
        username = _utf8(data)
        if username is None or not username:
            return self._finish(Step.failure("bad user name", malformed=True))
        self._username = username
        return Step.challenge(b"Password:")


class CramMD5(Mechanism):
    """CRAM-MD5 (RFC 2195): the server sends ``<random.timestamp@host>``, the client answers
    ``user SP hex(HMAC-MD5(password, challenge))``. Checked with the precomputed HMAC states
    from :mod:`mox_core.accounts.passwords`, so no password is stored."""

    name = "CRAM-MD5"

    def __init__(self, store: CredentialStore, *, hostname: str = "localhost") -> None:
        super().__init__(store, hostname=hostname)
        self._challenge = b""

    def start(self, initial_response: bytes | None) -> Step:
        if initial_response is not None:
            return self._finish(Step.failure("CRAM-MD5 takes no initial response", malformed=True))
        # RFC 2195 §2: msg-id syntax, random part plus timestamp plus host name.
        self._challenge = f"<{secrets.randbits(63)}.{int(time.time())}@{self.hostname}>".encode()
        return Step.challenge(self._challenge)

    def step(self, response: bytes) -> Step:
        if self._done or not self._challenge:
            return self._after_done()
        text = _utf8(response)
        if text is None:
            return self._finish(Step.failure("response is not UTF-8", malformed=True))
        username, sp, hexdigest = text.rpartition(" ")
        if not sp or not username or len(hexdigest) != 32:
            return self._finish(Step.failure("malformed CRAM-MD5 response", malformed=True))
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            return self._finish(Step.failure("digest is not hex", malformed=True))
        creds = self.store.lookup(username)
        if verify_cram_md5(creds, self._challenge, digest):
            return self._finish(Step.success(username))
        return self._finish(Step.failure("unknown user" if creds is None else "bad digest"))


# Secret for fake SCRAM salts of unknown users: an attacker must not be able to tell a real,
# stable salt from a fake one, so the fake one is stable too (per process).
_FAKE_SALT_KEY = os.urandom(32)


class _Scram(Mechanism):
    """SCRAM (RFC 5802) through scramp's server: client-first, server-first, client-final,
    server-final (sent as a ``334`` challenge, RFC 4954 §4), then an empty client response.

    scramp refuses a non-empty authzid in the gs2 header (``n,a=user,``), so such logins fail.
    """

    _scramp_name: ClassVar[str]
    _hash: ClassVar[str]
    _default_iterations: ClassVar[int]

    def __init__(self, store: CredentialStore, *, hostname: str = "localhost") -> None:
        super().__init__(store, hostname=hostname)
        self._server = ScramMechanism(self._scramp_name).make_server(self._auth_info)
        self._stage = "first"
        self._username: str | None = None
        self._known = False

    def _keys(self, creds: StoredCredentials) -> ScramKeys | None:
        raise NotImplementedError

    def _auth_info(self, username: str) -> tuple[bytes, bytes, bytes, int]:
        self._username = username
        creds = self.store.lookup(username)
        keys = self._keys(creds) if creds is not None else None
        if keys is not None:
            self._known = True
            return keys.salt, keys.stored_key, keys.server_key, keys.iterations
        # Unknown user, or no SCRAM keys for this hash: continue with a fake but stable salt
        # and random keys, so the exchange fails only at the proof, like a wrong password.
        salt = hmac.new(_FAKE_SALT_KEY, f"{self._hash}\x00{username}".encode(), "sha256").digest()[:16]
        size = hashlib.new(self._hash).digest_size
        return salt, os.urandom(size), os.urandom(size), self._default_iterations

    def start(self, initial_response: bytes | None) -> Step:
        if initial_response is None:
            return Step.challenge(b"")
        return self._client_first(initial_response)

    def step(self, response: bytes) -> Step:
        if self._stage == "first":
            return self._client_first(response)
        if self._stage == "final":
            return self._client_final(response)
        if self._stage == "ack":
            # RFC 4954 §4: after the server-final challenge the client sends an empty response.
            if response != b"":
                return self._finish(Step.failure("expected empty response", malformed=True))
            assert self._username is not None
            self._stage = "done"
            return self._finish(Step.success(self._username))
        return self._after_done()

    def _client_first(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None:
            return self._fail("client-first is not UTF-8", malformed=True)
        try:
            self._server.set_client_first(text)
            server_first = self._server.get_server_first()
        except ScramException as exc:
            return self._fail(f"client-first refused: {exc}")
        self._stage = "final"
        return Step.challenge(server_first.encode("utf-8"))

    def _client_final(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None:
            return self._fail("client-final is not UTF-8", malformed=True)
        try:
            self._server.set_client_final(text)
            server_final = self._server.get_server_final()
        except ScramException as exc:
            reason = "unknown user" if not self._known else f"client-final refused: {exc}"
            return self._fail(reason)
        self._stage = "ack"
        return Step.challenge(server_final.encode("utf-8"))

    def _fail(self, reason: str, *, malformed: bool = False) -> Step:
        self._stage = "done"
        return self._finish(Step.failure(reason, malformed=malformed))


class ScramSHA1(_Scram):
    name = "SCRAM-SHA-1"
    _scramp_name = "SCRAM-SHA-1"
    _hash = "sha1"
    _default_iterations = SCRAM_SHA1_ITERATIONS

    def _keys(self, creds: StoredCredentials) -> ScramKeys | None:
        return creds.scram_sha1


class ScramSHA256(_Scram):
    name = "SCRAM-SHA-256"
    _scramp_name = "SCRAM-SHA-256"
    _hash = "sha256"
    _default_iterations = SCRAM_SHA256_ITERATIONS

    def _keys(self, creds: StoredCredentials) -> ScramKeys | None:
        return creds.scram_sha256


# In the order EHLO advertises them, strongest first (mox's order, without -PLUS).
MECHANISMS: dict[str, type[Mechanism]] = {
    m.name: m for m in (ScramSHA256, ScramSHA1, CramMD5, Plain, Login)
}


def new_mechanism(name: str, store: CredentialStore, *, hostname: str = "localhost") -> Mechanism:
    """A fresh exchange for mechanism ``name`` (upper case); KeyError if unknown."""
    return MECHANISMS[name](store, hostname=hostname)


# --------------------------------------------------------------------------------------------
# Throttling failed logins


class AuthFailureLimiter:
    """Failed logins per client IP (IPv6 per /64) in a sliding window; mox limitauth.

    Share one instance between all connections of a server: each connection is a new
    :class:`MoxSMTP`. A successful login clears the IP's failures.
    """

    def __init__(self, max_failures: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    @staticmethod
    @functools.lru_cache(maxsize=65536)
    def key(ip: str) -> str:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.ip_network(f"{addr}/64", strict=False))
        return str(addr)

    def _recent(self, key: str) -> collections.deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        cutoff = self._clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, ip: str) -> bool:
        """Whether ``ip`` has used up its failures in the current window."""
        times = self._recent(self.key(ip))
        return times is not None and len(times) >= self.max_failures

    def blocked_for(self, ip: str) -> float:
        """Seconds until ``ip`` may try again; 0 when it is not blocked."""
        times = self._recent(self.key(ip))
        if times is None or len(times) < self.max_failures:
            return 0.0
        return max(0.0, times[0] + self.window - self._clock())

    def failed(self, ip: str) -> None:
        if len(self._failures) > 100_000:  # bound memory under a distributed attack
            for k in list(self._failures):
                self._recent(k)
        key = self.key(ip)
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = collections.deque(maxlen=self.max_failures)
        times.append(self._clock())

    def succeeded(self, ip: str) -> None:
        self._failures.pop(self.key(ip), None)


# Used by connections that are not given their own limiter, so throttling is never off by
# omission.
DEFAULT_AUTH_LIMITER = AuthFailureLimiter()
