"""The bookkeeping before and after delivery attempts (mox_core/queue/attempts.py): a group
commit that fails, a store that is not open, the checkpointer woken by attempt commits, and
the operations alone in transactions of their own (benchmarks, tools)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading

import pytest

from mox_core.queue import FakeClock, Queue
from tests.plugins.queue_helpers import MSG, cfg, queue_files  # noqa: F401 (fixtures)


async def opened(cfg) -> Queue:
    q = Queue(cfg, clock=FakeClock())
    q.store.inline_max = 0  # message files, to see when they go
    await q.open()
    return q


async def add(q: Queue, rcpt: str) -> int:
    [mid] = await q.add(account="alice", mail_from="alice@example.org", recipients=[rcpt], data=MSG)
    return mid


class _FailingCommit:
    """The store's connection, with every COMMIT failing (rolled back) as on a broken disk."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


async def in_one_commit(q: Queue, *coros):
    """Run the operations ``coros`` so that they share one group commit: the queue-db thread
    is kept busy until each has queued its operation."""
    busy = threading.Event()
    q.store._executor.submit(busy.wait, 10)
    tasks = [asyncio.create_task(c) for c in coros]
    for _ in range(3):
        await asyncio.sleep(0)
    busy.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_failing_group_commit_fails_every_operation_in_it(cfg):
    q = await opened(cfg)
    try:
        a, b = await add(q, "a@d1.example"), await add(q, "b@d2.example")
        real = q.store._db
        q.store._db = _FailingCommit(real)
        try:
            results = await in_one_commit(q, q.store.start_attempt([(a, 2000.0, 8)], 1000.0, {"text": "x"}),
                                          q.store.finish_attempt([b], []))
        finally:
            q.store._db = real
        assert [(type(r), str(r)) for r in results] == [(sqlite3.OperationalError, "disk I/O error")] * 2
        rows = {m.id: m for m in await q.list_messages()}
        assert sorted(rows) == [a, b] and rows[a].attempts == 0 and rows[a].results == []
        assert len(queue_files(cfg)) == 2  # b's file stays with its row
        assert q.store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
    finally:
        await q.close()


async def test_bookkeeping_on_a_store_that_is_not_open_fails_with_the_reason(cfg):
    q = await opened(cfg)
    real = q.store._db
    q.store._db = None
    try:
        with pytest.raises(RuntimeError, match="^queue store is not open$"):
            await q.store.finish_attempt([], [])
    finally:
        q.store._db = real
        await q.close()


async def test_an_attempt_commit_wakes_the_checkpointer(cfg, monkeypatch):
    q = await opened(cfg)
    try:
        mid = await add(q, "a@d1.example")
        wakes = []
        real_wake = q.store.checkpointer.wake
        monkeypatch.setattr(q.store.checkpointer, "wake", lambda: (wakes.append(1), real_wake()))
        await q.store.start_attempt([(mid, 2000.0, 8)], 1000.0, {"text": "delivering..."})
        assert wakes == [1]
        await q.store.finish_attempt([mid], [])
        assert wakes == [1, 1]
    finally:
        await q.close()


async def test_start_and_finish_alone_each_in_a_fsynced_transaction(cfg):
    q = await opened(cfg)
    statements: list[str] = []
    try:
        mid = await add(q, "a@d1.example")
        [file] = queue_files(cfg)
        q.store.db.set_trace_callback(statements.append)
        [row] = q.store._start_sync([(mid, 2000.0, 8)], 1000.0, {"text": "delivering..."})
        assert (row.id, row.attempts, row.last_attempt, row.next_attempt, row.max_attempts) == (mid, 1, 1000.0, 2000.0, 8)
        assert row.results == [{"text": "delivering..."}]
        q.store._finish_sync([], [(mid, {"text": "451 later"})])
        assert (await q.store.get(mid)).results == [{"text": "451 later"}]
        assert statements.count("COMMIT") == 2 and not any("synchronous=NORMAL" in s for s in statements)
        assert queue_files(cfg) == [file]
        q.store._finish_sync([mid], [])
        assert await q.list_messages() == [] and queue_files(cfg) == []
    finally:
        q.store.db.set_trace_callback(None)
        await q.close()


async def test_the_log_is_opened_for_its_fsync_read_only_and_close_on_exec(cfg, monkeypatch):
    q = await opened(cfg)
    try:
        mid = await add(q, "a@d1.example")
        await q.store.start_attempt([(mid, 2000.0, 8)], 1000.0, {"text": "delivering..."})
        opens: list[int] = []
        real_open = os.open

        def spying_open(path, flags, *args, **kw):
            if os.fspath(path).endswith("index.db-wal"):
                opens.append(flags)
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", spying_open)
        await q.store.finish_attempt([mid], [])  # a file goes: the log is fsynced first
        monkeypatch.undo()
        assert queue_files(cfg) == []
        assert [(f & os.O_ACCMODE, bool(f & os.O_CLOEXEC)) for f in opens] == [(os.O_RDONLY, True)]
    finally:
        await q.close()


@pytest.mark.parametrize("alone", [False, True])
async def test_a_segment_emptied_by_a_finished_attempt_is_recycled(cfg, alone):
    """Its messages delivered, a sealed segment's row goes and its file becomes a spare (or
    goes), in the group commit and alone."""
    from tests.test_queue_segments import fill, seg_dir
    from tests.test_queue_segments import opened as opened_with_small_segments

    q = await opened_with_small_segments(cfg)
    try:
        ids = await fill(q, range(1, 5))  # three fill the first segment, the fourth opens the second
        (first,), (second,) = q.store.db.execute("SELECT id FROM segment ORDER BY id").fetchall()
        if alone:
            q.store._finish_sync(ids[:3], [])
        else:
            await q.store.finish_attempt(ids[:3], [])
        assert q.store.db.execute("SELECT id FROM segment").fetchall() == [(second,)]
        assert [f for f in os.listdir(seg_dir(q)) if not f.startswith("spare-")] == [str(second)]
    finally:
        await q.close()
