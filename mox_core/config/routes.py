"""Validating the routes of ``domains.toml`` (global, per domain, per account) against the
transports of ``mox.toml`` and the route criteria plugins registered.

Matching a route against a delivery attempt is :mod:`mox_core.outgoing.routing`'s job.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from mox_core.config.resolved import Route
from mox_core.errors import ConfigProblem
from mox_core.plugins.host import PluginHost
from mox_core.plugins.registry import model_problems

__all__ = ["check_raw_routes", "validate_routes"]


def validate_routes(
    raw_routes: list[dict[str, Any]], where: str, path: str, transports: set[str] | None,
    plugins: PluginHost, file: str, problems: list[ConfigProblem],
) -> list[Route]:
    """The valid routes of one level; a problem added for every bad key or value.

    ``where`` names the level in messages ("global", "domain example.org"), ``path`` is its key
    path ("routes", "domains.example.org.routes"); ``transports`` are the names defined in
    mox.toml (None: unknown, not checked)."""
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
            prepared = _criterion(key, value, plugins, file, rpath, problems)
            if prepared is _INVALID:
                ok = False
            else:
                criteria[key] = prepared
        if ok:
            out.append(Route(where=where, index=i, transport=transport, criteria=criteria))
    return out


_INVALID = object()


def _criterion(key: str, value: Any, plugins: PluginHost, file: str, rpath: str,
               problems: list[ConfigProblem]) -> Any:
    """The prepared value of criterion ``key`` (its matcher's ``parse``), or ``_INVALID``."""
    matcher = plugins.route_matchers.get(key)
    if matcher is None:
        known = ", ".join(["transport", *sorted(plugins.route_matchers)])
        problems.append(ConfigProblem(file, f"{rpath}.{key}", f"unknown route criterion (known keys: {known})"))
        return _INVALID
    try:
        typed = TypeAdapter(matcher.value_type).validate_python(value, strict=True)
        return matcher.parse(typed)
    except ValidationError as exc:
        problems.extend(model_problems(exc, file, f"{rpath}.{key}"))
    except ValueError as exc:
        problems.append(ConfigProblem(file, f"{rpath}.{key}", str(exc)))
    return _INVALID


def check_raw_routes(raw: dict[str, Any], transports: set[str] | None, plugins: PluginHost, file: str,
                     problems: list[ConfigProblem]) -> None:
    """Check the routes of a domains.toml that failed validation, to report all problems."""

    def routes(v: Any) -> list[dict[str, Any]]:
        ok = isinstance(v, list) and all(isinstance(r, dict) for r in v)
        return v if ok else []

    validate_routes(routes(raw.get("routes")), "global", "routes", transports, plugins, file, problems)
    for level, where in (("domains", "domain"), ("accounts", "account")):
        section = raw.get(level)
        if isinstance(section, dict):
            for name, body in section.items():
                if isinstance(body, dict):
                    validate_routes(routes(body.get("routes")), f"{where} {name}",
                                    f"{level}.{name}.routes", transports, plugins, file, problems)
