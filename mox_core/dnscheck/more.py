"""The checks of MTA-STS, TLSRPT, autoconfig, SRV and reverse DNS (run by
:mod:`mox_core.dnscheck.run`)."""

from __future__ import annotations

from mox_core.dnscheck.base import CheckResult, Context
from mox_core.dnscheck.records import Record, listener_ips, socks_transports

__all__ = ["check_autoconfig", "check_mta_sts", "check_reverse", "check_srv", "check_tlsrpt"]


# -- MTA-STS (RFC 8461) ------------------------------------------------------------------------


async def _mta_sts_record(ctx: Context, r: CheckResult, policy_id: str) -> None:
    from mox_core.smtpclient.mtasts import PolicyError, parse_record

    name = f"_mta-sts.{ctx.domain}"
    records = await ctx.lookups.txt(name, "v=STSv1")
    fix = ctx.suggested("mtasts", f"{name}.")
    if not records:
        r.fail(f"no MTA-STS record at {name}: senders do not look for the policy")
        r.suggest(*fix)
    elif len(records) > 1:
        r.fail(f"{len(records)} MTA-STS records at {name}; RFC 8461 §3.1 ignores them all")
        r.suggest(*fix)
    else:
        try:
            published = parse_record(records[0])
        except PolicyError as exc:
            r.fail(f"{name}: {exc}")
            r.suggest(*fix)
            return
        if published != policy_id:
            r.warn(f"{name} has id {published}, the configured policy_id is {policy_id}: senders that "
                   "cached the policy fetch it again only when the id changes")
            r.suggest(*fix)
        else:
            r.messages.append(f"{name}: {records[0]}")


async def check_mta_sts(ctx: Context, r: CheckResult) -> None:
    from mox_core.smtpclient.mtasts import HTTPSPolicyFetcher, parse_policy

    dom = ctx.config.dynamic.domains[ctx.domain]
    if dom.mta_sts is None:
        if await ctx.lookups.txt(f"_mta-sts.{ctx.domain}", "v=STSv1"):
            r.warn(f"_mta-sts.{ctx.domain} is published, but the domain has no MTA-STS policy in domains.toml: "
                   "remove the record, or configure the policy")
        else:
            r.messages.append("no MTA-STS policy configured")
        return
    await _mta_sts_record(ctx, r, dom.mta_sts.policy_id)
    testing = ctx.config.static.testing
    fetch = HTTPSPolicyFetcher(port=testing.mta_sts_port, allow_private=testing.allow_private_targets,
                               timeout=ctx.lookup_timeout)
    url = f"https://mta-sts.{ctx.domain}/.well-known/mta-sts.txt"
    try:
        policy = parse_policy(await fetch(ctx.domain, ctx.lookups.resolver))
    except Exception as exc:  # DNS, connection, TLS, HTTP, parse: all mean "no policy"
        r.fail(f"the policy at {url} could not be fetched: {type(exc).__name__}: {exc}. mta-sts.{ctx.domain} "
               "must point to this server, which serves the policy over HTTPS (mta_sts_https on a listener, "
               f"with a certificate for mta-sts.{ctx.domain}: ACME gets it)")
        r.suggest(*ctx.suggested("mtasts", f"mta-sts.{ctx.domain}."))
        return
    want = dom.mta_sts
    want_mx = sorted(m.lower() for m in (want.mx or [ctx.config.static.hostname]))
    differences = []
    if policy.mode != want.mode:
        differences.append(f"mode {policy.mode}, configured {want.mode}")
    if policy.max_age != want.max_age:
        differences.append(f"max_age {policy.max_age}, configured {want.max_age}")
    if sorted(m.lower() for m in policy.mx) != want_mx:
        differences.append(f"mx {', '.join(policy.mx) or '(none)'}, configured {', '.join(want_mx)}")
    if differences:
        r.fail(f"the policy at {url} is not the configured one ({'; '.join(differences)}): another server "
               f"answers for mta-sts.{ctx.domain}?")
        r.suggest(*ctx.suggested("mtasts", f"mta-sts.{ctx.domain}."))
    else:
        r.messages.append(f"policy at {url}: mode {policy.mode}, mx {', '.join(policy.mx)}")


# -- TLSRPT (RFC 8460) -------------------------------------------------------------------------


