"""When the delivery scheduler looks again by itself (mox_core/queue/scheduler.py, ``_loop``):
at the next message's time, at the latest within the hour, and not before a delivery ends when
every slot is taken. Read off the scheduler's wait on the fake clock, never a sleep."""

from __future__ import annotations

import asyncio
import math

from mox_core.queue import Filter
from tests.plugins.queue_helpers import (  # noqa: F401
    MSG,
    cfg,
    count_picks,
    make_config,
    reset_script,
    running,
    scheduler_waiting,
)
from tests.plugins.queue_scripted import SCRIPT, T

HOUR = 3600.0


def deadline(q) -> float:
    """When the scheduler, waiting, looks again by itself (inf: only when woken)."""
    [d] = [d for d, ev in q.clock._waiters if ev is q.scheduler._wake]
    return d


async def add(q, rcpt: str, **kw) -> list[int]:
    return await q.add(account="alice", mail_from="alice@example.org", recipients=[rcpt], data=MSG, **kw)


async def until(pred) -> None:
    async with asyncio.timeout(10):
        while not pred():
            await asyncio.sleep(0.001)


async def test_a_deferred_message_is_attempted_when_due_without_a_kick(cfg):
    SCRIPT.respond("a@remote.example", (T, 451, "4.3.0", "later"))
    async with running(cfg) as q:
        t0 = q.clock.now()
        await add(q, "a@remote.example")
        await q.scheduler.settle()
        await scheduler_waiting(q)
        assert len(SCRIPT.calls) == 1 and deadline(q) == t0 + 450
        q.clock.advance(449)
        q.scheduler.kick()  # a pass one second before: nothing to do yet, the same deadline
        await scheduler_waiting(q)
        assert len(SCRIPT.calls) == 1 and deadline(q) == t0 + 450
        q.clock.advance(1)  # no kick: the scheduler wakes by itself
        await until(lambda: len(SCRIPT.calls) == 2)
        await q.scheduler.settle()
        assert await q.list_messages() == []


async def test_an_idle_scheduler_looks_again_within_the_hour(cfg):
    async with running(cfg) as q:
        await q.scheduler.settle()
        await scheduler_waiting(q)
        assert deadline(q) == q.clock.now() + HOUR  # nothing queued: in case the clock jumped
        [mid] = await add(q, "a@remote.example", hold=True)
        await q.store.update(Filter(ids=(mid,)), {"hold": 0, "next_attempt": q.clock.now() + 2 * HOUR})
        await q.scheduler.settle()
        await scheduler_waiting(q)
        assert deadline(q) == q.clock.now() + HOUR  # due in two hours: it looks again in one
        q.clock.advance(HOUR)
        await scheduler_waiting(q)
        assert deadline(q) == q.clock.now() + HOUR and SCRIPT.calls == []


async def test_with_deliveries_in_flight_it_waits_for_the_next_due_or_for_them(tmp_path):
    SCRIPT.gate = asyncio.Event()
    async with running(make_config(tmp_path), concurrency=2) as q:
        await add(q, "a@one.example")
        await until(lambda: SCRIPT.active == 1)
        await scheduler_waiting(q)
        assert deadline(q) == q.clock.now() + HOUR  # a slot free, nothing else due
        [later] = await add(q, "b@two.example", hold=True)
        await q.store.update(Filter(ids=(later,)), {"hold": 0, "next_attempt": q.clock.now() + 60})
        q.scheduler.kick()
        await scheduler_waiting(q)
        assert deadline(q) == q.clock.now() + 60
        await add(q, "c@three.example")
        await until(lambda: SCRIPT.active == 2)
        await scheduler_waiting(q)
        assert deadline(q) == math.inf  # every slot taken: only a delivery's end wakes it
        passes = count_picks(q)
        q.scheduler.kick()  # and a pass then (after an add) has nothing to ask the database
        await scheduler_waiting(q)
        assert passes[0] == 0 and deadline(q) == math.inf
        SCRIPT.gate.set()
        await until(lambda: SCRIPT.active == 0)
        await scheduler_waiting(q)
        assert deadline(q) == q.clock.now() + 60
