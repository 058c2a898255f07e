"""The fast DKIM verifier of incoming mail (``mox_core.checks.dkimverify``) against dkimpy.

``authres._dkim_results`` takes the fast path's "pass" where it has one and dkimpy's verdict
everywhere else, so the whole must give, signature by signature, exactly what dkimpy alone
gives (RFC 6376 §6.1: pass, fail, permerror; temperror for a key lookup that timed out).
Checked here on generated messages (RSA-2048/1024/512, Ed25519, rsa-sha1, every
canonicalization, l=, one to three signatures, published keys of every odd form) and on
changed copies of them (body, header and signature tags changed as forwarders and forgers
change them); and the pieces of the fast path against the dkimpy functions they replace.
The key lookups are a table in the test (no DNS).
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import time

import dkim
import dkim.canonicalization as dkimpy_c
import dkim.util
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mox_core.checks import authres, dkimverify
from mox_core.outgoing import dkimsign
from mox_core.outgoing.dkimsign import _Key, _split, canonical_body, signature_header

# a 512-bit RSA key (cryptography does not generate keys this small): below dkimpy's minimum
RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAo1+vXY6hm3ONfU/r
9yUSJkINMtSXc59ZoKHTDuslpNkrTGUSJC+anR+U/mr9xNxR30GGaCqZqWV1cBYN
jiz8kwIDAQABAkB6F5sFrv8FHmEB4kV0yGZ84uXcM9YPWWnwyp7hSkgyncuyUKdg
MjpAbjm/HHqfdjyafdBb3vPT1+uMxZ8y7PD5AiEAz6CUfp1YUXmBcZ2Dvbdyua7X
rzz0W4/0JeVQyu0ay5UCIQDJb7appzVQ6dN+cMltOVR6MBj/A/NgONDo0Y2L4xzd
hwIgIDqf8kuAUx1WT4mQ0pkwUMxoJIaEs9XTozJGaUmG2EUCIBe09xl2XVb9fe+W
lI4vPhr3SCnTLDR521RbPT5mZ0JHAiEAqne8ag2loDbjCzmq3A3JVPZzokUSVC/z
V/gvA7p5Jqk=
-----END PRIVATE KEY-----
"""


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _p(key) -> str:
    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    return base64.b64encode(pub.public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


class World:
    """Keys, the selectors of example.org with their records, and the lookup dkimpy calls."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa1k = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.small = serialization.load_pem_private_key(RSA_512, None)
        self.ed = ed25519.Ed25519PrivateKey.generate()
        rsa_p, ed_p = _p(self.rsa), _p(self.ed)
        # selector -> (signing key, algorithms it signs with, the record published for it)
        self.selectors = {
            "rsa": (self.rsa, ["rsa-sha256", "rsa-sha1"], f"v=DKIM1; k=rsa; p={rsa_p}"),
            "nov": (self.rsa, ["rsa-sha256"], f"p={rsa_p}"),
            "hsha": (self.rsa, ["rsa-sha256"], f"v=DKIM1; h=sha256; k=rsa; s=email; p={rsa_p}"),
            "rsa1k": (self.rsa1k, ["rsa-sha256"], f"v=DKIM1; k=rsa; p={_p(self.rsa1k)}"),
            "small": (self.small, ["rsa-sha256"], f"v=DKIM1; k=rsa; p={_p(self.small)}"),
            "ed": (self.ed, ["ed25519-sha256"], f"v=DKIM1; k=ed25519; p={ed_p}"),
            "wrongkey": (self.rsa, ["rsa-sha256"], f"v=DKIM1; k=rsa; p={_p(self.other)}"),
            "edrecord": (self.rsa, ["rsa-sha256"], f"v=DKIM1; k=ed25519; p={ed_p}"),
            "rsarecord": (self.ed, ["ed25519-sha256"], f"v=DKIM1; k=rsa; p={rsa_p}"),
            "tlsrpt": (self.rsa, ["rsa-sha256"], f"v=DKIM1; k=rsa; s=tlsrpt; p={rsa_p}"),
            "service": (self.rsa, ["rsa-sha256"], f"v=DKIM1; k=rsa; s=other; p={rsa_p}"),
            "unknownk": (self.rsa, ["rsa-sha256"], f"v=DKIM1; k=dsa; p={rsa_p}"),
            "revoked": (self.rsa, ["rsa-sha256"], "v=DKIM1; k=rsa; p="),
            "badp": (self.rsa, ["rsa-sha256"], "v=DKIM1; k=rsa; p=AAAA"),
            "badedp": (self.ed, ["ed25519-sha256"], "v=DKIM1; k=ed25519; p=AAAA"),
            "version": (self.rsa, ["rsa-sha256"], f"v=DKIM2; k=rsa; p={rsa_p}"),
            "duplicate": (self.rsa, ["rsa-sha256"], f"v=DKIM1; k=rsa; k=rsa; p={rsa_p}"),
            "garbage": (self.rsa, ["rsa-sha256"], "this is no key record"),
            "missing": (self.rsa, ["rsa-sha256"], None),
            "timeout": (self.rsa, ["rsa-sha256"], None),
        }
        self.common = ["rsa", "rsa", "rsa", "ed", "ed", "nov", "hsha", "rsa1k"]

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        m = re.fullmatch(rb"(.*)\._domainkey\.example\.org\.", name)
        if m is None:
            return None
        selector = m.group(1).decode(errors="replace")
        if selector == "timeout":
            raise dkim.DnsTimeoutError("no answer")
        record = self.selectors.get(selector, (None, None, None))[2]
        return record.encode() if record is not None else None


@pytest.fixture(scope="module")
def world() -> World:
    return World()


# ---- the messages -----------------------------------------------------------------------------

WORDS = [b"a", b"word", b" ", b"  ", b"\t", b" \t ", b".", b"=", b"\r\n", b"\r\n\r\n", b"b=x", b"\xc3\xa9"]


def _value(rng: random.Random) -> bytes:
    """A header value with random white space and folding (RFC 5322 §2.2.3)."""
    out = b""
    for _ in range(rng.randrange(1, 6)):
        out += rng.choice([b" ", b"  ", b"\t", b""]) + rng.choice([b"x", b"Hello", b"b=1", b"a@example.org", b";"])
        if rng.random() < 0.2:
            out += rng.choice([b"\r\n ", b"\r\n\t", b" \r\n  "])
    return out


def make_message(rng: random.Random) -> bytes:
    names = [b"From", b"To", b"Subject", b"Date", b"Message-ID", b"Received", b"Received", b"Cc", b"X-Mailer"]
    rng.shuffle(names)
    head = b""
    for name in names[: rng.randrange(2, len(names) + 1)]:
        if rng.random() < 0.2:
            name = name.lower() if rng.random() < 0.5 else name.upper()
        head += name + b":" + _value(rng) + b"\r\n"
    if b"from:" not in head.lower():
        head = b"From: a@example.org\r\n" + head
    body = b"".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 60)))
    if rng.random() < 0.1:
        body += b"word  and\tword \r\n" * rng.randrange(100, 3000)
    if rng.random() < 0.8:
        body += b"\r\n"
    return head + b"\r\n" + body


def sign_once(world: World, rng: random.Random, message: bytes) -> bytes:
    """One DKIM-Signature field for ``message``, by dkimpy or by mox's signer."""
    selector = rng.choice(world.common + list(world.selectors))
    key, algorithms, _ = world.selectors[selector]
    algorithm = rng.choice(algorithms)
    c = rng.choice([b"relaxed", b"simple"]), rng.choice([b"relaxed", b"simple"])
    present = [n.lower() for n, _ in dkim.rfc822_parse(message)[0]]
    include = [b"from"] + rng.sample(present, rng.randrange(0, len(present) + 1))
    include += rng.sample([b"subject", b"reply-to", b"received", b"from"], rng.randrange(0, 3))
    if rng.random() < 0.3 and algorithm != "rsa-sha1":
        fields, body = _split(message)
        k = _Key("ed25519-sha256", key) if algorithm.startswith("ed") else _Key("rsa-sha256", key)
        if not algorithm.startswith("ed"):
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding, utils

            k = _Key("rsa-sha256", key, (padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())))
        return signature_header(fields, hashlib.sha256(canonical_body(body, c[1].decode())).digest(),
                                domain="example.org", selector=selector, key=k,
                                headers=[h.decode() for h in include], canonicalization=b"/".join(c).decode(),
                                timestamp=int(time.time()) - rng.randrange(0, 100))
    private = (base64.b64encode(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                  serialization.NoEncryption()))
               if algorithm.startswith("ed") else _pem(key))
    identity = rng.choice([None, b"@example.org", b"user@mail.example.org"])
    signer = dkim.DKIM(message)
    signer.should_not_sign = set()  # Received may be signed here too
    return signer.sign(selector.encode(), b"example.org", private, identity=identity, canonicalize=c,
                       include_headers=include, length=rng.random() < 0.2, signature_algorithm=algorithm.encode())


