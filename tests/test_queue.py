"""The outgoing queue: durable add, scheduling, retries, batching, concurrency, crash safety."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mox_core.queue import FakeClock, Filter, Queue, QueueLocked, QueueStore, partition_of
from mox_core.queue.checkpoint import WAL_AUTOCHECKPOINT_PAGES, WAL_SIZE_LIMIT
from mox_core.queue.scheduler import remaining_schedule
from mox_core.store import Delivery, StorageError
from tests.conftest import ROOT
from tests.plugins.queue_helpers import (  # noqa: F401 (fixtures)
    MSG,
    cfg,
    count_picks,
    maildir_new,
    make_config,
    queue_files,
    reset_script,
    running,
    scheduler_waiting,
)
from tests.plugins.queue_scripted import SCRIPT, T

INTERVALS = [450, 900, 1800, 3600, 7200, 14400, 28800]


async def add(q: Queue, *rcpts: str, mail_from: str = "alice@example.org", account: str | None = "alice",
              data: bytes = MSG, **kw) -> list[int]:
    return await q.add(account=account, mail_from=mail_from, recipients=list(rcpts), data=data, **kw)


# --------------------------------------------------------------------------------------------
# storing


async def test_add_stores_one_row_per_recipient_and_one_file(cfg):
    q = Queue(cfg, clock=FakeClock())
    q.store.inline_max = 0  # a message file, not a msg_data row
    await q.open()
    try:
        ids = await add(q, "a@remote.example", "b@remote.example", "c@other.example")
        rows = await q.list_messages()
        assert sorted(m.id for m in rows) == ids
        assert {m.base_id for m in rows} == {ids[0]}
        assert {m.file for m in rows} == {rows[0].file}
        assert queue_files(cfg) == [rows[0].file]
        assert (cfg.data_dir / "queue" / "msg" / rows[0].file).read_bytes() == MSG
        m = next(m for m in rows if m.recipient == "c@other.example")
        assert m.recipient_domain == "other.example" and m.account == "alice"
        assert m.message_id == "<m1@example.org>" and m.subject == "hello there"
        assert m.size == len(MSG) and not m.has_8bit and not m.smtputf8
        assert m.attempts == 0 and m.next_attempt == m.queued == q.clock.now()
        assert q.store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert q.store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert (cfg.data_dir / "queue" / "index.db").exists()
    finally:
        await q.close()


async def test_add_durability_order(cfg, monkeypatch):
    """fsync(file) -> rename into msg/ -> fsync(dir) -> COMMIT, all before add() returns."""
    q = Queue(cfg, clock=FakeClock())
    q.store.inline_max = 0  # a message file, not a msg_data row
    await q.open()
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync_dir " if os.path.isdir(path) else "fsync_file ") + os.path.basename(path))
        return real_fsync(fd)

    def rename(a, b):
        events.append(f"rename {os.path.basename(a)}")
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    def trace(sql):
        if sql == "COMMIT":
            time.sleep(0.2)  # a slow commit: add() must still wait for it
            events.append(sql)

    q.store.db.set_trace_callback(trace)
    try:
        await add(q, "a@remote.example")
        events.append("add returned")
        [row] = await q.list_messages()
        name = row.file.split("/")[1]
        shard = row.file.split("/")[0]
        i_file = events.index(f"fsync_file {name}")
        i_rename = events.index(f"rename {name}")
        i_dir = events.index(f"fsync_dir {shard}")
        # (the first COMMIT of a fresh store reserves its block of row ids)
        i_commit = len(events) - 1 - events[::-1].index("COMMIT")
        assert i_file < i_rename < i_dir < i_commit < events.index("add returned"), events
    finally:
        q.store.db.set_trace_callback(None)
        await q.close()


async def test_add_fsync_error_is_452_and_leaves_nothing(cfg, monkeypatch, tmp_path):
    q = Queue(cfg, clock=FakeClock())
    q.store.inline_max = 0  # a message file, not a msg_data row
    await q.open()
    local = Delivery(tmp_path / "local" / "Maildir", MSG, b"Delivered-To: x@example.org\r\n")

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    try:
        with pytest.raises(StorageError) as exc:
            await add(q, "a@remote.example", local_deliveries=[local])
        assert exc.value.code == 452 and exc.value.enhanced_code == "4.3.1"
        monkeypatch.undo()
        assert await q.list_messages() == []
        assert queue_files(cfg) == [] and os.listdir(cfg.data_dir / "queue" / "tmp") == []
        assert not (tmp_path / "local" / "Maildir" / "new").exists() or \
            os.listdir(tmp_path / "local" / "Maildir" / "new") == []
        # the queue keeps working afterwards
        await add(q, "b@remote.example")
        assert len(await q.list_messages()) == 1
    finally:
        await q.close()


async def test_add_db_error_is_451_and_rolls_back_file_and_local_copies(cfg, monkeypatch, tmp_path):
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    root = tmp_path / "local" / "Maildir"
    local = Delivery(root, MSG, b"Delivered-To: x@example.org\r\n")

    def broken(item):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(q.store, "_insert_rows", broken)
    try:
        with pytest.raises(StorageError) as exc:
            await add(q, "a@remote.example", local_deliveries=[local])
        assert exc.value.code == 451 and exc.value.enhanced_code == "4.3.0"
        assert queue_files(cfg) == []
        assert not (root / "new").exists() or (os.listdir(root / "new") == [] and os.listdir(root / "tmp") == [])
        monkeypatch.undo()
        await add(q, "a@remote.example", local_deliveries=[local])
        assert len(os.listdir(root / "new")) == 1 and len(await q.list_messages()) == 1
    finally:
        await q.close()


class _FailingCommit:
    """The store's connection, with COMMIT failing as on a full disk."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.db.in_transaction and self.db.execute(
                "SELECT COUNT(*) FROM msg").fetchone()[0] > 0:
            self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


