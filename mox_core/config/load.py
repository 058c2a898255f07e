"""Config files: ``mox.toml`` (static, read at start) and ``domains.toml`` beside it (dynamic).

Both are validated by the pydantic models in :mod:`mox_core.config.models`; sections whose
shape depends on plugins (transports, routes, web handlers, rate limiters) are validated in a
second step against the kinds the plugins registered. Every problem is collected with its
file and key path, so ``mox config check`` can list them all at once.

``domains.toml`` reloads while mox runs: :class:`ConfigHolder` checks its modification time
at most once a second and keeps the previous config when the new one is invalid.
"""

from __future__ import annotations

import os
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, TypeAdapter, ValidationError

from mox_core.config.models import (
    TRANSPORT_COMMON_KEYS,
    WEBHANDLER_COMMON_KEYS,
    Account,
    Destination,
    Domain,
    DynamicConfig,
    StaticConfig,
    TransportCommon,
    WebHandlerCommon,
)
from mox_core.errors import ConfigError, ConfigProblem
from mox_core.plugins.host import PluginHost
from mox_core.plugins.kinds import RouteContext
from mox_core.smtp.domain import to_ascii, to_unicode

log = structlog.get_logger(component="config")

DEFAULT_CONFIG_PATH = Path("config/mox.toml")


def find_config_path(option: str | os.PathLike[str] | None) -> Path:
    """``--config``, else ``$MOX_CONFIG``, else ``config/mox.toml``."""
    if option:
        return Path(option)
    env = os.environ.get("MOX_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


# --------------------------------------------------------------------------------------------
# Resolved config: what the rest of core uses


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
    index: int
    kind: str
    common: WebHandlerCommon
    settings: BaseModel


@dataclass(frozen=True)
class RateLimiterEntry:
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

    def routes_for(self, account: str | None, from_domain: str) -> list[Route]:
        """Routes in evaluation order: account, then sender domain, then global."""
        routes: list[Route] = []
        if account:
            routes += self.dynamic.routes_account.get(account, [])
        routes += self.dynamic.routes_domain.get(from_domain.lower(), [])
        routes += self.dynamic.routes_global
        return routes

    def route_matches(self, route: Route, ctx: RouteContext) -> bool:
        for name, value in route.criteria.items():
            matcher = self.plugins.route_matchers[name]
            if not matcher.matches(value, ctx):
                return False
        return True


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str], plugins: PluginHost) -> Config:
    """Read and validate both files; raise :class:`ConfigError` listing every problem."""
    path = Path(path)
    domains_path = path.parent / "domains.toml"
    problems: list[ConfigProblem] = []
    static_raw = _read_toml(path, problems)
    static = None
    if static_raw is not None:
        static = _validate_model(StaticConfig, static_raw, str(path), problems)
    transports: dict[str, TransportEntry] = {}
    if static is not None:
        transports = _validate_transports(static, plugins, str(path), problems)
    names = set(static.transports) if static is not None else None
    dynamic = _load_dynamic(domains_path, static, names, plugins, problems)
    if problems:
        raise ConfigError(problems)
    assert static is not None and dynamic is not None
    return Config(
        path=path, domains_path=domains_path, static=static, dynamic=dynamic,
        transports=transports, plugins=plugins,
    )


def reload_dynamic(config: Config) -> Dynamic:
    """Parse ``domains.toml`` again against the current static config."""
    problems: list[ConfigProblem] = []
    dyn = _load_dynamic(
        config.domains_path, config.static, set(config.transports), config.plugins, problems
    )
    if problems:
        raise ConfigError(problems)
    assert dyn is not None
    return dyn


def _read_toml(path: Path, problems: list[ConfigProblem]) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        problems.append(ConfigProblem(str(path), "", "file not found"))
    except tomllib.TOMLDecodeError as exc:
        problems.append(ConfigProblem(str(path), "", f"invalid TOML: {exc}"))
    except OSError as exc:
        problems.append(ConfigProblem(str(path), "", f"cannot read: {exc.strerror}"))
    return None


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(str(p))
    out = ""
    for p in parts:
        out = out + p if p.startswith("[") or not out else f"{out}.{p}"
    return out


