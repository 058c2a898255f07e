"""The resolvers built from ``[dns]`` cache answers for their TTL, and never answers with TTL 0."""

from __future__ import annotations

from mox_core.config.models import DNS
from mox_core.dns.resolver import make_async_resolver, make_resolver


def _asked(dns_server, name: str, rdtype: str) -> int:
    return sum(1 for q in dns_server.queries if q.name == name + "." and q.rdtype == rdtype)


async def test_async_resolver_caches_for_the_ttl_and_not_ttl_0(dns_server):
    dns_server.add("cached.example", "A", "127.0.0.5", ttl=300)
    dns_server.add("live.example", "A", "127.0.0.6")  # the test server's default: TTL 0
    r = make_async_resolver(DNS(nameservers=[dns_server.nameserver]))
    for _ in range(3):
        assert [a.address for a in await r.resolve("cached.example.", "A")] == ["127.0.0.5"]
        assert [a.address for a in await r.resolve("live.example.", "A")] == ["127.0.0.6"]
    assert _asked(dns_server, "cached.example", "A") == 1
    assert _asked(dns_server, "live.example", "A") == 3
    # a TTL-0 record changed while running is seen at once
    dns_server.set("live.example", "A", "127.0.0.7")
    assert [a.address for a in await r.resolve("live.example.", "A")] == ["127.0.0.7"]


def test_sync_resolver_caches_too(dns_server):
    dns_server.add("cached.example", "TXT", "v=spf1 -all", ttl=300)
    dns_server.add("live.example", "TXT", "v=spf1 +all", ttl=0)
    r = make_resolver(DNS(nameservers=[dns_server.nameserver]))
    for _ in range(2):
        assert r.resolve("cached.example.", "TXT")[0].strings == (b"v=spf1 -all",)
        assert r.resolve("live.example.", "TXT")[0].strings == (b"v=spf1 +all",)
    assert _asked(dns_server, "cached.example", "TXT") == 1
    assert _asked(dns_server, "live.example", "TXT") == 2