async def test_failed_commit_is_452_and_rolls_back_file_and_local_copies(cfg, tmp_path):
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    root = tmp_path / "local" / "Maildir"
    local = Delivery(root, MSG, b"Delivered-To: x@example.org\r\n")
    real = q.store._db
    q.store._db = _FailingCommit(real)
    try:
        results = await asyncio.gather(add(q, "a@remote.example", local_deliveries=[local]),
                                       add(q, "b@remote.example"), return_exceptions=True)
        assert all(isinstance(r, StorageError) and r.code == 452 for r in results), results
        q.store._db = real
        assert await q.list_messages() == [] and queue_files(cfg) == []
        assert os.listdir(root / "new") == [] and os.listdir(root / "tmp") == []
        await add(q, "a@remote.example", local_deliveries=[local])
        assert len(os.listdir(root / "new")) == 1 and len(await q.list_messages()) == 1
    finally:
        q.store._db = real
        await q.close()


async def test_local_deliveries_durable_with_the_queue_entry(cfg, tmp_path):
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        roots = [tmp_path / "u1" / "Maildir", tmp_path / "u2" / "Maildir"]
        await add(q, "a@remote.example", local_deliveries=[Delivery(r, MSG, b"X-Local: 1\r\n") for r in roots])
        for r in roots:
            [f] = os.listdir(r / "new")
            assert (r / "new" / f).read_bytes() == b"X-Local: 1\r\n" + MSG
    finally:
        await q.close()


async def test_concurrent_adds_are_group_committed(cfg):
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        results = await asyncio.gather(*(add(q, f"r{i}@remote.example") for i in range(30)))
        assert len({i for ids in results for i in ids}) == 30
        assert q.store.commits < 30
        assert len(await q.list_messages()) == 30
    finally:
        await q.close()