def _validate_model(
    model: type[BaseModel], raw: Any, file: str, problems: list[ConfigProblem], prefix: str = ""
) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(ConfigProblem(file, _loc(prefix, err["loc"]), msg))
        return None


def _validate_transports(
    static: StaticConfig, plugins: PluginHost, file: str, problems: list[ConfigProblem]
) -> dict[str, TransportEntry]:
    out: dict[str, TransportEntry] = {}
    for name, raw in static.transports.items():
        where = f"transports.{name}"
        if not isinstance(raw, dict):
            problems.append(ConfigProblem(file, where, "must be a table"))
            continue
        kind = raw.get("kind", "direct")
        tk = plugins.transports.get(kind) if isinstance(kind, str) else None
        if tk is None:
            known = ", ".join(sorted(plugins.transports)) or "none"
            problems.append(ConfigProblem(
                file, f"{where}.kind", f"unknown transport kind {kind!r} (known kinds: {known})"
            ))
            continue
        common_raw = {k: v for k, v in raw.items() if k in TRANSPORT_COMMON_KEYS}
        settings_raw = {k: v for k, v in raw.items() if k not in TRANSPORT_COMMON_KEYS}
        common = _validate_model(TransportCommon, common_raw, file, problems, where)
        settings = _validate_model(tk.settings_model, settings_raw, file, problems, where)
        if common is not None and settings is not None:
            out[name] = TransportEntry(name=name, kind=kind, common=common, settings=settings)
    return out


