"""What the scheduler (mox_core/queue/scheduler.py) hands a transport, and what it keeps track
of between attempts: the message and context as given, a small message read once, the
deliveries still running to a domain when another attempt there ends, a message whose file is
gone by its last attempt."""

from __future__ import annotations

import asyncio

from mox_core.plugins.kinds import DeliveryStatus, RecipientResult
from mox_core.queue import Filter
from tests.plugins.queue_helpers import (  # noqa: F401
    MSG,
    cfg,
    maildir_new,
    make_config,
    queue_files,
    read_mail,
    reset_script,
    running,
)
from tests.plugins.queue_scripted import SCRIPT, T


class _Recording:
    """A transport keeping what it is given; each recipient's delivery waits for its gate."""

    def __init__(self) -> None:
        self.given: list[tuple] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.running: set[str] = set()

    def gate(self, rcpt: str) -> asyncio.Event:
        return self.gates.setdefault(rcpt, asyncio.Event())

    async def deliver(self, message, ctx):
        self.given.append((message, ctx))
        first = message.recipients[0]
        self.running.add(first)
        try:
            await self.gate(first).wait()
        finally:
            self.running.discard(first)
        return [RecipientResult(r, DeliveryStatus.DELIVERED, 250, "2.0.0", "mx.example", "ok")
                for r in message.recipients]


async def until(pred) -> None:
    async with asyncio.timeout(10):
        while not pred():
            await asyncio.sleep(0.001)


async def waiting(q, t: _Recording) -> None:
    """As queue_helpers.scheduler_waiting, with the deliveries running in ``t``: the
    scheduler's pass is over and whatever it launched has reached the transport."""
    s = q.scheduler
    await until(lambda: not s._wake.is_set() and any(ev is s._wake for _, ev in q.clock._waiters)
                and len(s._inflight) == len(t.running))


async def test_the_transport_gets_the_message_and_the_attempts_context(cfg, monkeypatch):
    resolver = object()  # the configured DNS resolver, passed on as is
    t = _Recording()
    async with running(cfg, resolver=resolver) as q:
        monkeypatch.setattr(q.scheduler.transports, "get", lambda config, res: t)
        t.gate("a@remote.example").set()
        data = MSG + "é\r\n".encode()
        await q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"], data=data,
                    smtputf8=True)
        await q.scheduler.settle()
        [(message, ctx)] = t.given
        assert (message.mail_from, list(message.recipients), message.data, message.account, message.smtputf8,
                message.has_8bit) == ("alice@example.org", ["a@remote.example"], data, "alice", True, True)
        assert (ctx.transport_name, ctx.attempt, ctx.hostname) == ("", 0, cfg.static.hostname)
        assert ctx.config is cfg and ctx.resolver is resolver and ctx.sessions is q.scheduler.sessions


async def test_a_message_stored_in_the_index_is_not_read_a_second_time(cfg):
    async with running(cfg) as q:
        reads = []
        real_read = q.store.read_message

        async def read_message(rel):
            reads.append(rel)
            return await real_read(rel)

        q.store.read_message = read_message
        await q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"], data=MSG)
        await q.scheduler.settle()
        assert reads == [] and [c.data for c in SCRIPT.calls] == [MSG]


FAST = '[transports.fast]\nkind = "queue_scripted"\ndestination_concurrency = 3\n'


async def test_a_one_at_a_time_attempt_waits_for_every_delivery_still_running_to_its_domain(tmp_path, monkeypatch):
    t = _Recording()
    async with running(make_config(tmp_path, FAST, '[[routes]]\ntransport = "fast"\n')) as q:
        monkeypatch.setattr(q.scheduler.transports, "get", lambda config, res: t)
        for r in ("r1@one.example", "r2@one.example"):
            await q.add(account="alice", mail_from="alice@example.org", recipients=[r], data=MSG)
        await until(lambda: t.running == {"r1@one.example", "r2@one.example"})
        t.gate("r1@one.example").set()  # r1 ends, r2 goes on
        await until(lambda: t.running == {"r2@one.example"})
        await q.add(account="alice", mail_from="alice@example.org", recipients=["b@one.example"], data=MSG,
                    transport="backup")  # one delivery per domain: not while r2 runs
        await waiting(q, t)
        assert t.running == {"r2@one.example"} and len(t.given) == 2
        t.gate("r2@one.example").set()
        await until(lambda: t.running == {"b@one.example"})
        t.gate("b@one.example").set()
        await q.scheduler.settle()
        assert await q.list_messages() == []


async def test_a_message_whose_file_is_gone_fails_with_a_dsn_without_its_headers(cfg):
    SCRIPT.default = (T, 451, "4.3.0", "later")
    async with running(cfg) as q:
        q.store.inline_max = 0
        [mid] = await q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"],
                            data=MSG)
        await q.scheduler.settle()
        for iv in [450, 900, 1800, 3600, 7200, 14400]:
            q.clock.advance(iv)
            await q.scheduler.settle()
        [file] = queue_files(cfg)
        (cfg.data_dir / "queue" / "msg" / file).unlink()
        q.clock.advance(28800)
        await q.scheduler.settle()  # the 8th and last attempt: the message cannot be read
        assert await q.list_messages(Filter()) == [] and len(SCRIPT.calls) == 7
    delayed, failed = sorted(maildir_new(cfg, "alice"), key=lambda p: read_mail(p)["Subject"])
    parts = list(read_mail(failed).iter_parts())
    assert read_mail(failed)["Subject"] == "mail delivery failed"
    assert parts[1].get_payload()[1]["Diagnostic-Code"] is None
    assert parts[2].get_content_type() == "text/rfc822-headers" and parts[2].get_payload() == ""