async def test_attempt_bookkeeping_is_not_fsynced_but_adds_and_file_removals_are(cfg, monkeypatch):
    """Before/after an attempt, rows change without an fsync (a crash repeats a delivery, as
    with Postfix); an add is fsynced (synchronous=FULL at its COMMIT); before a message file is
    unlinked, the write-ahead log holding its row's deletion is fsynced.

    The fsync of the log is seen at the system call's level (``os.fsync`` on the file
    ``index.db-wal``), not by replacing the method that does it."""
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    statements: list[str] = []
    # at each fsync of the log: the queue files present, and the COMMITs traced before it
    wal_syncs: list[tuple[list[str], int]] = []
    wal = os.path.realpath(cfg.data_dir / "queue" / "index.db-wal")
    real_fsync = os.fsync

    def spying_fsync(fd: int) -> None:
        real_fsync(fd)
        if os.path.realpath(f"/proc/self/fd/{fd}") == wal:
            wal_syncs.append((queue_files(cfg), statements.count("COMMIT")))

    monkeypatch.setattr(os, "fsync", spying_fsync)

    async def commit_level(coro):
        """The synchronous level in force at the COMMIT of ``coro``'s transaction."""
        statements.clear()
        await coro
        level, levels = "FULL", []
        for sql in statements:
            if sql.startswith("PRAGMA synchronous="):
                level = sql.split("=")[1]
            elif sql == "COMMIT":
                levels.append(level)
        assert q.store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
        [out] = levels
        return out

    try:
        q.store.db.set_trace_callback(statements.append)
        [small] = await add(q, "a@d1.example")
        assert await commit_level(add(q, "c@d3.example")) == "FULL"
        assert await commit_level(q.store.start_attempt([(small, 2000.0, 8)], 1000.0, {})) == "NORMAL"
        assert await commit_level(q.store.finish_attempt([], [(small, {"text": "451 later"})])) == "NORMAL"
        assert await commit_level(q.store.finish_attempt([small], [])) == "NORMAL"
        assert wal_syncs == []  # its data went with its row: no file, no fsync of the log
        q.store.inline_max = 0
        [large] = await add(q, "b@d2.example")
        [file] = queue_files(cfg)
        assert await commit_level(q.store.start_attempt([(large, 2000.0, 8)], 1000.0, {})) == "NORMAL"
        assert await commit_level(q.store.finish_attempt([large], [])) == "NORMAL"
        # the log fsynced after the COMMIT deleting the row, while the file was still there;
        # then the file went
        assert wal_syncs == [([file], 1)] and queue_files(cfg) == []
    finally:
        q.store.db.set_trace_callback(None)
        await q.close()


async def test_partitioned_stores_see_disjoint_shares_of_the_domains(cfg):
    """Two processes delivering from one queue (mox serve's workers) each pick, and wait for,
    only the domains of their partition; together they see every domain."""
    clock = FakeClock()
    q = Queue(cfg, clock=clock)
    await q.open()
    parts = [Queue(cfg, clock=clock, partition=(i, 2)) for i in range(2)]
    try:
        for p in parts:
            await p.open(lock=False)
        domains = {f"d{i}.example" for i in range(8)}
        for d in sorted(domains):
            await add(q, f"u@{d}")
        now = clock.now()
        seen = []
        for i, p in enumerate(parts):
            got = {b[0].recipient_domain for b in await p.store.pick(now, set(), 100)}
            assert got and all(partition_of(d, 2) == i for d in got)
            assert await p.store.next_due(got) is None  # nothing due outside its share
            assert await p.store.next_due(set()) is not None
            seen.append(got)
        assert seen[0] | seen[1] == domains and not seen[0] & seen[1]
    finally:
        for p in parts:
            await p.close()
        await q.close()


async def test_checkpoints_run_in_their_own_thread_not_in_the_writers(cfg):
    """The log is copied into the database file by the checkpoint thread's connection, woken
    by commits; the writer's own checkpoint (which an add would wait for) is only a backstop."""
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        store = q.store
        store.segment_min = store.inline_max  # in the index, not in segments: log to copy
        assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_AUTOCHECKPOINT_PAGES
        assert store.db.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_SIZE_LIMIT
        assert store.checkpointer is not None
        for i in range(20):  # 2 MB: far below the backstop of 16,384 pages
            await add(q, f"u{i}@d{i}.example", data=MSG + b"x" * 100_000 + b"\r\n")
        for _ in range(200):
            if store.checkpointer.count and store.checkpointer.last[1] > 400:
                break
            await asyncio.sleep(0.02)
        busy, frames, copied = store.checkpointer.last
        assert busy == 0 and frames > 400 and copied == frames  # all of it, by that thread
    finally:
        await q.close()
    assert q.store.checkpointer is None
    # a process that opens the queue without the lock (mox serve's workers) has none
    w = Queue(cfg, clock=FakeClock())
    await w.open(lock=False)
    try:
        assert w.store.checkpointer is None
    finally:
        await w.close()