async def check_tlsrpt(ctx: Context, r: CheckResult) -> None:
    for kind, name in (("domain", f"_smtp._tls.{ctx.domain}"), ("host", f"_smtp._tls.{ctx.host}")):
        records = await ctx.lookups.txt(name, "v=TLSRPTv1")
        fix = ctx.suggested("tlsrpt", f"{name}.")
        if not records:
            r.warn(f"no TLSRPT record for the {kind} at {name}: senders cannot report TLS problems"
                   + ("" if fix else f" (add an address tls-reports@{ctx.domain} to an account for the reports)"))
            r.suggest(*fix)
        elif len(records) > 1:
            r.warn(f"{len(records)} TLSRPT records at {name}; RFC 8460 §3 ignores them all")
            r.suggest(*fix)
        elif "rua=" not in records[0].replace(" ", ""):
            r.warn(f"TLSRPT record at {name} without rua: {records[0]}")
            r.suggest(*fix)
        else:
            r.messages.append(f"{name}: {records[0]}")


# -- autoconfig, SRV -------------------------------------------------------------------------


async def check_autoconfig(ctx: Context, r: CheckResult) -> None:
    if not any(lst.autoconfig_https.enabled for lst in ctx.config.static.listeners.values()):
        r.messages.append("autoconfig is not served (autoconfig_https)")
        return
    name = f"autoconfig.{ctx.domain}"
    fix = ctx.suggested("autoconfig")
    if await ctx.lookups.cname(name) == ctx.host:
        r.messages.append(f"{name} is a CNAME for {ctx.host}")
    else:
        theirs, ours = await ctx.lookups.addresses(name), await ctx.lookups.addresses(ctx.host)
        if not theirs or set(theirs) != set(ours):
            r.warn(f"{name} does not point to {ctx.host} ({', '.join(theirs) or 'no address'}): mail clients "
                   "cannot find their settings")
            r.suggest(*[x for x in fix if x.type == "CNAME"])
        else:
            r.messages.append(f"{name} has the addresses of {ctx.host}")
    srv = f"_autodiscover._tcp.{ctx.domain}"
    records = await ctx.lookups.rrset(srv, "SRV") or []
    if not any(x.target.to_text().rstrip(".").lower() == name and x.port == 443 for x in records):
        r.warn(f"no SRV record {srv} pointing to {name} port 443 (Microsoft's autodiscover)")
        r.suggest(*[x for x in fix if x.type == "SRV"])


def _srv_text(rec: object) -> tuple[int, str]:
    return rec.port, rec.target.to_text().rstrip(".").lower()  # type: ignore[attr-defined]


async def check_srv(ctx: Context, r: CheckResult) -> None:
    for want in ctx.suggested("srv"):
        _, _, port, target = want.value.split()
        expected = (int(port), target.rstrip(".").lower())
        records = await ctx.lookups.rrset(want.name, "SRV") or []
        found = [_srv_text(x) for x in records]
        name = want.name.rstrip(".")
        if not found:
            r.warn(f"no SRV record {name}" + (" (marks the service as not offered)" if expected[1] == ""
                                               else f" (mail clients look there for {expected[1]})"))
            r.suggest(want)
        elif expected not in found:
            r.warn(f"SRV {name} is {', '.join(f'{t or chr(46)}:{p}' for p, t in found)}, "
                   f"expected {expected[1] or '.'}:{expected[0]}")
            r.suggest(want)
        else:
            r.messages.append(f"{name}: {want.value}")


# -- reverse DNS ------------------------------------------------------------------------------


async def check_reverse(ctx: Context, r: CheckResult) -> None:
    import dns.reversename

    listeners = listener_ips(ctx.config)
    socks = socks_transports(ctx.config)
    if not listeners and not socks:
        r.messages.append("no explicit sending IPs to check")
    for ip, listener, host in listeners:
        names = await ctx.lookups.ptr(ip)
        if host not in names:
            r.fail(f"reverse DNS of {ip} (listener {listener}) is {', '.join(names) or 'missing'}, should be "
                   f"{host}: ask the provider of the address to set it")
            r.suggest(Record("reverse", dns.reversename.from_address(ip).to_text(), "PTR", f"{host}."))
        else:
            r.messages.append(f"{ip}: {host}")
    for name, ips, remote in socks:
        wrong = []
        for ip in ips:
            names = await ctx.lookups.ptr(ip)
            if remote.lower() not in names:
                wrong.append(f"{ip} ({', '.join(names) or 'no reverse DNS'})")
                r.suggest(Record("reverse", dns.reversename.from_address(ip).to_text(), "PTR", f"{remote}."))
            else:
                r.messages.append(f"{ip}: {remote} (transport {name})")
        if wrong:
            r.fail(f"For SOCKS transport {name}, ensure IPs {', '.join(ips)} have reverse address {remote}; "
                   f"now: {'; '.join(wrong)}")
