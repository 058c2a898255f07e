"""``mox serve``: start every component from the config and run until a signal."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

from mox_core.accounts.sasl import AuthFailureLimiter
from mox_core.acme.manager import ACMEManager
from mox_core.acme.names import uses_acme
from mox_core.config.resolved import Config
from mox_core.outgoing.ratelimit import RateLimits
from mox_core.server.components import Components, clean_maildir_tmp, stop_on_signals
from mox_core.server.ctl import CtlServer, socket_path
from mox_core.server.handoff import WorkerSubmissions
from mox_core.server.webprocess import WebProcess
from mox_core.server.workers import SMTPWorkers, worker_count, worker_cpus
from mox_core.smtpserver.listen import endpoints
from mox_core.web.ports import web_ports

log = structlog.get_logger(component="serve")
T = TypeVar("T")


async def serve(config: Config, *, stop: asyncio.Event | None = None,
                started: asyncio.Event | None = None) -> None:
    """Run every component of ``config`` until ``stop`` is set (or SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    removed = await asyncio.to_thread(clean_maildir_tmp, data_dir)
    if removed:
        log.info("maildir_tmp_cleaned", files=removed)
    parts = Components(config)
    ratelimits = RateLimits(parts.holder)
    auth_limiter = AuthFailureLimiter()
    workers = _workers(parts, ratelimits, auth_limiter)
    ports = web_ports(config.static)
    web = WebProcess(config.path, ports) if ports else None
    # the sockets first, so a busy port stops the start right away
    if workers is not None:
        workers.bind()
    if web is not None:
        try:
            web.bind()
        except OSError:
            if workers is not None:
                workers.close_sockets()
            raise
    if workers is not None:
        # the queue's lock and orphan cleanup here, before the workers open it; each worker
        # delivers to its share of the recipient domains and is woken for them
        await parts.queue.open(lock=True)
        parts.queue.wake = workers.wake
    else:
        await parts.queue.start()
    acme = await _prepare_acme(parts)
    ctl = CtlServer(socket_path(data_dir), {**parts.queue.ctl_handlers(), **(acme.ctl_handlers() if acme else {})})
    await ctl.start()

    async def stop_feeding_the_queue() -> None:
        if web is not None:
            await web.stop()
        if workers is not None:
            await workers.stop()
            if workers.submissions is not None:
                await workers.submissions.close()  # the adds of the workers' last submissions
        await ctl.close()

    try:
        if workers is not None:
            await workers.start()
        else:
            await parts.start_listeners(queue=parts.queue, ratelimits=ratelimits, auth_limiter=auth_limiter)
        if web is not None:
            await web.start()
    except BaseException:
        await parts.close(before_queue=stop_feeding_the_queue)
        raise
    log.info("mox_started", hostname=config.static.hostname, config=str(config.path), pid=os.getpid(),
             listeners=len(workers.endpoints) if workers is not None else len(parts.listeners),
             **_smtp_processes(workers),
             web_ports=sorted({wp.port for wp in ports}))
    if started is not None:
        started.set()
    parts.start_reloading(stop)
    acme_task = asyncio.create_task(acme.run(stop)) if acme is not None else None
    try:
        await stop.wait()
    finally:
        if acme_task is not None:
            acme_task.cancel()
        await parts.close(before_queue=stop_feeding_the_queue)
        log.info("mox_stopped")


def _smtp_processes(workers: SMTPWorkers | None) -> dict[str, int | str]:
    """What serves SMTP, for the start-up line: the worker processes running, or the main
    process itself (``smtp_workers = 1``, or one CPU)."""
    if workers is None:
        return {"smtp_processes": 1, "smtp_served_by": "main process"}
    return {"smtp_processes": workers.count, "smtp_served_by": f"{workers.count} worker processes"}


def _workers(parts: Components, ratelimits: RateLimits, auth_limiter: AuthFailureLimiter) -> SMTPWorkers | None:
    """SMTP, submission and outgoing deliveries in worker processes (server/workers.py)
    when there is more than one CPU, their submissions queued here (server/handoff.py)."""
    config = parts.holder.get()
    addresses = endpoints(parts.holder)
    count = worker_count(config.static.smtp_workers)
    if not addresses or count <= 1:
        return None
    cpus = worker_cpus(count) if config.static.pin_smtp_workers else None
    submissions = WorkerSubmissions(parts.queue, ratelimits, auth_limiter)
    return SMTPWorkers(config.path, addresses, count, cpus, submissions)


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


async def _prepare_acme(parts: Components) -> ACMEManager | None:
    """The ACME client, when a listener uses it, with a certificate file for every host name
    before anything serves TLS (temporary ones until the CA's arrive; mox_core/acme/)."""
    if not uses_acme(parts.holder.get()):
        return None
    acme = ACMEManager(parts.holder)
    await asyncio.to_thread(acme.prepare)
    return acme