async def test_start_attempt_brings_an_indexed_message_along(cfg):
    """The data of a message stored in the index comes back with the started rows (one trip
    to the database thread); a message file is left to read_message."""
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        [small] = await add(q, "a@d1.example")
        rows, data = await q.store.start_attempt([(small, 2000.0, 8)], 1000.0, {})
        assert [(r.id, r.attempts) for r in rows] == [(small, 1)] and data == MSG
        q.store.inline_max = 0
        [large] = await add(q, "b@d2.example")
        rows, data = await q.store.start_attempt([(large, 2000.0, 8)], 1000.0, {})
        assert [r.id for r in rows] == [large] and data is None
        assert await q.store.read_message(rows[0].file) == MSG
        await q.store.update(Filter(ids=(small,)), {"hold": 1})
        assert await q.store.start_attempt([(small, 3000.0, 8)], 1000.0, {}) == ([], None)
    finally:
        await q.close()


async def test_attempt_bookkeeping_of_concurrent_deliveries_is_group_committed(cfg):
    """start/finish_attempt calls queued while the queue-db thread is busy share one
    transaction, and no caller is resumed before that COMMIT returned."""
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    q.store.inline_max = 0  # message files, so that their removal can be seen
    events: list[str] = []

    def trace(sql):
        if sql == "COMMIT":
            time.sleep(0.1)  # a slow commit: nobody may go on before it is done
            events.append("COMMIT")

    async def together(calls):
        busy = threading.Event()
        q.store._executor.submit(busy.wait, 10)  # the queue-db thread is busy meanwhile
        tasks = [asyncio.create_task(c) for c in calls]
        for _ in range(3):
            await asyncio.sleep(0)  # every call has queued its operation
        before = q.store.attempt_commits
        events.clear()
        busy.set()
        out = await asyncio.gather(*tasks)
        assert q.store.attempt_commits == before + 1
        return out

    async def start(mid):
        rows, _ = await q.store.start_attempt([(mid, 2000.0, 8)], 1000.0, {"text": "delivering..."})
        events.append(f"returned {mid}")
        return rows

    async def finish(mid, remove):
        await q.store.finish_attempt([mid] if remove else [], [] if remove else [(mid, {"text": "451 later"})])
        events.append(f"returned {mid}")

    try:
        ids = [(await add(q, f"u{i}@d{i}.example"))[0] for i in range(5)]
        q.store.db.set_trace_callback(trace)
        rows = await together([start(m) for m in ids])
        assert events[0] == "COMMIT" and sorted(events[1:]) == sorted(f"returned {m}" for m in ids)
        assert [(r.id, r.attempts, r.next_attempt) for [r] in rows] == [(m, 1, 2000.0) for m in ids]
        await together([finish(m, remove=i < 3) for i, m in enumerate(ids)])
        assert events[0] == "COMMIT" and len(events) == 6
        left = await q.list_messages()
        assert sorted(m.id for m in left) == ids[3:]
        assert all(m.results[-1]["text"] == "451 later" for m in left)
        assert len(queue_files(cfg)) == 2  # the delivered ones' files are gone
    finally:
        q.store.db.set_trace_callback(None)
        await q.close()


async def test_orphans_are_removed_at_startup_and_referenced_files_kept(cfg):
    q = Queue(cfg, clock=FakeClock())
    q.store.inline_max = 0  # a message file, not a msg_data row
    await q.open()
    await add(q, "a@remote.example")
    [row] = await q.list_messages()
    await q.close()
    orphan = cfg.data_dir / "queue" / "msg" / "zz" / "123-orphan"
    orphan.parent.mkdir()
    orphan.write_bytes(b"not acknowledged")
    tmp = cfg.data_dir / "queue" / "tmp" / "half-written"
    tmp.write_bytes(b"partial")
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        assert not orphan.exists() and not tmp.exists()
        assert queue_files(cfg) == [row.file]
    finally:
        await q.close()


