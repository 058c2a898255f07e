"""The config as the rest of mox reads it: both files validated, plugin tables checked
against their kinds, and the lookup tables derived from ``domains.toml``.

:func:`mox_core.config.loader.load_config` builds a :class:`Config`; a reload of
``domains.toml`` builds a new :class:`Dynamic` and a new :class:`Config` around it
(:mod:`mox_core.config.holder`). Nothing here is changed after it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mox_core.config.models import (
    Account,
    Destination,
    Domain,
    DynamicConfig,
    StaticConfig,
    TransportCommon,
    WebHandlerCommon,
)
from mox_core.plugins.host import PluginHost
from mox_core.smtp.domain import to_ascii

__all__ = [
    "AddressDestination",
    "Config",
    "Dynamic",
    "RateLimiterEntry",
    "Route",
    "TransportEntry",
    "WebHandlerEntry",
]


@dataclass(frozen=True)
class TransportEntry:
    """A transport from ``[transports.NAME]``: its kind, common settings and kind settings."""

    name: str
    kind: str
    common: TransportCommon
    settings: BaseModel


@dataclass(frozen=True)
class Route:
    """A route: criteria (matcher name -> prepared value) and the transport it selects."""

    where: str  # "account alice", "domain example.org", "global"
    index: int
    transport: str
    criteria: dict[str, Any]

    def describe(self) -> str:
        crit = ", ".join(f"{k}={v!r}" for k, v in self.criteria.items()) or "no criteria"
        return f"{self.where} route #{self.index + 1} ({crit}) -> transport {self.transport!r}"


@dataclass(frozen=True)
class WebHandlerEntry:
    """A ``[[web_handlers]]`` entry: its position, kind, common and kind settings."""

    index: int
    kind: str
    common: WebHandlerCommon
    settings: BaseModel


@dataclass(frozen=True)
class RateLimiterEntry:
    """A ``[rate_limiters.NAME]`` table: a configured instance of a rate limiter kind."""

    name: str
    kind: str
    settings: BaseModel


@dataclass(frozen=True)
class AddressDestination:
    """Where an address in ``destinations`` delivers: account and destination settings."""

    account: str
    address: str  # as configured, canonical ("lp@domain" or "@domain" for a catch-all)
    destination: Destination


@dataclass
class Dynamic:
    """Validated ``domains.toml`` plus derived lookup tables."""

    model: DynamicConfig
    mtime: float
    routes_global: list[Route] = field(default_factory=list)
    routes_domain: dict[str, list[Route]] = field(default_factory=dict)  # ascii domain
    routes_account: dict[str, list[Route]] = field(default_factory=dict)
    web_handlers: list[WebHandlerEntry] = field(default_factory=list)
    rate_limiters: dict[str, RateLimiterEntry] = field(default_factory=dict)
    addresses: dict[str, AddressDestination] = field(default_factory=dict)  # canonical -> dest
    catchalls: dict[str, AddressDestination] = field(default_factory=dict)  # ascii domain -> dest
    domains: dict[str, Domain] = field(default_factory=dict)  # ascii domain -> Domain
    web_redirects: dict[str, str] = field(default_factory=dict)  # ascii domain -> ascii domain


@dataclass
class Config:
    """The whole config: static part, dynamic part (replaced on reload), and where it lives."""

    path: Path
    domains_path: Path
    static: StaticConfig
    dynamic: Dynamic
    transports: dict[str, TransportEntry]
    plugins: PluginHost

    @property
    def config_dir(self) -> Path:
        return self.path.parent

    @property
    def data_dir(self) -> Path:
        d = Path(self.static.data_dir)
        return d if d.is_absolute() else (self.config_dir / d)

    def domain(self, name: str) -> Domain | None:
        try:
            return self.dynamic.domains.get(to_ascii(name))
        except ValueError:
            return None

    def account(self, name: str) -> Account | None:
        return self.dynamic.model.accounts.get(name)

    def with_dynamic(self, dynamic: Dynamic) -> Config:
        """This config with another ``domains.toml`` (a reload, or a write by mox itself)."""
        return Config(path=self.path, domains_path=self.domains_path, static=self.static,
                      dynamic=dynamic, transports=self.transports, plugins=self.plugins)