# ---- changes on the way -----------------------------------------------------------------------


def _first_sig(rng: random.Random, message: bytes) -> tuple[int, int] | None:
    """Start and end (after its CRLF) of a DKIM-Signature field's value."""
    starts = [m.end() for m in re.finditer(rb"(?m)^DKIM-Signature:", message)]
    if not starts:
        return None
    start = rng.choice(starts)
    end = start
    while True:
        end = message.index(b"\r\n", end) + 2
        if message[end:end + 1] not in (b" ", b"\t"):
            return start, end


def change_tag(rng: random.Random, message: bytes) -> bytes:
    where = _first_sig(rng, message)
    if where is None:
        return message
    start, end = where
    value = message[start:end]
    now = int(time.time())
    edits = [
        lambda v: re.sub(rb"d=example\.org", b"d=example.net", v),
        lambda v: re.sub(rb"(?<=[;\s])(bh|b|h|s|d|v|a)=[^;]*;?", b"", v, count=1),
        lambda v: re.sub(rb"c=[^;]*", rng.choice([b"c=bogus", b"c=relaxed", b"c=simple", b"c=relaxed/x"]), v),
        lambda v: re.sub(rb"a=[^;]*", rng.choice([b"a=rsa-sha512", b"a=rsa-sha1", b"a=ed25519-sha256"]), v),
        lambda v: v.replace(b"v=1", rng.choice([b"v=2", b"v=1 ", b"v= 1"]), 1),
        lambda v: b" q=dns/other;" + v if b"q=" not in v else v.replace(b"q=dns/txt", b"q=dns"),
        lambda v: re.sub(rb"i=[^;]*", rng.choice([b"i=@other.org", b"i=example.org", b"i=@sub.example.org"]), v)
        if b"i=" in v else b" i=@EXAMPLE.ORG;" + v,
        lambda v: b" x=" + str(now - rng.choice([40000, -100, 0])).encode() + b";" + v,
        lambda v: re.sub(rb"t=\d+", b"t=" + rng.choice([str(now + 40000).encode(), b"abc", b"", b"0"]), v)
        if b"t=" in v else b" t=" + str(now + 40000).encode() + b";" + v,
        lambda v: b" l=" + str(rng.randrange(0, 50)).encode() + b";" + v if b"l=" not in v
        else re.sub(rb"l=\d+", b"l=" + rng.choice([b"1", b"99999", b"x"]), v),
        lambda v: b" s=rsa;" + v,
        lambda v: _flip_in(rng, v, rb"\bb=([A-Za-z0-9+/\s]{20})"),
        lambda v: _flip_in(rng, v, rb"bh=([A-Za-z0-9+/]{10})"),
        lambda v: re.sub(rb"(\bb=[A-Za-z0-9+/]{8})", b"\\1\r\n\t ", v, count=1),
        lambda v: re.sub(rb"(\bb=)", b"\\1A", v, count=1),
        lambda v: b" z=From:a@b|b=x;" + v,
        lambda v: v.replace(b"; ", b";\r\n\t", 2),
        lambda v: v.rstrip(b"\r\n") + rng.choice([b";", b"; ", b" ;x=", b"\t"]) + b"\r\n",
        lambda v: v.replace(b"b=", b"B=", 1),
        lambda v: v.replace(b"h=", b"h=x-absent:", 1),
    ]
    return message[:start] + rng.choice(edits)(value) + message[end:]


