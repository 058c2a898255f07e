"""The delivery scheduler's parts (mox_core/queue/scheduler.py) one by one: the remaining
retry schedule past the interval list, a transport's own destination concurrency, the times of
a result, the DSNs of a batch (one per submission, skipped, failing), a domain at launch and the
room of a domain in flight."""

from __future__ import annotations

import asyncio
import email
import email.policy

import pytest

from mox_core.outgoing.routing import Resolution
from mox_core.plugins.kinds import DeliveryStatus, RecipientResult
from mox_core.queue import FakeClock
from mox_core.queue.scheduler import Scheduler, destination_concurrency, remaining_schedule
from tests.plugins.queue_helpers import MSG, cfg, maildir_new, make_config, read_mail, reset_script, running  # noqa: F401
from tests.plugins.queue_scripted import SCRIPT, P

INTERVALS = [450, 900, 1800, 3600, 7200, 14400, 28800]
BOB = '[accounts.bob]\ndomain = "example.org"\n[accounts.bob.destinations."bob@example.org"]\n'


def test_past_the_interval_list_the_last_interval_repeats():
    assert remaining_schedule(7, 10, INTERVALS) == [28800, 57600, 86400]
    assert remaining_schedule(1, 3, INTERVALS) == [450, 450 + 900]


class _Transport:
    def __init__(self, n):
        self.destination_concurrency = n


class _Cache:
    """A TransportCache giving ``transport`` for exactly this config and resolution."""

    def __init__(self, cfg, res, transport):
        self.cfg, self.res, self.transport = cfg, res, transport

    def get(self, cfg, res):
        assert (cfg, res) == (self.cfg, self.res)
        if isinstance(self.transport, Exception):
            raise self.transport
        return self.transport


@pytest.mark.parametrize("declared, limit", [
    (3, 3), (1, 1), (0, 1), (-2, 1), ("3", 1), (2.0, 1), (None, 1),
])
def test_a_transports_own_destination_concurrency(cfg, declared, limit):
    res = Resolution("fast", "route")  # no transport table entry: the transport's attribute counts
    transport = _Transport(declared) if declared is not None else object()
    assert destination_concurrency(cfg, res, _Cache(cfg, res, transport)) == limit


def test_a_transport_that_cannot_be_built_takes_one_delivery_per_domain(cfg):
    res = Resolution("broken", "route")
    assert destination_concurrency(cfg, res, _Cache(cfg, res, RuntimeError("no"))) == 1


async def test_a_result_records_when_the_attempt_started_and_how_long_it_took(cfg):
    SCRIPT.default = (DeliveryStatus.TEMPORARY, 451, "4.3.0", "later")
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        t0 = q.clock.now()
        await q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"], data=MSG)
        while not SCRIPT.active:
            await asyncio.sleep(0.001)
        q.clock.advance(12.3456)  # the delivery takes that long
        SCRIPT.gate.set()
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert (m.results[-1]["start"], m.results[-1]["duration"]) == (t0, 12.346)


async def test_the_scheduler_and_its_deliveries_are_named_tasks(cfg):
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        [mid] = await q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"],
                            data=MSG)
        while not SCRIPT.active:
            await asyncio.sleep(0.001)
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert {"queue-scheduler", f"queue-delivery-{mid}"} <= names
        SCRIPT.gate.set()
        await q.scheduler.settle()


async def test_a_domain_just_launched_takes_no_other_delivery_before_its_route_is_known(cfg):
    async with running(cfg) as q:
        await q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"], data=MSG,
                    hold=True)
        [row] = await q.list_messages()
        s = Scheduler(q.store, lambda: cfg, maildir_store=None, clock=FakeClock())
        SCRIPT.gate = asyncio.Event()
        s._launch([row])  # its task has not run yet: the transport's limit is not known
        assert s.busy_domains == {"remote.example"} and s._room() == {}
        SCRIPT.gate.set()
        await s.stop()


