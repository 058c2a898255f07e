"""SASL client mechanisms for SMTP AUTH (RFC 4954), and how a transport picks one.

Why hand-rolled: the exchange is tiny, and we must control details a generic library hides:
CRAM-MD5 challenge checks, SCRAM server-signature verification before trusting a 235, the
minimum SCRAM iteration count and salt size (as mox's client checks them), and never offering
PLAIN without TLS (the password would cross the network in clear). SCRAM arithmetic comes from
``scramp``.

Channel binding (the ``-PLUS`` variants) is not implemented: Python's ``ssl`` only exposes
``tls-unique``, which does not exist for TLS 1.3 (RFC 9266), so configuring a ``-PLUS`` name is
refused by :func:`select_mechanism` as unknown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import scramp
from scramp.utils import saslprep

__all__ = [
    "DEFAULT_MECHANISMS",
    "KNOWN_MECHANISMS",
    "AuthCredentials",
    "CramMD5",
    "Mechanism",
    "NoMatchingMechanism",
    "Plain",
    "PlainWithoutTLS",
    "SASLError",
    "Scram",
    "select_mechanism",
]

#: Walked in order when a transport lists no mechanisms: mox's default list without the ``-PLUS``
#: variants. PLAIN is only used when listed explicitly (mox does not include it by default either).
DEFAULT_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5")
KNOWN_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN")

# mox's SCRAM client checks: weak parameters mean a broken or hostile server.
_MIN_SCRAM_ITERATIONS = 2048
_MIN_SCRAM_SALT = 8
_MIN_SERVER_NONCE_EXTRA = 8


class SASLError(Exception):
    """The server sent something the mechanism cannot accept; the client aborts with ``*``."""


class NoMatchingMechanism(SASLError):
    """None of the configured mechanisms is offered by the server (a permanent failure)."""

    def __init__(self, offered: Sequence[str]):
        self.offered = list(offered)
        super().__init__(
            "no matching authentication mechanisms, server supports "
            + (", ".join(self.offered) if self.offered else "none")
        )


class PlainWithoutTLS(SASLError):
    """Only PLAIN matched, but the connection is not encrypted (a temporary failure)."""

    def __init__(self) -> None:
        super().__init__("refusing to send AUTH PLAIN credentials over a connection without TLS")


def _normalize(password: str) -> str:
    """SASLprep the password (RFC 4013), as the server will; raw if it does not apply."""
    try:
        return saslprep(password)
    except Exception:
        return password


@dataclass(frozen=True)
class AuthCredentials:
    """What a transport's ``[auth]`` settings give the client.

    ``mechanisms``: walked in order, the first one the server announces wins; ``None`` or
    empty means :data:`DEFAULT_MECHANISMS`.
    """

    username: str
    password: str = field(repr=False)
    mechanisms: Sequence[str] | None = None


class Mechanism(ABC):
    """One client side of a SASL exchange.

    ``initial()`` is the initial response (``None``: the mechanism has none), ``respond()``
    answers each 334 challenge. ``complete`` says whether the client has seen everything it
    needs: a 235 before that is a protocol error (a server skipping SCRAM's proof).
    """

    name: str = ""
    cleartext: bool = False  # whether the exchange reveals the password to an eavesdropper

    @abstractmethod
    def initial(self) -> bytes | None: ...

    @abstractmethod
    def respond(self, challenge: bytes) -> bytes: ...

    @property
    @abstractmethod
    def complete(self) -> bool: ...


class Plain(Mechanism):
    """RFC 4616: ``\\0user\\0password`` as the initial response, no authorization identity."""

    name = "PLAIN"
    cleartext = True

    def __init__(self, username: str, password: str) -> None:
        self._response = b"\0" + username.encode() + b"\0" + _normalize(password).encode()

    def initial(self) -> bytes | None:
        return self._response

    def respond(self, challenge: bytes) -> bytes:
        raise SASLError("server requested unexpected continuation of authentication")

    @property
    def complete(self) -> bool:
        return True


# RFC 2195 §2: the challenge is a msg-id like <1896.697170952@postoffice.example.net>.
_CRAM_CHALLENGE = re.compile(rb"^<[^.<>]+\.[^<>]*@[^<>]+>$")


class CramMD5(Mechanism):
    """RFC 2195: ``user hex(HMAC-MD5(password, challenge))``; no initial response."""

    name = "CRAM-MD5"

    def __init__(self, username: str, password: str) -> None:
        self._username = username
        self._password = _normalize(password).encode()
        self._done = False

    def initial(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        if self._done:
            raise SASLError("server requested unexpected continuation of authentication")
        # mox checks the form: <timestamp.x@hostname>
        stamp, _, host = challenge.partition(b"@")
        if not _CRAM_CHALLENGE.match(challenge) or len(stamp) < 3 or len(host) < 2:
            raise SASLError(f"invalid challenge {challenge[:100]!r}")
        digest = hmac.new(self._password, challenge, hashlib.md5).hexdigest()
        self._done = True
        return f"{self._username} {digest}".encode()

    @property
    def complete(self) -> bool:
        return self._done


class Scram(Mechanism):
    """RFC 5802 / RFC 7677 SCRAM-SHA-1 and SCRAM-SHA-256 without channel binding (gs2 ``n,,``).

    Steps: client-first as initial response; answer server-first with client-final; verify
    the server signature in server-final and answer it with an empty response (RFC 4954 §4
    has no "additional data with success", so the server sends it in a 334).
    """

    cleartext = False

    def __init__(self, name: str, username: str, password: str) -> None:
        if name not in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
            raise ValueError(f"unsupported SCRAM mechanism {name!r}")
        self.name = name
        # mox: standard base64 of 12 random bytes; kept as text for the server-first check
        self._nonce = base64.b64encode(os.urandom(12)).decode()
        self._client = scramp.ScramClient([name], username, password, c_nonce=self._nonce)
        self._step = 0
        self._verified = False

    def initial(self) -> bytes | None:
        self._step = 1
        return self._client.get_client_first().encode()

    def respond(self, challenge: bytes) -> bytes:
        try:
            text = challenge.decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError("SCRAM server message is not UTF-8") from None
        try:
            if self._step == 1:
                self._check_server_first(text)
                self._client.set_server_first(text)
                self._step = 2
                return self._client.get_client_final().encode()
            if self._step == 2:
                self._client.set_server_final(text)  # raises if the signature is wrong or e=...
                self._step = 3
                self._verified = True
                return b""
        except scramp.ScramException as exc:
            raise SASLError(f"SCRAM: {exc}") from None
        raise SASLError("server requested unexpected continuation of authentication")

    def _check_server_first(self, text: str) -> None:
        attrs: dict[str, str] = {}
        for part in text.split(","):
            key, eq, value = part.partition("=")
            if not eq or len(key) != 1:
                raise SASLError("malformed SCRAM server-first message")
            attrs.setdefault(key, value)
        if "m" in attrs:  # RFC 5802 §5.1: mandatory extension we do not know
            raise SASLError("SCRAM server-first message has mandatory extension")
        if "e" in attrs:
            raise SASLError(f"SCRAM server error: {attrs['e']}")
        try:
            salt = base64.b64decode(attrs["s"], validate=True)
            iterations = int(attrs["i"])
            nonce = attrs["r"]
        except (KeyError, ValueError):
            raise SASLError("malformed SCRAM server-first message") from None
        ours = self._nonce
        if not nonce.startswith(ours) or len(nonce) < len(ours) + _MIN_SERVER_NONCE_EXTRA:
            raise SASLError("SCRAM server nonce does not extend ours by at least 8 characters")
        if len(salt) < _MIN_SCRAM_SALT:
            raise SASLError(f"SCRAM salt too short ({len(salt)} bytes)")
        if iterations < _MIN_SCRAM_ITERATIONS:
            raise SASLError(f"SCRAM iteration count too low ({iterations})")

    @property
    def complete(self) -> bool:
        return self._verified


def _make(name: str, creds: AuthCredentials) -> Mechanism:
    if name == "PLAIN":
        return Plain(creds.username, creds.password)
    if name == "CRAM-MD5":
        return CramMD5(creds.username, creds.password)
    return Scram(name, creds.username, creds.password)


def select_mechanism(creds: AuthCredentials, offered: Iterable[str], *, tls: bool) -> Mechanism:
    """The first configured mechanism the server announced, as mox's SMTP client picks it.

    Raises :class:`NoMatchingMechanism` when none matches, :class:`PlainWithoutTLS` when PLAIN
    is the only match and the connection is not encrypted, ``ValueError`` for an unknown name
    in the configured list (a config error that validation should have caught).
    """
    offered_up = [m.upper() for m in offered]
    wanted = list(creds.mechanisms or DEFAULT_MECHANISMS)
    plain_skipped = False
    for name in wanted:
        if name not in KNOWN_MECHANISMS:
            raise ValueError(f"unknown authentication mechanism {name}")
        if name not in offered_up:
            continue
        if name == "PLAIN" and not tls:
            plain_skipped = True  # never PLAIN in the clear: the password would be readable
            continue
        return _make(name, creds)
    if plain_skipped:
        raise PlainWithoutTLS()
    raise NoMatchingMechanism(offered_up)
