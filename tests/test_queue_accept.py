"""Acceptance into the outgoing queue: rate limits in the queue's write transaction, group
commit, several processes adding to one queue, the lean header checks."""

from __future__ import annotations

import asyncio
import email.policy
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from email.parser import BytesHeaderParser

import pytest

from mox_core.builtin.rate_limiters import LimitSettings, MessagesPerDay, OutgoingLog
from mox_core.outgoing.ratelimit import RateLimitCheck, RateLimited
from mox_core.plugins.kinds import Submission
from mox_core.queue import FakeClock, Queue
from mox_core.queue.headers import header_summary as _header_summary
from mox_core.queue.headers import header_summary_quick as _header_summary_quick
from mox_core.smtpserver.fromheader import lean_from_address as _lean_from
from tests.conftest import ROOT
from tests.plugins.queue_helpers import MSG, make_config, queue_files

DAY = 86_400.0  # the limiters' window, written out (not the module's constant)


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path)


def stored(cfg) -> list[str]:
    """Every stored message: files under queue/msg/, and "db/<base_id>" for msg_data rows."""
    db = sqlite3.connect(cfg.data_dir / "queue" / "index.db")
    try:
        inline = [f"db/{b}" for (b,) in db.execute("SELECT base_id FROM msg_data")]
    finally:
        db.close()
    return sorted(queue_files(cfg) + inline)


def check(cfg, limit: int, *rcpts: str, account: str = "alice") -> RateLimitCheck:
    limiter = MessagesPerDay("m", LimitSettings(limit=limit), cfg.data_dir / "ratelimit" / "messages_per_day")
    sub = Submission(account, f"{account}@example.org", list(rcpts), id=uuid.uuid4().hex, time=time.time())
    return RateLimitCheck(sub, [("m", limiter)])


async def test_rate_limit_in_the_batch_refuses_and_removes_the_file(cfg):
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        async def one(i: int):
            r = f"r{i}@remote.example"
            return await q.add(account="alice", mail_from="alice@example.org", recipients=[r], data=MSG,
                               rate_limit=check(cfg, 10, r))

        results = await asyncio.gather(*(one(i) for i in range(30)), return_exceptions=True)
        ok = [r for r in results if isinstance(r, list)]
        refused = [r for r in results if isinstance(r, RateLimited)]
        assert len(ok) == 10 and len(refused) == 20, results
        assert refused[0].reply == ("451 4.7.1 max number of messages (10) over past 24h reached, "
                                    "try increasing per-account setting max_outgoing_messages_per_day")
        assert q.store.commits < 30  # batched
        rows = await q.list_messages()
        assert len(rows) == 10 and sorted(m.file for m in rows) == stored(cfg)
        assert os.listdir(cfg.data_dir / "queue" / "tmp") == []
        (n,) = q.store.db.execute("SELECT COUNT(*) FROM outgoing").fetchone()
        assert n == 10
    finally:
        await q.close()


async def test_small_message_is_in_the_index_until_its_last_row_goes(cfg):
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def trace(sql):
        if sql == "COMMIT" or sql.startswith("INSERT INTO msg_data"):
            events.append(sql.split("(")[0].strip())

    os.fsync = fsync
    q.store.db.set_trace_callback(trace)
    try:
        ids = await q.add(account="alice", mail_from="alice@example.org",
                          recipients=["a@remote.example", "b@remote.example"], data=MSG)
        events.append("add returned")
        # No file, no fsync from Python: the WAL commit of the batch makes it durable.
        assert [e for e in events if e.startswith("fsync")] == [] and queue_files(cfg) == []
        assert events[-3:] == ["INSERT INTO msg_data", "COMMIT", "add returned"], events
        rows = await q.list_messages()
        assert {m.file for m in rows} == {f"db/{ids[0]}"} == set(stored(cfg))
        assert await q.dump(ids[0]) == MSG
        assert await q.store.remove([ids[0]]) == 1
        assert stored(cfg) == [f"db/{ids[0]}"]  # the other recipient still needs it
        assert await q.store.remove([ids[1]]) == 1
        assert stored(cfg) == []
        big = MSG + b"x" * q.store.inline_max
        [bid] = await q.add(account="alice", mail_from="alice@example.org", recipients=["c@remote.example"],
                            data=big)
        [m] = await q.list_messages()
        assert not m.file.startswith("db/") and stored(cfg) == [m.file] and await q.dump(bid) == big
    finally:
        os.fsync = real_fsync
        q.store.db.set_trace_callback(None)
        await q.close()


