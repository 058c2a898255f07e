"""Which web services each listening address serves, from the listeners of ``mox.toml``.

A listener's web services (``account_http``, ``webserver_https``, ``mta_sts_https``, ...) are
grouped by port: one socket per IP address and port, plain HTTP or HTTPS, and a request is
routed among the services of the port it came in on (:mod:`mox_core.web.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mox_core.config.listeners import HTTPService, Listener, WebserverService, WellKnownService
from mox_core.config.models import StaticConfig
from mox_core.errors import MoxError

__all__ = ["WebPort", "web_ports"]


@dataclass
class WebPort:
    """The web services of one listener on one port (served on each of its IPs)."""

    listener: str
    port: int
    tls: bool
    hostname: str  # the listener's host name, else mox's
    ips: list[str] = field(default_factory=list)
    account: HTTPService | None = None
    admin: HTTPService | None = None
    webserver: WebserverService | None = None
    mta_sts: WellKnownService | None = None
    autoconfig: WellKnownService | None = None
    metrics: bool = False
    acme_tls: bool = False  # answers ACME tls-alpn-01 challenges (RFC 8737)
    acme_http: bool = False  # answers ACME http-01 challenges (RFC 8555 §8.3)

    @property
    def forwarded(self) -> bool:
        """Behind a reverse proxy: the client IP is in X-Forwarded-For."""
        return any(s is not None and s.forwarded for s in (self.account, self.admin, self.mta_sts, self.autoconfig))

    @property
    def rate_limited(self) -> bool:
        return not (self.webserver is not None and self.webserver.rate_limit_disabled)

    def services(self) -> list[str]:
        names = [n for n in ("account", "admin", "webserver", "mta_sts", "autoconfig") if getattr(self, n) is not None]
        return names + (["metrics"] if self.metrics else []) + (["acme"] if self.acme_tls or self.acme_http else [])


def _port_of(ports: dict[int, WebPort], name: str, lst: Listener, port: int, tls: bool, hostname: str) -> WebPort:
    wp = ports.get(port)
    if wp is None:
        wp = ports[port] = WebPort(name, port, tls, hostname, list(lst.ips))
    return wp


def web_ports(static: StaticConfig) -> list[WebPort]:
    """Every (listener, port) with at least one web service; raises :class:`MoxError` when
    two listeners would serve the same IP address and port."""
    out: list[WebPort] = []
    seen: dict[tuple[str, int], str] = {}
    for name, lst in static.listeners.items():
        hostname = (lst.hostname or static.hostname).lower()
        ports: dict[int, WebPort] = {}
        for setting, tls in lst.web_services():
            svc = getattr(lst, setting)
            wp = _port_of(ports, name, lst, svc.port, tls, hostname)
            kind = setting.rsplit("_", 1)[0]  # account_https -> account
            if kind == "metrics":
                wp.metrics = True
            else:
                setattr(wp, kind, svc)
        _acme_ports(static, name, lst, ports, hostname)
        for wp in ports.values():
            for ip in wp.ips:
                other = seen.setdefault((ip, wp.port), name)
                if other != name:
                    raise MoxError(f"listeners {other} and {name} both serve web services on {ip} port {wp.port}")
            out.append(wp)
    return out


def _acme_ports(static: StaticConfig, name: str, lst: Listener, ports: dict[int, WebPort], hostname: str) -> None:
    """A listener with ACME answers tls-alpn-01 on the provider's HTTPS port (served for that
    alone if no web service uses it), and http-01 on its plain HTTP port if it serves one."""
    provider = static.acme.get(lst.tls.acme) if lst.tls is not None and lst.tls.acme else None
    if provider is None:
        return
    if "tls-alpn-01" in provider.challenges:
        wp = _port_of(ports, name, lst, provider.port, True, hostname)
        if not wp.tls:
            raise MoxError(f"listener {name}: port {provider.port} serves plain HTTP, but ACME answers "
                           "tls-alpn-01 there (set port of the ACME provider, or its challenges)")
        wp.acme_tls = True
    if "http-01" in provider.challenges:
        wp = ports.get(provider.http_port)
        if wp is not None and not wp.tls:
            wp.acme_http = True