def _flip_in(rng: random.Random, value: bytes, pattern: bytes) -> bytes:
    m = re.search(pattern, value)
    if m is None:
        return value
    i = m.start(1) + rng.randrange(0, 8)
    c = value[i:i + 1]
    return value[:i] + (b"B" if c != b"B" else b"C") + value[i + 1:]


def change(rng: random.Random, message: bytes) -> bytes:
    edits = [
        lambda m: m + b"tail\r\n",
        lambda m: m + b"\r\n\r\n",
        lambda m: m.replace(b" ", b"  ", 1),
        lambda m: m.replace(b"word", b"ward", 1),
        lambda m: m.replace(b"\r\n\r\n", b"\r\n \r\n", 1),
        lambda m: b"From: evil@example.net\r\n" + m,
        lambda m: b"X-Added: by a forwarder\r\n" + m,
        lambda m: re.sub(rb"(?mi)^(subject|to|date):", lambda x: x.group(1).swapcase() + b":", m, count=1),
        lambda m: re.sub(rb"(?mi)^(subject|from):([^\r]*)", b"\\1:\\2 ", m, count=1),
        lambda m: re.sub(rb"(?mi)^(subject|to):", b"\\1:\r\n\t", m, count=1),
        lambda m: re.sub(rb"(?mi)^subject:[^\r]*", b"Subject: changed", m, count=1),
        lambda m: change_tag(rng, m),
        lambda m: change_tag(rng, m),
        lambda m: change_tag(rng, m),
    ]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        message = rng.choice(edits)(message)
    return message


