"""Live reload of ``domains.toml``: :class:`ConfigHolder` holds the active config.

mox reads the dynamic config through :meth:`ConfigHolder.get` for every command, delivery
attempt and request, so a change applies to the next one. :meth:`ConfigHolder.get` stats the
file at most once a second; a change is parsed and validated in full and replaces the
dynamic part ("domains config reloaded"), an invalid file keeps the previous config and its
problems are logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from mox_core.config.generation import Generation
from mox_core.config.loader import reload_dynamic
from mox_core.config.resolved import Config
from mox_core.errors import ConfigError

__all__ = ["ConfigHolder"]

log = structlog.get_logger(component="config")


class ConfigHolder:
    """Holds the active :class:`Config`; reloads ``domains.toml`` when it changes."""

    def __init__(self, config: Config, *, interval: float = 1.0, generation: Generation | None = None):
        self._config = config
        self._interval = interval
        self._checked = time.monotonic()
        # mox's own writes of domains.toml apply at once (generation.py); None: only polling
        self._generation = generation
        self._seen = generation.current() if generation is not None else 0
        self._failed_mtime: float | None = None
        self._lock = threading.Lock()
        self.listeners: list[Callable[[Config], None]] = []  # run after a successful reload

    def get(self) -> Config:
        gen = self._generation
        if gen is not None and gen.current() != self._seen:
            return self._reload_generation(gen)
        now = time.monotonic()
        if now - self._checked < self._interval:
            return self._config
        with self._lock:
            if now - self._checked < self._interval:
                return self._config
            self._checked = now
            self._maybe_reload()
        return self._config

    def _reload_generation(self, gen: Generation) -> Config:
        with self._lock:
            n = gen.current()
            if n != self._seen:
                self._seen = n
                self._checked = time.monotonic()
                self._maybe_reload()
        return self._config

    def check_now(self) -> Config:
        """Look at domains.toml now, not at most once a second (told that it changed)."""
        with self._lock:
            self._checked = time.monotonic()
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
        self._config = cfg.with_dynamic(dyn)
        log.info("domains_config_reloaded", path=str(cfg.domains_path))
        for fn in self.listeners:
            fn(self._config)

    def replace(self, config: Config) -> None:
        """Install a config written by mox itself (admin UI), effective at once."""
        with self._lock:
            self._config = config
            self._failed_mtime = None
            if self._generation is not None:
                self._seen = self._generation.current()
