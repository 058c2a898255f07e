"""DKIM signing of outgoing mail (RFC 6376) with the selectors of each domain.

``[domains."example.org".dkim]`` in domains.toml names selectors with their private key files
(relative to the config directory) and which of them sign. Keys are RSA (``rsa-sha256``) or
Ed25519 (``ed25519-sha256``, RFC 8463), PEM; they are read once and cached by path and
modification time. ``mox dkim gen`` makes a key and prints the DNS record to publish.

Signing runs for every submitted message, so it is written for speed: the signature is made
by OpenSSL (``cryptography``: 0.4 ms for RSA-2048, where dkimpy's pure-Python RSA takes 6 ms)
and the body is canonicalized with a few scans and replaces in C (most bodies need no change
at all; dkimpy's regular expressions take 4 ms per 100 KB). Incoming mail is verified in
``checks/dkimverify.py`` and ``checks/authres.py``; the tests check these signatures with
dkimpy.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mox_core.config.resolved import Config
from mox_core.smtp.domain import to_ascii

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

# cryptography is imported when a key is first loaded: it adds 7 MiB to a process, and only
# the process that serves submissions for a signing domain needs it (bench/RESULTS.md, idle).

log = structlog.get_logger(component="dkim")

LINE_WIDTH = 78  # RFC 5322 §2.1.1: lines SHOULD be no longer than 78 characters

_WSP = re.compile(rb"[ \t]+")


@dataclass(frozen=True)
class _Key:
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    rsa_args: tuple[Any, ...] = ()  # PKCS #1 v1.5 padding of a SHA-256 digest, for RSA

    def sign(self, digest: bytes) -> bytes:
        if self.rsa_args:
            return self.key.sign(digest, *self.rsa_args)  # type: ignore[call-arg]
        return self.key.sign(digest)  # RFC 8463 §3: PureEdDSA over the SHA-256 hash


_keys: dict[tuple[str, int, int], _Key] = {}


class DKIMKeyError(ValueError):
    """A selector's key file cannot be used for signing."""


def _key(path: Path) -> _Key:
    st = path.stat()
    cache_key = (str(path), st.st_mtime_ns, st.st_size)
    k = _keys.get(cache_key)
    if k is None:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise DKIMKeyError(f"{path}: not an unencrypted PEM private key") from None
        if isinstance(key, rsa.RSAPrivateKey):
            k = _Key("rsa-sha256", key, (padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())))
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            k = _Key("ed25519-sha256", key)
        else:
            raise DKIMKeyError(f"{path}: {type(key).__name__} cannot sign; DKIM keys are RSA or Ed25519")
        if len(_keys) >= 1000:  # key files replaced again and again: forget the old ones
            _keys.clear()
        _keys[cache_key] = k
    return k


# ---- canonicalization (RFC 6376 §3.4) --------------------------------------------------------


def _without_trailing_empty_lines(body: bytes) -> bytes:
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    return body[:end]


_memmem: Any = None  # libc's memmem(3) once looked up; False: not available
MEMMEM_ABOVE = 16 * 1024  # smaller data: ``in`` is as fast as the foreign call


def contains(data: bytes, needle: bytes) -> bool:
    """``needle in data``, for large ``data`` by libc's memmem(3): CPython 3.11 looks for a
    needle of two or three bytes whose last byte is common (a space) at about 1.6 ns a byte,
    glibc's memmem 3-4 times faster (bench/RESULTS.md: 100 KB bodies). Called through
    ``ctypes.PyDLL``, holding the GIL, as a search in C would."""
    global _memmem
    if len(data) < MEMMEM_ABOVE or _memmem is False:
        return needle in data
    if _memmem is None:
        try:
            import ctypes

            fn = ctypes.PyDLL(None).memmem
            fn.restype = ctypes.c_void_p
            fn.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
            _memmem = fn
        except (ImportError, OSError, AttributeError):  # no libc memmem: CPython's search
            _memmem = False
            return needle in data
    return _memmem(data, len(data), needle, len(needle)) is not None