# ---- dkimpy alone: the expected verdicts ------------------------------------------------------


def reference(message: bytes, dnsfunc) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    """Each signature verified by dkimpy alone, in a DKIM object of its own."""
    try:
        headers, _ = dkim.rfc822_parse(message)
    except Exception:
        return [("permerror", "", "")]
    count = sum(1 for name, _ in headers if name.lower() == b"dkim-signature")
    return [_verdict(dkim.DKIM(message), idx, dnsfunc) for idx in range(count)]


def _verdict(d: dkim.DKIM, idx: int, dnsfunc) -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    timed_out = []

    def lookup(name, timeout=5):
        try:
            return dnsfunc(name, timeout=timeout)
        except dkim.DnsTimeoutError:
            timed_out.append(name)
            raise

    try:
        result = "pass" if d.verify(idx=idx, dnsfunc=lookup) else "temperror" if timed_out else "fail"
    except dkim.ValidationError:
        result = "fail"
    except Exception:
        result = "permerror"
    sig = d.signature_fields or {}
    return (result, (sig.get(b"d") or b"").decode(errors="replace"), (sig.get(b"s") or b"").decode(errors="replace"))


def test_fast_verification_gives_dkimpys_verdicts(world):
    rng = random.Random(8463)
    seen: dict[str, int] = {}
    fast_passes = 0
    for _ in range(700):
        message = make_message(rng)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            message = sign_once(world, rng, message) + message
        received = change(rng, message)
        expected = reference(received, world.dnsfunc)
        assert authres._dkim_results(received, world.dnsfunc, 5) == expected, received
        parsed = dkimverify.Message.parse(received)
        for idx, want in enumerate(expected):
            seen[want[0]] = seen.get(want[0], 0) + 1
            fast = parsed.verify(idx, world.dnsfunc) if parsed else None
            assert fast is None or fast == want, (idx, received)
            fast_passes += fast is not None and fast[0] == "pass"
    # every verdict occurs, and most passes came from the fast path
    assert set(seen) == {"pass", "fail", "permerror", "temperror"}, seen
    assert fast_passes >= 0.8 * seen["pass"], (fast_passes, seen)


def test_what_the_fast_path_leaves_to_dkimpy(world):
    """It decides the usual signatures only: l=, a small key, an unparsable header and a
    signature that does not verify go to dkimpy (None)."""
    rsa_pem = _pem(world.rsa)
    message = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    usual = dkim.sign(message, b"rsa", b"example.org", rsa_pem, include_headers=[b"from", b"subject"]) + message
    assert dkimverify.Message.parse(usual).verify(0, world.dnsfunc) == ("pass", "example.org", "rsa")
    with_l = dkim.sign(message, b"rsa", b"example.org", rsa_pem, include_headers=[b"from"], length=True) + message
    small = dkim.sign(message, b"small", b"example.org", RSA_512, include_headers=[b"from"]) + message
    for m in (with_l, small, usual.replace(b"body", b"bodY"), usual.replace(b"Subject: x", b"Subject: y")):
        assert dkimverify.Message.parse(m).verify(0, world.dnsfunc) is None
    assert dkimverify.Message.parse(b"From a@b Mon Dec  7 10:00:00 2026\r\n" + usual) is None
    assert dkimverify.Message.parse(b" folded\r\n" + usual) is None
    timeout = dkim.sign(message, b"timeout", b"example.org", rsa_pem, include_headers=[b"from"]) + message
    assert dkimverify.Message.parse(timeout).verify(0, world.dnsfunc) == ("temperror", "example.org", "timeout")
    assert authres._dkim_results(small, world.dnsfunc, 5) == [("permerror", "example.org", "small")]
    assert authres._dkim_results(with_l, world.dnsfunc, 5) == [("pass", "example.org", "rsa")]
    # a first line that continues nothing: dkimpy cannot read the header
    assert authres._dkim_results(b" folded\r\n" + usual, world.dnsfunc, 5) == [("permerror", "", "")]


