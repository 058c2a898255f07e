"""Worker processes for SMTP (port 25), submission (587, 465) and outgoing deliveries: use
every CPU, as Postfix's smtpd and smtp processes do.

One Python process runs on one core (the GIL), and accepting and delivering mail costs CPU
per message (parsing, SPF, headers, AUTH, DKIM signing, the SMTP client; bench/RESULTS.md).
So ``mox serve`` runs the SMTP, submission and submissions listeners and the queue's
deliveries in ``smtp_workers`` processes (default: one per CPU). The main process binds, for
every address of those services, one listening socket per worker sharing the port
(``SO_REUSEPORT``: the kernel spreads connections over them), opens the queue first (its lock
and orphan cleanup), starts the workers with their sockets and a link each, and keeps the
rest itself: adding the workers' submissions to the queue (with the rate limits, one group
commit for all: handoff.py), the count of failed logins, and the ctl socket.

Incoming SMTP needs nothing shared but files: a worker resolves recipients from the config
files (each process reloads domains.toml itself), checks SPF/DKIM and delivers into Maildir,
which is safe for several writers by design (unique file names with the process id; rename).
Submission needs the account database (read by every process) and the main process's queue.

Deliveries: worker ``i`` of ``n`` runs a queue scheduler for the recipient domains with
``partition_of(domain, n) == i``, so every delivery to one domain runs in one process and
per-domain limits hold as in a single process; ``[queue] concurrency`` applies to each
worker. The workers share the queue's SQLite database (its locking serialises their commits).
When the main process queues a message it writes ``kick DOMAIN ...`` on the pipe of each
worker concerned (a worker whose deliveries to those domains are all at their limit skips its
pass, as one process does), after an admin command ``kick`` to every worker; a worker that
starts looks at the whole queue.

With one worker per usable CPU (the default) worker ``i`` runs only on the CPU whose new
connections the kernel gives to its sockets (``listen.steer_by_cpu``: CPU number modulo the
worker count), unless ``pin_smtp_workers = false``: the kernel's work on a connection's
packets, its session and the worker's threads then share that CPU's caches, and a worker's
deliveries stay on its CPU too. Measured on 2 CPUs against unpinned workers
(bench/RESULTS.md, 2026-12-03 evening): outbound to one domain 1.20x and to 20 domains
1.09x, 20 connections into Maildir 1.12-1.23x (2 KB) and 1.10-1.23x (100 KB); one connection
at a time 0.86-0.92x at 2 KB, because the benchmark's client runs on the same machine, on the CPU its
connections arrive on, which pinning then makes the server's as well (a remote client's
packets arrive on the CPU of the network card's queue, not on a CPU it runs on).

A worker that dies is started again after a second, with the same sockets: connections that
waited in its backlog are then served. Workers die with the main process (``PR_SET_PDEATHSIG``
on Linux, and end of the pipe to the main process everywhere), so a crash of ``mox serve``
never leaves a process behind that keeps a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path
from urllib.parse import quote

import structlog

from mox_core.config.resolved import Config
from mox_core.errors import MoxError
from mox_core.queue.pick import partition_of
from mox_core.queue.scheduler import Scheduler
from mox_core.server.children import die_with_parent, spawn_child, stop_processes
from mox_core.server.components import Components, stop_on_signals
from mox_core.server.handoff import MainLink, WorkerSubmissions
from mox_core.smtpserver.listen import bind_shared

log = structlog.get_logger(component="smtpserver")

MAX_AUTO_WORKERS = 8
MAX_KICK_LINE = 4096
# At most one "kick DOMAIN ..." to a worker per this many seconds: the first message after a
# quiet spell wakes its worker at once, the others of a burst together at the end of the spell.
KICK_INTERVAL = 0.02
RESTART_DELAY = 1.0


def worker_cpus(count: int, cpus: set[int] | None = None) -> list[int] | None:
    """The CPU of each of ``count`` workers, when there is one usable CPU per worker: the CPU
    ``c`` with ``c % count == i`` for worker ``i`` (the CPUs whose connections
    ``steer_by_cpu`` gives to worker ``i``'s sockets); else None."""
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return None
    by_worker = {c % count: c for c in cpus}
    if len(cpus) != count or len(by_worker) != count:
        return None
    return [by_worker[i] for i in range(count)]


def worker_count(setting: int) -> int:
    """``smtp_workers``: 0 means one per CPU this process may use (at most 8)."""
    if setting > 0:
        return setting
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_AUTO_WORKERS))


