"""The link between a worker and the main process (server/handoff.py): a worker's
submission is queued by the main process's queue, with its local copies and the account's
rate limits, and failed logins are counted across workers. Both ends run here, in one event
loop, over real socket pairs and a real queue; tests/test_smtp_workers.py has them in
``mox serve``."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from mox_core.accounts.sasl import AuthFailureLimiter
from mox_core.config.holder import ConfigHolder
from mox_core.outgoing.ratelimit import RateLimited, RateLimits
from mox_core.queue import FakeClock, Queue
from mox_core.server.handoff import MainLink, WorkerSubmissions
from mox_core.store import Delivery, StorageError
from tests.plugins.queue_helpers import MSG, make_config

LIMITED = """
[accounts.bob]
domain = "example.org"
max_outgoing_messages_per_day = 1
[accounts.bob.destinations."bob@example.org"]
"""


class Linked:
    """The main process's side and ``n`` workers' links to it."""

    def __init__(self, queue, ratelimits, auth_limiter=None):
        self.main = WorkerSubmissions(queue, ratelimits, auth_limiter or AuthFailureLimiter())
        self.links: list[MainLink] = []

    async def connect(self, n: int) -> list[MainLink]:
        for i in range(n):
            ours, theirs = socket.socketpair()
            self.main.attach(i, ours)
            link = MainLink(theirs)
            await link.start()
            self.links.append(link)
        return self.links

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        await self.main.close()


@pytest.fixture
async def queue(tmp_path):
    cfg = make_config(tmp_path, domains=LIMITED)
    q = Queue(ConfigHolder(cfg), clock=FakeClock())
    await q.open()
    yield q
    await q.close()


@pytest.fixture
async def linked(queue):
    pair = Linked(queue, RateLimits(ConfigHolder(queue.config)))
    yield pair
    await pair.close()


async def test_a_workers_submission_is_queued_with_its_local_copies(queue, linked, tmp_path):
    [link] = await linked.connect(1)
    root = tmp_path / "alice" / "Maildir"
    local = b"Subject: the local copy\r\n\r\nbody\r\n"
    deliveries = [Delivery(root, local, b"Delivered-To: alice@example.org\r\n"),
                  Delivery(root, local, b"", "Archive")]
    ids = await link.add(account="alice", mail_from="alice@example.org",
                         recipients=["a@remote.example", "b@remote.example"], data=MSG,
                         local_deliveries=deliveries, smtputf8=True,
                         rate_limit=link.prepare("alice", "alice@example.org", ["a@remote.example"], len(MSG)))
    rows = sorted(await queue.list_messages(), key=lambda m: m.id)
    assert [m.id for m in rows] == ids and len(ids) == 2
    assert [m.recipient for m in rows] == ["a@remote.example", "b@remote.example"]
    assert all(m.smtputf8 and m.account == "alice" for m in rows)
    assert await queue.dump(ids[0]) == MSG
    [inbox] = os.listdir(root / "new")
    assert (root / "new" / inbox).read_bytes() == b"Delivered-To: alice@example.org\r\n" + local
    [archived] = os.listdir(root / ".Archive" / "new")
    assert (root / ".Archive" / "new" / archived).read_bytes() == local


async def test_rate_limits_are_checked_by_the_main_process_for_all_workers(queue, linked):
    first, second = await linked.connect(2)

    async def submit(link: MainLink, to: str) -> list[int]:
        return await link.add(account="bob", mail_from="bob@example.org", recipients=[to], data=MSG,
                              rate_limit=link.prepare("bob", "bob@example.org", [to], len(MSG)))

    assert len(await submit(first, "x@remote.example")) == 1
    with pytest.raises(RateLimited) as refused:
        await submit(second, "y@remote.example")
    assert refused.value.reply == ("451 4.7.1 max number of messages (1) over past 24h reached, "
                                   "try increasing per-account setting max_outgoing_messages_per_day")
    assert refused.value.decision.setting == "max_outgoing_messages_per_day"
    assert [m.recipient for m in await queue.list_messages()] == ["x@remote.example"]


class FailingQueue:
    """A queue whose store cannot take the message (disk full), or that breaks."""

    def __init__(self, error: BaseException):
        self.error = error

    async def add(self, **kw):
        raise self.error


async def test_a_storage_error_in_the_main_process_is_the_workers_reply():
    pair = Linked(FailingQueue(StorageError(452, "4.3.1", "insufficient system storage")), None)
    try:
        [link] = await pair.connect(1)
        with pytest.raises(StorageError) as exc:
            await link.add(account="alice", mail_from="a@example.org", recipients=["r@remote.example"], data=MSG)
        assert exc.value.reply == "452 4.3.1 insufficient system storage"
        pair.main.queue = FailingQueue(RuntimeError("a bug"))  # still an answer: a temporary one
        with pytest.raises(StorageError) as exc:
            await link.add(account="alice", mail_from="a@example.org", recipients=["r@remote.example"], data=MSG)
        assert exc.value.code == 451
    finally:
        await pair.close()


class StuckQueue:
    def __init__(self):
        self.called = asyncio.Event()

    async def add(self, **kw):
        self.called.set()
        await asyncio.Event().wait()


async def test_a_link_that_ends_fails_waiting_and_later_submissions_with_451():
    stuck = StuckQueue()
    pair = Linked(stuck, None)
    try:
        [link] = await pair.connect(1)
        waiting = asyncio.create_task(
            link.add(account="alice", mail_from="a@example.org", recipients=["r@remote.example"], data=MSG))
        await stuck.called.wait()
        for task in pair.main._readers.values():  # the main process goes away
            task.cancel()
        with pytest.raises(StorageError) as exc:
            await asyncio.wait_for(waiting, 5)
        assert exc.value.reply == "451 4.3.0 outgoing queue not available, try again later"
        with pytest.raises(StorageError) as exc:
            await link.add(account="alice", mail_from="a@example.org", recipients=["r@remote.example"], data=MSG)
        assert exc.value.code == 451
    finally:
        for task in list(pair.main._adds):
            task.cancel()
        await pair.close()


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_failed_logins_are_counted_across_workers():
    main_limiter = AuthFailureLimiter(max_failures=4)
    pair = Linked(None, None, main_limiter)
    try:
        first, second = await pair.connect(2)
        ip = "192.0.2.7"
        for link in (first, second, first, second):  # two each: neither worker alone is at 4
            link.auth_limiter.failed(ip)
        await until(lambda: second.auth_limiter.blocked(ip) and first.auth_limiter.blocked(ip))
        assert len(first.auth_limiter._recent(ip)) == 2  # its own count: below the limit
        assert 0 < main_limiter.blocked_for(ip) <= 60
        assert not first.auth_limiter.blocked("192.0.2.8")  # other clients are not blocked
        # IPv6 clients count per /64, as in one process
        first.auth_limiter.failed("2001:db8::1")
        await until(lambda: main_limiter._recent("2001:db8::/64") is not None)
        second.auth_limiter.succeeded("2001:db8::2")  # a login of the same /64: forgotten
        await until(lambda: main_limiter._recent("2001:db8::/64") is None)
    finally:
        await pair.close()


async def test_a_login_without_failures_sends_nothing_to_the_main_process():
    main_limiter = AuthFailureLimiter(max_failures=4)
    pair = Linked(None, None, main_limiter)
    try:
        [link] = await pair.connect(1)
        sent = []
        link.send = sent.append
        link.auth_limiter.succeeded("192.0.2.9")
        assert sent == []
        link.auth_limiter.failed("192.0.2.9")
        link.auth_limiter.succeeded("192.0.2.9")
        assert [h["op"] for h in sent] == ["auth_failed", "auth_ok"]
    finally:
        await pair.close()