def _load_dynamic(
    path: Path,
    static: StaticConfig | None,
    transports: set[str] | None,
    plugins: PluginHost,
    problems: list[ConfigProblem],
) -> Dynamic | None:
    """Validate domains.toml; ``transports`` are the names defined in mox.toml (None: unknown)."""
    file = str(path)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    raw = _read_toml(path, problems)
    if raw is None:
        return None
    model = _validate_model(DynamicConfig, raw, file, problems)
    if model is None:
        _check_raw_routes(raw, transports, plugins, file, problems)
        return None
    n = len(problems)
    dyn = Dynamic(model=model, mtime=mtime)

    # Domains, by their ASCII form.
    for name, dom in model.domains.items():
        try:
            a = to_ascii(name)
        except ValueError as exc:
            problems.append(ConfigProblem(file, f"domains.{name}", str(exc)))
            continue
        if to_unicode(a) != name:
            problems.append(ConfigProblem(
                file, f"domains.{name}",
                f"domain must be written in lower-case Unicode form: {to_unicode(a)!r}",
            ))
        if a in dyn.domains:
            problems.append(ConfigProblem(file, f"domains.{name}", "duplicate domain"))
        dyn.domains[a] = dom

    # Accounts and their destinations.
    for acc_name, acc in model.accounts.items():
        where = f"accounts.{acc_name}"
        if acc.domain is not None and _domain_or_none(acc.domain) not in dyn.domains:
            problems.append(ConfigProblem(file, f"{where}.domain", f"unknown domain {acc.domain!r}"))
        for addr, dest in acc.destinations.items():
            dwhere = f"{where}.destinations.{_quote(addr)}"
            lp, _, dname = addr.rpartition("@")
            if "@" not in addr:
                problems.append(ConfigProblem(file, dwhere, "address must be lp@domain or @domain"))
                continue
            ad = _domain_or_none(dname)
            dom = dyn.domains.get(ad or "")
            if dom is None:
                problems.append(ConfigProblem(file, dwhere, "unknown domain for address"))
                continue
            entry = AddressDestination(account=acc_name, address=addr, destination=dest)
            if lp == "":
                if ad in dyn.catchalls:
                    problems.append(ConfigProblem(
                        file, dwhere, f"duplicate canonicalized catchall destination address @{dname}"
                    ))
                dyn.catchalls[ad] = entry
                continue
            for sep in dom.separators():
                if sep in lp:
                    problems.append(ConfigProblem(
                        file, dwhere,
                        f"localpart of address {addr} includes domain catchall separator {sep}",
                    ))
            canon = f"{dom.canonical_localpart(lp, strip_separators=False)}@{ad}"
            if canon in dyn.addresses:
                problems.append(ConfigProblem(
                    file, dwhere, f"duplicate canonicalized destination address {canon}"
                ))
            dyn.addresses[canon] = entry
        if acc.rate_limiters is not None:
            for i, lname in enumerate(acc.rate_limiters):
                if lname in model.rate_limiters:
                    continue
                kind = plugins.rate_limiters.get(lname)
                if kind is None:
                    problems.append(ConfigProblem(
                        file, f"{where}.rate_limiters[{i}]", f"unknown rate limiter {lname!r}"
                    ))
                    continue
                try:
                    kind.settings_model()
                except ValidationError:
                    problems.append(ConfigProblem(
                        file, f"{where}.rate_limiters[{i}]",
                        f"rate limiter kind {lname!r} needs settings: define [rate_limiters.NAME] "
                        f"with kind = {lname!r} and use NAME here",
                    ))

    if static is not None and static.postmaster.account not in model.accounts:
        problems.append(ConfigProblem(
            file, "accounts",
            f"postmaster account {static.postmaster.account!r} (from mox.toml) is not defined",
        ))

    # Routes at the three levels.
    dyn.routes_global = _validate_routes(
        model.routes, "global", "routes", transports, plugins, file, problems
    )
    for name, dom in model.domains.items():
        d = _domain_or_none(name)
        if d is not None:
            dyn.routes_domain[d] = _validate_routes(
                dom.routes, f"domain {name}", f"domains.{name}.routes", transports, plugins,
                file, problems,
            )
    for acc_name, acc in model.accounts.items():
        dyn.routes_account[acc_name] = _validate_routes(
            acc.routes, f"account {acc_name}", f"accounts.{acc_name}.routes", transports,
            plugins, file, problems,
        )

    # Web handlers and rate limiters: kinds from plugins.
    for i, raw_h in enumerate(model.web_handlers):
        where = f"web_handlers[{i}]"
        kind = raw_h.get("kind")
        hk = plugins.webhandlers.get(kind) if isinstance(kind, str) else None
        if hk is None:
            known = ", ".join(sorted(plugins.webhandlers)) or "none"
            problems.append(ConfigProblem(
                file, f"{where}.kind", f"unknown web handler kind {kind!r} (known kinds: {known})"
            ))
            continue
        common = _validate_model(
            WebHandlerCommon, {k: v for k, v in raw_h.items() if k in WEBHANDLER_COMMON_KEYS},
            file, problems, where,
        )
        settings = _validate_model(
            hk.settings_model, {k: v for k, v in raw_h.items() if k not in WEBHANDLER_COMMON_KEYS},
            file, problems, where,
        )
        if common is not None and settings is not None:
            dyn.web_handlers.append(WebHandlerEntry(i, kind, common, settings))
    for name, raw_l in model.rate_limiters.items():
        where = f"rate_limiters.{name}"
        kind = raw_l.get("kind")
        lk = plugins.rate_limiters.get(kind) if isinstance(kind, str) else None
        if lk is None:
            known = ", ".join(sorted(plugins.rate_limiters)) or "none"
            problems.append(ConfigProblem(
                file, f"{where}.kind", f"unknown rate limiter kind {kind!r} (known kinds: {known})"
            ))
            continue
        settings = _validate_model(
            lk.settings_model, {k: v for k, v in raw_l.items() if k != "kind"}, file, problems, where
        )
        if settings is not None:
            dyn.rate_limiters[name] = RateLimiterEntry(name, kind, settings)
    for src, dst in model.web_domain_redirects.items():
        for d in (src, dst):
            if _domain_or_none(d) is None:
                problems.append(ConfigProblem(
                    file, f"web_domain_redirects.{_quote(src)}", f"invalid domain {d!r}"
                ))

    return dyn if len(problems) == n else None


def _check_raw_routes(
    raw: dict[str, Any], transports: set[str] | None, plugins: PluginHost, file: str,
    problems: list[ConfigProblem],
) -> None:
    """Check the routes of a domains.toml that failed validation, to report all problems."""

    def routes(v: Any) -> list[dict[str, Any]]:
        ok = isinstance(v, list) and all(isinstance(r, dict) for r in v)
        return v if ok else []

    _validate_routes(routes(raw.get("routes")), "global", "routes", transports, plugins, file, problems)
    for level, where in (("domains", "domain"), ("accounts", "account")):
        section = raw.get(level)
        if isinstance(section, dict):
            for name, body in section.items():
                if isinstance(body, dict):
                    _validate_routes(routes(body.get("routes")), f"{where} {name}",
                                     f"{level}.{name}.routes", transports, plugins, file, problems)


