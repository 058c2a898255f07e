"""SPF and DKIM results of incoming mail (``mox_core.checks.authres``), with a loopback DNS server.

The interesting part is the cache fast path: an SPF evaluation whose records are all in the
resolver's cache runs without a thread and without a query, and must give exactly the result
the full evaluation gives; one missing record sends it back to the full evaluation. DKIM
verification likewise runs in the event loop while the key records are cached.
"""

from __future__ import annotations

import pytest

from mox_core.checks import authres
from mox_core.config.models import DNS
from mox_core.dns.resolver import install_spf_lookup, make_resolver

MESSAGE = b"From: a@sender.example\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def spf_resolver(dns_server):
    """The server's synchronous resolver (with its TTL cache), installed for pyspf."""
    resolver = make_resolver(DNS(nameservers=[dns_server.nameserver], timeout=2))
    assert resolver.cache is not None
    install_spf_lookup(resolver)
    return resolver


def txt_queries(dns_server, name):
    return len(dns_server.queries_for(name, "TXT"))


async def test_spf_from_cache_gives_same_result_without_a_query(dns_server, spf_resolver):
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all", ttl=300)
    first = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert first.spf == "pass"
    assert txt_queries(dns_server, "sender.example") == 1

    second = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    third = await authres.check(MESSAGE, "127.0.0.2", "client.example", "a@sender.example", spf_resolver)
    assert (second.spf, second.spf_domain) == ("pass", "sender.example")
    assert third.spf == "fail"  # same cached record, other client IP
    assert txt_queries(dns_server, "sender.example") == 1


async def test_spf_with_uncached_include_falls_back_to_real_lookups(dns_server, spf_resolver):
    dns_server.add("sender.example", "TXT", "v=spf1 include:spf.provider.example -all", ttl=300)
    dns_server.add("spf.provider.example", "TXT", "v=spf1 ip4:127.0.0.0/8 -all", ttl=300)
    # Only the first record is cached: the cached evaluation misses the include and is redone.
    spf_resolver.resolve("sender.example", "TXT")
    result = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert result.spf == "pass"
    assert txt_queries(dns_server, "spf.provider.example") == 1


async def test_spf_record_with_ttl_zero_is_looked_up_every_time(dns_server, spf_resolver):
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all", ttl=0)
    for _ in range(3):
        result = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
        assert result.spf == "pass"
    assert txt_queries(dns_server, "sender.example") == 3


async def test_spf_without_cache_still_evaluates(dns_server, spf_resolver):
    spf_resolver.cache = None
    dns_server.add("sender.example", "TXT", "v=spf1 -all")
    result = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert result.spf == "fail"
    assert b"spf=fail smtp.mailfrom=sender.example" in result.header("mx.example", "127.0.0.1")


def _count_evaluations(monkeypatch) -> list[int]:
    """Count pyspf evaluations (``spf.query`` objects made) from now on."""
    calls = [0]

    class CountingQuery(authres.spf.query):
        def __init__(self, *args, **kwargs):
            calls[0] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(authres.spf, "query", CountingQuery)
    return calls


async def test_spf_result_remembered_while_its_records_stay_cached(dns_server, spf_resolver, monkeypatch):
    dns_server.add("sender.example", "TXT", "v=spf1 include:spf.provider.example -all", ttl=300)
    dns_server.add("spf.provider.example", "TXT", "v=spf1 ip4:127.0.0.0/8 -all", ttl=300)
    first = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert first.spf == "pass"  # real lookups, in a thread: now both records are cached
    calls = _count_evaluations(monkeypatch)
    cached = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert cached.spf == "pass" and calls[0] == 1  # evaluated from the cache, and remembered
    calls[0] = 0
    again = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert (again.spf, again.spf_domain) == ("pass", "sender.example")
    assert calls[0] == 0  # answered from the remembered result, not evaluated
    # another client IP or sender is another evaluation
    other = await authres.check(MESSAGE, "127.0.0.9", "client.example", "b@sender.example", spf_resolver)
    assert other.spf == "pass" and calls[0] == 1


