"""Credentials derived from a password, for every SASL mechanism, without storing the password.

What is stored per account (mox ``store/account.go`` SetPassword does the same, Dovecot too):

* ``password``: a salted scrypt hash, checked for PLAIN and LOGIN. scrypt is memory-hard, so a
  leaked hash costs an attacker far more than the SCRAM data below. Verifying takes tens of
  milliseconds on purpose: run it off the event loop (the SMTP protocol does).
* ``scram_sha1`` / ``scram_sha256``: salt, iteration count, StoredKey and ServerKey as RFC 5802
  §3 allows a server to keep. Unlike mox we do not keep SaltedPassword, which alone would let
  anyone who reads it log in.
* ``cram_md5``: the two MD5 chaining states of HMAC-MD5 after the key^ipad and key^opad blocks
  (RFC 2104 §4 "precomputed" keys, Dovecot's ``CRAM-MD5`` scheme, mox). With those states the
  server can compute HMAC-MD5(password, challenge) without the password. hashlib cannot start
  MD5 from a given state, so this module carries a small pure-Python MD5 compression function.
  Anyone holding these states can log in with CRAM-MD5; drop them (``cram_md5=False``) where
  CRAM-MD5 is not needed.

Passwords are SASLprep-normalised (RFC 4013, via scramp) before anything is derived, so that a
password typed in another Unicode form still matches on every mechanism. SCRAM clients do the
same normalisation (RFC 5802 §2.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Literal

from scramp.utils import ScramException, saslprep

__all__ = [
    "CramMD5State",
    "PasswordHash",
    "ScramKeys",
    "StoredCredentials",
    "cram_md5_state",
    "hmac_md5_from_state",
    "make_credentials",
    "make_scram_keys",
    "md5_compress",
    "md5_from_state",
    "normalize_password",
    "verify_cram_md5",
    "verify_password",
]

# scrypt cost: N=2**14, r=8, p=1 uses 16 MiB and about 50 ms here (RFC 7914 §2 suggests
# N=2**14 for interactive logins).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
_SCRYPT_MAXMEM = 256 * 1024 * 1024

# Iteration counts as mox uses them (SCRAM-SHA-1 8192, SCRAM-SHA-256 4096). RFC 7677 §4 asks
# for at least 4096; scramp refuses fewer.
SCRAM_SHA1_ITERATIONS = 8192
SCRAM_SHA256_ITERATIONS = 4096

ScramHash = Literal["sha1", "sha256"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def normalize_password(password: str) -> str:
    """SASLprep ``password`` (RFC 4013); return it unchanged if SASLprep refuses it.

    Falling back instead of failing keeps odd passwords usable with PLAIN, the mechanism
    where the server sees the password and can apply the same fallback.
    """
    try:
        return saslprep(password)
    except ScramException:
        return password


# --------------------------------------------------------------------------------------------
# Password hash for PLAIN and LOGIN


@dataclass(frozen=True)
class PasswordHash:
    """A salted scrypt hash of the normalised password."""

    salt: bytes
    hash: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P
    scheme: str = "scrypt"

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "n": self.n, "r": self.r, "p": self.p,
                "salt": _b64(self.salt), "hash": _b64(self.hash)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PasswordHash:
        if d.get("scheme") != "scrypt":
            raise ValueError(f"unknown password hash scheme {d.get('scheme')!r}")
        return cls(salt=_unb64(d["salt"]), hash=_unb64(d["hash"]), n=int(d["n"]),
                   r=int(d["r"]), p=int(d["p"]))

    @classmethod
    def make(cls, password: str, *, salt: bytes | None = None) -> PasswordHash:
        salt = os.urandom(16) if salt is None else salt
        return cls(salt=salt, hash=_scrypt(normalize_password(password).encode("utf-8"), salt,
                                           SCRYPT_N, SCRYPT_R, SCRYPT_P))

    def verify(self, password: str) -> bool:
        """Constant-time comparison of scrypt(password) with the stored hash."""
        got = _scrypt(normalize_password(password).encode("utf-8"), self.salt, self.n, self.r,
                      self.p, len(self.hash))
        return hmac.compare_digest(got, self.hash)


def _scrypt(pw: bytes, salt: bytes, n: int, r: int, p: int, dklen: int = SCRYPT_DKLEN) -> bytes:
    return hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_SCRYPT_MAXMEM)


# --------------------------------------------------------------------------------------------
# SCRAM


@dataclass(frozen=True)
class ScramKeys:
    """What RFC 5802 §3 lets a SCRAM server store: salt, i, StoredKey, ServerKey."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"salt": _b64(self.salt), "iterations": self.iterations,
                "stored_key": _b64(self.stored_key), "server_key": _b64(self.server_key)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScramKeys:
        return cls(salt=_unb64(d["salt"]), iterations=int(d["iterations"]),
                   stored_key=_unb64(d["stored_key"]), server_key=_unb64(d["server_key"]))


