"""``mox dnscheck DOMAIN``: every DNS check of a domain, run at once, each lookup with its own
timeout (default 10 s) and all of them within an overall one (default 30 s), as mox's DNS
check. Each check gives ``pass``, ``warning`` or ``failure`` with messages and the records
to publish instead (:class:`~mox_core.dnscheck.base.CheckResult`).

Checks: MX, SPF and DKIM (the published key is the key file's), DMARC
(:mod:`mox_core.dnscheck.checks`); MTA-STS (the TXT record and the policy fetched over HTTPS
from ``mta-sts.<domain>``, compared with the config), TLSRPT, autoconfig and SRV records, and
the reverse DNS of the sending IPs (:mod:`mox_core.dnscheck.more`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import dns.asyncresolver
import dns.resolver

from mox_core.config.resolved import Config
from mox_core.dnscheck import checks, more
from mox_core.dnscheck.base import CheckResult, Context, DNSCheck, Status
from mox_core.dnscheck.lookups import LookupFailed, Lookups
from mox_core.dnscheck.records import suggested_records
from mox_core.smtp.domain import to_ascii

__all__ = ["LOOKUP_TIMEOUT", "OVERALL_TIMEOUT", "check_domain"]

OVERALL_TIMEOUT = 30.0
LOOKUP_TIMEOUT = 10.0

CHECKS: list[tuple[str, Callable[[Context, CheckResult], Awaitable[None]]]] = [
    ("MX", checks.check_mx), ("SPF", checks.check_spf), ("DKIM", checks.check_dkim), ("DMARC", checks.check_dmarc),
    ("MTA-STS", more.check_mta_sts), ("TLSRPT", more.check_tlsrpt), ("Autoconfig", more.check_autoconfig),
    ("SRV", more.check_srv), ("Reverse DNS", more.check_reverse),
]


async def _run(name: str, fn: Callable[[Context, CheckResult], Awaitable[None]], ctx: Context) -> CheckResult:
    r = CheckResult(name)
    try:
        await fn(ctx, r)
    except LookupFailed as exc:
        r.fail(f"lookup failed: {exc}")
    return r


async def check_domain(config: Config, domain: str, *, resolver: dns.asyncresolver.Resolver | None = None,
                       sync_resolver: dns.resolver.Resolver | None = None, timeout: float = OVERALL_TIMEOUT,
                       lookup_timeout: float = LOOKUP_TIMEOUT) -> DNSCheck:
    """Every check of ``domain`` (one of the config's; ValueError otherwise), at once.

    Resolvers default to the config's ``[dns]``. A check still running after ``timeout``
    seconds is a failure."""
    from mox_core.dns.resolver import make_async_resolver, make_resolver

    records = suggested_records(config, domain)
    ctx = Context(config, to_ascii(domain), to_ascii(config.static.hostname),
                  Lookups(resolver or make_async_resolver(config.static.dns), lookup_timeout),
                  sync_resolver or make_resolver(config.static.dns), records, lookup_timeout)
    tasks = [asyncio.create_task(_run(name, fn, ctx)) for name, fn in CHECKS]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    results = []
    for (name, _), task in zip(CHECKS, tasks, strict=True):
        if task in done:
            results.append(task.result())
        else:
            results.append(CheckResult(name, Status.FAILURE, [f"no result within {timeout:g}s"]))
    return DNSCheck(ctx.domain, results)
