"""DNS lookups for the checks: each with its own timeout, answers as plain Python values, and
"does not exist" told apart from "could not be looked up" (:class:`LookupFailed`)."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

__all__ = ["LookupFailed", "Lookups"]


class LookupFailed(Exception):
    """The lookup failed (timeout, SERVFAIL, no nameserver): the answer is unknown."""


class Lookups:
    """Lookups through ``resolver``, each at most ``timeout`` seconds."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, timeout: float) -> None:
        self.resolver = resolver
        self.timeout = timeout

    async def rrset(self, name: str, rdtype: str) -> list | None:
        """The records of ``name``; None when the name or the type does not exist."""
        qname = name if name.endswith(".") else name + "."
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self.resolver.resolve(qname, rdtype, search=False, lifetime=self.timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (TimeoutError, dns.exception.Timeout):
            raise LookupFailed(f"{rdtype} {name}: no answer within {self.timeout:g}s") from None
        except dns.resolver.NoNameservers as exc:
            raise LookupFailed(f"{rdtype} {name}: {exc}") from None
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"{rdtype} {name}: {type(exc).__name__}: {exc}") from None
        return list(answer)

    async def txt(self, name: str, prefix: str | None = None) -> list[str]:
        """The TXT records of ``name`` as text (strings joined); only those starting with
        ``prefix`` (a ``v=`` tag, compared case-insensitively) when given."""
        records = await self.rrset(name, "TXT") or []
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in records]
        if prefix is None:
            return texts
        p = prefix.lower()
        return [t for t in texts if t.lower() == p or t.lower().startswith(p + " ") or t.lower().startswith(p + ";")]

    async def addresses(self, name: str) -> list[str]:
        """A and AAAA of ``name`` (CNAMEs followed by the resolver)."""
        out: list[str] = []
        for rdtype in ("A", "AAAA"):
            out += [r.address for r in await self.rrset(name, rdtype) or []]
        return out

    async def cname(self, name: str) -> str | None:
        records = await self.rrset(name, "CNAME")
        return records[0].target.to_text().rstrip(".").lower() if records else None

    async def ptr(self, ip: str) -> list[str]:
        records = await self.rrset(dns.reversename.from_address(ip).to_text(), "PTR") or []
        return [r.target.to_text().rstrip(".").lower() for r in records]
