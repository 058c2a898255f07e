"""Validating ``domains.toml`` (domains, accounts and their addresses, routes, web handlers,
rate limiters) and deriving the lookup tables of :class:`~mox_core.config.resolved.Dynamic`.

Every check adds its problems to one list, with the file and key, so all of them are
reported at once; the result is None when there was any.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from mox_core.config.models import WEBHANDLER_COMMON_KEYS, Account, DynamicConfig, StaticConfig, WebHandlerCommon
from mox_core.config.resolved import AddressDestination, Dynamic, RateLimiterEntry, WebHandlerEntry
from mox_core.config.routes import check_raw_routes, validate_routes
from mox_core.errors import ConfigProblem
from mox_core.plugins.host import PluginHost
from mox_core.plugins.registry import validate_model
from mox_core.smtp.domain import to_ascii, to_unicode

__all__ = ["validate_dynamic"]


def validate_dynamic(
    raw: dict[str, Any], file: str, mtime: float, static: StaticConfig | None,
    transports: set[str] | None, plugins: PluginHost, problems: list[ConfigProblem],
) -> Dynamic | None:
    """``domains.toml`` as parsed TOML, validated; ``transports`` are the names defined in
    mox.toml (None: unknown, not checked)."""
    model = validate_model(DynamicConfig, raw, file, problems)
    if model is None:
        check_raw_routes(raw, transports, plugins, file, problems)
        return None
    n = len(problems)
    dyn = Dynamic(model=model, mtime=mtime)
    _domains(model, dyn, file, problems)
    for acc_name, acc in model.accounts.items():
        _account(acc_name, acc, model, dyn, plugins, file, problems)
    if static is not None and static.localserve is not None and static.localserve.account not in model.accounts:
        problems.append(ConfigProblem(
            file, "accounts", f"localserve account {static.localserve.account!r} (from mox.toml) is not defined",
        ))
    if static is not None and static.postmaster.account not in model.accounts:
        problems.append(ConfigProblem(
            file, "accounts",
            f"postmaster account {static.postmaster.account!r} (from mox.toml) is not defined",
        ))
    _routes(model, dyn, transports, plugins, file, problems)
    _web_handlers(model, dyn, plugins, file, problems)
    _rate_limiters(model, dyn, plugins, file, problems)
    _domain_redirects(model, dyn, file, problems)
    if static is not None:
        _web_listeners(static, model, dyn, file, problems)
    return dyn if len(problems) == n else None


def _domains(model: DynamicConfig, dyn: Dynamic, file: str, problems: list[ConfigProblem]) -> None:
    """Domains by their ASCII form, each written in its lower-case Unicode form."""
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


def _account(acc_name: str, acc: Account, model: DynamicConfig, dyn: Dynamic, plugins: PluginHost,
             file: str, problems: list[ConfigProblem]) -> None:
    where = f"accounts.{acc_name}"
    if acc.domain is not None and domain_or_none(acc.domain) not in dyn.domains:
        problems.append(ConfigProblem(file, f"{where}.domain", f"unknown domain {acc.domain!r}"))
    for addr, dest in acc.destinations.items():
        entry = AddressDestination(account=acc_name, address=addr, destination=dest)
        _destination(entry, f"{where}.destinations.{quote_key(addr)}", dyn, file, problems)
    for i, lname in enumerate(acc.rate_limiters or []):
        if lname in model.rate_limiters:
            continue
        kind = plugins.rate_limiters.get(lname)
        lwhere = f"{where}.rate_limiters[{i}]"
        if kind is None:
            problems.append(ConfigProblem(file, lwhere, f"unknown rate limiter {lname!r}"))
            continue
        try:
            kind.settings_model()
        except ValidationError:
            problems.append(ConfigProblem(
                file, lwhere,
                f"rate limiter kind {lname!r} needs settings: define [rate_limiters.NAME] "
                f"with kind = {lname!r} and use NAME here",
            ))


def _destination(entry: AddressDestination, where: str, dyn: Dynamic, file: str,
                 problems: list[ConfigProblem]) -> None:
    """Add an address (or a catch-all ``@domain``) to the lookup tables by its canonical
    form: the domain's separators and case sensitivity applied (mox's rules)."""
    addr = entry.address
    lp, _, dname = addr.rpartition("@")
    if "@" not in addr:
        problems.append(ConfigProblem(file, where, "address must be lp@domain or @domain"))
        return
    ad = domain_or_none(dname)
    dom = dyn.domains.get(ad or "")
    if ad is None or dom is None:
        problems.append(ConfigProblem(file, where, "unknown domain for address"))
        return
    if lp == "":
        if ad in dyn.catchalls:
            problems.append(ConfigProblem(file, where, f"duplicate canonicalized catchall destination address @{dname}"))
        dyn.catchalls[ad] = entry
        return
    for sep in dom.separators():
        if sep in lp:
            problems.append(ConfigProblem(
                file, where, f"localpart of address {addr} includes domain catchall separator {sep}",
            ))
    canon = f"{dom.canonical_localpart(lp, strip_separators=False)}@{ad}"
    if canon in dyn.addresses:
        problems.append(ConfigProblem(file, where, f"duplicate canonicalized destination address {canon}"))
    dyn.addresses[canon] = entry


def _routes(model: DynamicConfig, dyn: Dynamic, transports: set[str] | None, plugins: PluginHost,
            file: str, problems: list[ConfigProblem]) -> None:
    """Routes at the three levels: global, per sender domain, per account."""
    dyn.routes_global = validate_routes(model.routes, "global", "routes", transports, plugins, file, problems)
    for name, dom in model.domains.items():
        d = domain_or_none(name)
        if d is not None:
            dyn.routes_domain[d] = validate_routes(
                dom.routes, f"domain {name}", f"domains.{name}.routes", transports, plugins, file, problems,
            )
    for acc_name, acc in model.accounts.items():
        dyn.routes_account[acc_name] = validate_routes(
            acc.routes, f"account {acc_name}", f"accounts.{acc_name}.routes", transports, plugins, file, problems,
        )


def _web_handlers(model: DynamicConfig, dyn: Dynamic, plugins: PluginHost, file: str,
                  problems: list[ConfigProblem]) -> None:
    """Each entry names exactly one kind; its path_regexp starts with ^ and compiles."""
    for i, raw in enumerate(model.web_handlers):
        where = f"web_handlers[{i}]"
        if "kind" not in raw:
            problems.append(ConfigProblem(
                file, f"{where}.kind", f"must have exactly one handler: kind is one of {plugins.webhandlers.known()}"
            ))
            continue
        table = plugins.webhandlers.validate_table(
            raw, file, where, problems, common_model=WebHandlerCommon, common_keys=WEBHANDLER_COMMON_KEYS,
        )
        if table is None:
            continue
        c = table.common
        label = f"webhandler {c.domain} {c.path_regexp}"
        if domain_or_none(c.domain) is None:
            problems.append(ConfigProblem(file, f"{where}.domain", f"{label}: invalid domain"))
            continue
        if not c.path_regexp.startswith("^"):
            problems.append(ConfigProblem(file, f"{where}.path_regexp", f"{label}: path regexp must start with a ^"))
            continue
        try:
            re.compile(c.path_regexp)
        except re.error as exc:
            problems.append(ConfigProblem(file, f"{where}.path_regexp", f"{label}: compiling regexp: {exc}"))
            continue
        dyn.web_handlers.append(WebHandlerEntry(i, table.name, c, table.settings))


def _rate_limiters(model: DynamicConfig, dyn: Dynamic, plugins: PluginHost, file: str,
                   problems: list[ConfigProblem]) -> None:
    for name, raw in model.rate_limiters.items():
        table = plugins.rate_limiters.validate_table(raw, file, f"rate_limiters.{name}", problems)
        if table is not None:
            dyn.rate_limiters[name] = RateLimiterEntry(name, table.name, table.settings)


def _domain_redirects(model: DynamicConfig, dyn: Dynamic, file: str, problems: list[ConfigProblem]) -> None:
    """Every request for one domain redirected to another (always to HTTPS)."""
    for src, dst in model.web_domain_redirects.items():
        where = f"web_domain_redirects.{quote_key(src)}"
        a, b = domain_or_none(src), domain_or_none(dst)
        if a is None or b is None:
            problems.append(ConfigProblem(file, where, f"invalid domain {src if a is None else dst!r}"))
            continue
        if a == b:
            problems.append(ConfigProblem(file, where, f"will not redirect domain {src} to itself"))
        elif a in dyn.web_redirects:
            problems.append(ConfigProblem(file, where, f"duplicate redirect domain {src}"))
        dyn.web_redirects[a] = b


def _web_listeners(static: StaticConfig, model: DynamicConfig, dyn: Dynamic, file: str,
                   problems: list[ConfigProblem]) -> None:
    """What domains.toml asks of the web server needs a listener of mox.toml that serves it."""
    services = {name for lst in static.listeners.values() for name, _ in lst.web_services()}
    if (model.web_handlers or model.web_domain_redirects) and not services & {"webserver_http", "webserver_https"}:
        problems.append(ConfigProblem(
            file, "web_handlers" if model.web_handlers else "web_domain_redirects",
            "web_domain_redirects or web_handlers configured but no listener with webserver_http or "
            "webserver_https enabled (mox.toml)",
        ))
    if "mta_sts_https" not in services:
        for name, dom in model.domains.items():
            if dom.mta_sts is not None:
                problems.append(ConfigProblem(
                    file, f"domains.{quote_key(name)}.mta_sts",
                    "MTA-STS policy configured but no listener with mta_sts_https enabled (mox.toml)",
                ))


def domain_or_none(d: str) -> str | None:
    """The lower-case ASCII form of domain ``d``, None when it is not a valid domain."""
    try:
        return to_ascii(d)
    except ValueError:
        return None


def quote_key(key: str) -> str:
    """A TOML key as written in a key path: quoted when it holds ``.``, ``@`` or ``"``."""
    return f'"{key}"' if any(c in key for c in '.@"') else key
