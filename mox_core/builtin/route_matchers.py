"""Core's route criteria, registered through the same hook as plugins' criteria.

As mox's routes (domains.conf ``Routes``): ``example.com`` matches only that domain,
``.example.com`` matches the domain and all its subdomains; ``.`` matches only the empty domain
of IP-literal addresses. ``minimum_attempts = 3`` first applies on the 4th attempt.
"""

from __future__ import annotations

from mox_core import hookimpl
from mox_core.plugins.kinds import RouteContext, RouteMatcherKind
from mox_core.smtp.domain import to_ascii


def parse_domain_list(values: list[str]) -> tuple[str, ...]:
    out = []
    for v in values:
        if v == ".":
            out.append(".")
            continue
        dot = v.startswith(".")
        out.append(("." if dot else "") + to_ascii(v[1:] if dot else v))
    return tuple(out)


def domain_matches(entries: tuple[str, ...], domain: str) -> bool:
    """True if ``domain`` (lower-case ASCII) matches one of the prepared entries."""
    if not entries:
        return True
    d = domain.lower().rstrip(".")
    for e in entries:
        if e == ".":
            if d == "":
                return True
        elif e.startswith("."):
            if d and (d == e[1:] or d.endswith(e)):
                return True
        elif d == e:
            return True
    return False


def _minimum(value: int) -> int:
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


@hookimpl
def mox_register_route_matchers() -> list[RouteMatcherKind]:
    return [
        RouteMatcherKind(
            name="from_domain",
            value_type=list[str],
            parse=parse_domain_list,
            matches=lambda entries, ctx: domain_matches(entries, ctx.from_domain),
            description="Envelope sender domains; `.example.com` includes subdomains.",
        ),
        RouteMatcherKind(
            name="to_domain",
            value_type=list[str],
            parse=parse_domain_list,
            matches=lambda entries, ctx: domain_matches(entries, ctx.to_domain),
            description="Recipient domains; `.example.com` includes subdomains.",
        ),
        RouteMatcherKind(
            name="minimum_attempts",
            value_type=int,
            parse=_minimum,
            matches=lambda n, ctx: ctx.attempts >= n,
            description="Delivery attempts already made; 3 first applies on the 4th attempt.",
        ),
    ]


__all__ = ["RouteContext", "domain_matches", "mox_register_route_matchers", "parse_domain_list"]
