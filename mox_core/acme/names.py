"""Which host names need an ACME certificate, from the config: for each listener whose
``tls.acme`` names a provider, its host name; ``mta-sts.<domain>`` for the domains with an
MTA-STS policy and ``autoconfig.<domain>`` for every domain, where the listener serves those
over HTTPS; and the domains of the web handlers and domain redirects of ``domains.toml`` where
it serves the web handlers over HTTPS. Computed again from the live config, so a domain
added to ``domains.toml`` gets its certificates without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from mox_core.config.resolved import Config
from mox_core.smtp.domain import to_ascii

__all__ = ["Wanted", "uses_acme", "wanted_names"]


@dataclass(frozen=True)
class Wanted:
    """A host name to keep a certificate for, and how to get it."""

    name: str  # lower-case ASCII
    provider: str  # name in [acme]
    listener: str
    challenges: tuple[str, ...]  # usable challenge types, in order of preference


def uses_acme(config: Config) -> bool:
    return any(lst.tls is not None and lst.tls.acme for lst in config.static.listeners.values())


def _safe_ascii(name: str) -> str | None:
    try:
        return to_ascii(name)
    except ValueError:
        return None


def wanted_names(config: Config) -> list[Wanted]:
    """Every host name that needs a certificate (each once: the first listener asking wins)."""
    static, dyn = config.static, config.dynamic
    out: dict[str, Wanted] = {}
    for lname, lst in static.listeners.items():
        if lst.tls is None or not lst.tls.acme:
            continue
        provider = static.acme[lst.tls.acme]
        plain_ports = {getattr(lst, s).port for s, tls in lst.web_services() if not tls}
        challenges = tuple(c for c in provider.challenges
                           if c != "http-01" or provider.http_port in plain_ports)
        names = [static.hostname if lst.hostname is None else lst.hostname]
        domains = [d for d, dom in dyn.domains.items() if not dom.disabled]
        if lst.mta_sts_https.enabled and not lst.mta_sts_https.non_tls:
            names += [f"mta-sts.{d}" for d in domains if dyn.domains[d].mta_sts is not None]
        if lst.autoconfig_https.enabled and not lst.autoconfig_https.non_tls:
            names += [f"autoconfig.{d}" for d in domains]
        if lst.webserver_https.enabled:
            names += [h.common.domain for h in dyn.web_handlers] + list(dyn.web_redirects)
        for n in names:
            ascii_name = _safe_ascii(n)
            if ascii_name is not None and ascii_name not in out:
                out[ascii_name] = Wanted(ascii_name, lst.tls.acme, lname, challenges)
    return list(out.values())
