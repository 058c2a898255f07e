"""DKIM verification of incoming mail (RFC 6376 §6.1; Ed25519, RFC 8463): the fast path.

Nearly all signed mail carries signatures of one usual form, and nearly all of them verify.
Such a signature is found to "pass" here at a fraction of what dkimpy takes (bench/RESULTS.md):

* the header is split once, as dkimpy splits it, and only the signed fields are canonicalized
  (dkimpy canonicalizes every field of the header for every signature);
* the body hash is computed once per canonicalization and hash algorithm, by C scans and
  OpenSSL, without copying the body (:func:`body_hash`);
* a key record is parsed once (by dkimpy's own parser) and the result kept by the record's
  bytes: the record itself still comes from the resolver, so it lives as long as its TTL;
* the signature is checked by OpenSSL (RSA) or by libsodium (Ed25519, as dkimpy does).

Anything else returns None and dkimpy decides (``authres._Verifier``): a signature that does
not verify, a tag or value dkimpy would refuse or that needs more than this path does (``l=``,
an unknown algorithm or canonicalization, a key record of another form or one too small), a
header dkimpy would read differently. So every result other than "pass" is dkimpy's (but for
a key lookup that timed out: "temperror", as ``authres`` also says when dkimpy verifies), and
"pass" comes only where dkimpy's checks pass too: the conditions below are theirs
(``dkim.validate_signature_fields``, ``evaluate_pk``, ``verify_sig_process``), and
tests/test_dkimverify.py compares both on many generated and changed messages.

Messages have CRLF line ends throughout, as the SMTP DATA reader passes them (it refuses a
bare CR or LF); dkimpy would turn a bare LF in the body into CRLF, this path would not.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from typing import Any

import dkim
import nacl.exceptions  # PyNaCl: dkimpy's Ed25519, imported by dkim already

from mox_core.outgoing.dkimsign import body_hash

__all__ = ["Message", "body_hash", "rsa_verify"]

_HASHES = {b"rsa-sha256": "sha256", b"rsa-sha1": "sha1", b"ed25519-sha256": "sha256"}
_KEY_ALGORITHMS = {b"rsa-sha256": b"rsa", b"rsa-sha1": b"rsa", b"ed25519-sha256": b"ed25519"}
# c= values dkimpy reads (RFC 6376 §3.5: header/body, body "simple" when left out)
_CANON = {c: tuple(m.decode() for m in (c + b"/simple").split(b"/")[:2])
          for c in (b"simple", b"relaxed", b"simple/simple", b"simple/relaxed", b"relaxed/simple",
                    b"relaxed/relaxed")}
_MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
_NAME = re.compile(rb"[\x21-\x7e]+")  # a field name as dkimpy reads it (no space, no control)
_B64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")
_D_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_H_SPLIT = re.compile(rb"\s*:\s*")
_WSP = re.compile(rb"[\t ]+")
_B_START = re.compile(rb"[;\s]b\s*=")  # where dkimpy's RE_BTAG matches: the b= tag
_B_VALUE = re.compile(rb"[\sA-Za-z0-9+/=]*")
_SPACE = b" \t\n\r\x0b\x0c"  # what \s matches in a bytes pattern
SLOP = 36000  # dkimpy's leeway for t= and x=, 10 hours


def _nows(value: bytes) -> bytes:
    return value.translate(None, _SPACE)


# ---- keys -------------------------------------------------------------------------------------

_rsa_keys: dict[tuple[int, int], Any] = {}


_rsa_args: dict[bytes, tuple[Any, ...]] = {}  # a= -> (InvalidSignature, padding, Prehashed)


def rsa_verify(pk: dict, signature: bytes, digest: bytes, algorithm: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 with OpenSSL for the key dkimpy parsed from DNS (``modulus``,
    ``publicExponent``); public keys kept by their numbers. (cryptography is imported at the
    first signature, not with this module: see ``dkimsign``.)"""
    args = _rsa_args.get(algorithm)
    if args is None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, utils

        hash_algorithm = hashes.SHA1() if algorithm == b"rsa-sha1" else hashes.SHA256()
        args = _rsa_args[algorithm] = (InvalidSignature, padding.PKCS1v15(), utils.Prehashed(hash_algorithm))
    try:
        _rsa_key(pk).verify(signature, digest, args[1], args[2])
    except args[0]:
        return False
    return True


