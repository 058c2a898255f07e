"""Which transport delivers an attempt: override, else routes, else direct (as in mox).

Routes are evaluated for EVERY attempt, not once at queue time, because they depend on the
number of attempts made (``minimum_attempts``) and because ``domains.toml`` reloads: a route
added while a message waits applies to its next attempt. Order: the sending account's routes,
then the sender domain's, then the global ones; the first route whose criteria all match wins.

:func:`explain` answers the admin's question "why did this go out through X" by checking every
criterion of every route separately, which :func:`route_matches` (short-circuiting) does not.
Both walk the routes in the order of :func:`routes_for`; this module is the one place that
matches routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from mox_core.config.resolved import Config, Route, TransportEntry
from mox_core.plugins.kinds import RouteContext, Transport
from mox_core.smtp.domain import to_ascii

__all__ = [
    "DEFAULT_TRANSPORT_KIND",
    "Explanation",
    "Resolution",
    "RouteCheck",
    "TransportCache",
    "TransportUnavailable",
    "address_domain",
    "explain",
    "resolve",
    "retry_policy",
    "route_context",
    "route_matches",
    "routes_for",
]

log = structlog.get_logger(component="routing")

DEFAULT_TRANSPORT_KIND = "direct"


class TransportUnavailable(Exception):
    """The chosen transport cannot be used now: a temporary failure of the attempt."""


@dataclass(frozen=True)
class Resolution:
    """The transport chosen for an attempt.

    ``name`` is the transport's name in config, ``""`` for the implicit default direct
    delivery. ``source`` is ``override`` (set by ``mox queue kick --transport``), ``route`` or
    ``default``. ``error`` is set when the named transport does not exist (any more): the
    attempt then fails temporarily with that text, as mox does.
    """

    name: str
    source: str
    kind: str | None = None
    entry: TransportEntry | None = None
    route: Route | None = None
    error: str | None = None


def address_domain(address: str) -> str:
    """Lower-case ASCII domain of ``address``; IP literals (``[1.2.3.4]``) kept as written."""
    domain = address.rpartition("@")[2]
    if domain.startswith("["):
        return domain.lower()
    try:
        return to_ascii(domain)
    except ValueError:
        return domain.lower()


def route_context(
    *, mail_from: str, recipient: str, attempts: int, account: str | None
) -> RouteContext:
    """The :class:`RouteContext` of an attempt; domains lower-case ASCII, ``""`` if none."""
    from_domain = address_domain(mail_from) if "@" in mail_from else ""
    return RouteContext(
        from_domain=from_domain,
        to_domain=address_domain(recipient),
        attempts=attempts,
        account=account,
        sender=mail_from,
        recipient=recipient,
    )


def routes_for(config: Config, account: str | None, from_domain: str) -> list[Route]:
    """Routes in evaluation order: the account's, then the sender domain's, then global."""
    dyn = config.dynamic
    routes: list[Route] = []
    if account:
        routes += dyn.routes_account.get(account, [])
    routes += dyn.routes_domain.get(from_domain.lower(), [])
    routes += dyn.routes_global
    return routes


def route_matches(config: Config, route: Route, ctx: RouteContext) -> bool:
    """Whether every criterion of ``route`` matches the attempt."""
    matchers = config.plugins.route_matchers
    return all(matchers[name].matches(value, ctx) for name, value in route.criteria.items())


def _named(config: Config, name: str, source: str, route: Route | None = None) -> Resolution:
    entry = config.transports.get(name)
    if entry is None:
        return Resolution(name, source, route=route, error=f'cannot find transport "{name}"')
    return Resolution(name, source, kind=entry.kind, entry=entry, route=route)


def resolve(config: Config, ctx: RouteContext, override: str | None = None) -> Resolution:
    """The transport for the attempt described by ``ctx``; never raises."""
    if override:
        return _named(config, override, "override")
    for route in routes_for(config, ctx.account, ctx.from_domain):
        if route_matches(config, route, ctx):
            return _named(config, route.transport, "route", route)
    return Resolution("", "default", kind=DEFAULT_TRANSPORT_KIND)


def retry_policy(config: Config, res: Resolution) -> tuple[list[float], int]:
    """Retry intervals and max attempts: the transport's own, else ``[queue]``'s."""
    q = config.static.queue
    intervals = q.retry_intervals
    max_attempts = q.max_attempts
    if res.entry is not None:
        if res.entry.common.retry_intervals:
            intervals = res.entry.common.retry_intervals
        if res.entry.common.max_attempts:
            max_attempts = res.entry.common.max_attempts
    return list(intervals), max_attempts


class TransportCache:
    """Transports built once per config, by their kind's factory.

    Transports come from mox.toml, which does not reload, but the :class:`Config` object is
    replaced when domains.toml reloads; the cache is keyed by the identity of the config's
    ``transports`` table (shared across such reloads), so a reload does not rebuild them and a
    new mox.toml (tests, admin) does. The implicit default is built from the ``direct`` kind
    with default settings under the name ``""``.
    """

    def __init__(self) -> None:
        self._key: Any = None
        self._built: dict[str, Transport] = {}

    def get(self, config: Config, res: Resolution) -> Transport:
        if self._key is not config.transports:
            self._key = config.transports
            self._built = {}
        if res.error:
            raise TransportUnavailable(res.error)
        t = self._built.get(res.name)
        if t is not None:
            return t
        if res.entry is None:
            tk = config.plugins.transports.get(DEFAULT_TRANSPORT_KIND)
            if tk is None:
                raise TransportUnavailable(
                    f'no transport kind "{DEFAULT_TRANSPORT_KIND}" installed for default delivery'
                )
            t = tk.factory("", tk.settings_model())
        else:
            tk = config.plugins.transports.get(res.entry.kind)
            if tk is None:
                raise TransportUnavailable(f'transport kind "{res.entry.kind}" is not installed')
            t = tk.factory(res.entry.name, res.entry.settings)
        self._built[res.name] = t
        log.debug("transport_built", transport=res.name, kind=res.kind)
        return t


# --------------------------------------------------------------------------------------------
# mox routes explain


@dataclass(frozen=True)
class RouteCheck:
    """One route as considered: matched, or the criteria that did not (with why)."""

    route: Route
    matched: bool
    considered: bool  # False: an earlier route already matched
    failed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        head = self.route.describe()
        if not self.considered:
            return f"{head}: not considered, an earlier route matched"
        if self.matched:
            return f"{head}: MATCHES"
        return f"{head}: no match: {'; '.join(self.failed)}"


@dataclass(frozen=True)
class Explanation:
    context: RouteContext
    checks: list[RouteCheck]
    resolution: Resolution

    def lines(self) -> list[str]:
        c = self.context
        out = [
            f"attempt {c.attempts + 1} ({c.attempts} attempt(s) made before), "
            f"from domain {c.from_domain or '(none)'}, to domain {c.to_domain}, "
            f"account {c.account or '(none)'}",
        ]
        if not self.checks:
            out.append("no routes configured for this sender")
        out += [chk.describe() for chk in self.checks]
        r = self.resolution
        if r.source == "default":
            out.append("transport: direct delivery (default, no route matched)")
        elif r.error:
            out.append(f"transport: {r.name!r}: {r.error} (attempt fails temporarily)")
        else:
            how = f"from {r.route.where} route #{r.route.index + 1}" if r.route else "override"
            out.append(f"transport: {r.name} (kind {r.kind}), {how}")
        return out


def _why_not(name: str, value: Any, ctx: RouteContext) -> str:
    if name == "minimum_attempts":
        return f"minimum_attempts = {value}, but {ctx.attempts} attempt(s) made"
    if name == "from_domain":
        return f"from_domain {list(value)} does not include {ctx.from_domain or '(empty)'!r}"
    if name == "to_domain":
        return f"to_domain {list(value)} does not include {ctx.to_domain or '(empty)'!r}"
    return f"{name} = {value!r} does not match"


def explain(
    config: Config, from_addr: str, to_addr: str, attempt: int, *,
    account: str | None = None, override: str | None = None,
) -> Explanation:
    """Explain the choice of transport for attempt ``attempt`` (1 = first) of a message.

    ``account`` defaults to the local account owning ``from_addr``, if any, since that is the
    account whose routes apply to its submissions.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if account is None and from_addr:
        from mox_core.accounts.addresses import AddressNotFound, lookup

        try:
            account = lookup(config, from_addr).account
        except (AddressNotFound, ValueError):
            account = None
    ctx = route_context(mail_from=from_addr, recipient=to_addr, attempts=attempt - 1, account=account)
    checks: list[RouteCheck] = []
    matched = False
    for route in routes_for(config, ctx.account, ctx.from_domain):
        if matched:
            checks.append(RouteCheck(route, False, False))
            continue
        failed = [
            _why_not(name, value, ctx)
            for name, value in route.criteria.items()
            if not config.plugins.route_matchers[name].matches(value, ctx)
        ]
        matched = not failed
        checks.append(RouteCheck(route, matched, True, failed))
    return Explanation(ctx, checks, resolve(config, ctx, override))
