"""One delivery attempt of the scheduler (mox_core/queue/scheduler.py) when something other
than the receiver fails: the message file, the transport (missing, not buildable, raising,
answering for too few recipients); what is counted; the delayed DSN's last retry; stopping
with and without grace."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from prometheus_client import REGISTRY

from mox_core.plugins.kinds import DeliveryStatus, RecipientResult
from mox_core.queue import Filter
from tests.plugins.queue_helpers import (  # noqa: F401
    MSG,
    cfg,
    maildir_new,
    queue_files,
    read_mail,
    reset_script,
    running,
)
from tests.plugins.queue_scripted import SCRIPT, P, T


async def add(q, *rcpts: str, **kw) -> list[int]:
    return await q.add(account="alice", mail_from="alice@example.org", recipients=list(rcpts), data=MSG, **kw)


def only_result(m) -> dict:
    r = dict(m.results[-1])
    del r["start"], r["duration"]
    return r


def temporary(text: str, transport: str = "") -> dict:
    return {"success": False, "code": None, "enhanced_code": None, "remote_host": None, "text": text,
            "permanent": False, "transport": transport}


async def test_an_unreadable_message_file_is_a_temporary_failure(cfg):
    async with running(cfg) as q:
        q.store.inline_max = 0
        [mid] = await add(q, "a@remote.example", hold=True)
        [file] = queue_files(cfg)
        (cfg.data_dir / "queue" / "msg" / file).unlink()
        await q.store.update(Filter(ids=(mid,)), {"hold": 0})
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert m.attempts == 1 and SCRIPT.calls == []
        assert only_result(m) == temporary("reading queued message: No such file or directory")


async def test_a_missing_transport_is_a_temporary_failure(cfg):
    async with running(cfg) as q:
        await add(q, "a@remote.example", transport="gone")
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert only_result(m) == temporary('cannot find transport "gone"', "gone") and SCRIPT.calls == []


async def test_a_transport_that_cannot_be_built_is_a_temporary_failure(cfg, monkeypatch):
    async with running(cfg) as q:
        def get(config, res):
            raise ValueError("bad settings")

        monkeypatch.setattr(q.scheduler.transports, "get", get)
        await add(q, "a@remote.example", transport="relay")
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert only_result(m) == temporary("transport 'relay' could not be set up: bad settings", "relay")


async def test_a_raising_transport_is_a_temporary_failure_with_the_exception(cfg):
    SCRIPT.raise_error = RuntimeError("boom")
    async with running(cfg) as q:
        await add(q, "a@remote.example")
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert only_result(m) == temporary("transport error: RuntimeError: boom")


class _Partial:
    """Answers only for the first recipient (in upper case), as a buggy transport might."""

    async def deliver(self, message, ctx):
        first = message.recipients[0]
        return [RecipientResult(first.upper(), DeliveryStatus.DELIVERED, 250, "2.0.0", "mx.remote.example", "ok")]


async def test_recipients_a_transport_gave_no_result_for_are_tried_again(cfg, monkeypatch):
    async with running(cfg) as q:
        monkeypatch.setattr(q.scheduler.transports, "get", lambda config, res: _Partial())
        await add(q, "a@remote.example", "b@remote.example")
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert m.recipient == "b@remote.example" and m.attempts == 1
        assert only_result(m) == temporary("transport gave no result")


def counted(transport: str, result: str) -> float:
    return REGISTRY.get_sample_value("mox_queue_deliveries_total", {"transport": transport, "result": result}) or 0.0


async def test_each_recipients_result_is_counted_under_its_transport(cfg):
    SCRIPT.respond("b@remote.example", (T, 451, "4.3.0", "later"))
    before = {k: counted(*k) for k in [("direct", "delivered"), ("direct", "temporary"), ("relay", "delivered")]}
    async with running(cfg) as q:
        await add(q, "a@remote.example", "b@remote.example")
        await add(q, "c@other.example", transport="relay")
        await q.scheduler.settle()
    assert {k: counted(*k) - v for k, v in before.items()} == {
        ("direct", "delivered"): 1.0, ("direct", "temporary"): 1.0, ("relay", "delivered"): 1.0}


async def test_the_delayed_dsn_says_until_when_it_is_tried(cfg):
    SCRIPT.default = (T, 451, "4.3.0", "mailbox busy")
    async with running(cfg) as q:
        await add(q, "bob@remote.example")
        await q.scheduler.settle()
        for iv in [450, 900, 1800, 3600]:
            q.clock.advance(iv)
            await q.scheduler.settle()
        fifth = q.clock.now()
    [path] = maildir_new(cfg, "alice")
    status = list(read_mail(path).iter_parts())[1].get_payload()
    last = format_datetime(datetime.fromtimestamp(fifth + 7200 + 14400 + 28800, UTC))
    assert status[1]["Action"] == "delayed" and status[1]["Will-Retry-Until"] == last


async def test_stopping_gives_running_deliveries_their_grace(cfg):
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        await add(q, "a@remote.example")
        async with asyncio.timeout(10):
            while not SCRIPT.active:
                await asyncio.sleep(0.001)
        SCRIPT.gate.set()  # it can end now: within the grace
        await q.scheduler.stop(grace=30)
        assert await q.list_messages() == []


async def test_stopping_without_grace_cancels_running_deliveries(cfg):
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        await add(q, "a@remote.example")
        async with asyncio.timeout(10):
            while not SCRIPT.active:
                await asyncio.sleep(0.001)
        await q.scheduler.stop()  # no grace: cancelled where it waits
        [m] = await q.list_messages()
        assert m.attempts == 1  # tried again after a restart; its result says what was going on:
        assert m.results == [{"start": q.clock.now(), "text": "delivering...", "transport": "", "pending": True}]


async def test_each_outcome_is_logged_with_the_message_recipient_and_reply(cfg):
    from structlog.testing import capture_logs

    SCRIPT.respond("b@remote.example", (T, 451, "4.3.0", "later", "mx2.remote.example"))
    SCRIPT.respond("c@remote.example", (P, 550, "5.1.1", "no such user"))
    with capture_logs() as logs:
        async with running(cfg) as q:
            ids = await add(q, "a@remote.example", "b@remote.example", "c@remote.example", transport="relay")
            await q.scheduler.settle()
    keys = ("event", "msg_id", "recipient", "transport", "attempt", "code", "enhanced_code", "remote_host", "text")
    got = [tuple(e.get(k) for k in keys) for e in logs if e["event"].startswith("delivery_") and "msg_id" in e]
    assert got == [
        ("delivery_delivered", ids[0], "a@remote.example", "relay", 1, 250, "2.0.0", "mx.remote.example", "ok"),
        ("delivery_deferred", ids[1], "b@remote.example", "relay", 1, 451, "4.3.0", "mx2.remote.example", "later"),
        ("delivery_failed", ids[2], "c@remote.example", "relay", 1, 550, "5.1.1", "mx.remote.example",
         "no such user"),
    ]


async def test_settling_gives_up_when_a_delivery_never_ends(cfg):
    SCRIPT.gate = asyncio.Event()  # never set
    async with running(cfg) as q:
        await add(q, "a@remote.example")
        with pytest.raises(TimeoutError):
            await q.scheduler.settle(timeout=0.01)
        await q.scheduler.stop()


FAST = '[transports.fast]\nkind = "queue_scripted"\ndestination_concurrency = 3\n'


async def test_a_domain_waiting_for_a_one_at_a_time_transport_takes_nothing_else(tmp_path):
    """r1 runs through a transport allowing 3 at once; b, through one allowing one, must wait
    for r1 (postponed: the domain is blocked); r4 may not start meanwhile either."""
    from tests.plugins.queue_helpers import make_config, scheduler_waiting

    SCRIPT.gate = asyncio.Event()
    async with running(make_config(tmp_path, FAST, '[[routes]]\ntransport = "fast"\n')) as q:
        await add(q, "r1@one.example")
        await scheduler_waiting(q)
        [b] = await add(q, "b@one.example", transport="backup")
        await scheduler_waiting(q)
        await add(q, "r4@one.example")
        await scheduler_waiting(q)
        assert [c.recipients for c in SCRIPT.calls] == [["r1@one.example"]]
        assert (await q.store.get(b)).attempts == 0
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert [c.recipients[0] for c in SCRIPT.calls] == ["r1@one.example", "b@one.example", "r4@one.example"]


async def test_a_blocked_domain_takes_its_transports_concurrency_again_once_the_block_is_over(tmp_path):
    """The domain blocked for b (above) is blocked only until its deliveries are done: then
    three deliveries through the fast transport run at once again, not one at a time."""
    from tests.plugins.queue_helpers import make_config, scheduler_waiting

    SCRIPT.gate = asyncio.Event()
    async with running(make_config(tmp_path, FAST, '[[routes]]\ntransport = "fast"\n')) as q:
        await add(q, "r1@one.example")
        await scheduler_waiting(q)
        await add(q, "b@one.example", transport="backup")
        await scheduler_waiting(q)
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert [c.recipients[0] for c in SCRIPT.calls] == ["r1@one.example", "b@one.example"]
        assert SCRIPT.max_active == 1
        SCRIPT.gate = asyncio.Event()
        for i in range(3):
            await add(q, f"u{i}@one.example")
        async with asyncio.timeout(10):
            while SCRIPT.active < 3:
                await asyncio.sleep(0.001)
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert SCRIPT.max_active == 3 and len(SCRIPT.calls) == 5
        s = q.scheduler  # and nothing is kept for the domain once its deliveries are done
        assert (s._per_domain, s._allowed, s._blocked, s._running, s._inflight) == ({}, {}, set(), {}, {})


ROUTES = """
[[accounts.alice.routes]]
to_domain = ["account.example"]
transport = "relay"