async def test_second_process_cannot_take_the_queue_lock(cfg):
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    other = QueueStore(cfg.data_dir)
    try:
        with pytest.raises(QueueLocked):
            await other.open()
    finally:
        await other.close()
        await q.close()


def _count_vm_steps(db: sqlite3.Connection, fn) -> int:
    steps = [0]

    def tick():
        steps[0] += 1
        return 0

    db.set_progress_handler(tick, 100)
    try:
        fn()
    finally:
        db.set_progress_handler(None, 0)
    return steps[0]


def _fill(db: sqlite3.Connection, n: int, domain: str, next_attempt: float, start_id: int) -> None:
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO msg (id, base_id, mail_from, recipient, recipient_domain, queued, next_attempt, "
        "size, file) VALUES (?,?,?,?,?,?,?,?,?)",
        ((i, i, "a@example.org", f"r{i}@{domain}", domain, 0, next_attempt, 10, "xx/none")
         for i in range(start_id, start_id + n)),
    )
    db.execute("COMMIT")


async def test_picking_does_not_slow_down_with_queue_size(cfg):
    """Picking reads the same few rows whether 1,000 or 100,000 messages wait for a busy domain."""
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    store = q.store
    try:
        plans = {r[3] for sql in (
            "SELECT domain FROM domain_due WHERE next_attempt <= 1 ORDER BY next_attempt LIMIT 5",
            "SELECT * FROM msg WHERE hold = 0 AND recipient_domain = 'x' AND next_attempt <= 1 "
            "ORDER BY next_attempt, id LIMIT 1",
            "SELECT * FROM msg WHERE base_id = 1 AND recipient_domain = 'x' AND hold = 0 "
            "AND next_attempt <= 1 AND id != 1 ORDER BY id",
        ) for r in store.db.execute("EXPLAIN QUERY PLAN " + sql)}
        assert not any(p.startswith("SCAN") for p in plans), plans

        _fill(store.db, 1000, "busy.example", 10.0, 1)
        _fill(store.db, 10, "free.example", 20.0, 5_000_000)
        small = _count_vm_steps(store.db, lambda: store._pick_sync(100.0, {"busy.example"}, 1))
        _fill(store.db, 100_000, "busy.example", 10.0, 2000)
        big_picked: list = []
        big = _count_vm_steps(store.db, lambda: big_picked.extend(
            store._pick_sync(100.0, {"busy.example"}, 1)))
        assert [b[0].recipient_domain for b in big_picked] == ["free.example"]
        assert big <= small * 2 + 5, (small, big)
        assert store._next_due_sync({"busy.example"}) == 20.0
        # One trip for a scheduler pass: the batches, then the next due time of the domains
        # that are neither busy nor just picked.
        batches, nxt, looked = await store.pick_and_next_due(100.0, {"busy.example"}, 5)
        assert [b[0].recipient_domain for b in batches] == ["free.example"]
        assert looked and nxt is None  # busy.example busy, free.example now in flight
        batches, nxt, looked = await store.pick_and_next_due(15.0, set(), 5)
        assert [b[0].recipient_domain for b in batches] == ["busy.example"]
        assert looked and nxt == 20.0  # free.example is due at 20
        batches, nxt, looked = await store.pick_and_next_due(100.0, set(), 1)
        assert len(batches) == 1 and not looked  # as many as asked: the scheduler is full
    finally:
        await q.close()


# --------------------------------------------------------------------------------------------
# scheduling and retries


async def test_retry_schedule_has_the_exact_mox_intervals(cfg):
    SCRIPT.default = (T, 451, "4.3.0", "try again later")
    async with running(cfg) as q:
        t0 = q.clock.now()
        await add(q, "bob@remote.example", mail_from="", account=None)
        await q.scheduler.settle()
        assert [c.time for c in SCRIPT.calls] == [t0]
        expected = [t0]
        for iv in INTERVALS:
            q.clock.advance(iv - 1)
            await q.scheduler.settle()
            assert len(SCRIPT.calls) == len(expected), "attempted before its time"
            q.clock.advance(1)
            await q.scheduler.settle()
            expected.append(expected[-1] + iv)
            assert [c.time for c in SCRIPT.calls] == expected
        assert [c.attempt for c in SCRIPT.calls] == list(range(8))
        # the 8th attempt failed temporarily: the message failed for good
        assert await q.list_messages() == []
        assert queue_files(q.config) == []
        assert expected[-1] - t0 == 15 * 3600 + 52.5 * 60