def _rsa_key(pk: dict) -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = (pk["modulus"], pk["publicExponent"])
    key = _rsa_keys.get(numbers)
    if key is None:
        try:
            key = rsa.RSAPublicNumbers(numbers[1], numbers[0]).public_key()
        except ValueError as exc:
            raise dkim.KeyFormatError(f"unusable RSA public key: {exc}") from None
        if len(_rsa_keys) >= 10_000:
            _rsa_keys.clear()
        _rsa_keys[numbers] = key
    return key


# key record bytes -> (key type, the key dkimpy parsed) or None (dkimpy decides)
_KEYS: dict[bytes, tuple[bytes, Any] | None] = {}
_KEYS_MAX = 10_000


def _key(record: bytes) -> tuple[bytes, Any] | None:
    try:
        return _KEYS[record]
    except KeyError:
        pass
    entry: tuple[bytes, Any] | None = None
    try:
        pk, keysize, ktag, tlsrpt = dkim.evaluate_pk(b"", record)
        if not tlsrpt and ktag == b"ed25519":
            entry = (ktag, pk)
        elif not tlsrpt and ktag == b"rsa" and keysize >= 1024:  # dkimpy's minkey
            _rsa_key(pk)
            entry = (ktag, pk)
    except Exception:  # an unusual record: dkimpy's verification says what it is
        entry = None
    if len(_KEYS) >= _KEYS_MAX:
        _KEYS.clear()
    _KEYS[record] = entry
    return entry


# ---- the signature ------------------------------------------------------------------------------


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    """dkimpy's ``parse_tag_value`` (RFC 6376 §3.2), None where it would raise."""
    tags: dict[bytes, bytes] = {}
    specs = value.strip().split(b";")
    if not specs[-1]:
        specs.pop()
    for spec in specs:
        key, eq, val = spec.partition(b"=")
        key = key.strip()
        if not eq or not key[:1].isalpha() or key in tags:
            return None
        tags[key] = val.strip()
    return tags


def _usual(sig: dict[bytes, bytes], now: int) -> bool:
    """The tags are all there and as dkimpy's ``validate_signature_fields`` wants them, and
    of a form this path handles."""
    if any(f not in sig for f in _MANDATORY) or b"l" in sig or b"cv" in sig:
        return False
    if sig[b"v"] != b"1" or sig[b"a"] not in _HASHES or sig.get(b"c", b"simple/simple") not in _CANON:
        return False
    b = sig[b"b"]
    if not _B64.match(b) or len(_nows(b)) % 4 or len(_nows(sig[b"bh"])) % 4:
        return False
    d = sig[b"d"]
    if not d.isascii() or _D_SPECIALS.search(d):
        return False
    if b"i" in sig:
        i = sig[b"i"]
        if len(i) <= len(d) or not i.lower().endswith(d.lower()) or i[-len(d) - 1] not in (64, 46):
            return False
    if sig.get(b"q", b"dns/txt") != b"dns/txt":
        return False
    t_sign = None
    if b"t" in sig:
        if not sig[b"t"].isdigit() or int(sig[b"t"]) > now + SLOP:
            return False
        t_sign = int(sig[b"t"])
    if b"x" in sig:
        x = sig[b"x"]
        if not x.isdigit() or int(x) < now - SLOP or (t_sign and int(x) < t_sign):
            return False
    return True