[[routes]]
minimum_attempts = 2
transport = "backup"
"""


async def test_routes_see_the_sending_account_and_the_attempts_made(tmp_path):
    from tests.plugins.queue_helpers import make_config

    SCRIPT.default = (T, 451, "4.3.0", "later")
    async with running(make_config(tmp_path, domains=ROUTES)) as q:
        await add(q, "a@account.example")
        await add(q, "b@other.example")
        await q.scheduler.settle()
        for iv in [450, 900]:
            q.clock.advance(iv)
            await q.scheduler.settle()
        got = sorted((c.recipients[0], c.attempt, c.transport) for c in SCRIPT.calls)
        assert got == [("a@account.example", 0, "relay"), ("a@account.example", 1, "relay"),
                       ("a@account.example", 2, "relay"), ("b@other.example", 0, ""),
                       ("b@other.example", 1, ""), ("b@other.example", 2, "backup")]


class _Parallel:
    """The default transport, declaring that it takes three deliveries to a domain at once."""

    destination_concurrency = 3

    def __init__(self, scripted):
        self.scripted = scripted

    async def deliver(self, message, ctx):
        return await self.scripted.deliver(message, ctx)


async def test_the_default_transports_own_concurrency_lets_deliveries_to_a_domain_run_together(cfg, monkeypatch):
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        real_get = q.scheduler.transports.get
        monkeypatch.setattr(q.scheduler.transports, "get", lambda config, res: _Parallel(real_get(config, res)))
        for i in range(4):
            await add(q, f"u{i}@one.example")
        async with asyncio.timeout(10):
            while SCRIPT.active < 3:
                await asyncio.sleep(0.001)
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert SCRIPT.max_active == 3 and len(SCRIPT.calls) == 4


async def test_an_attempt_at_its_domains_limit_costs_no_extra_scheduler_pass(cfg):
    """The scheduler looks again after an attempt's route is resolved only when the domain may
    take more deliveries than the one running (one here)."""
    from tests.plugins.queue_helpers import count_picks, scheduler_waiting

    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        await scheduler_waiting(q)
        passes = count_picks(q)
        await add(q, "a@remote.example")
        await scheduler_waiting(q)
        assert SCRIPT.active == 1 and passes[0] == 1
        SCRIPT.gate.set()
        await q.scheduler.settle()
