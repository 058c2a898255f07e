"""The bookkeeping before and after each delivery attempt (:class:`AttemptBookkeeping`, part of
:class:`mox_core.queue.queuestore.QueueStore`): ``start_attempt``, ``finish_attempt``, and
the group commit they share.

Each delivery used to cost two fsynced commits of its own (start, finish), one after another
in the single queue-db thread, which was then the bottleneck of outbound delivery.
Operations are queued; the thread runs every operation queued meanwhile in one transaction (a
savepoint each, so that one failing operation fails alone) and resumes each caller only after
that COMMIT returned.

These commits are not fsynced (``synchronous=NORMAL`` for that one COMMIT), as Postfix
neither fsyncs the deletion of a delivered queue file nor the time stamp of a deferred one:
losing bookkeeping in a crash can only repeat work (the message is tried again, a delivery
may be repeated), never lose a message, and the next fsynced commit (any add) makes every
earlier one durable, since the WAL is written in order. DSNs are stored durably before the
rows change (``Scheduler._record``). Before message files are unlinked after such a commit,
the log is fsynced (``_sync_wal``), so that no row outlives its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from mox_core.queue.checkpoint import CheckpointThread
from mox_core.queue.messagedata import delete_rows, is_file, read_stored, remove_unreferenced
from mox_core.queue.records import COLUMNS, QueuedMessage
from mox_core.queue.segments import Segments
from mox_core.queue.transaction import WriteTransaction, in_savepoint

__all__ = ["AttemptBookkeeping", "AttemptOp"]

log = structlog.get_logger(component="queue.store")

# (operation, its args, the caller's loop, the caller's future)
AttemptOp = tuple[Any, tuple[Any, ...], asyncio.AbstractEventLoop, asyncio.Future[Any]]


class AttemptBookkeeping:
    """Mixin of :class:`~mox_core.queue.queuestore.QueueStore`; its state (the operations
    waiting for the next group commit, ``attempt_commits``) is created in
    ``QueueStore.__init__``, with the connection, thread and lock it shares with adds."""

    # defined by QueueStore
    _db: sqlite3.Connection | None
    db: sqlite3.Connection
    db_path: Path
    msg_dir: Path
    segments: Segments
    checkpointer: CheckpointThread | None
    _executor: ThreadPoolExecutor
    _pending_lock: threading.Lock
    _attempt_ops: list[AttemptOp]
    _attempts_scheduled: bool
    attempt_commits: int

    async def start_attempt(
        self, plans: Sequence[tuple[int, float, int]], now: float, result: dict[str, Any]
    ) -> tuple[list[QueuedMessage], bytes | None]:
        """Before an attempt, in one transaction per row set: attempts+1, last_attempt=now,
        next_attempt from ``plans`` (id, next_attempt, max_attempts) and a "delivering..."
        result. Returns the rows still queued and not held, as updated, once committed, and
        the first row's message data when it is stored in the index, read in the same trip to
        the database thread (``None``: a message file, or no row; read it with
        :meth:`read_message`).

        Concurrent calls (and :meth:`finish_attempt` calls) share one transaction: see
        :meth:`_flush_attempts`."""
        out, _ = await self._attempt_op(self._start_rows_and_read, plans, now, result)
        return out

    async def finish_attempt(
        self, remove: Sequence[int], update: Sequence[tuple[int, dict[str, Any]]]
    ) -> None:
        """After an attempt, one transaction: delete ``remove`` rows, replace the last result
        of ``update`` rows. Message files no longer referenced are deleted afterwards."""
        await self._attempt_op(self._finish_rows, remove, update)

    async def _attempt_op(self, fn: Any, *args: Any) -> tuple[Any, set[tuple[int, str]]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._pending_lock:
            self._attempt_ops.append((fn, args, loop, fut))
            if not self._attempts_scheduled:
                self._attempts_scheduled = True
                self._executor.submit(self._flush_attempts)
        return await fut

    def _flush_attempts(self) -> None:
        """The group commit: every operation queued so far, in one transaction that is not
        fsynced (see the module's docstring); then the files they freed are removed."""
        with self._pending_lock:
            ops, self._attempt_ops = self._attempt_ops, []
            self._attempts_scheduled = False
        outcomes: list[tuple[bool, Any]] = []
        db = self._db
        try:
            if db is None:
                raise RuntimeError("queue store is not open")
            db.execute("PRAGMA synchronous=NORMAL")  # for this COMMIT only (see above)
            try:
                with WriteTransaction(db):
                    for fn, args, _, _ in ops:
                        outcomes.append(in_savepoint(db, fn, *args))
            finally:
                db.execute("PRAGMA synchronous=FULL")
        except BaseException as exc:
            log.error("queue_attempt_commit_failed", error=str(exc), operations=len(ops))
            outcomes = [(False, exc)] * len(ops)
        else:
            self.attempt_commits += 1
            if self.checkpointer is not None:
                self.checkpointer.wake()
            files: set[tuple[int, str]] = set()
            for ok, res in outcomes:
                if ok:
                    files |= res[1]
            try:
                if any(is_file(f) for _, f in files):
                    self._sync_wal()  # the deletions are on disk before any file goes
                remove_unreferenced(db, self.msg_dir, self.segments, files)
            except Exception:  # a file left behind is an orphan, removed at startup
                log.exception("queue_unlink_failed")
        for (_, _, loop, fut), (ok, res) in zip(ops, outcomes, strict=True):
            loop.call_soon_threadsafe(_settle, fut, ok, res)

    def _sync_wal(self) -> None:
        """Make commits made with ``synchronous=NORMAL`` durable: what SQLite's FULL does at
        COMMIT, an fsync of the write-ahead log (written in order, so it covers them all)."""
        fd = os.open(f"{self.db_path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the operations, each in its savepoint of the group commit --------------------------
    # Each returns (its result, the (base_id, file) of the rows it deleted).

    def _start_rows(
        self, plans: Sequence[tuple[int, float, int]], now: float, result: dict[str, Any]
    ) -> tuple[list[QueuedMessage], set[tuple[int, str]]]:
        out = []
        for mid, nxt, max_attempts in plans:
            row = self.db.execute(
                "UPDATE msg SET attempts = attempts + 1, last_attempt = ?, next_attempt = ?, "
                "max_attempts = ?, results = json_insert(results, '$[#]', json(?)) "
                f"WHERE id = ? AND hold = 0 RETURNING {COLUMNS}",
                (now, nxt, max_attempts, json.dumps(result), mid),
            ).fetchone()
            if row is not None:
                out.append(QueuedMessage.from_row(row))
        return out, set()

    def _start_rows_and_read(
        self, plans: Sequence[tuple[int, float, int]], now: float, result: dict[str, Any]
    ) -> tuple[tuple[list[QueuedMessage], bytes | None], set[tuple[int, str]]]:
        rows, files = self._start_rows(plans, now, result)
        data = None
        if rows and not is_file(rows[0].file):
            with contextlib.suppress(FileNotFoundError):  # read_message reports it
                data = read_stored(self.db, self.segments.dir, rows[0].file, rows[0].base_id)
        return (rows, data), files

    def _finish_rows(
        self, remove: Sequence[int], update: Sequence[tuple[int, dict[str, Any]]]
    ) -> tuple[None, set[tuple[int, str]]]:
        for mid, res in update:
            self.db.execute(
                "UPDATE msg SET results = json_set(results, '$[#-1]', json(?)) WHERE id = ?",
                (json.dumps(res), mid),
            )
        return None, delete_rows(self.db, remove)[1]

    # -- outside the group commit -----------------------------------------------------------

    def _start_sync(
        self, plans: Sequence[tuple[int, float, int]], now: float, result: dict[str, Any]
    ) -> list[QueuedMessage]:
        """:meth:`start_attempt` alone in its own transaction (benchmarks, tools)."""
        return self._alone(self._start_rows, plans, now, result)[0]

    def _finish_sync(self, remove: Sequence[int], update: Sequence[tuple[int, dict[str, Any]]]) -> None:
        """:meth:`finish_attempt` alone in its own transaction (benchmarks, tools)."""
        self._alone(self._finish_rows, remove, update)

    def _alone(self, fn: Any, *args: Any) -> Any:
        """One operation in a transaction of its own (fsynced), then its files removed."""
        db = self.db
        with WriteTransaction(db):
            out = fn(*args)
        remove_unreferenced(db, self.msg_dir, self.segments, out[1])
        return out


def _settle(fut: asyncio.Future[Any], ok: bool, res: Any) -> None:
    if fut.done():  # the caller was cancelled (shutdown); its operation is committed anyway
        return
    if ok:
        fut.set_result(res)
    else:
        fut.set_exception(res)