async def test_a_domain_in_flight_has_room_for_as_many_more_as_its_transport_allows(tmp_path):
    fast = '[transports.fast]\nkind = "queue_scripted"\ndestination_concurrency = 3\n'
    cfg = make_config(tmp_path, fast, '[[routes]]\ntransport = "fast"\n')
    async with running(cfg) as q:
        await q.scheduler.stop()  # the rows are this test's scheduler's alone
        rows = [(await queued(q, "alice", "alice@example.org", f"u{i}@remote.example", hold=False))[0]
                for i in range(3)]
        s = Scheduler(q.store, lambda: cfg, maildir_store=None, clock=q.clock)
        SCRIPT.gate = asyncio.Event()
        for n, row in enumerate(rows, 1):
            s._launch([row])
            async with asyncio.timeout(10):
                while SCRIPT.active < n:  # the attempt has learnt the transport's limit
                    await asyncio.sleep(0.001)
            assert s._room() == ({"remote.example": 3 - n} if n < 3 else {})
            assert s.busy_domains == (set() if n < 3 else {"remote.example"})
        SCRIPT.gate.set()
        await s.stop(grace=10)


def failed(m, text: str = "no such user") -> tuple:
    return m, RecipientResult(m.recipient, DeliveryStatus.PERMANENT, 550, "5.1.1", "mx.remote.example", text)


async def queued(q, account, mail_from, *rcpts, hold: bool = True, **kw):
    ids = await q.add(account=account, mail_from=mail_from, recipients=list(rcpts), data=MSG, hold=hold, **kw)
    rows = {m.id: m for m in await q.list_messages()}
    return [rows[i] for i in ids]


def dsn_recipients(path) -> list[str]:
    status = list(read_mail(path).iter_parts())[1]
    return sorted(b["Final-Recipient"] for b in status.get_payload()[1:])


async def test_one_dsn_per_submission_and_the_count_of_those_stored(tmp_path):
    cfg = make_config(tmp_path, domains=BOB)
    async with running(cfg) as q:
        first = await queued(q, "alice", "alice@example.org", "a@remote.example", "b@remote.example")
        second = await queued(q, "alice", "alice@example.org", "c@remote.example")
        pairs = [failed(first[0]), failed(second[0]), failed(first[1])]
        assert await q.scheduler.send_dsn(cfg, "failed", pairs, MSG, q.clock.now()) == 2
    got = sorted(dsn_recipients(p) for p in maildir_new(cfg, "alice"))
    assert got == [["rfc822; a@remote.example", "rfc822; b@remote.example"], ["rfc822; c@remote.example"]]


async def test_a_submission_without_a_dsn_does_not_stop_the_next(tmp_path):
    cfg = make_config(tmp_path, domains=BOB)
    async with running(cfg) as q:
        null = await queued(q, "alice", "", "a@remote.example")
        remote = await queued(q, None, "someone@elsewhere.example", "b@remote.example")
        local = await queued(q, "bob", "bob@example.org", "c@remote.example")
        pairs = [failed(null[0]), failed(remote[0]), failed(local[0])]
        assert await q.scheduler.send_dsn(cfg, "failed", pairs, MSG, q.clock.now()) == 1
    assert maildir_new(cfg, "alice") == [] and len(maildir_new(cfg, "bob")) == 1


async def test_a_dsn_that_cannot_be_stored_does_not_stop_the_next(tmp_path):
    cfg = make_config(tmp_path, domains=BOB)
    async with running(cfg) as q:
        alice = await queued(q, "alice", "alice@example.org", "a@remote.example")
        bob = await queued(q, "bob", "bob@example.org", "b@remote.example")
        blocked = cfg.data_dir / "accounts" / "alice"
        blocked.mkdir(parents=True, exist_ok=True)
        (blocked / "Maildir").write_text("not a directory")  # alice's DSN cannot be stored
        pairs = [failed(alice[0]), failed(bob[0])]
        assert await q.scheduler.send_dsn(cfg, "failed", pairs, MSG, q.clock.now()) == 1
    [path] = maildir_new(cfg, "bob")
    assert dsn_recipients(path) == ["rfc822; b@remote.example"]


async def test_the_dsn_of_an_smtputf8_submission_has_a_global_delivery_status(cfg):
    SCRIPT.default = (P, 550, "5.1.1", "no such user")
    async with running(cfg) as q:
        await q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"], data=MSG,
                    smtputf8=True)
        await q.scheduler.settle()
    [path] = maildir_new(cfg, "alice")
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert [p.get_content_type() for p in msg.iter_parts()][1:] == ["message/global-delivery-status",
                                                                    "message/global-headers"]
