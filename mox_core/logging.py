"""Logging: the only module that configures structlog.

Levels, most verbose first: ``tracedata``, ``traceauth``, ``trace``, ``debug``, ``info``,
``warn``, ``error``. A log line's ``component`` (``smtpserver``, ``queue.delivery``, ...) is
checked against the most specific component that has a level, else the default level. Levels
can change at run time (:func:`set_levels`); the filter reads them on every call, which costs
a dict lookup, and drops the event before any rendering.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from mox_core.errors import UsageError

LEVELS: dict[str, int] = {
    "tracedata": 1,
    "traceauth": 2,
    "trace": 5,
    "debug": 10,
    "info": 20,
    "warn": 30,
    "warning": 30,
    "error": 40,
    "critical": 50,
    "exception": 40,
}

_state: dict[str, Any] = {"default": LEVELS["info"], "components": {}}


def parse_level(name: str) -> int:
    n = (name or "info").lower()
    if n not in LEVELS or n in ("warning", "critical", "exception"):
        raise UsageError(f"unknown loglevel {name!r} (levels: tracedata, traceauth, trace, debug, info, warn, error)")
    return LEVELS[n]


def set_levels(default: str | None = None, components: dict[str, str] | None = None) -> None:
    """Set the default level and/or replace the per-component levels."""
    if default is not None:
        _state["default"] = parse_level(default)
    if components is not None:
        _state["components"] = {k: parse_level(v) for k, v in components.items()}


def level_for(component: str | None) -> int:
    comps: dict[str, int] = _state["components"]
    c = component or ""
    while c:
        if c in comps:
            return comps[c]
        c = c.rpartition(".")[0]
    return _state["default"]


def enabled(level: str, component: str | None = None) -> bool:
    """Whether a line at ``level`` for ``component`` would be written (to skip costly work)."""
    return LEVELS[level] >= level_for(component)


def _filter(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    level = event.pop("_level", None) or method
    if LEVELS.get(level, 20) < level_for(event.get("component")):
        raise structlog.DropEvent
    event["level"] = "warn" if level == "warning" else level
    return event


class BoundLogger(structlog.BoundLoggerBase):
    """Logger with mox's levels; ``trace*`` methods go through the same filter."""

    def _log(self, method: str, event: str | None, kw: dict[str, Any]) -> Any:
        try:
            args, kwargs = self._process_event(method, event, kw)
        except structlog.DropEvent:
            return None
        return self._logger.msg(*args, **kwargs)

    def tracedata(self, event: str | None = None, **kw: Any) -> Any:
        return self._log("tracedata", event, kw)

    def traceauth(self, event: str | None = None, **kw: Any) -> Any:
        return self._log("traceauth", event, kw)

    def trace(self, event: str | None = None, **kw: Any) -> Any:
        return self._log("trace", event, kw)

    def debug(self, event: str | None = None, **kw: Any) -> Any:
        return self._log("debug", event, kw)

    def info(self, event: str | None = None, **kw: Any) -> Any:
        return self._log("info", event, kw)

    def warning(self, event: str | None = None, **kw: Any) -> Any:
        return self._log("warn", event, kw)

    warn = warning

    def error(self, event: str | None = None, **kw: Any) -> Any:
        return self._log("error", event, kw)

    def exception(self, event: str | None = None, **kw: Any) -> Any:
        kw.setdefault("exc_info", True)
        return self._log("error", event, kw)

    def msg(self, event: str | None = None, **kw: Any) -> Any:
        return self._log("info", event, kw)


# Tracebacks as JSON (structlog's dict_tracebacks) without the frames' local variables, which
# structlog shows by default: a password being checked must not end up in the log.
_tracebacks = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


CONSOLE_ENV = "MOX_LOG_CONSOLE"


def configure(*, json: bool, stream: Any = None) -> None:
    """JSON lines (for ``serve``) or readable console output (other commands), on stderr.
    ``MOX_LOG_CONSOLE=1`` makes it console output anyway (``mox localserve`` sets it, for its
    worker processes too)."""
    if json and os.environ.get(CONSOLE_ENV) == "1":
        json = False
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _filter,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=BoundLogger,
        # WriteLogger: each line in one write() (print() writes the newline separately), so
        # the lines of mox serve and its worker processes on one stream never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries using stdlib logging (uvicorn, aiosmtpd) go to stderr at warning and above.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
