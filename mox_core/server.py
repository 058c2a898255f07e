"""``mox serve``: start every component from the config and run until a signal."""

from __future__ import annotations

import asyncio
import signal

import structlog

from mox_core.config import Config, ConfigHolder

log = structlog.get_logger(component="serve")


async def _reload_loop(holder: ConfigHolder, stop: asyncio.Event) -> None:
    """Poll domains.toml once a second so a change takes effect without a request."""
    while not stop.is_set():
        await asyncio.to_thread(holder.get)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    holder = ConfigHolder(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    log.info("mox_started", hostname=config.static.hostname, config=str(config.path))
    reloader = asyncio.create_task(_reload_loop(holder, stop))
    await stop.wait()
    reloader.cancel()
    log.info("mox_stopped")


def run(config: Config) -> None:
    asyncio.run(serve(config))
