"""Plugin loading: built-ins first, then the entry-point group ``mox.plugins``.

:class:`PluginHost` wraps the pluggy manager. It is the only place that calls hooks; the rest
of core uses its registries of kinds (``host.transports`` and so on,
:class:`~mox_core.plugins.registry.KindRegistry`). Loading never raises:
each plugin gets a :class:`PluginInfo` with status ``ok``, ``error`` or ``disabled``, so
``mox plugins list`` can show a broken plugin, while ``mox serve`` calls
:meth:`PluginHost.raise_for_errors` to refuse to start with one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from mox_core import hookspecs
from mox_core.errors import PluginConflictError, PluginError, PluginLoadError
from mox_core.plugins.kinds import RateLimiterKind, RouteMatcherKind, TransportKind, WebHandlerKind
from mox_core.plugins.registry import KindRegistry

ENTRY_POINT_GROUP = "mox.plugins"

# Core's own kinds, registered through the same hooks as any plugin (module, name).
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("mox_core.builtin.route_matchers", "core.route_matchers"),
    ("mox_core.builtin.rate_limiters", "core.rate_limiters"),
    ("mox_core.builtin.loopback", "core.transports"),
)

# hook name -> (registry attribute of PluginHost, expected kind class)
_KIND_HOOKS: dict[str, tuple[str, type]] = {
    "mox_register_transports": ("transports", TransportKind),
    "mox_register_route_matchers": ("route_matchers", RouteMatcherKind),
    "mox_register_webhandlers": ("webhandlers", WebHandlerKind),
    "mox_register_rate_limiters": ("rate_limiters", RateLimiterKind),
}


@dataclass
class PluginInfo:
    """What ``mox plugins list`` shows about one plugin."""

    name: str
    dist: str | None
    version: str | None
    module: str | None
    builtin: bool = False
    status: str = "ok"  # ok | error | disabled
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.dist,
            "version": self.version,
            "module": self.module,
            "builtin": self.builtin,
            "hooks": self.hooks,
            "kinds": self.kinds,
            "status": self.status,
            "error": self.error,
        }


def disabled_from_env() -> set[str]:
    """Plugin names listed in ``MOX_DISABLED_PLUGINS`` (comma or space separated)."""
    raw = os.environ.get("MOX_DISABLED_PLUGINS", "")
    return {n.strip() for n in raw.replace(",", " ").split() if n.strip()}


class PluginHost:
    """The plugin manager plus the registries of kinds the plugins provide."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.transports = KindRegistry[TransportKind]("transport", "transport kind")
        self.route_matchers = KindRegistry[RouteMatcherKind]("route_matcher", "route criterion")
        self.webhandlers = KindRegistry[WebHandlerKind]("webhandler", "web handler kind")
        self.rate_limiters = KindRegistry[RateLimiterKind]("rate_limiter", "rate limiter kind")
        if os.environ.get("MOX_TRACE_HOOKS") == "1":
            self.pm.trace.root.setwriter(print)
            self.pm.enable_tracing()

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(
        cls, disabled: Iterable[str] = (), *, autoload: bool | None = None
    ) -> PluginHost:
        """Built-ins, then entry points (unless autoload is off), minus ``disabled``."""
        host = cls()
        off = set(disabled) | disabled_from_env()
        for module, name in DEFAULT_PLUGINS:
            host._load_module(name, module, dist="mox-core", builtin=True, disabled=off)
        if autoload is None:
            autoload = os.environ.get("MOX_DISABLE_PLUGIN_AUTOLOAD") != "1"
        if autoload:
            for ep in sorted(
                importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
            ):
                dist = ep.dist.name if ep.dist is not None else None
                if ep.name in host.infos:
                    other = host.infos[ep.name]
                    host.infos[f"{ep.name}@{dist}"] = PluginInfo(
                        name=ep.name, dist=dist, version=_version(dist), module=ep.value,
                        status="error",
                        error=f"plugin name {ep.name!r} is also used by distribution {other.dist}",
                    )
                    continue
                host._load_module(ep.name, ep.value, dist=dist, disabled=off, loader=ep.load)
        return host

    def register(self, plugin: object, name: str, *, dist: str | None = None) -> PluginInfo:
        """Register an already imported plugin object or module (tests, embedding)."""
        info = PluginInfo(name=name, dist=dist, version=_version(dist), module=_module_name(plugin))
        self.infos[name] = info
        self._register(plugin, info)
        return info

    def unregister(self, name: str) -> None:
        """Remove a plugin and the kinds it provided."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin, name=name)
        self.infos.pop(name, None)
        for registry in self.registries():
            registry.remove_plugin(name)

    def _load_module(
        self, name: str, module: str, *, dist: str | None, builtin: bool = False,
        disabled: set[str], loader: Any = None,
    ) -> None:
        info = PluginInfo(
            name=name, dist=dist, version=_version(dist), module=module, builtin=builtin
        )
        self.infos[name] = info
        if name in disabled:
            info.status = "disabled"
            return
        try:
            plugin = loader() if loader is not None else importlib.import_module(module)
        except Exception as exc:  # a broken plugin must not take "plugins list" down
            info.status = "error"
            info.error = f"import failed: {type(exc).__name__}: {exc}"
            return
        self._register(plugin, info)

    def _register(self, plugin: object, info: PluginInfo) -> None:
        unknown = [
            attr for attr in dir(plugin)
            if attr.startswith("mox_") and callable(getattr(plugin, attr, None))
            and getattr(getattr(plugin, attr), f"{hookspecs.PROJECT}_impl", None) is not None
            and not hasattr(self.pm.hook, attr)
        ]
        if unknown:
            info.status = "error"
            info.error = f"unknown hook(s): {', '.join(sorted(unknown))}"
            return
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:  # pluggy.PluginValidationError and friends
            info.status = "error"
            info.error = f"{type(exc).__name__}: {exc}"
            return
        info.hooks = sorted(
            caller.name for caller in (self.pm.get_hookcallers(plugin) or [])
        )
        for hook_name in info.hooks:
            if hook_name not in _KIND_HOOKS:
                continue
            attr, kind_cls = _KIND_HOOKS[hook_name]
            registry: KindRegistry[Any] = getattr(self, attr)
            impl = next(
                i for i in getattr(self.pm.hook, hook_name).get_hookimpls() if i.plugin is plugin
            )
            try:
                kinds = list(impl.function() or [])
                for kind in kinds:
                    if not isinstance(kind, kind_cls):
                        raise TypeError(
                            f"{hook_name} returned {type(kind).__name__}, expected {kind_cls.__name__}"
                        )
            except Exception as exc:
                self._fail(plugin, info, f"{hook_name} failed: {type(exc).__name__}: {exc}")
                return
            try:
                registry.check_free([k.name for k in kinds], info.name)
            except PluginConflictError as err:
                self._fail(plugin, info, str(err))
                return
            for kind in kinds:
                registry.add(kind.name, kind, info.name)
                info.kinds.append(f"{registry.category}:{kind.name}")

    def _fail(self, plugin: object, info: PluginInfo, message: str) -> None:
        info.status = "error"
        info.error = message
        for registry in self.registries():
            registry.remove_plugin(info.name)
        info.kinds = []
        self.pm.unregister(plugin, name=info.name)

    def registries(self) -> list[KindRegistry[Any]]:
        return [getattr(self, attr) for attr, _ in _KIND_HOOKS.values()]

    # -- state ----------------------------------------------------------------------------

    def errors(self) -> list[PluginInfo]:
        return [i for i in self.infos.values() if i.status == "error"]

    def raise_for_errors(self) -> None:
        """Raise the first plugin error: a missing transport would misroute mail."""
        for info in self.errors():
            if info.error and "registered by both plugin" in info.error:
                raise PluginError(info.error)
            raise PluginLoadError(info.name, info.dist, info.error or "unknown error")

    # -- typed hook facade ----------------------------------------------------------------

    def add_cli_commands(self, cli: Any) -> None:
        """Let each plugin add subcommands; a name already taken marks that plugin broken."""
        for impl in self.pm.hook.mox_add_cli_commands.get_hookimpls():
            info = self.infos.get(self.pm.get_name(impl.plugin) or "")
            before = dict(cli.commands)
            try:
                impl.function(cli=cli)
            except Exception as exc:
                if info is not None:
                    info.status, info.error = "error", f"mox_add_cli_commands failed: {exc}"
                cli.commands.clear()
                cli.commands.update(before)
                continue
            clashes = [n for n in before if cli.commands.get(n) is not before[n]]
            if clashes:
                cli.commands.clear()
                cli.commands.update(before)
                if info is not None:
                    info.status = "error"
                    info.error = f"command name(s) already taken: {', '.join(clashes)}"
                continue
            if info is not None:
                info.kinds.extend(f"command:{n}" for n in cli.commands if n not in before)


def _version(dist: str | None) -> str | None:
    if not dist:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_name(plugin: object) -> str | None:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return getattr(type(plugin), "__module__", None)
