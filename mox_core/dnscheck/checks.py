"""The checks of MX, SPF, DKIM and DMARC records (:mod:`mox_core.dnscheck.run` runs them).

SPF as mox checks it: every sending IP (the SMTP listeners' explicit IPs and every SOCKS
transport's ``remote_ips``) must ``pass`` both the domain's and the host name's record,
evaluated as a message from ``postmaster@<name>`` with HELO ``<name>``, by pyspf through the
configured resolver.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import dns.resolver

from mox_core.dnscheck.base import CheckResult, Context
from mox_core.dnscheck.records import (
    Record,
    dkim_key_path,
    dkim_value,
    listener_ips,
    sending_ips,
    spf_domain_value,
    spf_host_value,
)
from mox_core.outgoing.dkimsign import public_key_of

__all__ = ["check_dkim", "check_dmarc", "check_mx", "check_spf"]


# -- MX ------------------------------------------------------------------------------------


async def check_mx(ctx: Context, r: CheckResult) -> None:
    hosts = {h for _, _, h in listener_ips(ctx.config)} | {ctx.host}
    records = await ctx.lookups.rrset(ctx.domain, "MX")
    if not records:
        r.fail(f"no MX record for {ctx.domain}: mail for it cannot be delivered here")
        r.suggest(*ctx.suggested("mx"))
        return
    targets = sorted((rec.preference, rec.exchange.to_text().rstrip(".").lower()) for rec in records)
    if targets == [(0, "")]:
        r.fail(f"{ctx.domain} has a null MX (RFC 7505): it accepts no mail")
        r.suggest(*ctx.suggested("mx"))
        return
    r.messages.append("MX " + ", ".join(f"{p} {t}" for p, t in targets))
    if not hosts & {t for _, t in targets}:
        r.fail(f"no MX record points to this server ({ctx.host})")
        r.suggest(*ctx.suggested("mx"))
    addrs = await ctx.lookups.addresses(ctx.host)
    if not addrs:
        r.fail(f"{ctx.host} has no A or AAAA record")
        r.suggest(*[x for x in ctx.suggested("host", f"{ctx.host}.") if x.type in ("A", "AAAA")])
        return
    missing = [ip for ip, _, h in listener_ips(ctx.config) if h == ctx.host and ip not in addrs]
    if missing:
        r.warn(f"{ctx.host} resolves to {', '.join(addrs)}, not to the listener IPs {', '.join(missing)}")
        r.suggest(*[x for x in ctx.suggested("host", f"{ctx.host}.") if x.type in ("A", "AAAA")])


# -- SPF -----------------------------------------------------------------------------------


_thread = threading.local()


def _lookup_in_this_thread(resolver: dns.resolver.Resolver) -> None:
    """pyspf's lookups in this thread through ``resolver``, those of other threads (a
    server's SPF checks of incoming mail) unchanged: pyspf has one module-global lookup
    function, so it is wrapped once by one that asks a thread-local one first."""
    import spf

    from mox_core.dns.resolver import spf_lookup

    current = spf.DNSLookup
    if not getattr(current, "_mox_per_thread", False):
        def dispatch(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list:
            return (getattr(_thread, "lookup", None) or current)(name, qtype, strict, timeout)

        dispatch._mox_per_thread = True  # type: ignore[attr-defined]
        spf.DNSLookup = dispatch
    _thread.lookup = spf_lookup(resolver)


def _spf_evaluate_all(resolver: dns.resolver.Resolver, ips: list[str], domain: str,
                      timeout: float) -> list[tuple[str, str, str, str]]:
    """pyspf's (ip, result, explanation, mechanism) for each of ``ips`` sending as
    ``postmaster@domain`` with HELO ``domain``; run in a thread of its own."""
    import spf

    _lookup_in_this_thread(resolver)
    try:
        out = []
        for ip in ips:
            q = spf.query(i=ip, s=f"postmaster@{domain}", h=domain, timeout=timeout)
            result, _, explanation = q.check()
            out.append((ip, result, explanation or "", str(getattr(q, "mechanism", "") or "")))
        return out
    finally:
        _thread.lookup = None


async def _spf_kind(ctx: Context, r: CheckResult, kind: str, name: str, suggestion: str) -> None:
    records = await ctx.lookups.txt(name, "v=spf1")
    fix = Record("spf", f"{name}.", "TXT", suggestion)
    if not records:
        r.fail(f"no SPF record for {kind} {name}")
        r.suggest(fix)
        return
    if len(records) > 1:
        r.fail(f"{len(records)} SPF records for {kind} {name}; RFC 7208 §4.5 allows one")
        r.suggest(fix)
        return
    r.messages.append(f"{kind} {name}: {records[0]}")
    ips = sending_ips(ctx.config)
    results = await asyncio.to_thread(_spf_evaluate_all, ctx.sync_resolver, ips, name, ctx.lookup_timeout)
    for ip, status, explanation, mechanism in results:
        if status in ("temperror", "permerror"):
            r.fail(f'Evaluating IP "{ip}" against {kind} SPF record: {status}: {explanation}')
            r.suggest(fix)
        elif status != "pass":
            r.fail(f'IP "{ip}" does not pass {kind} SPF evaluation, status not "pass" but "{status}" '
                   f'(mechanism "{mechanism}", explanation "{explanation}")')
            r.suggest(fix)


async def check_spf(ctx: Context, r: CheckResult) -> None:
    if not sending_ips(ctx.config):
        r.warn("no sending IPs to check: the SMTP listeners listen on all addresses; list the public IPs "
               "in their ips to have them checked and put in the suggested record")
    await _spf_kind(ctx, r, "domain", ctx.domain, spf_domain_value(ctx.config))
    await _spf_kind(ctx, r, "host", ctx.host, spf_host_value(ctx.config))


# -- DKIM ----------------------------------------------------------------------------------


def _tags(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        k, eq, v = part.partition("=")
        if eq:
            out.setdefault(k.strip().lower(), "".join(v.split()))
    return out


async def check_dkim(ctx: Context, r: CheckResult) -> None:
    dom = ctx.config.dynamic.domains[ctx.domain]
    if not dom.dkim.selectors:
        r.warn("no DKIM selectors configured: outgoing mail is not signed (mox dkim gen)")
        return
    for selector, sel in dom.dkim.selectors.items():
        name = f"{selector}._domainkey.{ctx.domain}"
        path = dkim_key_path(ctx.config, sel.private_key_file)
        try:
            algorithm, public = public_key_of(path)
        except (OSError, ValueError) as exc:
            r.fail(f"selector {selector}: key file {path}: {exc}")
            continue
        fix = Record("dkim", f"{name}.", "TXT", dkim_value(algorithm, public))
        records = await ctx.lookups.txt(name, "v=DKIM1")
        if not records:
            records = [t for t in await ctx.lookups.txt(name) if "p=" in t]  # v= is optional (RFC 6376 §3.6.1)
        if not records:
            r.fail(f"selector {selector}: no DKIM record at {name}")
            r.suggest(fix)
            continue
        tags = _tags(records[0])
        try:
            published = base64.b64decode(tags.get("p", ""), validate=True)
        except ValueError:
            published = b""
        if tags.get("k", "rsa") != algorithm or published != public:
            r.fail(f"selector {selector}: the key published at {name} is not the key of {path}")
            r.suggest(fix)
            continue
        signing = " (signs)" if selector in dom.dkim.sign else " (does not sign)"
        r.messages.append(f"selector {selector}: {algorithm} key matches{signing}")


# -- DMARC ---------------------------------------------------------------------------------


async def check_dmarc(ctx: Context, r: CheckResult) -> None:
    name = f"_dmarc.{ctx.domain}"
    records = await ctx.lookups.txt(name, "v=DMARC1")
    fix = ctx.suggested("dmarc")
    if not records:
        r.fail(f"no DMARC record at {name}")
        r.suggest(*fix)
        return
    if len(records) > 1:
        r.fail(f"{len(records)} DMARC records at {name}; RFC 7489 §6.6.3 ignores them all")
        r.suggest(*fix)
        return
    tags = _tags(records[0])
    r.messages.append(records[0])
    policy = tags.get("p", "")
    if policy not in ("none", "quarantine", "reject"):
        r.fail(f"DMARC record without a valid policy (p=): {records[0]}")
        r.suggest(*fix)
    elif policy == "none":
        r.warn("policy p=none: receivers only report, failing messages are still delivered")
