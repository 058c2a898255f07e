"""Direct delivery: from a recipient domain to its MX hosts, and the loop over those hosts.

Destination resolution follows mox's direct delivery: IP-literal recipients go to that IP; other
domains have their CNAMEs followed, then MX looked up; a null MX (RFC 7505) fails permanently;
no MX means the domain itself is the host (RFC 5321 §5.1, "implicit MX"). Hosts are tried in
order of preference until one accepts or refuses permanently.

:func:`deliver_via_mx` is shared by the direct transport and the socks transport (which passes
its own :data:`~mox_core.smtpclient.dial.Dialer` and EHLO name); the queue can call it for the
implicit default transport.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import structlog

from mox_core.plugins.kinds import DeliveryContext, DeliveryStatus, OutgoingMessage, RecipientResult
from mox_core.smtp.domain import to_ascii
from mox_core.smtpclient.client import SMTPClient, Timeouts, open_client
from mox_core.smtpclient.dial import Dialer, dial_host, dns_error_text, gather_ips, order_ips, tcp_dial
from mox_core.smtpclient.errors import RefusedTargetError, SMTPClientError, SMTPTLSError
from mox_core.smtpclient.mtasts import MTASTSCache, Policy
from mox_core.smtpclient.sasl import AuthCredentials
from mox_core.smtpclient.sessions import SessionCache
from mox_core.smtpclient.tls import TLSMode

__all__ = [
    "Destinations",
    "MXDeliveryState",
    "NULL_MX_TEXT",
    "deliver_to_host",
    "deliver_via_mx",
    "gather_destinations",
    "parse_ip_literal",
    "session_deliver",
]

log = structlog.get_logger(component="smtpclient.mx")

NULL_MX_TEXT = "domain does not accept email as indicated with single dot for mx record"
_MAX_CNAMES = 16  # as mox: if the 16th CNAME lookup still finds a CNAME, the chain is too long
_DNS_TIMEOUT = 30.0


class MXDeliveryState:
    """What an MX-delivering transport (direct, socks) keeps between attempts: its MTA-STS
    policy cache (made on first use from the delivery context) and the IPs dialed per host
    (for mox's address-family alternation), bounded so a long-running server cannot grow it
    without limit."""

    MAX_REMEMBERED_HOSTS = 10000

    def __init__(self, mtasts: MTASTSCache | None = None) -> None:
        self._mtasts = mtasts
        self._dialed_ips: dict[str, list[str]] = {}

    def mtasts(self, ctx: DeliveryContext) -> MTASTSCache:
        if self._mtasts is None:
            self._mtasts = MTASTSCache.for_context(ctx)
        return self._mtasts

    def dialed_ips(self) -> dict[str, list[str]]:
        if len(self._dialed_ips) > self.MAX_REMEMBERED_HOSTS:
            self._dialed_ips.clear()
        return self._dialed_ips


@dataclass(frozen=True)
class Destinations:
    """Where mail for a domain goes: ``hosts`` in the order to try them."""

    domain: str  # recipient domain, IDNA ASCII (or the IP literal as written)
    expanded: str  # after following CNAMEs
    hosts: tuple[str, ...]  # MX targets; the domain itself for an implicit MX; the IP literal
    implicit_mx: bool = False
    ip_literal: str | None = None  # the address of ``user@[1.2.3.4]``


def parse_ip_literal(domain: str) -> str | None:
    """``[1.2.3.4]`` / ``[IPv6:2001:db8::1]`` -> the address (RFC 5321 §4.1.3); else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


def _temp_dns(domain: str, what: str, exc: BaseException) -> SMTPClientError:
    return SMTPClientError(False, None, "4.4.3", None, f"{what} for {domain}: {dns_error_text(exc)}", command="dns")


async def _resolve(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> dns.resolver.Answer:
    async with asyncio.timeout(_DNS_TIMEOUT):
        return await resolver.resolve(name.rstrip(".") + ".", rdtype, search=False)


async def gather_destinations(resolver: dns.asyncresolver.Resolver, domain: str) -> Destinations:
    """Resolve a recipient domain to the hosts to try; raises :class:`SMTPClientError`."""
    literal = parse_ip_literal(domain)
    if literal is not None:
        return Destinations(domain, domain, (literal,), ip_literal=literal)
    try:
        name = ascii_domain = to_ascii(domain)
    except ValueError as exc:
        raise SMTPClientError(True, None, "5.1.2", None, f"bad recipient domain: {exc}", command="dns") from None

    # RFC 5321 §5.1: the domain may be an alias; follow it ourselves to detect loops
    seen = {name}
    for _ in range(_MAX_CNAMES):
        try:
            ans = await _resolve(resolver, name, "CNAME")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            break
        except (dns.exception.DNSException, TimeoutError) as exc:
            raise _temp_dns(name, "cname lookup", exc) from None
        target = ans[0].target.to_text(omit_final_dot=True).lower()
        if target in seen:
            raise SMTPClientError(False, None, "4.4.3", None, f"cname loop for {domain} at {target}", command="dns")
        seen.add(target)
        name = target
    else:
        raise SMTPClientError(False, None, "4.4.3", None, f"too many cname records for {domain}", command="dns")

    try:
        ans = await _resolve(resolver, name, "MX")
    except dns.resolver.NoAnswer:  # no MX: the name itself is the host (RFC 5321 §5.1)
        return Destinations(ascii_domain, name, (name,), implicit_mx=True)
    except dns.resolver.NXDOMAIN:
        # deviation from mox (which tries the A records and then retries for days): a domain
        # that does not exist cannot receive mail; bounce at once as Postfix does (5.1.2)
        raise SMTPClientError(True, None, "5.1.2", None, f"domain {name} does not exist (NXDOMAIN)",
                              command="dns") from None
    except (dns.exception.DNSException, TimeoutError) as exc:
        raise _temp_dns(name, "mx lookup", exc) from None
    records = [(rd.preference, rd.exchange) for rd in ans]
    if len(records) == 1 and records[0][1] == dns.name.root:  # RFC 7505 §3
        raise SMTPClientError(True, None, "5.1.10", None, NULL_MX_TEXT, command="dns")
    valid = [(pref, ex.to_text(omit_final_dot=True).lower()) for pref, ex in records if ex != dns.name.root]
    if len(valid) != len(records):
        log.info("mx_records_ignored", domain=name, reason="null mx among other mx records")
    if not valid:
        raise SMTPClientError(True, None, "5.1.10", None, NULL_MX_TEXT, command="dns")
    # RFC 5321 §5.1: lowest preference first; equal preferences in random order
    random.shuffle(valid)
    valid.sort(key=lambda pv: pv[0])
    hosts = tuple(dict.fromkeys(host for _, host in valid))
    return Destinations(ascii_domain, name, hosts)


def _domain_of(recipient: str) -> str:
    return recipient.rpartition("@")[2].lower()


async def deliver_via_mx(message: OutgoingMessage, ctx: DeliveryContext, *,
                         dial: Dialer = tcp_dial, ehlo_name: str | None = None,
                         resolver: dns.asyncresolver.Resolver | None = None, port: int | None = None,
                         allow_private: bool | None = None, ipv4: bool = True, ipv6: bool = True,
                         mtasts: MTASTSCache | None = None, timeouts: Timeouts = Timeouts(),
                         dialed_ips: dict[str, list[str]] | None = None,
                         tls_ca_file: str | None = None) -> list[RecipientResult]:
    """Deliver ``message`` to the MX hosts of its recipients' domains; one result per recipient.

    Defaults come from ``ctx``: EHLO name ``ctx.hostname``, resolver ``ctx.resolver`` (else
    one built from ``[dns]``), port and private-target permission from ``[testing]``
    (``direct_smtp_port``, ``allow_private_targets``; refused without a config).
    ``dialed_ips`` (host -> IPs, updated here) lets the queue remember addresses across
    attempts for the family alternation of :func:`~mox_core.smtpclient.dial.order_ips`.
    ``tls_ca_file`` adds CAs for verified TLS (MTA-STS enforce), e.g. a test CA.
    """
    testing = ctx.config.static.testing if ctx.config is not None else None
    if resolver is None:
        resolver = ctx.resolver
    if resolver is None:
        from mox_core.dns.resolver import make_async_resolver

        resolver = make_async_resolver(ctx.config.static.dns) if ctx.config else dns.asyncresolver.Resolver()
    run = _Run(
        message=message, ctx=ctx, dial=dial, ehlo_name=ehlo_name or ctx.hostname, resolver=resolver,
        port=port or (testing.direct_smtp_port if testing else 25),
        allow_private=allow_private if allow_private is not None else bool(testing and testing.allow_private_targets),
        ipv4=ipv4, ipv6=ipv6, mtasts=mtasts, timeouts=timeouts,
        dialed_ips=dialed_ips if dialed_ips is not None else {}, ca_file=tls_ca_file,
    )
    results: list[RecipientResult | None] = [None] * len(message.recipients)
    by_domain: dict[str, list[int]] = {}
    for i, rcpt in enumerate(message.recipients):
        by_domain.setdefault(_domain_of(rcpt), []).append(i)
    for domain, indexes in by_domain.items():
        rs = await run.domain(domain, [message.recipients[i] for i in indexes])
        for i, r in zip(indexes, rs, strict=True):
            results[i] = r
    return [r for r in results if r is not None]


@dataclass
class _Run:
    """The state of one :func:`deliver_via_mx` call."""

    message: OutgoingMessage
    ctx: DeliveryContext
    dial: Dialer
    ehlo_name: str
    resolver: dns.asyncresolver.Resolver
    port: int
    allow_private: bool
    ipv4: bool
    ipv6: bool
    mtasts: MTASTSCache | None
    timeouts: Timeouts
    dialed_ips: dict[str, list[str]]
    ca_file: str | None = None

    async def domain(self, domain: str, recipients: list[str]) -> list[RecipientResult]:
        """Try the domain's hosts in order; recipients with a temporary result move on."""
        try:
            dest = await gather_destinations(self.resolver, domain)
        except SMTPClientError as exc:
            log.info("delivery_dns_failed", domain=domain, error=str(exc), permanent=exc.permanent)
            return [exc.result(r) for r in recipients]
        policy: Policy | None = None
        if dest.ip_literal is None and self.mtasts is not None:
            try:  # as mox: the policy of the recipient domain, never of its CNAME target
                policy = await self.mtasts.get(dest.domain, self.resolver)
            except SMTPClientError as exc:
                return [exc.result(r) for r in recipients]
        enforce = policy is not None and policy.mode == "enforce"
        final: dict[str, RecipientResult] = {}
        remaining = list(dict.fromkeys(recipients))
        for host in dest.hosts:
            if not remaining:
                break
            if policy is not None and policy.mode != "none" and not policy.matches(host):
                log.info("mtasts_mx_mismatch", domain=dest.domain, host=host, mode=policy.mode)
                if enforce:  # RFC 8461 §5: skip hosts not in an enforced policy
                    err = SMTPClientError(False, None, "4.7.5", host,
                                          f"mx host {host} does not match enforced mta-sts policy with hosts "
                                          + ", ".join(policy.mx), command="mtasts")
                    final.update({r: err.result(r) for r in remaining})
                    continue
            results, next_host = await self.host(dest, host, remaining, enforce)
            remaining = []
            for r in results:
                final[r.recipient] = r
                if r.status is DeliveryStatus.TEMPORARY or (next_host and r.status is DeliveryStatus.PERMANENT):
                    remaining.append(r.recipient)
        return [final[r] for r in recipients]

    async def host(self, dest: Destinations, host: str, recipients: list[str],
                   enforce: bool) -> tuple[list[RecipientResult], bool]:
        """Deliver to one host; returns results and whether a permanent error there should
        still let the next host be tried (a 5xx greeting, as Postfix ``smtp_skip_5xx_greeting``)."""
        if dest.ip_literal is not None:
            ips = [dest.ip_literal]
            dualstack = False
        else:
            try:
                ips = await gather_ips(self.resolver, host, ipv4=self.ipv4, ipv6=self.ipv6,
                                       missing_permanent=dest.implicit_mx)
            except SMTPClientError as exc:
                return [exc.result(r) for r in recipients], False
            dualstack = any(":" in ip for ip in ips) and any(":" not in ip for ip in ips)
        ips = order_ips(ips, self.dialed_ips.get(host, []))
        tls_mode = TLSMode.REQUIRED_VERIFIED if enforce else TLSMode.OPPORTUNISTIC
        try:
            results = await self._session(host, ips, recipients, tls_mode)
        except SMTPTLSError as exc:
            if tls_mode is not TLSMode.OPPORTUNISTIC:
                return [exc.result(r) for r in recipients], False
            # plaintext fallback, as mox's direct delivery: the TLS handshake failed and nothing
            # requires TLS; connect again without it, once, to the address that answered
            log.info("tls_failed_retrying_plaintext", host=host, error=str(exc))
            ip = self.dialed_ips[host][-1]
            try:
                results = await self._session(host, [ip], recipients, TLSMode.SKIP)
            except SMTPClientError as exc2:
                return [exc2.result(r) for r in recipients], False
        except RefusedTargetError as exc:
            # an MX on loopback, private or any-address space is a misconfiguration (or an attempt
            # to reach our own network), not an outage: permanent, as KumoMTA's prohibited_hosts
            # and Postfix's "loops back to myself"; the next MX may still be fine
            log.info("delivery_host_refused", host=host, error=str(exc))
            err = SMTPClientError(True, None, "5.4.4", host, exc.text, command="dial")
            return [err.result(r) for r in recipients], True
        except SMTPClientError as exc:
            log.info("delivery_host_failed", host=host, error=str(exc), permanent=exc.permanent)
            return [exc.result(r) for r in recipients], exc.permanent and exc.command == "greeting"
        if self.ctx.attempt == 0 and dualstack:
            # mox: a policy rejection on the first attempt may be about this address family only
            results = [_downgrade_policy_error(r) for r in results]
        return results, False

    async def _session(self, host: str, ips: Sequence[str], recipients: list[str],
                       tls_mode: TLSMode) -> list[RecipientResult]:
        results, _ = await session_deliver(
            self.message, recipients, host=host, ips=ips, port=self.port, dial=self.dial,
            ehlo_name=self.ehlo_name, tls_mode=tls_mode, ca_file=self.ca_file, timeouts=self.timeouts,
            allow_private=self.allow_private, on_connect=lambda ip: self._dialed(host, ip))
        return results

    def _dialed(self, host: str, ip: str) -> None:
        dialed = self.dialed_ips.setdefault(host, [])
        dialed.append(ip)
        del dialed[:-8]  # only the last few matter to order_ips


async def session_deliver(message: OutgoingMessage, recipients: Sequence[str], *, host: str,
                          ips: Sequence[str], port: int, ehlo_name: str, dial: Dialer = tcp_dial,
                          tls_mode: TLSMode = TLSMode.OPPORTUNISTIC, tls_server_name: str | None = None,
                          ca_file: str | None = None, auth: AuthCredentials | None = None,
                          timeouts: Timeouts = Timeouts(), allow_private: bool = False,
                          require_8bitmime: bool = False,
                          on_connect: Callable[[str], None] | None = None,
                          keep: Callable[[SMTPClient], None] | None = None) -> tuple[list[RecipientResult], str]:
    """Dial one of ``ips``, run one SMTP session, deliver, QUIT. Returns results and the IP.

    Raises :class:`SMTPClientError` (:class:`SMTPTLSError` for TLS) for failures that are not
    per recipient. ``on_connect(ip)`` is called once the TCP connection stands. With ``keep``,
    the session is handed to it after the delivery instead of QUIT (a :class:`SessionCache`).
    """
    (reader, writer), ip = await dial_host(host, ips, port, dial=dial, timeout=timeouts.connect,
                                           allow_private=allow_private)
    if on_connect is not None:
        on_connect(ip)
    log.debug("connected", host=host, ip=ip, port=port, tls_mode=tls_mode.value)
    client = await open_client(reader, writer, remote_host=host, ehlo_name=ehlo_name, tls_mode=tls_mode,
                               tls_server_name=tls_server_name or host, ca_file=ca_file, auth=auth,
                               timeouts=timeouts)
    try:
        results = await client.deliver(message.mail_from, recipients, message.data, smtputf8=message.smtputf8,
                                       has_8bit=message.has_8bit, require_8bitmime=require_8bitmime)
    except SMTPClientError as exc:
        await client.hang_up(exc)  # QUIT after a refused MAIL FROM, close a broken connection
        raise
    except BaseException:
        await client.close()
        raise
    if keep is not None:
        keep(client)
    else:
        await client.quit()
    return results, ip


async def deliver_to_host(message: OutgoingMessage, *, host: str, port: int, ehlo_name: str,
                          resolver: dns.asyncresolver.Resolver, tls_mode: TLSMode,
                          ca_file: str | None = None, auth: AuthCredentials | None = None,
                          dial: Dialer = tcp_dial, timeouts: Timeouts = Timeouts(),
                          allow_private: bool = True, ipv4: bool = True, ipv6: bool = True,
                          require_8bitmime: bool = True, sessions: SessionCache | None = None,
                          session_key: Hashable = None) -> list[RecipientResult]:
    """Deliver all recipients to one named host: the smarthost transports (mox's ``SMTP:``,
    ``Submission:`` and ``Submissions:``).

    No MX, no MTA-STS, no plaintext fallback; the certificate is checked against ``host``
    when ``tls_mode`` verifies. Smarthosts may sit on private networks, so private targets
    are allowed by default. Never raises for delivery problems: one result per recipient.

    With ``sessions`` (the queue's :class:`SessionCache`), an idle session kept under
    ``session_key`` (which must identify host, port and every setting of the session) is used
    when there is one, and the session is kept afterwards instead of QUIT. A kept session that
    fails before any message data was sent (the server closed it meanwhile: lost connection,
    421) cannot have delivered anything, so the message is sent over a new session instead.
    """
    key = (host, port, tls_mode, session_key)
    try:
        while sessions is not None and (client := sessions.take(key)) is not None:
            try:
                results = await client.deliver(message.mail_from, message.recipients, message.data,
                                               smtputf8=message.smtputf8, has_8bit=message.has_8bit,
                                               require_8bitmime=require_8bitmime)
            except SMTPClientError as exc:
                await client.hang_up(exc)
                if client.data_sent or not (client.broken or exc.code == 421):
                    raise
                log.debug("cached_session_unusable", host=host, error=str(exc))
                continue
            except BaseException:
                await client.close()
                raise
            sessions.put(key, client)
            return results
        ips = await gather_ips(resolver, host, ipv4=ipv4, ipv6=ipv6)
        results, _ = await session_deliver(
            message, message.recipients, host=host, ips=ips, port=port, ehlo_name=ehlo_name, dial=dial,
            tls_mode=tls_mode, ca_file=ca_file, auth=auth, timeouts=timeouts, allow_private=allow_private,
            require_8bitmime=require_8bitmime,
            keep=(lambda c: sessions.put(key, c)) if sessions is not None else None)
        return results
    except SMTPClientError as exc:
        log.info("delivery_host_failed", host=host, port=port, error=str(exc), permanent=exc.permanent)
        return [exc.result(r) for r in message.recipients]


def _downgrade_policy_error(r: RecipientResult) -> RecipientResult:
    if r.status is DeliveryStatus.PERMANENT and (r.enhanced_code or "").startswith("5.7."):
        return RecipientResult(r.recipient, DeliveryStatus.TEMPORARY, r.code, r.enhanced_code,
                               r.remote_host, r.text)
    return r
