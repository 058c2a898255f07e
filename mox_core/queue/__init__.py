"""The outgoing queue: durable store, delivery scheduler, DSNs and admin operations.

The server creates one :class:`Queue`, ``await queue.start()`` (opens the store, removes
orphans, starts the scheduler), gives it to the submission listener (``queue.add``) and to the
ctl socket (:meth:`Queue.ctl_handlers`), and ``await queue.close()`` at shutdown. Admin
commands (``mox queue ...``) call the same methods, through the ctl socket when the server
runs, or on an offline :class:`Queue` (never started) when it does not. With ``smtp_workers``
each worker opens the same queue with ``lock=False`` and delivers its share of the domains
(``partition``); the main process wakes it through ``wake``.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import dns.asyncresolver
import structlog

from mox_core import afterreply
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.errors import MoxError
from mox_core.outgoing.ratelimit import RateLimitCheck
from mox_core.outgoing.results import DeliveryStatus, RecipientResult
from mox_core.queue.clock import Clock, FakeClock, RealClock
from mox_core.queue.commit import recipient_domain
from mox_core.queue.pick import partition_of
from mox_core.queue.queuestore import QueueLocked, QueueStore
from mox_core.queue.records import Filter, QueuedMessage
from mox_core.queue.scheduler import Scheduler
from mox_core.store import Delivery, MaildirStore, StorageError

__all__ = [
    "Clock",
    "FakeClock",
    "Filter",
    "Queue",
    "QueueError",
    "QueueLocked",
    "QueueStore",
    "QueuedMessage",
    "RealClock",
    "Scheduler",
    "StorageError",
    "partition_of",
]

log = structlog.get_logger(component="queue")

CtlHandler = Callable[[dict[str, Any]], Awaitable[Any]]

ADMIN_FAIL_TEXT = "delivery canceled by admin"


class QueueError(MoxError):
    """An admin request that cannot be done (unknown transport, no such message)."""


class Queue:
    """Store + scheduler + admin operations over one data directory.

    :param config: the live :class:`ConfigHolder` (routes reload), or a fixed :class:`Config`.
    :param maildir_store: the server's durable Maildir store, for DSNs; one is created (and
        closed by :meth:`close`) when not given.
    :param clock: time source; :class:`FakeClock` in tests.
    :param partition: ``(index, count)``: this queue's scheduler delivers only to the
        recipient domains of that share (:func:`partition_of`), for one of ``count``
        processes delivering from the same queue (``mox serve`` with ``smtp_workers``).

    ``wake``: when set, the scheduler that must look at new or changed messages runs in
    other processes (the workers of ``mox serve``), and this is called instead of the local
    scheduler's kick, with the recipient domains concerned (``None``: any domain).
    """

    def __init__(
        self,
        config: Config | ConfigHolder,
        *,
        maildir_store: MaildirStore | None = None,
        clock: Clock | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
        concurrency: int | None = None,
        partition: tuple[int, int] | None = None,
    ) -> None:
        self._config: Callable[[], Config] = (
            config.get if isinstance(config, ConfigHolder) else (lambda: config)
        )
        cfg = self._config()
        self.clock: Clock = clock or RealClock()
        self.store = QueueStore(cfg.data_dir, partition=partition)
        self.wake: Callable[[Iterable[str] | None], None] | None = None
        self._own_maildir = maildir_store is None
        self.maildir_store = maildir_store
        self._resolver = resolver
        self._concurrency = concurrency
        self.scheduler: Scheduler | None = None
        self._opened = False

    @property
    def config(self) -> Config:
        return self._config()

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self, *, lock: bool = True) -> None:
        """Open the store. ``lock=True`` is for the one process that runs deliveries."""
        if self._opened:
            return
        await self.store.open(lock=lock, cleanup=lock)
        if self.maildir_store is None:
            self.maildir_store = MaildirStore()
        self.scheduler = Scheduler(
            self.store, self._config, maildir_store=self.maildir_store, clock=self.clock,
            resolver=self._resolver, concurrency=self._concurrency,
        )
        self._opened = True

    async def start(self, *, lock: bool = True) -> None:
        """Open and start delivering. ``lock=True``: the only process delivering from this
        queue, or the one that runs before the others start (lock and orphan cleanup)."""
        await self.open(lock=lock)
        assert self.scheduler is not None
        self.scheduler.start()
        part = self.store.partition
        log.info("queue_started", concurrency=self.scheduler.concurrency,
                 messages=await self.store.count(),
                 **({"partition": f"{part[0] + 1}/{part[1]}"} if part else {}))

    async def close(self, grace: float = 0.0) -> None:
        """Stop the scheduler (``grace`` seconds for running deliveries) and close the store."""
        if not self._opened:
            return
        if self.scheduler is not None:
            await self.scheduler.stop(grace)
        await self.store.close()
        if self._own_maildir and self.maildir_store is not None:
            await self.maildir_store.aclose()
            self.maildir_store = None
        self._opened = False

    def _sched(self) -> Scheduler:
        if self.scheduler is None:
            raise RuntimeError("queue is not open")
        return self.scheduler

    def _wake(self, domains: Iterable[str] | None = None) -> None:
        """Have the scheduler that delivers to ``domains`` (``None``: any) look again."""
        if self.wake is not None:
            self.wake(None if domains is None else list(domains))
        elif domains is None:
            self._sched().kick()
        else:
            self._sched().kick_for(domains)

    # -- submission -------------------------------------------------------------------------

    async def add(
        self,
        *,
        account: str | None,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
        local_deliveries: Sequence[Delivery] = (),
        smtputf8: bool = False,
        hold: bool = False,
        transport: str | None = None,
        rate_limit: RateLimitCheck | None = None,
        logged: bool = False,
    ) -> list[int]:
        """Queue ``data`` (CRLF, trace headers included) from ``mail_from`` to ``recipients``.

        Returns the new row ids (one per recipient) once the message file, the rows and the
        ``local_deliveries`` (Maildir copies for the submission's local recipients) are all
        durable: the SMTP server may answer 250 then. Raises :class:`StorageError` (451/452)
        with nothing kept otherwise. ``account`` is the sending account (``None``: no DSNs).

        ``rate_limit`` (:meth:`mox_core.outgoing.ratelimit.RateLimits.prepare`) is checked and counted
        in the transaction that queues the message; a refusal raises
        :class:`mox_core.outgoing.ratelimit.RateLimited` with nothing kept. ``recipients`` may be
        empty if ``local_deliveries`` is not: the rate limits still apply.

        ``logged``: the caller logs the new ids itself (the SMTP server's ``message_accepted``
        line), so no ``queue_added`` line: one line per accepted submission.
        """
        ids = await self.store.add(
            account=account, mail_from=mail_from, recipients=recipients, data=data,
            local_deliveries=local_deliveries, smtputf8=smtputf8, hold=hold,
            transport=transport, now=self.clock.now(), rate_limit=rate_limit,
        )
        if not ids:
            return ids
        if not logged:
            log.info("queue_added", ids=ids, account=account, mail_from=mail_from,
                     recipients=len(recipients), size=len(data), local=len(local_deliveries))
        if self.scheduler is not None and not hold:
            afterreply.later(self._wake, [recipient_domain(r) for r in recipients])
        return ids

    # -- admin ------------------------------------------------------------------------------

    async def list_messages(self, flt: Filter = Filter()) -> list[QueuedMessage]:
        return await self.store.list_messages(flt)

    async def kick(self, flt: Filter = Filter(), transport: str | None = None) -> int:
        """Next attempt now; ``transport`` sets the override ("" removes it). Returns count."""
        values: dict[str, Any] = {"next_attempt": self.clock.now()}
        if transport is not None:
            if transport and transport not in self.config.transports:
                known = ", ".join(sorted(self.config.transports)) or "none"
                raise QueueError(f"unknown transport {transport!r} (configured: {known})")
            values["transport"] = transport or None
        n = len(await self.store.update(flt, values))
        self._wake()
        log.info("queue_kicked", count=n, transport=transport)
        return n

    async def set_hold(self, flt: Filter, hold: bool) -> int:
        """Hold or release matching messages; returns how many changed state."""
        if flt.hold is not None and flt.hold == hold:
            return 0
        flt = dataclasses.replace(flt, hold=not hold)
        n = len(await self.store.update(flt, {"hold": int(hold)}))
        self._wake()
        log.info("queue_hold_changed", count=n, hold=hold)
        return n

    async def drop(self, flt: Filter) -> int:
        """Remove matching messages without a DSN."""
        rows = await self.store.list_messages(flt)
        n = await self.store.remove([m.id for m in rows])
        log.info("queue_dropped", count=n, ids=[m.id for m in rows])
        return n

    async def fail(self, flt: Filter) -> int:
        """Fail matching messages now: failure DSN ("delivery canceled by admin"), removed."""
        rows = sorted(await self.store.list_messages(flt), key=lambda m: m.id)
        cfg = self.config
        by_file: dict[str, list[QueuedMessage]] = {}
        for m in rows:
            by_file.setdefault(m.file, []).append(m)
        for file, group in by_file.items():
            try:
                data = await self.store.read_message(file)
            except OSError:
                data = b""
            pairs = [(m, RecipientResult(m.recipient, DeliveryStatus.PERMANENT, text=ADMIN_FAIL_TEXT))
                     for m in group]
            await self._sched().send_dsn(cfg, "failed", pairs, data, self.clock.now())
        n = await self.store.remove([m.id for m in rows])
        log.info("queue_failed_by_admin", count=n)
        return n

    async def dump(self, msg_id: int) -> bytes:
        m = await self.store.get(msg_id)
        if m is None:
            raise QueueError(f"no message with id {msg_id}")
        return await self.store.read_message(m.file)

    # -- ctl socket -------------------------------------------------------------------------

    def ctl_handlers(self) -> dict[str, CtlHandler]:
        """Handlers for :class:`mox_core.server.ctl.CtlServer`: JSON in, JSON out."""

        async def q_list(a: dict[str, Any]) -> Any:
            rows = await self.list_messages(Filter.from_json(a.get("filter")))
            return {"now": self.clock.now(), "messages": [m.to_json() for m in rows]}

        async def q_kick(a: dict[str, Any]) -> Any:
            return {"count": await self.kick(Filter.from_json(a.get("filter")), a.get("transport"))}

        async def q_drop(a: dict[str, Any]) -> Any:
            return {"count": await self.drop(Filter.from_json(a.get("filter")))}

        async def q_hold(a: dict[str, Any]) -> Any:
            return {"count": await self.set_hold(Filter.from_json(a.get("filter")), bool(a["hold"]))}

        async def q_fail(a: dict[str, Any]) -> Any:
            return {"count": await self.fail(Filter.from_json(a.get("filter")))}

        async def q_dump(a: dict[str, Any]) -> Any:
            data = await self.dump(int(a["id"]))
            return {"data": base64.b64encode(data).decode()}

        return {
            "queue.list": q_list,
            "queue.kick": q_kick,
            "queue.drop": q_drop,
            "queue.hold": q_hold,
            "queue.fail": q_fail,
            "queue.dump": q_dump,
        }