class SMTPWorkers:
    """The main process's side: sockets, starting, watching and stopping the workers."""

    def __init__(self, config_path: Path, endpoints: list[tuple[str, str, str, int]], count: int,
                 cpus: list[int] | None = None, submissions: WorkerSubmissions | None = None):
        self.config_path = config_path
        self.endpoints = endpoints  # (listener name, service, ip, port)
        self.count = count
        self.cpus = cpus  # the CPU each worker is pinned to (worker_cpus), None: not pinned
        # the main process's side of the workers' links (handoff.WorkerSubmissions)
        self.submissions = submissions
        self._sockets: dict[tuple[str, str, str], list[socket.socket]] = {}
        self._procs: list[asyncio.subprocess.Process | None] = [None] * count
        # The main process's end of each worker's pipe: the worker stops when it closes.
        self._channels: list[asyncio.StreamWriter | None] = [None] * count
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        # per worker: domains of new messages not yet sent, when it was last kicked, the
        # timer that sends them
        self._kick_due: list[dict[str, None]] = [{} for _ in range(count)]
        self._kick_last: list[float] = [float("-inf")] * count
        self._kick_timer: list[asyncio.TimerHandle | None] = [None] * count

    def bind(self) -> None:
        """Bind every address, ``count`` sockets each; OSError names the listener."""
        try:
            for name, service, ip, port in self.endpoints:
                self._sockets[(name, service, ip)], steered = bind_shared(name, service, ip, port, self.count)
                if not steered and self.cpus:
                    log.info("smtp_workers_not_pinned", reason="connections not steered by CPU")
                    self.cpus = None
        except OSError:
            self.close_sockets()
            raise

    def close_sockets(self) -> None:
        for group in self._sockets.values():
            for sock in group:
                sock.close()
        self._sockets.clear()

    async def start(self) -> None:
        """Start every worker and wait until each serves its sockets."""
        try:
            await asyncio.gather(*(self._spawn(i) for i in range(self.count)))
        except BaseException:
            await self.stop()
            raise
        self._watchers = [asyncio.create_task(self._watch(i)) for i in range(self.count)]

    async def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        link_ours, link_theirs = socket.socketpair()  # submissions to the main process's queue
        fds = [theirs.fileno(), link_theirs.fileno()]
        spec = []
        for (name, service, ip), group in self._sockets.items():
            fd = group[index].fileno()
            fds.append(fd)
            spec.append(f"{fd}:{quote(name, safe='')}:{service}:{ip}")  # a name may hold ":"
        cmd = [sys.executable, "-m", "mox_core", "--config", str(self.config_path), "smtp-worker",
               "--index", str(index), "--count", str(self.count),
               "--parent", str(os.getpid()), "--channel", str(theirs.fileno()),
               "--link", str(link_theirs.fileno()),
               *(["--cpu", str(self.cpus[index])] if self.cpus else []),
               *[a for s in spec for a in ("--socket", s)]]
        reader, writer = await asyncio.open_connection(sock=ours)
        self._channels[index] = writer

        attached = False

        def started(proc: asyncio.subprocess.Process) -> None:
            nonlocal attached
            self._procs[index] = proc
            attached = self.submissions is not None
            if self.submissions is not None:
                self.submissions.attach(index, link_ours)
            else:
                link_ours.close()

        try:
            proc = await spawn_child(cmd, fds, reader, f"smtp worker {index}", child_ends=(theirs, link_theirs),
                                     started=started)
        except BaseException:
            if not attached:
                link_ours.close()
            raise
        log.info("smtp_worker_started", worker=index, pid=proc.pid,
                 **({"cpu": self.cpus[index]} if self.cpus else {}))

    async def _watch(self, index: int) -> None:
        while True:
            proc = self._procs[index]
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            log.error("smtp_worker_exited", worker=index, pid=proc.pid, status=code,
                      restart_in=RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)
            if self._stopping:
                return
            old = self._channels[index]
            if old is not None:
                old.close()
                self._channels[index] = None
            try:
                await self._spawn(index)
            except (MoxError, OSError) as exc:
                log.error("smtp_worker_restart_failed", worker=index, error=str(exc))

    def wake(self, domains: list[str] | None) -> None:
        """Have the workers delivering to ``domains`` (``None``: all workers) look at the
        queue again (``Queue.wake``). A worker being restarted looks at it when it starts.

        "kick DOMAIN ...": a worker whose deliveries to all of them are at their limit skips
        its pass (Scheduler.kick_for), as one process does. A worker is kicked for new
        messages at most every KICK_INTERVAL seconds, with every domain queued since: waking
        another process for each submission cost 10-30 % of the submissions per second at one
        connection (bench/RESULTS.md), and a delivery starting up to 20 ms later costs nothing.
        """
        if domains is None:  # an admin command: every worker, now
            for i in range(self.count):
                self._kick_due[i].clear()
                self._send_kick(i, b"kick\n")
            return
        loop = asyncio.get_running_loop()
        for d in domains:
            self._kick_due[partition_of(d, self.count)][d] = None
        for i, due in enumerate(self._kick_due):
            if due and self._kick_timer[i] is None:
                wait = self._kick_last[i] + KICK_INTERVAL - loop.time()
                if wait <= 0:
                    self._flush_kick(i)
                else:
                    self._kick_timer[i] = loop.call_later(wait, self._flush_kick, i)

    def _flush_kick(self, i: int) -> None:
        self._kick_timer[i] = None
        due = self._kick_due[i]
        if not due:
            return
        line = ("kick " + " ".join(due) + "\n").encode()
        due.clear()
        # a submission to very many domains: a plain kick (the worker's pipe reader takes
        # lines of up to 64 KB; one domain name alone can be 253 bytes)
        self._send_kick(i, line if len(line) <= MAX_KICK_LINE else b"kick\n")

    def _send_kick(self, i: int, line: bytes) -> None:
        timer = self._kick_timer[i]
        if timer is not None:
            timer.cancel()
            self._kick_timer[i] = None
        self._kick_last[i] = asyncio.get_running_loop().time()
        ch = self._channels[i]
        if ch is not None and not ch.is_closing():
            ch.write(line)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.returncode is None]

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker (they finish the deliveries in progress), then wait."""
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        for i, timer in enumerate(self._kick_timer):
            if timer is not None:
                timer.cancel()
                self._kick_timer[i] = None
        await stop_processes([p for p in self._procs if p is not None], timeout)
        for ch in self._channels:
            if ch is not None:
                ch.close()
        self.close_sockets()


# ---------------------------------------------------------------------------------------------
# The worker process


async def _read_channel(channel: socket.socket, stop: asyncio.Event, scheduler: Scheduler) -> None:
    """Lines from the main process until the pipe ends, which means the main process is gone
    or stopping: "kick" (messages changed, any domain) or "kick DOMAIN ..." (new messages
    for these domains of this worker's)."""
    reader, writer = await asyncio.open_connection(sock=channel)
    with contextlib.suppress(OSError):
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # longer than the reader's limit (never sent): look at all
                scheduler.kick()
                continue
            if not line:
                break
            if line == b"kick\n":
                scheduler.kick()
            elif line.startswith(b"kick "):
                scheduler.kick_for(line[5:].decode("utf-8", "replace").split())
    stop.set()
    writer.close()


async def serve_worker(config: Config, index: int, count: int, parent: int, channel_fd: int,
                       link_fd: int, sockets: dict[tuple[str, str, str], int],
                       cpu: int | None = None) -> None:
    """Serve the SMTP, submission and submissions listeners on sockets inherited from the
    main process (submissions are queued by the main process, over the link), and deliver
    queued messages to this worker's share of the recipient domains; only on ``cpu`` when
    given (before any thread starts: they all inherit it)."""
    die_with_parent(parent)
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except (AttributeError, OSError) as exc:  # CPUs changed since the main process looked
            log.warning("smtp_worker_cpu_not_set", worker=index, cpu=cpu, error=str(exc))
    structlog.contextvars.bind_contextvars(worker=index)
    stop = asyncio.Event()
    stop_on_signals(stop)
    channel = socket.socket(fileno=channel_fd)
    socks = {key: [socket.socket(fileno=fd)] for key, fd in sockets.items()}
    # [queue] concurrency applies per worker: divided among them, one domain's deliveries
    # (all in one worker) had half the slots, and ran 23 % slower through one smarthost
    parts = Components(config, partition=(index, count))
    await parts.queue.start(lock=False)
    link = MainLink(socket.socket(fileno=link_fd))
    await link.start()
    await parts.start_listeners(queue=link, ratelimits=link, auth_limiter=link.auth_limiter, sockets=socks)
    channel.sendall(b"ready\n")
    assert parts.queue.scheduler is not None
    watcher = asyncio.create_task(_read_channel(channel, stop, parts.queue.scheduler))
    parts.start_reloading(stop)
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await parts.close(before_queue=link.close)
        log.info("smtp_worker_stopped", pid=os.getpid())