async def test_attempt_is_counted_and_rescheduled_before_the_transport_runs(cfg):
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        t0 = q.clock.now()
        await add(q, "bob@remote.example")
        for _ in range(100):
            if SCRIPT.active:
                break
            await asyncio.sleep(0.01)
        [m] = await q.list_messages()
        assert m.attempts == 1 and m.last_attempt == t0 and m.next_attempt == t0 + 450
        assert m.max_attempts == 8
        assert m.results[-1]["text"] == "delivering..." and m.results[-1]["pending"]
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert await q.list_messages() == []


async def test_4xx_then_success(cfg):
    SCRIPT.respond("bob@remote.example", (T, 451, "4.7.1", "greylisted"))
    async with running(cfg) as q:
        await add(q, "bob@remote.example")
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert m.attempts == 1
        assert m.results[-1] | {"start": 0, "duration": 0} == {
            "start": 0, "duration": 0, "success": False, "code": 451, "enhanced_code": "4.7.1",
            "remote_host": "mx.remote.example", "text": "greylisted", "permanent": False,
            "transport": "",
        }
        assert m.last_error == "greylisted"
        q.clock.advance(450)
        await q.scheduler.settle()
        assert len(SCRIPT.calls) == 2
        assert await q.list_messages() == [] and queue_files(q.config) == []
        assert maildir_new(q.config, "alice") == []  # no DSN for a delivered message


async def test_recipients_of_one_submission_to_one_domain_share_a_call(cfg):
    async with running(cfg) as q:
        await add(q, "a@remote.example", "b@remote.example", "c@other.example", "d@REMOTE.example")
        await add(q, "e@remote.example")  # another submission: its own transaction
        await q.scheduler.settle()
        calls = sorted(sorted(c.recipients) for c in SCRIPT.calls)
        assert calls == [["a@remote.example", "b@remote.example", "d@REMOTE.example"],
                         ["c@other.example"], ["e@remote.example"]]
        assert all(c.data == MSG for c in SCRIPT.calls)


async def test_batch_is_split_by_resolved_transport(tmp_path):
    cfg = make_config(tmp_path, domains='[[routes]]\nto_domain = ["remote.example"]\ntransport = "relay"\n')
    async with running(cfg) as q:
        # per-recipient transport override splits the batch
        ids = await add(q, "a@remote.example", "b@remote.example")
        await q.store.update(Filter(ids=(ids[1],)), {"transport": "backup"})
        await q.scheduler.settle()
        assert sorted((c.transport, c.recipients[0]) for c in SCRIPT.calls) == [
            ("backup", "b@remote.example"), ("relay", "a@remote.example")]


async def test_concurrency_limit_and_one_delivery_per_domain(tmp_path):
    cfg = make_config(tmp_path, "")
    SCRIPT.gate = asyncio.Event()
    async with running(cfg, concurrency=3) as q:
        for i in range(6):
            await add(q, f"u@d{i}.example")
        await add(q, "v@d0.example")  # same domain as an in-flight delivery
        await scheduler_waiting(q)
        assert SCRIPT.active == 3 and len(SCRIPT.calls) == 3
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert len(SCRIPT.calls) == 7 and SCRIPT.max_active == 3
        assert q.scheduler.max_inflight == 3
        # v@d0 never ran in parallel with u@d0
        order = [c.recipients[0] for c in SCRIPT.calls]
        assert order.index("v@d0.example") > order.index("u@d0.example")


async def test_one_inflight_delivery_per_domain(cfg):
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        await add(q, "a@remote.example")
        await add(q, "b@remote.example")
        await add(q, "c@other.example")
        await scheduler_waiting(q)
        assert sorted(c.recipients[0] for c in SCRIPT.calls) == ["a@remote.example", "c@other.example"]
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert len(SCRIPT.calls) == 3


