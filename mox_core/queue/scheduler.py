"""The delivery scheduler: picks due messages, routes them, calls transports, records results.

Rules (those of mox's queue), and why:

- At most ``[queue] concurrency`` deliveries at once and, for direct delivery, at most one in
  flight per recipient domain, so one slow or greylisting domain cannot take every slot and we
  never open many parallel connections to one receiver. A transport may allow more deliveries
  to one domain at once (its ``destination_concurrency`` attribute, or the transport table's
  key of that name): a smarthost is one host of our own choosing, and relaying one domain's
  mail through it one message at a time is what made mox 6x slower than Postfix there (Postfix:
  ``default_destination_concurrency_limit = 20``). The limit is checked after the route is
  evaluated, so an attempt whose transport allows fewer deliveries than are running to its
  domain does not start (nothing is recorded) and the domain takes no new attempt until its
  running ones are done.
- Recipients of one submission to the same domain that resolve to the same transport go in one
  ``Transport.deliver`` call: one SMTP transaction, the body sent once.
- Before each attempt, one transaction sets attempts+1, last_attempt=now, next_attempt=now +
  backoff and appends a "delivering..." result. A crash during delivery therefore leaves a
  message that is retried after its backoff, and a row is only removed after the transport
  reported DELIVERED (or the message failed for good): duplicates are possible, losses not.
- Routes are evaluated at every attempt with the current config (domains.toml reloads).

Time comes from a :class:`Clock`, so tests move time forward with :class:`FakeClock` instead
of sleeping, and :meth:`Scheduler.settle` waits until the scheduler has nothing left to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import dns.asyncresolver
import structlog

from mox_core.config.resolved import Config
from mox_core.metrics import METRICS
from mox_core.outgoing import dsn
from mox_core.outgoing.routing import (
    Resolution,
    TransportCache,
    TransportUnavailable,
    resolve,
    retry_policy,
    route_context,
)
from mox_core.plugins.kinds import DeliveryContext, DeliveryStatus, OutgoingMessage, RecipientResult
from mox_core.queue.clock import Clock, RealClock
from mox_core.queue.queuestore import QueueStore
from mox_core.queue.records import QueuedMessage
from mox_core.smtpclient.sessions import SessionCache
from mox_core.store import MaildirStore, StorageError

__all__ = ["DELAYED_DSN_ATTEMPT", "Scheduler", "destination_concurrency", "remaining_schedule"]

log = structlog.get_logger(component="queue.delivery")

# mox: a "delayed" DSN after the 5th failed attempt (about 2 hours after queueing).
DELAYED_DSN_ATTEMPT = 5


def remaining_schedule(attempts: int, max_attempts: int, intervals: Sequence[float]) -> list[float]:
    """Offsets from the start of attempt ``attempts`` to each attempt still to come."""
    out: list[float] = []
    t = 0.0
    for k in range(attempts - 1, max_attempts - 1):
        t += intervals[min(k, len(intervals) - 1)]
        out.append(t)
    return out


def destination_concurrency(cfg: Config, res: Resolution, transports: TransportCache) -> int:
    """Deliveries at once to one recipient domain through ``res``'s transport: the transport
    table's ``destination_concurrency``, else the transport's own (:class:`~mox_core.plugins.kinds.Transport`;
    1 for a transport that does not declare it)."""
    if res.entry is not None and res.entry.common.destination_concurrency:
        return res.entry.common.destination_concurrency
    try:
        transport = transports.get(cfg, res)
    except Exception:  # the attempt reports it
        return 1
    n = getattr(transport, "destination_concurrency", 1)
    return n if isinstance(n, int) and n >= 1 else 1


def _result_entry(res: RecipientResult, start: float, end: float, transport: str) -> dict[str, Any]:
    return {
        "start": start,
        "duration": round(end - start, 3),
        "success": res.status is DeliveryStatus.DELIVERED,
        "code": res.code,
        "enhanced_code": res.enhanced_code,
        "remote_host": res.remote_host,
        "text": res.text,
        "permanent": res.status is DeliveryStatus.PERMANENT,
        "transport": transport,
    }


class Scheduler:
    """One asyncio task running deliveries from a :class:`QueueStore`.

    ``config`` is called for the current config at every attempt (``ConfigHolder.get``).
    ``maildir_store`` stores DSNs. ``concurrency`` defaults to ``[queue] concurrency``.
    """

    def __init__(
        self,
        store: QueueStore,
        config: Callable[[], Config],
        *,
        maildir_store: MaildirStore | None,
        clock: Clock | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.maildir_store = maildir_store
        self.clock: Clock = clock or RealClock()
        self.resolver = resolver
        self.concurrency = concurrency or config().static.queue.concurrency
        self.transports = TransportCache()
        # SMTP sessions to smarthosts kept open for the next message (closed by stop())
        self.sessions = SessionCache()
        self.max_inflight = 0  # highest number of deliveries at once, for tests and metrics
        self._inflight: dict[asyncio.Task[None], list[QueuedMessage]] = {}  # task -> its batch
        self._per_domain: dict[str, int] = {}  # recipient domain -> tasks in flight
        self._inflight_ids: set[int] = set()  # rows of those tasks: never picked twice
        self._running: dict[str, list[int]] = {}  # domain -> limits of the attempts under way
        self._allowed: dict[str, int] = {}  # domain -> limit of its last attempt under way
        self._blocked: set[str] = set()  # domains refusing new attempts until theirs are done
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._wake_gen = 0
        self._idle_gen = -1
        self._idle_ev = asyncio.Event()

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="queue-scheduler")

    async def stop(self, grace: float = 0.0) -> None:
        """Stop picking; give running deliveries ``grace`` seconds, then cancel them.

        A cancelled delivery was already counted as an attempt with its retry time set, so it
        is simply tried again after a restart.
        """
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        tasks = list(self._inflight)
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sessions.aclose()

    def kick(self) -> None:
        """Look for due work now (after add, kick, unhold, or a finished delivery)."""
        self._wake_gen += 1
        self._wake.set()

    def kick_for(self, domains: Iterable[str]) -> None:
        """:meth:`kick` after new messages to ``domains``, unless every one of them is at its
        limit of deliveries in flight: the end of one of those wakes the scheduler anyway (a
        burst of submissions to one busy domain then costs no pass each)."""
        busy = self.busy_domains
        if not busy or any(d not in busy for d in domains):
            self.kick()

    async def settle(self, timeout: float = 30.0) -> None:
        """Wait until a full pass after this call found nothing due and nothing in flight."""
        self.kick()
        target = self._wake_gen
        async with asyncio.timeout(timeout):
            while self._idle_gen < target:
                await self._idle_ev.wait()

    @property
    def busy_domains(self) -> set[str]:
        """Domains that take no further delivery now."""
        return {d for d, n in self._per_domain.items() if n >= self._domain_limit(d)}

    def _domain_limit(self, domain: str) -> int:
        if domain in self._blocked:
            return 1
        return self._allowed.get(domain, 1)

    def _room(self) -> dict[str, int]:
        """Domains with deliveries in flight that may take more: how many more."""
        out = {}
        for d, n in self._per_domain.items():
            lim = self._domain_limit(d)
            if n < lim:
                out[d] = lim - n
        return out

    # -- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            gen = self._wake_gen
            self._wake.clear()
            delay: float | None
            try:
                busy = self.busy_domains  # deliveries may finish while we pick: use this set
                free = self.concurrency - len(self._inflight)
                batches: list[list[QueuedMessage]] = []
                nxt = None
                if free > 0:
                    # One trip to the database thread for both questions (a pass runs after
                    # every queued message). The next due time comes back whenever the batches
                    # leave a slot free; it leaves out the domains with room left, which gave
                    # all their due rows (waiting for those is waiting for a delivery's end,
                    # which wakes us).
                    batches, nxt, _ = await self.store.pick_and_next_due(
                        self.clock.now(), busy, free, self._room(), frozenset(self._inflight_ids))
                    for batch in batches:
                        self._launch(batch)
                if not batches and not busy and not self._inflight:
                    self._set_idle(gen)
                if len(self._inflight) >= self.concurrency:
                    delay = None  # a finishing delivery wakes us
                else:
                    delay = None if nxt is None else max(0.0, nxt - self.clock.now())
                    if delay == 0.0 and not batches:
                        delay = 0.05  # never spin; should not happen with consistent state
                    # wake up now and then anyway, in case the wall clock jumped
                    delay = 3600.0 if delay is None else min(delay, 3600.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue_scheduler_error")
                delay = 60.0
            await self.clock.wait(self._wake, delay)

    def _set_idle(self, gen: int) -> None:
        self._idle_gen = gen
        ev, self._idle_ev = self._idle_ev, asyncio.Event()
        ev.set()

    def _launch(self, batch: list[QueuedMessage]) -> None:
        task = asyncio.create_task(self._run_batch(batch), name=f"queue-delivery-{batch[0].id}")
        d = batch[0].recipient_domain
        self._inflight[task] = batch
        self._per_domain[d] = self._per_domain.get(d, 0) + 1
        self._inflight_ids.update(m.id for m in batch)
        self.max_inflight = max(self.max_inflight, len(self._inflight))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        batch = self._inflight.pop(task, None)
        if batch is not None:
            d = batch[0].recipient_domain
            self._inflight_ids.difference_update(m.id for m in batch)
            n = self._per_domain.get(d, 1) - 1
            if n > 0:
                self._per_domain[d] = n
            else:
                self._per_domain.pop(d, None)
                self._allowed.pop(d, None)
                self._blocked.discard(d)
        self.kick()

    async def _run_batch(self, batch: list[QueuedMessage]) -> None:
        try:
            await self.attempt(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("queue_delivery_crashed", msg_id=batch[0].id)

    # -- one attempt ------------------------------------------------------------------------

    def _resolve(self, cfg: Config, m: QueuedMessage) -> Resolution:
        ctx = route_context(mail_from=m.mail_from, recipient=m.recipient, attempts=m.attempts,
                            account=m.account)
        return resolve(cfg, ctx, m.transport)

    async def attempt(self, candidates: list[QueuedMessage]) -> None:
        """Deliver the first candidate plus those of the others that share its transport."""
        cfg = self.config()
        start = self.clock.now()
        first = candidates[0]
        res = self._resolve(cfg, first)
        group = [first] + [
            m for m in candidates[1:]
            if (r := self._resolve(cfg, m)).name == res.name and r.error == res.error
        ]
        domain = first.recipient_domain
        limit = destination_concurrency(cfg, res, self.transports)
        running = self._running.setdefault(domain, [])
        if len(running) >= min([limit, *running]):
            # more deliveries to this domain under way than this transport allows: the rows
            # stay as they are, and the domain waits until its running attempts are done
            self._blocked.add(domain)
            log.debug("delivery_postponed", msg_id=first.id, domain=domain, transport=res.name,
                      running=len(running), limit=limit)
            return
        running.append(limit)
        self._allowed[domain] = limit
        if self._per_domain.get(domain, 0) < limit:
            # the domain was picked at the limit known before its route was resolved (1 for
            # a domain with nothing in flight): look again now that it may take more
            self.kick()
        try:
            intervals, max_attempts = retry_policy(cfg, res)
            plans = [(m.id, start + intervals[min(m.attempts, len(intervals) - 1)], max_attempts)
                     for m in group]
            pending = {"start": start, "text": "delivering...", "transport": res.name, "pending": True}
            rows, data = await self.store.start_attempt(plans, start, pending)
            if not rows:
                return
            before = rows[0].attempts - 1
            log.info("delivery_attempt", msg_ids=[m.id for m in rows], domain=rows[0].recipient_domain,
                     transport=res.name, source=res.source, attempt=before + 1)
            data, results = await self._call_transport(cfg, res, rows, before, data)
            await self._record(cfg, res, rows, results, data, start, intervals)
        finally:
            running.remove(limit)
            if not running:
                self._running.pop(domain, None)

    async def _call_transport(
        self, cfg: Config, res: Resolution, rows: list[QueuedMessage], before: int, data: bytes | None,
    ) -> tuple[bytes, list[RecipientResult]]:
        def all_temporary(text: str) -> list[RecipientResult]:
            return [RecipientResult(m.recipient, DeliveryStatus.TEMPORARY, text=text) for m in rows]

        first = rows[0]
        try:
            if data is None:
                data = await self.store.read_message(first.file)
        except OSError as exc:
            log.error("queue_message_file_unreadable", msg_id=first.id, error=str(exc))
            return b"", all_temporary(f"reading queued message: {exc.strerror or exc}")
        try:
            transport = self.transports.get(cfg, res)
        except TransportUnavailable as exc:
            return data, all_temporary(str(exc))
        except Exception as exc:
            log.exception("transport_build_failed", transport=res.name, kind=res.kind)
            return data, all_temporary(f"transport {res.name!r} could not be set up: {exc}")
        msg = OutgoingMessage(
            mail_from=first.mail_from, recipients=[m.recipient for m in rows], data=data,
            account=first.account, smtputf8=first.smtputf8, has_8bit=first.has_8bit,
        )
        ctx = DeliveryContext(transport_name=res.name, attempt=before, hostname=cfg.static.hostname,
                              config=cfg, resolver=self.resolver, sessions=self.sessions)
        try:
            out = list(await transport.deliver(msg, ctx))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the contract says results, not exceptions: a bug
            log.exception("transport_raised", transport=res.name, kind=res.kind)
            return data, all_temporary(f"transport error: {type(exc).__name__}: {exc}")
        if len(out) == len(rows):
            return data, out
        by_rcpt = {r.recipient.lower(): r for r in out}
        log.error("transport_result_mismatch", transport=res.name, expected=len(rows), got=len(out))
        return data, [
            by_rcpt.get(m.recipient.lower())
            or RecipientResult(m.recipient, DeliveryStatus.TEMPORARY, text="transport gave no result")
            for m in rows
        ]

    async def _record(
        self, cfg: Config, res: Resolution, rows: list[QueuedMessage],
        results: list[RecipientResult], data: bytes, start: float, intervals: list[float],
    ) -> None:
        end = self.clock.now()
        remove: list[int] = []
        update: list[tuple[int, dict[str, Any]]] = []
        failed: list[tuple[QueuedMessage, RecipientResult]] = []
        delayed: list[tuple[QueuedMessage, RecipientResult]] = []
        transport = res.name or "direct"  # the implicit default: direct delivery
        for m, r in zip(rows, results, strict=True):
            METRICS.deliveries.labels(transport, r.status.value).inc()
            entry = _result_entry(r, start, end, res.name)
            fields = dict(msg_id=m.id, recipient=m.recipient, transport=res.name,
                          attempt=m.attempts, code=r.code, enhanced_code=r.enhanced_code,
                          remote_host=r.remote_host, text=r.text)
            if r.status is DeliveryStatus.DELIVERED:
                remove.append(m.id)
                log.info("delivery_delivered", **fields)
            elif r.status is DeliveryStatus.PERMANENT or m.attempts >= m.max_attempts:
                remove.append(m.id)
                failed.append((m, r))
                log.info("delivery_failed", permanent=r.permanent, max_attempts=m.max_attempts, **fields)
            else:
                update.append((m.id, entry))
                if m.attempts == DELAYED_DSN_ATTEMPT:
                    delayed.append((m, r))
                log.info("delivery_deferred", next_attempt=m.next_attempt, **fields)
        # DSNs before the rows change: a crash in between repeats work, it does not lose a DSN.
        if failed:
            await self.send_dsn(cfg, "failed", failed, data, end)
        if delayed:
            sched = remaining_schedule(delayed[0][0].attempts, delayed[0][0].max_attempts, intervals)
            await self.send_dsn(cfg, "delayed", delayed, data, end, retry_in=sched,
                                will_retry_until=start + sched[-1] if sched else None)
        await self.store.finish_attempt(remove, update)

    async def send_dsn(
        self, cfg: Config, action: str, pairs: Sequence[tuple[QueuedMessage, RecipientResult]],
        data: bytes, now: float, *, retry_in: Sequence[float] = (),
        will_retry_until: float | None = None,
    ) -> int:
        """One report per submission for ``pairs``; only for local senders, never for ``<>``.

        Returns the number of DSNs stored. A storage failure is logged, not raised: the
        message's fate does not change because its report could not be written.
        """
        by_base: dict[int, list[tuple[QueuedMessage, RecipientResult]]] = {}
        for m, r in pairs:
            by_base.setdefault(m.base_id, []).append((m, r))
        sent = 0
        for group in by_base.values():
            m0 = group[0][0]
            if not m0.mail_from or not m0.account:
                log.debug("dsn_skipped", msg_id=m0.id, null_sender=not m0.mail_from,
                          local_sender=bool(m0.account))
                continue
            if self.maildir_store is None:
                log.error("dsn_not_stored", msg_id=m0.id, error="no maildir store")
                continue
            recipients = [
                dsn.DSNRecipient(m.recipient, r.enhanced_code, r.code, r.remote_host, r.text,
                                 m.last_attempt)
                for m, r in group
            ]
            report = dsn.compose(
                hostname=cfg.static.hostname, mail_from=m0.mail_from, action=action,
                recipients=recipients, original=data, arrival=m0.queued, now=now,
                smtputf8=m0.smtputf8, original_message_id=m0.message_id, retry_in=retry_in,
                will_retry_until=will_retry_until,
            )
            try:
                await dsn.deliver(cfg, self.maildir_store, account=m0.account,
                                  mail_from=m0.mail_from, dsn=report)
            except StorageError as exc:
                log.error("dsn_not_stored", msg_id=m0.id, action=action, error=str(exc))
                continue
            sent += 1
            log.info("dsn_stored", msg_id=m0.id, action=action, account=m0.account,
                     recipients=[m.recipient for m, _ in group])
        return sent
