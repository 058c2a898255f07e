"""DKIM signing with per-domain selectors (RSA and Ed25519, every canonicalization), and
`mox dkim gen`, verified by dkimpy through loopback DNS."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re

import dkim
import dkim.canonicalization as dkimpy_c
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mox_core.checks.authres import _dkim_dnsfunc, _Verifier
from mox_core.config.loader import load_config
from mox_core.outgoing.dkimsign import (
    _Key,
    _split,
    canonical_body,
    canonical_header,
    dns_record,
    sign,
    signature_header,
)
from mox_core.plugins.host import PluginHost
from mox_core.testing import MINIMAL_DOMAINS, MINIMAL_STATIC, write_config
from mox_testpeers.dnsserver import sync_resolver_for
from tests.conftest import run_mox

MSG = b"From: admin@example.org\r\nTo: x@example.net\r\nSubject: signed\r\n\r\nbody\r\n"


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_dkim_gen_sign_and_verify(tmp_path, dns_server, algorithm):
    key = tmp_path / "sel1.pem"
    r = run_mox("dkim", "gen", "--selector", "sel1", "--domain", "example.org", "--algorithm", algorithm, str(key))
    assert r.returncode == 0, r.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    record = r.stdout.splitlines()[0]
    m = re.fullmatch(r'sel1\._domainkey\.example\.org\. TXT (.*)', record)
    assert m, record
    strings = re.findall(r'"([^"]*)"', m.group(1))
    assert all(len(s) <= 255 for s in strings)
    assert strings[0].startswith(f"v=DKIM1; k={algorithm}; p=")
    dns_server.add("sel1._domainkey.example.org", "TXT", strings)

    path = write_config(tmp_path / "c", MINIMAL_STATIC, MINIMAL_DOMAINS.replace(
        '[domains."example.org"]\n',
        f'[domains."example.org"]\n[domains."example.org".dkim]\nsign = ["sel1"]\n'
        f'[domains."example.org".dkim.selectors.sel1]\nprivate_key_file = "{key}"\n'), base=False)
    cfg = load_config(path, PluginHost.load())
    sig = sign(cfg, "example.org", MSG)
    assert sig.startswith(b"DKIM-Signature: ") and b"d=example.org" in sig and b"s=sel1" in sig
    assert {"rsa": b"a=rsa-sha256;", "ed25519": b"a=ed25519-sha256;"}[algorithm] in sig
    dnsfunc = _dkim_dnsfunc(sync_resolver_for(dns_server))
    assert dkim.verify(sig + MSG, dnsfunc=dnsfunc)
    assert not dkim.verify(sig + MSG.replace(b"body", b"BODY"), dnsfunc=dnsfunc)
    assert sign(cfg, "other.example", MSG) == b""


# ---- signatures made by mox_core.outgoing.dkimsign, checked by an independent verifier (dkimpy) ------

HEADERS = ["From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To",
           "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding"]
MESSAGES = {
    "plain": MSG,
    "whitespace everywhere": b"From: admin@example.org\r\nTo:  x@example.net ,\r\n\t y@example.net  \r\n"
                             b"Subject:\tx  y \r\nsubject: second\r\n\r\n  lead  and\ttab \t\r\ntrail   \r\n\r\n\r\n",
    "empty body": b"From: admin@example.org\r\nSubject: nothing\r\n\r\n",
    "no body": b"From: admin@example.org\r\nSubject: nothing\r\n",
    "only empty lines": b"From: admin@example.org\r\n\r\n\r\n \r\n\t\r\n",
    "last line without CRLF": b"From: admin@example.org\r\n\r\nend  ",
}


@pytest.fixture
def keys(tmp_path, dns_server):
    """An RSA and an Ed25519 selector of example.org, published on the test's DNS server."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    files = {}
    for name, key in (("rsa", rsa_key), ("ed", ed_key)):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    rsa_public = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    ed_public = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    dns_server.add("rsa._domainkey.example.org", "TXT", re.findall(r'"([^"]*)"', dns_record("rsa", "example.org", rsa_public)))
    dns_server.add("ed._domainkey.example.org", "TXT", "v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public).decode())
    return files


def _config(tmp_path, keys, sign_with, canonicalization="relaxed/relaxed", headers=HEADERS):
    selectors = "".join(
        f'[domains."example.org".dkim.selectors.{name}]\nprivate_key_file = "{path}"\n'
        f'canonicalization = "{canonicalization}"\nheaders = {json.dumps(headers)}\n'
        for name, path in keys.items())
    path = write_config(tmp_path / "c", MINIMAL_STATIC, MINIMAL_DOMAINS.replace(
        '[domains."example.org"]\n',
        f'[domains."example.org"]\n[domains."example.org".dkim]\nsign = {json.dumps(sign_with)}\n' + selectors),
        base=False)
    return load_config(path, PluginHost.load())


def _verify(dns_server, signed: bytes, idx: int = 0) -> bool:
    try:
        return dkim.DKIM(signed).verify(idx=idx, dnsfunc=_dkim_dnsfunc(sync_resolver_for(dns_server)))
    except dkim.ValidationError:  # e.g. the body hash differs
        return False


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"])
@pytest.mark.parametrize("selector", ["rsa", "ed"])
@pytest.mark.parametrize("shape", list(MESSAGES))
def test_signatures_verify_with_dkimpy(tmp_path, keys, dns_server, canonicalization, selector, shape):
    cfg = _config(tmp_path, keys, [selector], canonicalization)
    message = MESSAGES[shape]
    sig = sign(cfg, "example.org", message)
    algorithm = {"rsa": b"a=rsa-sha256;", "ed": b"a=ed25519-sha256;"}[selector]
    assert sig.startswith(b"DKIM-Signature: v=1; ") and algorithm in sig
    assert f"c={canonicalization};".encode() in sig
    assert all(len(line) <= 78 for line in sig.split(b"\r\n")), sig
    assert sig.endswith(b"\r\n") and b"\r\n\r\n" not in sig
    assert _verify(dns_server, sig + message)


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_a_changed_message_fails_verification(tmp_path, keys, dns_server, canonicalization):
    cfg = _config(tmp_path, keys, ["rsa"], canonicalization)
    message = MESSAGES["whitespace everywhere"]
    sig = sign(cfg, "example.org", message)
    assert _verify(dns_server, sig + message)
    assert not _verify(dns_server, sig + message.replace(b"trail", b"TRAIL"))
    assert not _verify(dns_server, sig + message.replace(b"subject: second", b"subject: other"))
    # a header the signature lists but the message lacked cannot be added afterwards
    assert not _verify(dns_server, sig + b"Reply-To: someone@example.net\r\n" + message)
    # the signed one of two Subject fields is the last (RFC 6376 §5.4.2): the first is free
    head, _, rest = message.partition(b"Subject:\tx  y \r\n")
    assert _verify(dns_server, sig + head + b"Subject: changed\r\n" + rest)


def test_every_selector_signs_and_from_is_always_signed(tmp_path, keys, dns_server):
    cfg = _config(tmp_path, keys, ["rsa", "ed"], headers=["Subject"])
    sig = sign(cfg, "example.org", MSG)
    assert sig.count(b"DKIM-Signature:") == 2
    assert re.findall(rb"h=from:subject;", sig) == [b"h=from:subject;"] * 2
    assert _verify(dns_server, sig + MSG, 0) and _verify(dns_server, sig + MSG, 1)


def test_an_unusable_key_is_logged_and_the_other_selectors_still_sign(tmp_path, keys, dns_server, capsys):
    ec_file = tmp_path / "ec.pem"
    ec_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    cfg = _config(tmp_path, {**keys, "ec": ec_file, "garbage": garbage}, ["ec", "garbage", "rsa"])
    sig = sign(cfg, "example.org", MSG)
    assert sig.count(b"DKIM-Signature:") == 1 and b"s=rsa;" in sig
    assert _verify(dns_server, sig + MSG)
    err = capsys.readouterr()
    out = err.out + err.err
    assert out.count("dkim_sign_failed") == 2
    assert "ec.pem: ECPrivateKey cannot sign; DKIM keys are RSA or Ed25519" in out
    assert "garbage.pem: not an unencrypted PEM private key" in out


def test_body_canonicalization_matches_dkimpy_on_random_bodies():
    rng = random.Random(8)
    pieces = [b"a", b"b", b" ", b"  ", b"\t", b" \t ", b"\r\n"]
    for _ in range(3000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
        assert canonical_body(body, "relaxed") == dkimpy_c.Relaxed.canonicalize_body(body), body
        assert canonical_body(body, "simple") == dkimpy_c.Simple.canonicalize_body(body), body


def test_canonicalization_examples_of_rfc_6376():
    # RFC 6376 §3.4.5
    assert canonical_header(b"A: X\r\n", "relaxed") + canonical_header(b"B : Y\t\r\n\tZ  \r\n", "relaxed") == \
        b"a:X\r\nb:Y Z\r\n"
    assert canonical_header(b"B : Y\t\r\n\tZ  \r\n", "simple") == b"B : Y\t\r\n\tZ  \r\n"
    assert canonical_body(b" C \r\nD \t E\r\n\r\n\r\n", "relaxed") == b" C\r\nD E\r\n"
    assert canonical_body(b" C \r\nD \t E\r\n\r\n\r\n", "simple") == b" C \r\nD \t E\r\n"
    assert canonical_body(b"", "simple") == b"\r\n" and canonical_body(b"", "relaxed") == b""


# ---- verification of incoming mail (authres._Verifier): dkimpy's, with the body hashed in C ----


def _outcome(verifier: type, message: bytes, dnsfunc) -> str:
    try:
        return "pass" if verifier(message).verify(dnsfunc=dnsfunc) else "fail"
    except dkim.DKIMException as exc:
        return type(exc).__name__


def test_incoming_verification_agrees_with_dkimpy(tmp_path, keys, dns_server):
    dnsfunc = _dkim_dnsfunc(sync_resolver_for(dns_server))
    rsa_pem = keys["rsa"].read_bytes()
    other_pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ed_key = _Key("ed25519-sha256", serialization.load_pem_private_key(keys["ed"].read_bytes(), None))
    rng = random.Random(6376)
    words = [b"a", b"b", b" ", b"  ", b"\t", b"\r\n", b".", b"\r\n\r\n"]
    outcomes = set()
    for i in range(300):
        body = b"".join(rng.choice(words) for _ in range(rng.randrange(0, 40))) + b"\r\n"
        message = b"From: a@example.org\r\nSubject: t " + str(i).encode() + b"\r\n\r\n" + body
        c = rng.choice([(b"relaxed", b"relaxed"), (b"relaxed", b"simple"), (b"simple", b"simple"),
                        (b"simple", b"relaxed")])
        signer = rng.choice(["rsa-sha256", "rsa-sha1", "ed25519", "another key"])
        if signer == "ed25519":
            fields, raw_body = _split(message)
            signed = signature_header(fields, hashlib.sha256(canonical_body(raw_body, c[1].decode())).digest(),
                                      domain="example.org", selector="ed", key=ed_key, headers=["From", "Subject"],
                                      canonicalization=b"/".join(c).decode(), timestamp=1_700_000_000)
        else:
            signed = dkim.sign(message, b"rsa", b"example.org", other_pem if signer == "another key" else rsa_pem,
                               canonicalize=c, include_headers=[b"from", b"subject"], length=rng.random() < 0.3,
                               signature_algorithm=b"rsa-sha1" if signer == "rsa-sha1" else b"rsa-sha256")
        # the same message, or one changed by a forwarder, in the body or a header
        change = rng.choice([lambda m: m, lambda m: m + b"tail\r\n", lambda m: m.replace(b" ", b"  "),
                             lambda m: m.replace(b"\r\n\r\n", b"\r\n \r\n", 1), lambda m: m + b"\r\n\r\n",
                             lambda m: m.replace(b"Subject: t", b"Subject:  t")])
        received = change(signed + message)
        ours, theirs = _outcome(_Verifier, received, dnsfunc), _outcome(dkim.DKIM, received, dnsfunc)
        assert ours == theirs, received
        outcomes.add(ours)
    # the cases above reach every outcome: a valid signature, a body that no longer matches,
    # a signature that does not verify (another key, a changed header)
    assert {"pass", "ValidationError", "fail"} <= outcomes, outcomes


def test_incoming_verification_of_a_large_message(keys, dns_server):
    dnsfunc = _dkim_dnsfunc(sync_resolver_for(dns_server))
    message = b"From: a@example.org\r\nSubject: big\r\n\r\n" + b"word  and\tword \r\n" * 6000
    signed = dkim.sign(message, b"rsa", b"example.org", keys["rsa"].read_bytes(),
                       canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from", b"subject"])
    assert _Verifier(signed + message).verify(dnsfunc=dnsfunc)
    assert _outcome(_Verifier, signed + message.replace(b"word", b"ward", 1), dnsfunc) == "ValidationError"