def make_scram_keys(password: str, hash_name: ScramHash, *, iterations: int | None = None,
                    salt: bytes | None = None) -> ScramKeys:
    """Derive SCRAM keys (RFC 5802 §3): SaltedPassword = Hi(Normalize(password), salt, i)."""
    if iterations is None:
        iterations = SCRAM_SHA1_ITERATIONS if hash_name == "sha1" else SCRAM_SHA256_ITERATIONS
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac(hash_name, normalize_password(password).encode("utf-8"), salt,
                                 iterations)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    return ScramKeys(salt=salt, iterations=iterations, stored_key=stored_key,
                     server_key=server_key)


# --------------------------------------------------------------------------------------------
# MD5 compression that can resume from a chaining state (RFC 1321 §3.4)

_MASK = 0xFFFFFFFF
_MD5_IV: tuple[int, int, int, int] = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_K = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]  # RFC 1321 §3.4 T[i]
_MD5_S = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_MD5_G = ([i for i in range(16)] + [(5 * i + 1) % 16 for i in range(16, 32)]
          + [(3 * i + 5) % 16 for i in range(32, 48)] + [(7 * i) % 16 for i in range(48, 64)])

MD5State = tuple[int, int, int, int]


def md5_compress(state: MD5State, block: bytes) -> MD5State:
    """Run the MD5 compression function on one 64-byte block, from chaining ``state``."""
    if len(block) != 64:
        raise ValueError("MD5 block must be 64 bytes")
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
        elif i < 32:
            f = (d & b) | (~d & c)
        elif i < 48:
            f = b ^ c ^ d
        else:
            f = c ^ (b | (~d & _MASK))
        f = (f + a + _MD5_K[i] + x[_MD5_G[i]]) & _MASK
        s = _MD5_S[i]
        a, d, c = d, c, b
        b = (b + ((f << s) | (f >> (32 - s)))) & _MASK
    return ((state[0] + a) & _MASK, (state[1] + b) & _MASK, (state[2] + c) & _MASK,
            (state[3] + d) & _MASK)


def _openssl_md5() -> Any:
    """libcrypto's MD5_Update/MD5_Final, which can start from a chaining state (hashlib
    cannot), or None. Ten times faster than :func:`md5_compress` in Python, which costs about
    90 us per CRAM-MD5 login (a fifth of a busy submission listener's event loop)."""
    import ctypes
    import ctypes.util

    path = ctypes.util.find_library("crypto")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.MD5_Update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.MD5_Final.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return lib


_LIBCRYPTO = _openssl_md5()


def _md5_from_state_openssl(state: MD5State, data: bytes, prefix_len: int) -> bytes:
    import ctypes

    bits = prefix_len * 8
    # MD5_CTX: A, B, C, D, Nl, Nh (bit count), data[16], num: 23 32-bit words, all zero but these
    ctx = (ctypes.c_uint32 * 23)(*state, bits & _MASK, (bits >> 32) & _MASK)
    _LIBCRYPTO.MD5_Update(ctx, data, len(data))
    out = ctypes.create_string_buffer(16)
    _LIBCRYPTO.MD5_Final(out, ctx)
    return out.raw


def md5_from_state(state: MD5State, data: bytes, prefix_len: int, *, python: bool = False) -> bytes:
    """Finish an MD5 computation that has already absorbed ``prefix_len`` bytes into ``state``.

    ``prefix_len`` must be a multiple of 64 (whole blocks). ``md5_from_state(IV, m, 0)`` is
    ``hashlib.md5(m).digest()``. Through OpenSSL when available, unless ``python``.
    """
    if prefix_len % 64:
        raise ValueError("prefix_len must be a multiple of 64")
    if _LIBCRYPTO is not None and not python:
        return _md5_from_state_openssl(state, data, prefix_len)
    total = prefix_len + len(data)
    padded = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", (total * 8) & (2**64 - 1))
    for off in range(0, len(padded), 64):
        state = md5_compress(state, padded[off:off + 64])
    return struct.pack("<4I", *state)