def _validate_routes(
    raw_routes: list[dict[str, Any]],
    where: str,
    path: str,
    transports: set[str] | None,
    plugins: PluginHost,
    file: str,
    problems: list[ConfigProblem],
) -> list[Route]:
    out = []
    for i, raw in enumerate(raw_routes):
        rpath = f"{path}[{i}]"
        transport = raw.get("transport")
        ok = True
        if not isinstance(transport, str) or (transports is not None and transport not in transports):
            problems.append(ConfigProblem(
                file, f"{rpath}.transport",
                f"{where} routes: route references undefined transport {transport or ''!r}",
            ))
            ok = False
        criteria: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "transport":
                continue
            matcher = plugins.route_matchers.get(key)
            if matcher is None:
                known = ", ".join(["transport", *sorted(plugins.route_matchers)])
                problems.append(ConfigProblem(
                    file, f"{rpath}.{key}", f"unknown route criterion (known keys: {known})"
                ))
                ok = False
                continue
            try:
                typed = TypeAdapter(matcher.value_type).validate_python(value, strict=True)
                criteria[key] = matcher.parse(typed)
            except ValidationError as exc:
                for err in exc.errors():
                    problems.append(ConfigProblem(file, _loc(f"{rpath}.{key}", err["loc"]), err["msg"]))
                ok = False
            except ValueError as exc:
                problems.append(ConfigProblem(file, f"{rpath}.{key}", str(exc)))
                ok = False
        if ok:
            out.append(Route(where=where, index=i, transport=transport, criteria=criteria))
    return out


def _domain_or_none(d: str) -> str | None:
    try:
        return to_ascii(d)
    except ValueError:
        return None


def _quote(key: str) -> str:
    return f'"{key}"' if any(c in key for c in '.@"') else key


# --------------------------------------------------------------------------------------------
# Live reload of domains.toml


class ConfigHolder:
    """Holds the active :class:`Config`; reloads ``domains.toml`` when it changes.

    :meth:`get` stats the file at most once a second. A change is parsed and validated in
    full; on success it replaces the dynamic part ("domains config reloaded"), otherwise the
    previous config stays active and the problems are logged.
    """

    def __init__(self, config: Config, *, interval: float = 1.0):
        self._config = config
        self._interval = interval
        self._checked = time.monotonic()
        self._failed_mtime: float | None = None
        self._lock = threading.Lock()
        self.listeners: list[Any] = []  # callables(config) run after a successful reload

    def get(self) -> Config:
        now = time.monotonic()
        if now - self._checked < self._interval:
            return self._config
        with self._lock:
            if now - self._checked < self._interval:
                return self._config
            self._checked = now
            self._maybe_reload()
        return self._config

    def _maybe_reload(self) -> None:
        cfg = self._config
        try:
            mtime = cfg.domains_path.stat().st_mtime
        except OSError as exc:
            log.error("domains_config_stat_failed", path=str(cfg.domains_path), error=str(exc))
            return
        if mtime == cfg.dynamic.mtime or mtime == self._failed_mtime:
            return
        try:
            dyn = reload_dynamic(cfg)
        except ConfigError as exc:
            self._failed_mtime = mtime
            log.error(
                "domains_config_reload_failed", path=str(cfg.domains_path),
                problems=[str(p) for p in exc.problems],
                detail="keeping the previous config",
            )
            return
        self._failed_mtime = None
        self._config = Config(
            path=cfg.path, domains_path=cfg.domains_path, static=cfg.static, dynamic=dyn,
            transports=cfg.transports, plugins=cfg.plugins,
        )
        log.info("domains_config_reloaded", path=str(cfg.domains_path))
        for fn in self.listeners:
            fn(self._config)

    def replace(self, config: Config) -> None:
        """Install a config written by mox itself (admin UI), effective at once."""
        with self._lock:
            self._config = config
            self._failed_mtime = None