class Message:
    """A received message (CRLF line ends throughout), its header split as dkimpy splits it."""

    __slots__ = ("_body_hashes", "body", "fields", "names", "signatures")

    def __init__(self, fields: list[tuple[bytes, bytes]], body: bytes):
        self.fields = fields
        self.names = [name.lower() for name, _ in fields]
        self.signatures = [f for f, n in zip(fields, self.names, strict=True) if n == b"dkim-signature"]
        self.body = body
        self._body_hashes: dict[tuple[str, str], bytes] = {}

    @classmethod
    def parse(cls, message: bytes) -> Message | None:
        """None where dkimpy's ``rfc822_parse`` would read the header otherwise or not at all."""
        end = message.find(b"\r\n\r\n")
        if end <= 0:
            return None
        head = message[: end + 2]
        crlf = head.count(b"\r\n")
        if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
            return None
        fields: list[list[bytes]] = []
        for line in head[:-2].split(b"\r\n"):
            if line[:1] in (b" ", b"\t"):
                if not fields:
                    return None
                fields[-1][1] += line + b"\r\n"
                continue
            colon = line.find(b":")
            if colon <= 0 or not _NAME.fullmatch(line, 0, colon):
                return None
            fields.append([line[:colon], line[colon + 1:] + b"\r\n"])
        return cls([(n, v) for n, v in fields], message[end + 4:])

    def verify(self, idx: int, dnsfunc, timeout: float = 5) -> tuple[str, str, str] | None:  # type: ignore[no-untyped-def]
        """("pass", d=, s=) when signature ``idx`` verifies; ("temperror", ...) when its key
        record timed out; None: let dkimpy decide."""
        if idx >= len(self.signatures):
            return None
        sig_name, sig_value = self.signatures[idx]
        sig = _tags(sig_value)
        if sig is None or not _usual(sig, int(time.time())):
            return None
        d, s = sig[b"d"], sig[b"s"]
        result = (d.decode(errors="replace"), s.decode(errors="replace"))
        try:
            record = dnsfunc(s + b"._domainkey." + d + b".", timeout=timeout)
        except dkim.DnsTimeoutError:
            return ("temperror", *result)  # RFC 8601 §2.7.1; dkimpy would say "fail"
        key = _key(record) if record else None
        algorithm = sig[b"a"]
        if key is None or key[0] != _KEY_ALGORITHMS[algorithm]:
            return None
        header_c, body_c = _CANON[sig.get(b"c", b"simple/simple")]
        hash_name = _HASHES[algorithm]
        if self._body_hash(body_c, hash_name) != base64.b64decode(_nows(sig[b"bh"])):
            return None
        h = hashlib.new(hash_name)
        include = [x.lower() for x in _H_SPLIT.split(sig[b"h"])]
        if b"from" in include:  # as dkimpy: a From field added above the signed one breaks it
            include.append(b"from")
        for name, value in self._select(include):
            h.update(_canonical(name, value, header_c))
        stripped = _without_b(sig_value)
        h.update(_canonical(sig_name, stripped, header_c).rstrip())
        signature = base64.b64decode(_nows(sig[b"b"]))
        if key[0] == b"rsa":
            ok = rsa_verify(key[1], signature, h.digest(), algorithm)
        else:
            ok = _ed25519_verify(key[1], signature, h.digest())
        return ("pass", *result) if ok else None

    def tags(self, idx: int) -> dict[bytes, bytes] | None:
        """The tags of signature ``idx`` as dkimpy parses them (None: it would not)."""
        return _tags(self.signatures[idx][1]) if idx < len(self.signatures) else None

    def _body_hash(self, method: str, hash_name: str) -> bytes:
        digest = self._body_hashes.get((method, hash_name))
        if digest is None:
            digest = self._body_hashes[method, hash_name] = body_hash(self.body, method, hash_name)
        return digest

    def _select(self, include: list[bytes]) -> list[tuple[bytes, bytes]]:
        """dkimpy's ``select_headers`` (RFC 6376 §5.4.2): for each name, the last instance not
        yet used, going up."""
        out, last, names = [], {}, self.names
        for h in include:
            i = last.get(h, len(names))
            while i > 0:
                i -= 1
                if names[i] == h:
                    out.append(self.fields[i])
                    break
            last[h] = i
        return out


def _without_b(value: bytes) -> bytes:
    """The DKIM-Signature's value with the b= tag's value removed (RFC 6376 §3.7): what
    dkimpy's ``RE_BTAG.sub`` gives, which takes 50-60 us on a 2048-bit signature. RE_BTAG
    removes, after "b", white space and "=", the longest run of base64 characters and white
    space that ends in a base64 character, and a line end right after it that ends the value.
    Where "b=" is found more than once, RE_BTAG itself does it."""
    starts = [m.end() for m in _B_START.finditer(value)]
    if len(starts) != 1:
        return dkim.RE_BTAG.sub(b"\\1", value)
    start = starts[0]
    end = start + len(value[start:_B_VALUE.match(value, start).end()].rstrip(_SPACE))  # type: ignore[union-attr]
    rest = value[end:]
    return value[:start] + (b"" if rest in (b"\r\n", b"\n") else rest)


def _canonical(name: bytes, value: bytes, method: str) -> bytes:
    """One field as it is hashed (RFC 6376 §3.4.1, §3.4.2; dkimpy's unfolding and stripping).
    Relaxed: runs of WSP become one space, which changes nothing without a tab or two spaces."""
    if method == "simple":
        return name + b":" + value
    value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP.sub(b" ", value)
    return name.lower() + b":" + value.strip() + b"\r\n"


def _ed25519_verify(pk: Any, signature: bytes, digest: bytes) -> bool:
    try:
        pk.verify(digest, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True
