"""DNS resolvers built from ``[dns]`` in mox.toml.

Tests point ``nameservers`` at a DNS server they start on loopback; nothing in mox asks the
system resolver when nameservers are configured. pyspf only knows a module-level lookup
function, so :func:`install_spf_lookup` replaces it with one that uses our resolver.

Both resolvers cache answers for their TTL (dnspython's :class:`~dns.resolver.LRUCache`, which
also keeps negative answers for the SOA minimum): without it a smarthost's name was looked up
(A and AAAA) for every single delivery. Answers with TTL 0 are never served from the cache, and
failures (SERVFAIL, timeouts) are not cached. The loopback test DNS server answers with TTL 0
unless a test asks for another, because tests change records while a server runs.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mox_core.config.models import DNS

#: answers kept per resolver (least recently used dropped first)
CACHE_SIZE = 10_000

R = TypeVar("R", bound=dns.resolver.BaseResolver)


def _nameservers(cfg: DNS) -> tuple[list[str], int | None]:
    ips, port = [], None
    for ns in cfg.nameservers:
        host, _, p = ns.rpartition(":") if ns.count(":") == 1 else (ns, "", "")
        if ns.startswith("["):  # [::1]:53
            host, _, p = ns[1:].partition("]:")
        ips.append(host or ns)
        if p:
            port = int(p)
    return ips, port


def _configure(cls: type[R], cfg: DNS) -> R:
    """A resolver of ``cls`` for ``[dns]``: its nameservers (else the system's), timeout, and
    a cache that keeps answers for their TTL (never those with TTL 0)."""
    if not cfg.nameservers:
        r = cls()
    else:
        r = cls(configure=False)
        r.nameservers, port = _nameservers(cfg)
        if port:
            r.port = port
    r.lifetime = cfg.timeout
    r.timeout = cfg.timeout
    r.cache = dns.resolver.LRUCache(CACHE_SIZE)
    return r


def make_resolver(cfg: DNS) -> dns.resolver.Resolver:
    """A synchronous resolver (for pyspf and dkimpy, which run in a thread)."""
    return _configure(dns.resolver.Resolver, cfg)


def make_async_resolver(cfg: DNS) -> dns.asyncresolver.Resolver:
    """The resolver of the queue and the transports (MX, MTA-STS, smarthost addresses)."""
    return _configure(dns.asyncresolver.Resolver, cfg)


class CacheOnly:
    """While active in a thread, pyspf lookups and DKIM key lookups (``authres``) answer only
    from the resolver's cache.

    A lookup the cache cannot answer returns nothing and sets ``missed``: the caller then
    throws the whole evaluation away and runs it again with real lookups (in a thread). So an
    SPF check whose records are all cached runs in the event loop, without a thread hop and
    without a query; anything else is evaluated exactly as before.
    """

    _local = threading.local()

    def __init__(self) -> None:
        self.missed = False
        # (name, qtype, answer) of every lookup answered from the cache: the evaluation's
        # result holds for as long as each of these is still the cache's answer
        self.used: list[tuple[str, str, Any]] = []

    def __enter__(self) -> CacheOnly:
        CacheOnly._local.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        CacheOnly._local.active = None

    @classmethod
    def current(cls) -> CacheOnly | None:
        return getattr(cls._local, "active", None)


def cached_answer(resolver: dns.resolver.Resolver, name: str, qtype: str) -> dns.resolver.Answer | None:
    """The answer in ``resolver``'s cache, None if it has none (or no cache)."""
    cache = resolver.cache
    if cache is None:
        return None
    try:
        key = (_qname(name), dns.rdatatype.from_text(qtype), dns.rdataclass.IN)
    except (dns.exception.DNSException, ValueError):
        return None
    return cache.get(key)


@functools.lru_cache(maxsize=4096)
def _qname(name: str) -> dns.name.Name:
    return dns.name.from_text(name)


def install_spf_lookup(resolver: dns.resolver.Resolver) -> None:
    """Make pyspf resolve through ``resolver`` (its lookup function is module-global)."""
    import spf

    spf.DNSLookup = spf_lookup(resolver)


def spf_lookup(resolver: dns.resolver.Resolver):  # -> pyspf's DNSLookup signature
    """pyspf's lookup function, resolving through ``resolver``."""
    import spf

    def lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list:
        out: list = []
        cache_only = CacheOnly.current()
        if cache_only is not None:
            answers = cached_answer(resolver, name, qtype)
            if answers is None:
                cache_only.missed = True
                return out
            cache_only.used.append((name, qtype, answers))
        else:
            try:
                answers = resolver.resolve(name, qtype, lifetime=min(timeout, resolver.lifetime),
                                           raise_on_no_answer=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return out
            except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
                raise spf.TempError(f"DNS {exc}") from None
        for rdata in answers.rrset or []:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out

    return lookup
