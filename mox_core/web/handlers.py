"""The web handlers of ``domains.toml``, built into ASGI applications by their kinds'
factories, once per version of the config: a reload builds them anew, and a request in
flight finishes with the ones it started with.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from mox_core.config.resolved import Config
from mox_core.plugins.kinds import ASGIApp, WebHandlerContext
from mox_core.smtp.domain import to_ascii

__all__ = ["Handler", "HandlerSet", "call_handler"]

log = structlog.get_logger(component="http")


@dataclass(frozen=True)
class Handler:
    """One ``[[web_handlers]]`` entry, ready to serve."""

    index: int
    name: str  # log name: the entry's log_name, else its index
    domain: str  # lower-case ASCII
    regexp: re.Pattern[str]
    dont_redirect_plaintext: bool
    compress: bool
    app: ASGIApp


class HandlerSet:
    """The handlers of the current config, rebuilt when ``domains.toml`` changed."""

    def __init__(self, internal_services: Mapping[str, ASGIApp]) -> None:
        self.internal_services = internal_services
        self._key: object = None
        self._handlers: list[Handler] = []

    def get(self, config: Config) -> list[Handler]:
        if self._key is not config.dynamic:
            old = self._handlers
            self._handlers = build(config, self.internal_services)
            self._key = config.dynamic
            _close_later(old)
        return self._handlers


CLOSE_REPLACED_AFTER = 60.0


def _close_later(handlers: list[Handler]) -> None:
    """Close the apps of a replaced config (those with ``aclose``, e.g. a proxy's kept-alive
    backend connections) once the requests they serve have had time to end."""
    closers = [h.app.aclose for h in handlers if callable(getattr(h.app, "aclose", None))]
    if not closers:
        return

    async def close() -> None:
        await asyncio.sleep(CLOSE_REPLACED_AFTER)
        for aclose in closers:
            try:
                await aclose()
            except Exception as exc:  # a plugin's close failing must not matter
                log.warning("web_handler_close_failed", error=str(exc))

    try:
        task = asyncio.get_running_loop().create_task(close())
    except RuntimeError:  # no loop (a test building handlers directly)
        return
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


def build(config: Config, internal_services: Mapping[str, ASGIApp]) -> list[Handler]:
    out = []
    for entry in config.dynamic.web_handlers:
        c = entry.common
        name = c.log_name or str(entry.index)
        ctx = WebHandlerContext(
            domain=to_ascii(c.domain), path_regexp=c.path_regexp, log_name=name,
            config_dir=config.config_dir, data_dir=config.data_dir,
            allow_private_targets=config.static.testing.allow_private_targets,
            internal_services=internal_services,
        )
        kind = config.plugins.webhandlers[entry.kind]
        try:
            app = kind.app_factory(entry.settings, ctx)
        except Exception as exc:  # a broken plugin: its requests get 500, the others are served
            log.exception("web_handler_build_failed", handler=name, kind=entry.kind, error=str(exc))
            app = _broken(name)
        out.append(Handler(entry.index, name, ctx.domain, re.compile(c.path_regexp),
                           c.dont_redirect_plaintext, c.compress, app))
    return out


def _broken(name: str) -> ASGIApp:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        from mox_core.web.request import send_text

        await send_text(send, 500, "500 - internal server error")

    return app


async def call_handler(app: ASGIApp, scope: Any, receive: Any, send: Any) -> bool:
    """Run ``app``; False when it declined (returned without starting a response)."""
    started = False

    async def tracking_send(message: Any) -> None:
        nonlocal started
        started = True
        await send(message)

    await app(scope, receive, tracking_send)
    return started
