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


async def test_a_message_due_within_the_second_is_looked_at_on_time(tmp_path):
    async with running(make_config(tmp_path)) as q:
        [mid] = await add(q, "a@remote.example", hold=True)
        await q.store.update(Filter(ids=(mid,)), {"hold": 0, "next_attempt": q.clock.now() + 0.25})
        q.scheduler.kick()
        await scheduler_waiting(q)
        assert deadline(q) == q.clock.now() + 0.25 and SCRIPT.calls == []


async def test_a_due_time_already_past_that_nothing_took_is_looked_at_again_in_50_ms(tmp_path):
    """Should the database say something is due that no pick takes (it does not, with a
    consistent queue), the scheduler looks again shortly, neither at once (a busy loop) nor
    much later."""
    async with running(make_config(tmp_path)) as q:
        await scheduler_waiting(q)

        async def inconsistent(now, *args, **kw):
            return [], now - 5, True

        q.store.pick_and_next_due = inconsistent
        q.scheduler.kick()
        await scheduler_waiting(q)
        assert deadline(q) == q.clock.now() + 0.05


FAST = '[transports.fast]\nkind = "queue_scripted"\ndestination_concurrency = 3\n'


async def held(q, *rcpts: str) -> list[int]:
    return [(await add(q, r, hold=True))[0] for r in rcpts]


async def test_a_domain_taking_three_at_once_gets_them_in_two_passes(tmp_path):
    """The first pass takes one message (the domain's limit is not known before its route is
    resolved); the attempt learns it is 3 and asks for another pass, which takes the other two
    together, as the room the domain has left."""
    SCRIPT.gate = asyncio.Event()
    async with running(make_config(tmp_path, FAST, '[[routes]]\ntransport = "fast"\n')) as q:
        ids = await held(q, "a@one.example", "b@one.example", "c@one.example")
        await scheduler_waiting(q)
        passes = count_picks(q)
        await q.store.update(Filter(ids=tuple(ids)), {"hold": 0})
        q.scheduler.kick()
        await until(lambda: SCRIPT.active == 3)
        await scheduler_waiting(q)
        assert passes[0] == 2
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert sorted(c.recipients[0] for c in SCRIPT.calls) == ["a@one.example", "b@one.example", "c@one.example"]


async def test_a_message_whose_attempt_has_not_started_yet_is_not_picked_again(tmp_path):
    """Between its launch and the attempt marking its row in the database, a message is still
    due there: a pass in between (here: the attempt's own, for the domain's room) must not
    start it a second time."""
    async with running(make_config(tmp_path, FAST, '[[routes]]\ntransport = "fast"\n')) as q:
        start_attempt, release = q.store.start_attempt, asyncio.Event()

        async def slow_start_attempt(*args, **kw):
            await release.wait()
            return await start_attempt(*args, **kw)

        q.store.start_attempt = slow_start_attempt
        passes = count_picks(q)
        await add(q, "a@one.example")
        s = q.scheduler

        def second_pass_over() -> bool:  # the launch's pass, and the one the attempt asked for
            return passes[0] >= 2 and not s._wake.is_set() and any(ev is s._wake for _, ev in q.clock._waiters)

        await until(second_pass_over)
        assert len(s._inflight) == 1
        release.set()
        await q.scheduler.settle()
        assert [c.recipients[0] for c in SCRIPT.calls] == ["a@one.example"]