async def test_spf_result_evaluated_again_when_a_record_it_used_changes(dns_server, spf_resolver, monkeypatch):
    dns_server.add("sender.example", "TXT", "v=spf1 include:spf.provider.example -all", ttl=300)
    dns_server.add("spf.provider.example", "TXT", "v=spf1 ip4:127.0.0.0/8 -all", ttl=300)
    first = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert first.spf == "pass"
    # The included record changes and the cache holds the new answer (the old one expired):
    # the remembered result must not outlive the answer it was computed from.
    dns_server.set("spf.provider.example", "TXT", ["v=spf1 ip4:192.0.2.0/24 -all"], ttl=300)
    spf_resolver.cache.flush()
    for name in ("sender.example", "spf.provider.example"):
        spf_resolver.resolve(name, "TXT")
    calls = _count_evaluations(monkeypatch)
    second = await authres.check(MESSAGE, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert second.spf == "fail"
    assert calls[0] >= 1


# ---- DKIM: verified in the event loop while the key record is cached --------------------------


@pytest.fixture
def signed(dns_server):
    """MESSAGE DKIM-signed by sel._domainkey.sender.example (key published, TTL 300 s)."""
    import base64

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()
    dns_server.add("sel._domainkey.sender.example", "TXT",
                   [record[i:i + 255] for i in range(0, len(record), 255)], ttl=300)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return dkim.sign(MESSAGE, b"sel", b"sender.example", pem, include_headers=[b"from", b"subject"]) + MESSAGE


def _count_threads(monkeypatch) -> list[int]:
    calls = [0]
    real = authres.asyncio.to_thread

    async def counting(*args, **kwargs):
        calls[0] += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(authres.asyncio, "to_thread", counting)
    return calls


async def test_dkim_verified_without_a_thread_while_the_key_is_cached(dns_server, spf_resolver, signed, monkeypatch):
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all", ttl=300)
    threads = _count_threads(monkeypatch)
    first = await authres.check(signed, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert first.dkim == [("pass", "sender.example", "sel")]
    assert threads[0] == 1  # the key was not cached: looked up in a thread
    second = await authres.check(signed, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    changed = await authres.check(signed.replace(b"hello", b"HELLO"), "127.0.0.1", "client.example",
                                  "a@sender.example", spf_resolver)
    assert second.dkim == [("pass", "sender.example", "sel")] and changed.dkim == [("fail", "sender.example", "sel")]
    assert threads[0] == 1  # both from the cache, in the event loop
    assert txt_queries(dns_server, "sel._domainkey.sender.example") == 1
    spf_resolver.cache.flush()  # the key expired: a real lookup again, in a thread
    third = await authres.check(signed, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert third.dkim == [("pass", "sender.example", "sel")]
    assert txt_queries(dns_server, "sel._domainkey.sender.example") == 2 and threads[0] == 2


async def test_a_signed_message_with_an_unreadable_header_is_a_dkim_permerror(dns_server, spf_resolver):
    # dkimpy refuses to parse a header with a line that is no header field; before, that
    # exception became a 451 for the message, on every retry
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all", ttl=300)
    message = (b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.example; s=sel; h=from; bh=AAAA; b=AAAA\r\n"
               b"From: a@sender.example\r\nthis line has no colon\r\n\r\nbody\r\n")
    for _ in range(2):  # the key lookup never happens: the thread path, then the event loop's
        result = await authres.check(message, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
        assert result.spf == "pass" and result.dkim == [("permerror", "", "")]
    assert b"spf=pass smtp.mailfrom=sender.example;\r\n\tdkim=permerror\r\n" in result.header("mx.example", "127.0.0.1")


async def test_an_ed25519_signature_verifies(dns_server, spf_resolver):
    # RFC 8463; dkimpy checks it with PyNaCl, a dependency of mox-core for this
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from mox_core.outgoing.dkimsign import _Key, _split, canonical_body, signature_header

    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    dns_server.add("ed._domainkey.sender.example", "TXT", "v=DKIM1; k=ed25519; p=" + base64.b64encode(public).decode())
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    fields, body = _split(MESSAGE)
    signed = signature_header(fields, hashlib.sha256(canonical_body(body, "relaxed")).digest(), domain="sender.example",
                              selector="ed", key=_Key("ed25519-sha256", key), headers=["From", "Subject"],
                              canonicalization="relaxed/relaxed", timestamp=1_700_000_000) + MESSAGE
    result = await authres.check(signed, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert result.dkim == [("pass", "sender.example", "ed")]
    changed = await authres.check(signed.replace(b"hello", b"HELLO"), "127.0.0.1", "client.example",
                                  "a@sender.example", spf_resolver)
    assert changed.dkim == [("fail", "sender.example", "ed")]


async def test_a_key_lookup_that_times_out_is_a_dkim_temperror(dns_server, spf_resolver, signed):
    # RFC 8601 §2.7.1: a retry may give a final result (dkimpy itself says "fail")
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all", ttl=300)
    dns_server.timeout("sel._domainkey.sender.example", "TXT")
    result = await authres.check(signed, "127.0.0.1", "client.example", "a@sender.example", spf_resolver)
    assert result.dkim == [("temperror", "sender.example", "sel")]
    assert b"dkim=temperror header.d=sender.example header.s=sel" in result.header("mx.example", "127.0.0.1")