# ---- the pieces against the dkimpy functions they stand for -----------------------------------


def test_body_hash_is_dkimpys(world):
    rng = random.Random(6376)
    for _ in range(3000):
        body = b"".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 30)))
        for method, canon in (("relaxed", dkimpy_c.Relaxed), ("simple", dkimpy_c.Simple)):
            for hash_name in ("sha256", "sha1"):
                want = hashlib.new(hash_name, canon.canonicalize_body(body)).digest()
                assert dkimverify.body_hash(body, method, hash_name) == want, (body, method)


def test_large_bodies_hash_as_dkimpy_hashes_them():
    # above dkimsign.MEMMEM_ABOVE the scans for what relaxed canonicalization changes are libc's
    rng = random.Random(20)
    filler = b"word and word\r\n" * (dkimsign.MEMMEM_ABOVE // 15 + 1)
    for _ in range(200):
        extra = b"".join(rng.choice(WORDS + [b"\x00"]) for _ in range(rng.randrange(0, 6)))
        at = rng.randrange(0, len(filler) + 1)
        body = rng.choice([filler[:at] + extra + filler[at:], filler + extra, extra + filler])
        for method, canon in (("relaxed", dkimpy_c.Relaxed), ("simple", dkimpy_c.Simple)):
            want = hashlib.sha256(canon.canonicalize_body(body)).digest()
            assert dkimverify.body_hash(body, method, "sha256") == want, (extra, at, method)
            assert dkimsign.canonical_body(body, method) == canon.canonicalize_body(body)
    for _ in range(2000):
        data = bytes(rng.choice(b" \r\n\x00a") for _ in range(rng.randrange(0, 40)))
        data = rng.choice([data + filler, filler + data, filler[:100] + data + filler])
        needle = rng.choice([b"  ", b" \r\n", b"\x00 ", b"a"])
        assert dkimsign.contains(data, needle) == (needle in data), (data[:50], data[-50:], needle)


def test_header_split_is_dkimpys():
    rng = random.Random(5322)
    pieces = [b"From: a", b"To:b", b"X-A :c", b" cont", b"\tcont", b"bad line", b"Sub\x7fj: x", b":empty name",
              b"Subject:", b"a:b:c", b"From x@y Mon", b"\xc3\xa9: x"]
    for _ in range(3000):
        head = b"\r\n".join(rng.choice(pieces) for _ in range(rng.randrange(1, 6)))
        message = head + b"\r\n\r\nbody\r\n"
        parsed = dkimverify.Message.parse(message)
        if parsed is None:
            continue
        headers, body = dkim.rfc822_parse(message)
        assert [tuple(h) for h in headers] == parsed.fields and body == parsed.body, message


def test_tag_list_is_dkimpys():
    rng = random.Random(3)
    pieces = [b"a", b"b", b"=", b";", b" ", b"\t", b"\r\n ", b"v", b"1", b"_", b"bh", b"==", b"h=from:to"]
    for _ in range(5000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))
        try:
            want = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList:
            want = None
        assert dkimverify._tags(value) == want, value


def test_b_tag_removal_is_dkimpys():
    rng = random.Random(4)
    pieces = [b"b=", b"b =", b" b=", b";b=", b"\tb\r\n =", b"abc", b"AB+/", b"=", b" ", b"\r\n\t", b";",
              b" bh=xyz", b"\r\n", b"\n", b"-", b"z=b=1"]
    for _ in range(10000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 10)))
        assert dkimverify._without_b(value) == dkim.RE_BTAG.sub(b"\\1", value), value
