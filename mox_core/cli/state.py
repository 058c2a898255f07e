"""What every ``mox`` subcommand gets: the global options and the plugins, and how to load
the config with them (:class:`State`)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import structlog

from mox_core import logging as moxlog
from mox_core.config.loader import config_candidates, find_config_path, load_config
from mox_core.config.resolved import Config
from mox_core.errors import MoxError
from mox_core.plugins.host import PluginHost

__all__ = ["State"]

log = structlog.get_logger(component="cli")


class State:
    """Global options, shared by every subcommand through the click context."""

    def __init__(self, config: str | None, loglevel: str | None, host: PluginHost):
        self.config_option = config
        self.loglevel = loglevel
        self.host = host

    @property
    def config_path(self) -> Path:
        return find_config_path(self.config_option)

    def plugins_for_config(self) -> PluginHost:
        """The plugin host, reloaded if mox.toml disables plugins by name."""
        disabled = _peek_disabled_plugins(self.config_path)
        if disabled:
            self.host = PluginHost.load(disabled)
        return self.host

    def load_config(self, *, reapply_cli_level: bool = True) -> Config:
        """Load the config; except for serve, the command-line level stays the default level."""
        path = self.config_path
        if not path.exists() and not self.config_option and not os.environ.get("MOX_CONFIG"):
            tried = ", ".join(str(p) for p in config_candidates())
            raise MoxError(f"no mox.toml found (tried {tried}); give one with --config or $MOX_CONFIG")
        cfg = load_config(path, self.plugins_for_config())
        moxlog.set_levels(cfg.static.log_level, dict(cfg.static.package_log_levels))
        if reapply_cli_level:
            moxlog.set_levels(self.loglevel or "info")
        log.debug("config_loaded", path=str(cfg.path), domains=len(cfg.dynamic.domains))
        return cfg


def _peek_disabled_plugins(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return []
    value = raw.get("disabled_plugins", [])
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
