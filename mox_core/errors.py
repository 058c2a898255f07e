"""Exceptions of mox-core. Those derived from :class:`MoxError` are shown without traceback."""

from __future__ import annotations

from dataclasses import dataclass


class MoxError(Exception):
    """Base class: an error with a message meant for the administrator."""


class UsageError(MoxError):
    """Bad command-line usage."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file: which file, which key (dotted path) and why."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


class ConfigError(MoxError):
    """The config is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class PluginError(MoxError):
    """A plugin could not be used."""


class PluginLoadError(PluginError):
    """A plugin failed to import or to register."""

    def __init__(self, plugin: str, dist: str | None, reason: str):
        self.plugin = plugin
        self.dist = dist
        self.reason = reason
        in_dist = f" (distribution {dist})" if dist else ""
        super().__init__(f"plugin {plugin!r}{in_dist} failed to load: {reason}")


class PluginConflictError(PluginError):
    """Two plugins register the same kind."""

    def __init__(self, category: str, kind: str, first: str, second: str):
        self.category = category
        self.kind = kind
        self.plugins = (first, second)
        super().__init__(
            f"{category} kind {kind!r} is registered by both plugin {first!r} and plugin {second!r}"
        )
