"""The parts of a running mox that the main process and every worker process both have,
built from the config in one order and closed in the reverse.

``mox serve``'s main process (:mod:`mox_core.server.main`) and its SMTP worker processes
(:mod:`mox_core.server.workers`) each build :class:`Components`: the live config, the DNS
resolver (also used by SPF), the durable Maildir store, the account credentials and the
outgoing queue. What differs is around them: the main process owns the queue's lock, the ctl
socket and the workers; a worker delivers only its share of the queue and hands its
submissions to the main process.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from mox_core.accounts.db import AccountCredentials
from mox_core.accounts.sasl import AuthFailureLimiter
from mox_core.config.generation import Generation
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.dns.resolver import install_spf_lookup, make_async_resolver, make_resolver
from mox_core.queue import Queue
from mox_core.smtpserver.interfaces import OutgoingQueue, SubmissionRateLimits
from mox_core.smtpserver.listen import Listening, start_listeners
from mox_core.store import Maildir, MaildirStore

__all__ = ["Components", "clean_maildir_tmp", "reload_loop", "stop_on_signals"]

log = structlog.get_logger(component="serve")


class Components:
    """Config holder, resolver, Maildir store, credentials and queue of one process.

    ``partition``: ``(index, count)`` of a worker process, which delivers the queued messages
    of its share of the recipient domains (:func:`mox_core.queue.partition_of`).
    """

    def __init__(self, config: Config, *, partition: tuple[int, int] | None = None) -> None:
        self.generation = Generation(config.data_dir)
        self.holder = ConfigHolder(config, generation=self.generation)
        self.resolver = make_resolver(config.static.dns)
        install_spf_lookup(self.resolver)
        self.store = MaildirStore()
        self.credentials = AccountCredentials(self.holder)
        self.queue = Queue(self.holder, maildir_store=self.store,
                           resolver=make_async_resolver(config.static.dns), partition=partition)
        self.listeners: list[Listening] = []
        self._reloader: asyncio.Task[None] | None = None

    async def start_listeners(self, *, queue: OutgoingQueue, ratelimits: SubmissionRateLimits,
                              auth_limiter: AuthFailureLimiter,
                              sockets: dict[tuple[str, str, str], list[socket.socket]] | None = None,
                              ) -> list[Listening]:
        """The SMTP, submission and submissions listeners of mox.toml with this process's
        store, credentials and resolver; submissions go to ``queue`` after ``ratelimits``
        (this process's queue, or a worker's link to the main process)."""
        self.listeners = await start_listeners(
            self.holder, store=self.store, credentials=self.credentials, resolver=self.resolver,
            queue=queue, ratelimits=ratelimits, auth_limiter=auth_limiter, sockets=sockets)
        return self.listeners

    def start_reloading(self, stop: asyncio.Event) -> None:
        """Check domains.toml once a second until ``stop``, so a change takes effect without
        waiting for a command that reads it."""
        self._reloader = asyncio.create_task(reload_loop(self.holder, stop))

    async def close(self, *, before_queue: Callable[[], Awaitable[None]] | None = None) -> None:
        """Stop accepting, let ``before_queue`` end what feeds the queue (the workers, the link
        to the main process), then close the queue (deliveries in progress get 5 seconds; it
        goes before the store, since DSNs are delivered through the store), the store and the
        credentials."""
        if self._reloader is not None:
            self._reloader.cancel()
        for lst in self.listeners:
            lst.server.close()
        if before_queue is not None:
            await before_queue()
        await self.queue.close(grace=5)
        await self.store.aclose()
        self.credentials.close()


async def reload_loop(holder: ConfigHolder, stop: asyncio.Event) -> None:
    """Poll domains.toml once a second so a change takes effect without a request."""
    while not stop.is_set():
        await asyncio.to_thread(holder.get)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (where the event loop supports signal handlers)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass


def clean_maildir_tmp(data_dir: Path) -> int:
    """Remove what a crash mid-write left in the accounts' Maildir ``tmp/`` directories (files
    older than 36 hours, the Maildir rule; newer ones may belong to another deliverer)."""
    removed = 0
    for root in (data_dir / "accounts").glob("*/Maildir"):
        removed += Maildir(root).clean_tmp()
        for sub in root.glob(".*"):
            if sub.is_dir():
                removed += Maildir(sub, subfolder=True).clean_tmp()
    return removed