@dataclass(frozen=True)
class CramMD5State:
    """HMAC-MD5 key precomputed as two MD5 chaining states (RFC 2104 §4)."""

    inner: MD5State  # after compressing key ^ ipad
    outer: MD5State  # after compressing key ^ opad

    def to_dict(self) -> dict[str, Any]:
        # Little-endian words: the layout Dovecot's CRAM-MD5 scheme and an MD5 digest use.
        return {"inner": struct.pack("<4I", *self.inner).hex(),
                "outer": struct.pack("<4I", *self.outer).hex()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CramMD5State:
        def words(h: str) -> MD5State:
            a, b, c, e = struct.unpack("<4I", bytes.fromhex(h))
            return (a, b, c, e)
        return cls(inner=words(d["inner"]), outer=words(d["outer"]))


def cram_md5_state(password: str) -> CramMD5State:
    """Precompute the HMAC-MD5 states for ``password`` used as key."""
    key = normalize_password(password).encode("utf-8")
    if len(key) > 64:  # RFC 2104 §2: longer keys are hashed first
        key = hashlib.md5(key).digest()
    key = key.ljust(64, b"\x00")
    return CramMD5State(inner=md5_compress(_MD5_IV, bytes(k ^ 0x36 for k in key)),
                        outer=md5_compress(_MD5_IV, bytes(k ^ 0x5C for k in key)))


def hmac_md5_from_state(state: CramMD5State, message: bytes) -> bytes:
    """HMAC-MD5(key, message) from the precomputed key states."""
    inner = md5_from_state(state.inner, message, 64)
    return md5_from_state(state.outer, inner, 64)


# --------------------------------------------------------------------------------------------
# All credentials of an account


@dataclass(frozen=True)
class StoredCredentials:
    """Everything needed to check one account's password, per mechanism; never the password.

    A field that is None disables the mechanisms that need it for this account (the login then
    fails with the same reply as a wrong password).
    """

    password: PasswordHash | None = None
    scram_sha1: ScramKeys | None = None
    scram_sha256: ScramKeys | None = None
    cram_md5: CramMD5State | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (bytes as base64, MD5 states as hex); None fields are left out."""
        d: dict[str, Any] = {"version": 1}
        for name in ("password", "scram_sha1", "scram_sha256", "cram_md5"):
            value = getattr(self, name)
            if value is not None:
                d[name] = value.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredCredentials:
        if d.get("version", 1) != 1:
            raise ValueError(f"unknown credentials version {d.get('version')!r}")
        return cls(
            password=PasswordHash.from_dict(d["password"]) if d.get("password") else None,
            scram_sha1=ScramKeys.from_dict(d["scram_sha1"]) if d.get("scram_sha1") else None,
            scram_sha256=ScramKeys.from_dict(d["scram_sha256"]) if d.get("scram_sha256") else None,
            cram_md5=CramMD5State.from_dict(d["cram_md5"]) if d.get("cram_md5") else None,
        )


def make_credentials(password: str, *, cram_md5: bool = True) -> StoredCredentials:
    """Derive all stored credentials from ``password`` with fresh random salts.

    Slow on purpose (scrypt plus two PBKDF2 runs, about 60 ms): call it off the event loop.
    """
    return StoredCredentials(
        password=PasswordHash.make(password),
        scram_sha1=make_scram_keys(password, "sha1"),
        scram_sha256=make_scram_keys(password, "sha256"),
        cram_md5=cram_md5_state(password) if cram_md5 else None,
    )


_DUMMY: dict[str, Any] = {}


def _dummy_password_hash() -> PasswordHash:
    h = _DUMMY.get("password")
    if h is None:
        h = _DUMMY["password"] = PasswordHash.make(os.urandom(16).hex())
    return h


def _dummy_cram_md5() -> CramMD5State:
    s = _DUMMY.get("cram_md5")
    if s is None:
        s = _DUMMY["cram_md5"] = cram_md5_state(os.urandom(16).hex())
    return s


def verify_password(creds: StoredCredentials | None, password: str) -> bool:
    """Check a PLAIN/LOGIN password. Unknown users (``creds`` None) cost the same scrypt run,
    so response time does not tell whether an account exists."""
    if creds is None or creds.password is None:
        _dummy_password_hash().verify(password)
        return False
    return creds.password.verify(password)


def verify_cram_md5(creds: StoredCredentials | None, challenge: bytes, digest: bytes) -> bool:
    """Check a CRAM-MD5 response digest (16 raw bytes) against ``challenge`` (RFC 2195 §2)."""
    state = creds.cram_md5 if creds is not None else None
    expected = hmac_md5_from_state(state or _dummy_cram_md5(), challenge)
    return hmac.compare_digest(expected, digest) and state is not None