def _relaxing_changes(body: bytes) -> bool:
    """Whether relaxed body canonicalization changes more than the trailing empty lines: a
    tab, a run of spaces, a space at a line's end (RFC 6376 §3.4.4)."""
    if b"\t" in body:
        return True
    if b" " not in body:  # one byte: memchr, fast (base64, for one)
        return False
    return contains(body, b"  ") or contains(body, b" \r\n")


def canonical_body(body: bytes, method: str) -> bytes:
    """``body`` (CRLF line endings) canonicalized by ``simple`` or ``relaxed``."""
    if method == "relaxed":
        # Most bodies have no tab, no double space and no space at a line's end: then only
        # the trailing empty lines change. Each test is one scan in C. (A last line without
        # CRLF keeps a trailing space, as dkimpy's verifier has it: it has no line end.)
        if _relaxing_changes(body):
            body = body.replace(b"\t", b" ")
            while b"  " in body:  # each pass halves every run of spaces
                body = body.replace(b"  ", b" ")
            body = body.replace(b" \r\n", b"\r\n")
        body = _without_trailing_empty_lines(body)
        return body + b"\r\n" if body else b""
    return _without_trailing_empty_lines(body) + b"\r\n"


def body_hash(body: bytes, method: str, hash_name: str = "sha256") -> bytes:
    """The hash of ``body`` canonicalized by ``method`` (:func:`canonical_body`), without a
    copy of the body where canonicalization changes nothing but the trailing empty lines."""
    h = hashlib.new(hash_name)
    if method == "relaxed" and _relaxing_changes(body):
        h.update(canonical_body(body, method))
        return h.digest()
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    h.update(memoryview(body)[:end])
    if end or method == "simple":
        h.update(b"\r\n")
    return h.digest()


def canonical_header(field: bytes, method: str) -> bytes:
    """One header field (name, colon, value with its folding, final CRLF) canonicalized."""
    if method == "simple":
        return field
    name, _, value = field.partition(b":")
    value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:  # else every run of WSP is one space already
        value = _WSP.sub(b" ", value)
    return name.rstrip(b" \t").lower() + b":" + value.strip(b" ") + b"\r\n"