async def test_adding_to_a_domain_at_its_limit_costs_no_scheduler_pass(cfg):
    """A message for a domain whose deliveries are all in flight waits for one of them to end
    (which wakes the scheduler): its add does not make the scheduler look in the database."""
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        passes = count_picks(q)
        await add(q, "a@remote.example")
        await scheduler_waiting(q)
        assert SCRIPT.active == 1
        before = passes[0]
        await add(q, "b@remote.example")  # remote.example takes one delivery at a time
        await scheduler_waiting(q)
        assert passes[0] == before
        await add(q, "c@other.example")
        await scheduler_waiting(q)
        assert passes[0] > before and SCRIPT.active == 2
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert sorted(SCRIPT.recipients_delivered()) == ["a@remote.example", "b@remote.example",
                                                         "c@other.example"]


async def _until(pred) -> None:
    for _ in range(300):
        if pred():
            return
        await asyncio.sleep(0.01)


FAST = '[transports.fast]\nkind = "queue_scripted"\ndestination_concurrency = 3\n'


async def test_transport_destination_concurrency_runs_several_deliveries_to_one_domain(tmp_path):
    cfg = make_config(tmp_path, FAST, '[[routes]]\ntransport = "fast"\n')
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        for i in range(5):
            await add(q, f"u{i}@one.example")
        await scheduler_waiting(q)
        assert SCRIPT.active == 3 and len(SCRIPT.calls) == 3
        assert sorted(c.recipients[0] for c in SCRIPT.calls) == [f"u{i}@one.example" for i in range(3)]
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert sorted(SCRIPT.recipients_delivered()) == [f"u{i}@one.example" for i in range(5)]
        assert SCRIPT.max_active == 3 and all(c.transport == "fast" for c in SCRIPT.calls)
        assert await q.list_messages() == [] and queue_files(q.config) == []


async def test_messages_queued_before_start_leave_in_parallel_to_one_domain(tmp_path):
    """A domain with nothing in flight is first picked one message at a time (its transport is
    not known before the route is resolved); once its first attempt knows the limit, the
    other queued messages start at once instead of one after the other."""
    cfg = make_config(tmp_path, FAST, '[[routes]]\ntransport = "fast"\n')
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        for i in range(5):
            await add(q, f"u{i}@one.example")
    finally:
        await q.close()
    SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        await scheduler_waiting(q)
        assert SCRIPT.active == 3 and len(SCRIPT.calls) == 3
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert sorted(SCRIPT.recipients_delivered()) == [f"u{i}@one.example" for i in range(5)]
        assert SCRIPT.max_active == 3


async def test_attempt_through_a_one_per_domain_transport_waits_for_the_domain(tmp_path):
    """A message routed through a transport allowing one delivery per domain does not start
    while others run to its domain; it is not counted as an attempt, and runs alone later."""
    cfg = make_config(tmp_path, FAST, '[[routes]]\ntransport = "fast"\n')
    first_gate = SCRIPT.gate = asyncio.Event()
    async with running(cfg) as q:
        await add(q, "r1@one.example")
        await add(q, "r2@one.example")
        [b] = await add(q, "b@one.example", transport="backup")  # backup: one per domain
        await add(q, "r4@one.example")
        await scheduler_waiting(q)
        assert sorted(c.recipients[0] for c in SCRIPT.calls) == ["r1@one.example", "r2@one.example"]
        assert (await q.store.get(b)).attempts == 0
        SCRIPT.gate = asyncio.Event()  # the next deliveries wait on a new gate
        first_gate.set()
        await _until(lambda: len(SCRIPT.calls) == 3 and SCRIPT.active == 1)
        await scheduler_waiting(q)
        assert SCRIPT.calls[2].recipients == ["b@one.example"] and SCRIPT.calls[2].transport == "backup"
        assert SCRIPT.active == 1 and len(SCRIPT.calls) == 3  # r4 waits for b
        SCRIPT.gate.set()
        await q.scheduler.settle()
        assert [c.recipients[0] for c in SCRIPT.calls][3:] == ["r4@one.example"]
        assert await q.list_messages() == []


async def test_transport_exception_is_a_temporary_failure(cfg):
    SCRIPT.raise_error = RuntimeError("boom")
    async with running(cfg) as q:
        await add(q, "a@remote.example")
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert m.attempts == 1 and "boom" in m.last_error
        assert not m.results[-1]["permanent"]