async def test_failing_limiter_fails_only_its_submission(cfg):
    class Broken:
        def check(self, db, submission):
            raise RuntimeError("bug")

        def record(self, db, submission):
            pass

    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        good = check(cfg, 100, "a@remote.example")
        bad = RateLimitCheck(good.submission, [("broken", Broken())])
        results = await asyncio.gather(
            q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"], data=MSG,
                  rate_limit=good),
            q.add(account="alice", mail_from="alice@example.org", recipients=["b@remote.example"], data=MSG,
                  rate_limit=bad), return_exceptions=True)
        assert isinstance(results[0], list)
        assert getattr(results[1], "code", None) == 451
        assert (results[1].step, results[1].detail) == ("ratelimit", "RuntimeError('bug')")  # for the log
        [m] = await q.list_messages()
        assert m.recipient == "a@remote.example" and stored(cfg) == [m.file]
    finally:
        await q.close()


ADDER = """
import asyncio, json, sys, time, uuid
from pathlib import Path
from mox_core.builtin.rate_limiters import LimitSettings, MessagesPerDay
from mox_core.config.loader import load_config
from mox_core.plugins.kinds import Submission
from mox_core.queue import Queue
from mox_core.outgoing.ratelimit import RateLimitCheck, RateLimited
from tests.plugins.queue_helpers import MSG, make_host

cfg = load_config(sys.argv[1], make_host())
tag = sys.argv[2]
limiter = MessagesPerDay("m", LimitSettings(limit=50), cfg.data_dir / "ratelimit" / "messages_per_day")

async def main():
    q = Queue(cfg)
    await q.open(lock=False)  # as an smtp worker: no lock, no orphan cleanup
    while not Path(sys.argv[3]).exists():  # start together
        await asyncio.sleep(0.01)

    async def one(i):
        r = f"{tag}{i}@remote.example"
        sub = Submission("alice", "alice@example.org", [r], id=uuid.uuid4().hex, time=time.time())
        try:
            return await q.add(account="alice", mail_from="alice@example.org", recipients=[r], data=MSG,
                               hold=True, rate_limit=RateLimitCheck(sub, [("m", limiter)]))
        except RateLimited:
            return None

    results = []
    for k in range(8):
        results += await asyncio.gather(*(one(k * 5 + i) for i in range(5)))
    await q.close()
    print(json.dumps({"accepted": [ids for ids in results if ids]}))

asyncio.run(main())
"""


