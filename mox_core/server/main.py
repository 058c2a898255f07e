"""``mox serve``: start every component from the config and run until a signal."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

from mox_core.config.load import Config, ConfigHolder

log = structlog.get_logger(component="serve")
T = TypeVar("T")


async def reload_loop(holder: ConfigHolder, stop: asyncio.Event) -> None:
    """Poll domains.toml once a second so a change takes effect without a request."""
    while not stop.is_set():
        await asyncio.to_thread(holder.get)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


def clean_maildir_tmp(data_dir) -> int:
    """Remove what a crash mid-write left in the accounts' Maildir ``tmp/`` directories (files
    older than 36 hours, the Maildir rule; newer ones may belong to another deliverer)."""
    from mox_core.store import Maildir

    removed = 0
    for root in (data_dir / "accounts").glob("*/Maildir"):
        removed += Maildir(root).clean_tmp()
        for sub in root.glob(".*"):
            if sub.is_dir():
                removed += Maildir(sub, subfolder=True).clean_tmp()
    return removed


async def serve(config: Config, *, stop: asyncio.Event | None = None,
                started: asyncio.Event | None = None) -> None:
    from mox_core.accounts.db import AccountCredentials
    from mox_core.accounts.sasl import AuthFailureLimiter
    from mox_core.dns.resolver import install_spf_lookup, make_async_resolver, make_resolver
    from mox_core.outgoing.ratelimit import RateLimits
    from mox_core.queue import Queue
    from mox_core.server.ctl import CtlServer, socket_path
    from mox_core.server.handoff import WorkerSubmissions
    from mox_core.server.workers import SMTPWorkers, worker_count, worker_cpus
    from mox_core.smtpserver.listen import endpoints, start_listeners
    from mox_core.store import MaildirStore

    stop = stop or asyncio.Event()
    holder = ConfigHolder(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    removed = await asyncio.to_thread(clean_maildir_tmp, data_dir)
    if removed:
        log.info("maildir_tmp_cleaned", files=removed)
    resolver = make_resolver(config.static.dns)
    install_spf_lookup(resolver)
    store = MaildirStore()
    credentials = AccountCredentials(holder)
    queue = Queue(holder, maildir_store=store, resolver=make_async_resolver(config.static.dns))
    ratelimits = RateLimits(holder)
    auth_limiter = AuthFailureLimiter()
    # SMTP, submission and outgoing deliveries in worker processes (server/workers.py)
    # when there is more than one CPU, their submissions queued here (handoff.py); their
    # sockets are bound here, first, so a busy port stops the start right away.
    workers = submissions = None
    addresses = endpoints(holder)
    count = worker_count(config.static.smtp_workers)
    if addresses and count > 1:
        submissions = WorkerSubmissions(queue, ratelimits, auth_limiter)
        workers = SMTPWorkers(config.path, addresses, count,
                              worker_cpus(count) if config.static.pin_smtp_workers else None,
                              submissions)
        workers.bind()
    if workers:
        # the queue's lock and orphan cleanup here, before the workers open it; each worker
        # delivers to its share of the recipient domains and is woken for them
        await queue.open(lock=True)
        queue.wake = workers.wake
    else:
        await queue.start()
    ctl = CtlServer(socket_path(data_dir), queue.ctl_handlers())
    await ctl.start()
    listeners = []
    try:
        if workers:
            await workers.start()
        else:
            listeners = await start_listeners(
                holder, store=store, credentials=credentials, resolver=resolver,
                auth_limiter=auth_limiter, queue=queue, ratelimits=ratelimits,
            )
    except BaseException:
        if workers:
            await workers.stop()
            await submissions.close()
        await ctl.close()
        await queue.close()
        await store.aclose()
        raise
    log.info("mox_started", hostname=config.static.hostname, config=str(config.path),
             pid=os.getpid(), listeners=len(addresses) if workers else len(listeners),
             smtp_workers=count if workers else 0)
    if started is not None:
        started.set()
    reloader = asyncio.create_task(reload_loop(holder, stop))
    try:
        await stop.wait()
    finally:
        reloader.cancel()
        for lst in listeners:
            lst.server.close()
        if workers:
            await workers.stop()
            await submissions.close()  # the adds of the workers' last submissions
        await ctl.close()
        await queue.close(grace=5)  # before the store: DSNs are delivered through it
        await store.aclose()
        credentials.close()
        log.info("mox_stopped")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (a dependency except on Windows): its event
    loop, transports and timers are in C, and the SMTP command path is mostly event-loop
    overhead (bench/RESULTS.md). ``MOX_EVENT_LOOP=asyncio`` runs the standard loop instead."""
    if os.environ.get("MOX_EVENT_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def run(config: Config) -> None:
    run_loop(serve(config))