async def test_held_messages_are_not_attempted_until_released(cfg):
    async with running(cfg) as q:
        await add(q, "a@remote.example", hold=True)
        await add(q, "b@other.example")
        await q.scheduler.settle()
        assert [c.recipients for c in SCRIPT.calls] == [["b@other.example"]]
        q.clock.advance(86400)
        await q.scheduler.settle()
        assert len(SCRIPT.calls) == 1
        assert await q.set_hold(Filter(hold=True), False) == 1
        await q.scheduler.settle()
        assert SCRIPT.calls[-1].recipients == ["a@remote.example"]


async def test_kick_drop_fail_admin_operations(cfg):
    SCRIPT.default = (T, 421, "4.4.0", "down")
    async with running(cfg) as q:
        await add(q, "a@remote.example")
        await add(q, "b@other.example", mail_from="", account=None)
        await q.scheduler.settle()
        assert len(SCRIPT.calls) == 2
        assert await q.kick(Filter(to="a@")) == 1
        await q.scheduler.settle()
        assert len(SCRIPT.calls) == 3 and SCRIPT.calls[-1].recipients == ["a@remote.example"]
        assert await q.kick(Filter(to="a@"), transport="relay") == 1
        await q.scheduler.settle()
        assert SCRIPT.calls[-1].transport == "relay"
        [m] = await q.list_messages(Filter(transport="relay"))
        assert m.recipient == "a@remote.example"
        assert await q.drop(Filter(from_="@example.org")) == 1
        assert await q.fail(Filter()) == 1  # null sender: no DSN
        assert await q.list_messages() == [] and queue_files(q.config) == []
        assert maildir_new(q.config, "alice") == []


async def test_remaining_schedule():
    assert remaining_schedule(5, 8, INTERVALS) == [7200, 7200 + 14400, 7200 + 14400 + 28800]
    assert remaining_schedule(8, 8, INTERVALS) == []


# --------------------------------------------------------------------------------------------
# crash safety

CRASH_SCRIPT = """
import asyncio, sys
from mox_core.config.loader import load_config
from mox_core.queue import Queue
from tests.plugins.queue_helpers import MSG, make_host

cfg = load_config(sys.argv[1], make_host())

async def add_and_ack(q, rcpts):
    await q.add(account="alice", mail_from="alice@example.org", recipients=rcpts, data=MSG)
    print("ack", *rcpts, flush=True)  # acknowledged: as the SMTP server would answer 250

async def main():
    q = Queue(cfg, concurrency=2)
    await q.start()
    i = 0
    while True:
        batch = []
        for _ in range(5):
            batch.append(add_and_ack(q, [f"r{i}a@d{i % 4}.example", f"r{i}b@d{i % 4}.example"]))
            i += 1
        await asyncio.gather(*batch)
        await asyncio.sleep(0.01)

asyncio.run(main())
"""


def test_crash_mid_delivery_loses_nothing(tmp_path):
    cfg = make_config(tmp_path)
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_SCRIPT))
    block = tmp_path / "started"
    env = dict(os.environ, QUEUE_SCRIPTED_BLOCK_FILE=str(block), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(cfg.path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    acked: set[str] = set()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("ack "):
                acked.update(line.split()[1:])
            started = block.read_text().splitlines() if block.exists() else []
            if len(started) >= 2 and len(acked) >= 40:
                break
        else:
            pytest.fail("subprocess did not get going")
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=10)
    assert len(acked) >= 40, err
    started = [r for line in block.read_text().splitlines() for r in line.split()]
    assert started, "no delivery was in flight when killed"

    async def restart():
        # after the crash: a new scheduler on the same data dir, time past every backoff
        async with running(cfg, clock=FakeClock(time.time() + 86400)) as q:
            await q.scheduler.settle()
            assert await q.list_messages() == []
            assert queue_files(cfg) == []
        return set(SCRIPT.recipients_delivered())

    delivered = asyncio.run(restart())
    assert acked <= delivered, sorted(acked - delivered)
    assert set(started) <= delivered