def test_processes_adding_to_one_queue_share_ids_and_limits(cfg, tmp_path):
    """Two processes adding (opened with lock=False) next to the one that runs the scheduler:
    80 submissions, a limit of 50 for the account: exactly 50 queued, distinct ids, one file
    per row."""
    script = tmp_path / "adder.py"
    script.write_text(textwrap.dedent(ADDER))
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    async def run():
        q = Queue(cfg)
        await q.start()
        try:
            procs = [subprocess.Popen([sys.executable, str(script), str(cfg.path), tag, str(go)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
                     for tag in ("p", "q")]
            await asyncio.sleep(0.5)
            go.write_text("")
            outs = []
            for p in procs:
                out, err = await asyncio.to_thread(p.communicate, timeout=60)
                assert p.returncode == 0, err
                outs.append(json.loads(out.splitlines()[-1]))
            return outs, await q.list_messages()
        finally:
            await q.close()

    outs, rows = asyncio.run(run())
    accepted = [ids for o in outs for ids in o["accepted"]]
    assert len(accepted) == 50
    ids = [i for ids in accepted for i in ids]
    assert len(set(ids)) == 50 and sorted(ids) == sorted(m.id for m in rows)
    assert sorted(m.file for m in rows) == stored(cfg)
    db = sqlite3.connect(cfg.data_dir / "queue" / "index.db")
    assert db.execute("SELECT COUNT(*) FROM outgoing").fetchone()[0] == 50
    assert db.execute("SELECT SUM(n) FROM outgoing_minute").fetchone()[0] == 50
    db.close()


def test_window_counts_match_the_records(tmp_path):
    """Bucketed counts against a direct count over random records (mox's daily-limit rules)."""
    db = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
    log = OutgoingLog()
    log.setup(db)
    rnd = random.Random(7)
    now = 1_800_000_000.0
    recipients = [f"r{i}@x.example" for i in range(40)]
    db.execute("BEGIN")
    for k in range(400):
        t = now - rnd.uniform(0, 3 * DAY)
        log.record(db, Submission("a", "a@example.org", rnd.sample(recipients, rnd.randint(1, 3)), id=f"s{k}", time=t))
    db.execute("COMMIT")
    for probe in [now, now - DAY / 2, now - 1.5 * DAY, now + 3600]:
        (direct,) = db.execute("SELECT COUNT(*) FROM outgoing WHERE account = 'a' AND submitted > ?",
                               (probe - DAY,)).fetchone()
        assert log.in_window(db, "a", probe) == direct
        new = ["r1@x.example", "new@x.example", "new@x.example"]
        expect = sum(1 for r in set(new) if db.execute(
            "SELECT 1 FROM outgoing WHERE account = 'a' AND recipient = ? AND submitted <= ?", (r, probe)).fetchone() is None)
        (in_window,) = db.execute(
            """SELECT COUNT(*) FROM (SELECT recipient, MIN(submitted) AS first FROM outgoing
                   WHERE account = 'a' AND submitted > ? GROUP BY recipient) w
               WHERE NOT EXISTS (SELECT 1 FROM outgoing o WHERE o.account = 'a'
                                 AND o.recipient = w.recipient AND o.submitted < w.first)""",
            (probe - DAY,)).fetchone()
        assert log.first_time_count(db, "a", new, probe) == expect + in_window
    db.close()


def test_records_of_earlier_versions_are_imported_once(tmp_path):
    legacy = tmp_path / "ratelimit" / "outgoing.db"
    legacy.parent.mkdir()
    old = sqlite3.connect(legacy)
    old.execute("CREATE TABLE outgoing (account TEXT NOT NULL, recipient TEXT NOT NULL, submitted REAL NOT NULL, "
                "submission TEXT NOT NULL, UNIQUE (submission, recipient))")
    now = time.time()
    old.executemany("INSERT INTO outgoing VALUES ('a', ?, ?, ?)",
                    [("x@r.example", now - 2 * DAY, "s1"), ("x@r.example", now - 60, "s2"), ("y@r.example", now - 30, "s3")])
    old.commit()
    old.close()
    db = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    OutgoingLog(legacy).setup(db)
    assert not legacy.exists() and legacy.with_name("outgoing.db.imported").exists()
    OutgoingLog(legacy).setup(db)  # nothing left to import: unchanged
    assert OutgoingLog.in_window(db, "a", now) == 2
    # y was first sent to in the window, x long before; z would be new.
    assert OutgoingLog.first_time_count(db, "a", ["x@r.example", "z@r.example"], now) == 1 + 1
    db.close()


def _parser_from(head: bytes) -> str | None:
    msg = BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\r\n")
    froms = msg.get_all("From") or []
    if len(froms) != 1:
        return None
    try:
        addrs = list(froms[0].addresses)
    except Exception:
        return None
    if len(addrs) != 1 or froms[0].defects or "@" not in (addrs[0].addr_spec or ""):
        return None
    return addrs[0].addr_spec


FROMS = [b"alice@example.org", b"Alice <alice@example.org>", b'"Alice A." <alice@example.org>',
         b"<alice+tag@example.org>", b"Alice\r\n <alice@example.org>", b"alice@example.org)<admin@example.org>",
         b"a..b@example.org", b"Alice <alice@example.org>, bob@example.org", b"(c) alice@example.org",
         b"=?utf-8?q?A?= <alice@example.org>", b"J. Smith <alice@example.org>", b'"A \\"q" <alice@example.org>',
         b"alice@[1.2.3.4]", b"", b"<>", b"alice", b"x <alice@example.org> y", b"\xc3\xa9 <alice@example.org>",
         b"g: alice@example.org;", b"alice @example.org", b"alice@example.org.", b'"a@b" <alice@example.org>']


@pytest.mark.parametrize("value", FROMS)
@pytest.mark.parametrize("before,after", [(b"", b""), (b"Subject: x\r\n", b"To: y\r\n"),
                                          (b"X: 1\r\n", b"FROM: other@example.org\r\n"),
                                          (b"Bad line\r\n", b""), (b" folded\r\n", b"")])
def test_lean_from_agrees_with_the_parser(value, before, after):
    head = before + b"From: " + value + b"\r\n" + after
    lean = _lean_from(head)
    assert lean is None or lean == _parser_from(head)


def test_lean_from_takes_the_common_forms():
    for v in FROMS[:5]:
        assert _lean_from(b"Subject: x\r\nFrom: " + v + b"\r\nTo: y\r\n") is not None


@pytest.mark.parametrize("head", [
    b"Subject: hello there\r\nMessage-ID: <m1@example.org>\r\n", b"Subject:  x  y  \r\n", b"X: 1\r\n",
    b"Message-Id: <a@b>\r\nSUBJECT: Hi\r\n", b"Subject: =?utf-8?q?h=C3=A9?=\r\n", b"Subject: a\r\n b\r\n",
    b"Message-ID: <a@b> (c)\r\n", b"Message-ID: <a b@c>\r\n", b"Message-ID: <>\r\n", b"Subject: x\r\nSubject: y\r\n",
    b'Message-ID: <"a"@b>\r\n', b"Subject: a; b, c: <d>\r\n", b"Message-ID: <a..b@c>\r\n", b"Bad line: x\r\nSubject: x\r\n",
    b"Subject: \xc3\xa9\r\n", b"Message-ID: <a@b@c>\r\n"])
def test_lean_header_summary_agrees_with_the_parser(head):
    quick = _header_summary_quick(head)
    msg = BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    try:
        slow = (str(msg.get("Message-ID", "") or "").strip(), str(msg.get("Subject", "") or "").strip())
    except Exception:
        slow = ("", "")
    assert quick is None or quick == slow
    assert _header_summary(head + b"\r\nbody") == slow
