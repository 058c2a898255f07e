"""The registries of plugin kinds: one class for every category (transports, route
matchers, web handlers, rate limiters).

A registry maps a kind's name to what a plugin registered for it and remembers which plugin
that was. Config loading asks it for a kind by name (:meth:`KindRegistry.lookup`, which
reports an unknown name with the known ones) and validates a kind's table against it
(:meth:`KindRegistry.validate_table`), the same way for every category.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from mox_core.errors import ConfigProblem, PluginConflictError

__all__ = ["KindRegistry", "KindTable", "model_problems", "validate_model"]

K = TypeVar("K")


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    """A key path for messages: ``prefix.a.b[2].c``."""
    out = prefix
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out = f"{out}.{p}" if out else str(p)
    return out


def model_problems(exc: ValidationError, file: str, prefix: str = "") -> list[ConfigProblem]:
    """pydantic's errors as config problems with file and key path."""
    out = []
    for err in exc.errors():
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(ConfigProblem(file, _loc(prefix, err["loc"]), msg))
    return out


def validate_model(model: type[BaseModel], raw: Any, file: str, problems: list[ConfigProblem],
                   prefix: str = "") -> Any:
    """``model`` validated from ``raw``; None with the problems added when it is invalid."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems.extend(model_problems(exc, file, prefix))
        return None


@dataclass(frozen=True)
class KindTable(Generic[K]):
    """A config table (``[transports.X]``, a ``[[web_handlers]]`` entry, ...) validated
    against its kind: the kind's name and record, core's common settings (None when the
    category has none) and the kind's own settings."""

    name: str
    kind: K
    common: Any
    settings: BaseModel


class KindRegistry(Generic[K]):
    """The kinds of one category by name, and the plugin that registered each.

    Reads like a mapping (``registry.get(name)``, ``name in registry``, ``sorted(registry)``).
    """

    def __init__(self, category: str, label: str) -> None:
        self.category = category  # "transport", shown as "transport:smtp" in plugin listings
        self.label = label  # "transport kind", in messages
        self._kinds: dict[str, K] = {}
        self._owners: dict[str, str] = {}

    # -- mapping ------------------------------------------------------------------------

    def get(self, name: Any) -> K | None:
        return self._kinds.get(name) if isinstance(name, str) else None

    def __getitem__(self, name: str) -> K:
        return self._kinds[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def items(self) -> list[tuple[str, K]]:
        return list(self._kinds.items())

    def owner(self, name: str) -> str | None:
        """The plugin that registered kind ``name``."""
        return self._owners.get(name)

    # -- registering --------------------------------------------------------------------

    def check_free(self, names: list[str], plugin: str) -> None:
        """Raise :class:`PluginConflictError` when another plugin has one of ``names``."""
        for name in names:
            owner = self._owners.get(name)
            if owner is not None:
                raise PluginConflictError(self.category, name, owner, plugin)

    def add(self, name: str, kind: K, plugin: str) -> None:
        self.check_free([name], plugin)
        self._kinds[name] = kind
        self._owners[name] = plugin

    def remove_plugin(self, plugin: str) -> None:
        """Forget every kind ``plugin`` registered."""
        for name, owner in list(self._owners.items()):
            if owner == plugin:
                del self._owners[name]
                del self._kinds[name]

    # -- config -------------------------------------------------------------------------

    def known(self) -> str:
        return ", ".join(sorted(self._kinds)) or "none"

    def lookup(self, name: Any, file: str, where: str, problems: list[ConfigProblem]) -> K | None:
        """The kind ``name`` names; None with "unknown <label>" (and the known kinds) added to
        ``problems`` at key ``where`` when no plugin registered it."""
        kind = self.get(name)
        if kind is None:
            problems.append(ConfigProblem(
                file, where, f"unknown {self.label} {name!r} (known kinds: {self.known()})"
            ))
        return kind

    def validate_table(
        self, raw: dict[str, Any], file: str, where: str, problems: list[ConfigProblem], *,
        common_model: type[BaseModel] | None = None, common_keys: frozenset[str] = frozenset({"kind"}),
        default_kind: str | None = None,
    ) -> KindTable[K] | None:
        """Validate a table naming its kind with ``kind = "..."``: the keys in ``common_keys``
        go to ``common_model`` (core's settings of every kind, if any), the others to the
        kind's ``settings_model``. None, with the problems added, when anything is wrong."""
        name = raw.get("kind", default_kind)
        kind = self.lookup(name, file, f"{where}.kind", problems)
        if kind is None:
            return None
        common = None
        ok = True
        if common_model is not None:
            common = validate_model(common_model, {k: v for k, v in raw.items() if k in common_keys},
                                    file, problems, where)
            ok = common is not None
        settings = validate_model(kind.settings_model,  # type: ignore[attr-defined]
                                  {k: v for k, v in raw.items() if k not in common_keys},
                                  file, problems, where)
        if not ok or settings is None:
            return None
        return KindTable(name, kind, common, settings)
