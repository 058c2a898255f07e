"""Reading the config files: ``mox.toml`` (static, read at start) and ``domains.toml``
beside it (dynamic, reloaded while mox runs).

Both are validated by the pydantic models of :mod:`mox_core.config.models`; tables whose
shape depends on plugins (transports, routes, web handlers, rate limiters) are validated in a
second step against the kinds the plugins registered (:mod:`mox_core.plugins.registry`).
Every problem is collected with its file and key path, so ``mox config check`` lists them all
at once.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from mox_core.config.domains import validate_dynamic
from mox_core.config.models import TRANSPORT_COMMON_KEYS, StaticConfig, TransportCommon
from mox_core.config.resolved import Config, Dynamic, TransportEntry
from mox_core.errors import ConfigError, ConfigProblem
from mox_core.plugins.host import PluginHost
from mox_core.plugins.registry import validate_model

__all__ = ["DEFAULT_CONFIG_PATH", "config_candidates", "find_config_path", "localserve_dir", "load_config", "read_toml", "reload_dynamic"]

DEFAULT_CONFIG_PATH = Path("config/mox.toml")


def find_config_path(option: str | os.PathLike[str] | None) -> Path:
    """``--config``, else ``$MOX_CONFIG``, else the first of :func:`config_candidates` that
    exists, else ``config/mox.toml``."""
    if option:
        return Path(option)
    env = os.environ.get("MOX_CONFIG")
    if env:
        return Path(env)
    for path in config_candidates():
        if path.exists():
            return path
    return DEFAULT_CONFIG_PATH


def config_candidates() -> list[Path]:
    """Where mox looks for mox.toml without ``--config`` or ``$MOX_CONFIG``: ``config/mox.toml``,
    ``mox.toml`` in the current directory (a ``mox localserve`` folder, say), and the default
    folder of ``mox localserve``."""
    return [DEFAULT_CONFIG_PATH, Path("mox.toml"), localserve_dir() / "mox.toml"]


def localserve_dir() -> Path:
    """The default folder of ``mox localserve``: ``$XDG_CONFIG_HOME/mox-localserve``, else
    ``~/.config/mox-localserve``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mox-localserve"


def load_config(path: str | os.PathLike[str], plugins: PluginHost) -> Config:
    """Read and validate both files; raise :class:`ConfigError` listing every problem."""
    path = Path(path)
    domains_path = path.parent / "domains.toml"
    problems: list[ConfigProblem] = []
    static_raw = read_toml(path, problems)
    static = None
    if static_raw is not None:
        static = validate_model(StaticConfig, static_raw, str(path), problems)
    transports: dict[str, TransportEntry] = {}
    if static is not None:
        transports = _validate_transports(static, plugins, str(path), problems)
    names = set(static.transports) if static is not None else None
    dynamic = _read_dynamic(domains_path, static, names, plugins, problems)
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
    dyn = _read_dynamic(config.domains_path, config.static, set(config.transports), config.plugins, problems)
    if problems:
        raise ConfigError(problems)
    assert dyn is not None
    return dyn


def _read_dynamic(path: Path, static: StaticConfig | None, transports: set[str] | None,
                  plugins: PluginHost, problems: list[ConfigProblem]) -> Dynamic | None:
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    raw = read_toml(path, problems)
    if raw is None:
        return None
    return validate_dynamic(raw, str(path), mtime, static, transports, plugins, problems)


def read_toml(path: Path, problems: list[ConfigProblem]) -> dict[str, Any] | None:
    """The parsed file; None with the problem added when it is missing or not TOML."""
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


def _validate_transports(
    static: StaticConfig, plugins: PluginHost, file: str, problems: list[ConfigProblem]
) -> dict[str, TransportEntry]:
    out: dict[str, TransportEntry] = {}
    for name, raw in static.transports.items():
        where = f"transports.{name}"
        if not isinstance(raw, dict):
            problems.append(ConfigProblem(file, where, "must be a table"))
            continue
        table = plugins.transports.validate_table(
            raw, file, where, problems, common_model=TransportCommon,
            common_keys=TRANSPORT_COMMON_KEYS, default_kind="direct",
        )
        if table is not None:
            out[name] = TransportEntry(name=name, kind=table.name, common=table.common, settings=table.settings)
    return out