def _split(message: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines and CRLF) and the body."""
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head, body = message if message.endswith(b"\r\n") else message + b"\r\n", b""
    else:
        head, body = message[: end + 2], message[end + 4:]
    fields: list[bytes] = []
    for line in head[:-2].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields, body


def _selected(fields: list[bytes], names: list[str]) -> list[bytes]:
    """RFC 6376 §5.4.2: for each name of h=, the last instance not yet used; none if none
    is left (the name is still signed: such a header cannot be added later)."""
    by_name: dict[bytes, list[bytes]] = {}
    for f in fields:
        name = f.partition(b":")[0].rstrip(b" \t").lower()
        by_name.setdefault(name, []).append(f)
    out = []
    for name in names:
        instances = by_name.get(name.encode("ascii").lower())
        if instances:
            out.append(instances.pop())
    return out


# ---- the DKIM-Signature header ---------------------------------------------------------------


def _fold(tokens: list[tuple[str, str]], line: str) -> str:
    """Append ``(separator, token)`` pairs to ``line`` (the field's start), starting a new
    line (CRLF TAB) before a token that would pass LINE_WIDTH. Breaks only go where RFC 6376
    allows folding white space: between tags, around the colons of h=, inside base64."""
    out = []
    for sep, token in tokens:
        if len(line) + len(sep) + len(token) > LINE_WIDTH and line.strip():
            out.append(line + "\r\n")
            line = "\t" + token
        else:
            line += sep + token
    out.append(line)
    return "".join(out)


def _b_chunks(value: str, first: int) -> list[tuple[str, str]]:
    """The b= value as tokens: fill the current line (``first`` columns left), then lines."""
    chunks, pos = [], 0
    width = max(first, 8)
    while pos < len(value):
        chunks.append(("", value[pos:pos + width]))
        pos += width
        width = LINE_WIDTH - 1
    return chunks


def signature_header(fields: list[bytes], body_hash: bytes, *, domain: str, selector: str,
                     key: _Key, headers: list[str], canonicalization: str, timestamp: int) -> bytes:
    """The DKIM-Signature field (with CRLF) signing the selected ``fields`` and the body."""
    header_c = canonicalization.partition("/")[0]
    names = [h.lower() for h in headers]
    if "from" not in names:  # RFC 6376 §5.4: the From header field MUST be signed
        names.insert(0, "from")
    tags = [("v", "1"), ("a", key.algorithm), ("c", canonicalization), ("d", domain),
            ("s", selector), ("t", str(timestamp))]
    tokens = [(" ", f"{k}={v};") for k, v in tags]
    tokens += [(" ", "h=" + names[0])] + [("", ":" + n) for n in names[1:]]
    tokens[-1] = (tokens[-1][0], tokens[-1][1] + ";")
    tokens += [(" ", "bh=" + base64.b64encode(body_hash).decode() + ";"), (" ", "b=")]
    unsigned = _fold(tokens, "DKIM-Signature:")  # b= empty: what the signature covers

    h = hashlib.sha256()
    for f in _selected(fields, names):
        h.update(canonical_header(f, header_c))
    h.update(canonical_header(unsigned.encode("ascii") + b"\r\n", header_c)[:-2])
    b = base64.b64encode(key.sign(h.digest())).decode()
    last = unsigned.rpartition("\n")[2]
    return (unsigned + _fold(_b_chunks(b, LINE_WIDTH - len(last)), last)[len(last):]).encode("ascii") + b"\r\n"


def sign(config: Config, from_domain: str, message: bytes) -> bytes:
    """The DKIM-Signature header fields to put in front of ``message`` (b"" if not signing).

    ``from_domain`` is the domain of the message's From address; every selector in the
    domain's ``dkim.sign`` signs. A broken key is logged and the message goes out without that
    selector's signature rather than not at all.
    """
    try:
        domain = to_ascii(from_domain)
    except ValueError:
        return b""
    dom = config.dynamic.domains.get(domain)
    if dom is None or not dom.dkim.sign:
        return b""
    fields, body = _split(message)
    body_hashes: dict[str, bytes] = {}
    timestamp = int(time.time())
    out = b""
    for name in dom.dkim.sign:
        sel = dom.dkim.selectors[name]
        path = sel.private_key_file if sel.private_key_file.is_absolute() else config.config_dir / sel.private_key_file
        body_c = sel.canonicalization.partition("/")[2]
        try:
            key = _key(path)
            if body_c not in body_hashes:
                body_hashes[body_c] = body_hash(body, body_c)
            out += signature_header(fields, body_hashes[body_c], domain=domain, selector=name, key=key,
                                    headers=sel.headers, canonicalization=sel.canonicalization,
                                    timestamp=timestamp)
        except (OSError, DKIMKeyError) as exc:
            log.error("dkim_sign_failed", domain=domain, selector=name, error=str(exc))
    return out


def generate_key(path: Path, bits: int = 2048, algorithm: str = "rsa") -> bytes:
    """Write a new private key (PEM, mode 0600) and return the public key as DNS publishes
    it: DER for RSA, the 32 raw bytes for Ed25519 (RFC 8463 §4)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "ed25519":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_of(path: Path) -> tuple[str, bytes]:
    """(``k=`` algorithm, public key as DNS publishes it) of a DKIM private key file (PEM);
    ValueError for a key that cannot sign DKIM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519", key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa", key.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    raise ValueError(f"{path}: a {type(key).__name__} cannot sign DKIM; use RSA or Ed25519")


def dns_record(selector: str, domain: str, public_key: bytes, algorithm: str = "rsa") -> str:
    """The TXT record in zone-file syntax, split into strings of at most 255 characters."""
    value = f"v=DKIM1; k={algorithm}; p=" + base64.b64encode(public_key).decode()
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    return f"{selector}._domainkey.{to_ascii(domain)}. TXT " + " ".join(f'"{c}"' for c in chunks)
