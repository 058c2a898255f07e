"""Adding to the queue, the path behind the SMTP 250 reply (:class:`Adds`, part of
:class:`mox_core.queue.queuestore.QueueStore`): ``add()`` and the group commit of adds.

Concurrent ``add()`` calls queue up behind a running commit and are then written and
committed together by the queue-db thread (one directory fsync and one commit per batch):

0. row ids, from the store's reserved block (:mod:`mox_core.queue.ids`);
1. the message data (:mod:`mox_core.queue.messagedata` says where it goes): a large message's
   file is written into ``queue/tmp/``, fsynced, renamed into ``queue/msg/<id >> 13>/<id>``
   and that directory fsynced; mid-sized messages of a batch are written into a segment,
   whose ``fdatasync`` runs while the rows commit (:mod:`mox_core.queue.segments` has the
   crash cases); small ones go into the index with their rows;
2. one SQLite write transaction (:mod:`mox_core.queue.commit`): the submission's rate limits
   are checked, its rows (and a small message's data) inserted and its rate-limit counts
   written, the local Maildir copies of the same submission are committed, and only then is
   the transaction committed (WAL, ``synchronous=FULL``: the commit is on disk when it
   returns);
3. ``add()`` returns once its rows are committed and its data synced.

So a small message costs no fsync of its own: the commit of its batch makes it durable. A
failure at any step removes what that submission wrote and raises :class:`StorageError` (a
rate limiter's refusal: :class:`mox_core.outgoing.ratelimit.RateLimited`). A crash between a
file's rename and the commit leaves a message file no row refers to; ``QueueStore.open``
removes such orphans, so nothing half-written is ever delivered.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from mox_core.queue import segments
from mox_core.queue.checkpoint import CheckpointThread
from mox_core.queue.headers import header_summary
from mox_core.queue.ids import RowIds
from mox_core.queue.messagedata import FILES_PER_DIR_SHIFT, INLINE_PREFIX, delete_rows
from mox_core.queue.segments import SEGMENT_PREFIX, Segments
from mox_core.queue.transaction import WriteTransaction, sqlite_storage_error
from mox_core.store import Delivery, StorageError
from mox_core.store.maildir import fsync_dir, mkdir_durable, unlink_quiet, write_file

__all__ = ["Adds", "PendingAdd"]

log = structlog.get_logger(component="queue.store")


@dataclass
class PendingAdd:
    """One ``add()`` call on its way through the writer thread."""

    account: str | None
    mail_from: str
    recipients: Sequence[str]
    data: bytes
    local: Sequence[Delivery]
    smtputf8: bool
    hold: bool
    transport: str | None
    now: float
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future[list[int]]
    rate_limit: Any = None  # mox_core.outgoing.ratelimit.RateLimitCheck
    rel: str = ""  # file, relative to msg/
    state: int = 0  # 0 nothing on disk, 1 tmp written, 2 renamed into msg/
    local_paths: list[Path] = field(default_factory=list)
    error: Exception | None = None  # StorageError, or RateLimited
    ids: list[int] = field(default_factory=list)
    summary: tuple[str, str] = ("", "")  # Message-ID, Subject
    committed: bool = False
    placed: Any = None  # segments.Placed, when the data went into a segment


class Adds:
    """Mixin of :class:`~mox_core.queue.queuestore.QueueStore`. Its state (the adds waiting
    for the next batch, the size thresholds, the reserved row ids) is created in
    ``QueueStore.__init__``, with the connection, thread and lock it shares with the
    attempts' bookkeeping (why mixins: :mod:`mox_core.queue.queuestore`). The write
    transaction of a batch is :class:`mox_core.queue.commit.AddCommit`'s."""

    # defined by QueueStore (and AddCommit, AttemptBookkeeping)
    db: sqlite3.Connection
    msg_dir: Path
    tmp_dir: Path
    segments: Segments
    segment_min: int
    segment_batch_min: int
    inline_max: int
    checkpointer: CheckpointThread | None
    _ids: RowIds
    _executor: ThreadPoolExecutor
    _writers: ThreadPoolExecutor
    _pending: list[PendingAdd]
    _pending_lock: threading.Lock
    _flush_scheduled: bool
    _known_dirs: set[str]
    _limiters_ready: dict[int, object]
    _alone: Any
    _transaction: Any

    async def add(
        self, *, account: str | None, mail_from: str, recipients: Sequence[str], data: bytes,
        local_deliveries: Sequence[Delivery] = (), smtputf8: bool = False, hold: bool = False,
        transport: str | None = None, now: float | None = None, rate_limit: Any = None,
    ) -> list[int]:
        """Queue ``data`` for ``recipients``; return the row ids once all of it is durable.

        ``local_deliveries`` (Maildir copies for local recipients of the same submission) are
        committed in the same step: either both they and the queue rows are durable when this
        returns, or :class:`StorageError` is raised and neither is kept. ``recipients`` may
        be empty when there are local deliveries (a submission to local recipients only:
        then only the rate limits are checked and counted).

        ``rate_limit`` (a :class:`mox_core.outgoing.ratelimit.RateLimitCheck`) runs inside the write
        transaction that inserts the rows: a refusal raises
        :class:`mox_core.outgoing.ratelimit.RateLimited` and nothing is kept.
        """
        if not recipients and not local_deliveries:
            raise ValueError("queue add without recipients")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[int]] = loop.create_future()
        item = PendingAdd(account, mail_from, list(recipients), data, list(local_deliveries), smtputf8,
                    hold, transport, time.time() if now is None else now, loop, fut, rate_limit)
        with self._pending_lock:
            self._pending.append(item)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._executor.submit(self._flush)
        return await fut

    def _flush(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
            self._flush_scheduled = False
        try:
            self._commit_adds(batch)
        except BaseException as exc:  # a bug must not leave SMTP sessions waiting forever
            log.exception("queue_add_batch_crashed")
            for it in batch:
                if it.error is None and not it.committed:
                    it.error = StorageError.local_error(step="batch", detail=repr(exc))
                    it.ids = []
                    self._rollback(it)
        for it in batch:
            it.loop.call_soon_threadsafe(_resolve, it.fut, it.error, it.ids)

    def _commit_adds(self, batch: list[PendingAdd]) -> None:
        # 0. Ids, from this store's reserved block: the file is named after its
        # submission's base id (queue/msg/<id >> 13>/<id>), so one batch lands in one
        # directory, which then costs one directory fsync.
        try:
            self._ids.reserve(self.db, sum(len(it.recipients) for it in batch))
        except (sqlite3.Error, OSError) as exc:
            err = sqlite_storage_error(exc)
            log.error("queue_commit_failed", error=str(exc), code=err.code, messages=len(batch))
            for it in batch:
                it.error = err
            return
        files, mid_sized = self._assign(batch)
        syncs = []
        if len(mid_sized) >= self.segment_batch_min:
            syncs = self._place_in_segments(mid_sized)
        elif mid_sized:
            self.segments.prepare()
        # 1. Message files. Outside the SQLite write lock: other processes adding to this
        # queue meanwhile write their files too.
        self._write_files(files)
        # 2. One write transaction: per submission check its rate limits, insert its rows,
        # count it; then the local Maildir copies of the accepted ones; one commit.
        self._setup_rate_limits(batch)
        live = [it for it in batch if it.error is None]
        try:
            while live:
                retry = self._transaction(live)
                if retry is None:
                    break
                live = retry
        finally:  # even after a bug: nothing is acknowledged before its data's sync ended
            wait_futures([fut for _, fut in syncs])
        if syncs:
            self._settle_segment_syncs(syncs, mid_sized)
        try:
            self.segments.after_commit(self.db)
        except (sqlite3.Error, OSError) as exc:  # sealed by the next startup's cleanup
            log.warning("queue_segment_seal_failed", error=str(exc))
        if self.checkpointer is not None:
            self.checkpointer.wake()

    def _assign(self, batch: list[PendingAdd]) -> tuple[list[PendingAdd], list[PendingAdd]]:
        """Give each submission its ids, summary and place (``rel``): the ones that get a
        file of their own, and the mid-sized ones (candidates for a segment)."""
        files = []
        mid_sized = []
        for it in batch:
            if not it.recipients:
                continue
            it.ids = self._ids.take(len(it.recipients))
            it.summary = header_summary(it.data)
            if len(it.data) <= self.inline_max:
                it.rel = f"{INLINE_PREFIX}{it.ids[0]}"  # into msg_data, with its rows
                if len(it.data) > self.segment_min:
                    mid_sized.append(it)
                continue
            it.rel = f"{it.ids[0] >> FILES_PER_DIR_SHIFT}/{it.ids[0]}"
            files.append(it)
        return files, mid_sized

    def _write_files(self, files: list[PendingAdd]) -> None:
        """Write+fsync each in tmp/, rename into msg/<xx>/, fsync each directory once."""
        # Written and fsynced in parallel when there are several: the filesystem's journal
        # then commits their metadata together instead of once per file.
        if len(files) > 1:
            errors = list(self._writers.map(self._write_tmp, files))
        else:
            errors = [self._write_tmp(it) for it in files]
        dirs: dict[str, list[PendingAdd]] = {}
        for it, exc in zip(files, errors, strict=True):
            if exc is not None:
                self._fail(it, exc, "write")
                continue
            try:
                shard, _, name = it.rel.partition("/")
                shard_dir = str(self.msg_dir / shard)
                if shard_dir not in self._known_dirs:
                    mkdir_durable(shard_dir)
                    self._known_dirs.add(shard_dir)
                os.rename(self.tmp_dir / name, self.msg_dir / it.rel)
                it.state = 2
                dirs.setdefault(shard_dir, []).append(it)
            except OSError as exc:
                self._fail(it, exc, "write")
        for d, users in dirs.items():
            try:
                fsync_dir(d)
            except OSError as exc:
                for it in users:
                    if it.error is None:
                        self._fail(it, exc, "fsync_dir")

    def _write_tmp(self, it: PendingAdd) -> OSError | None:
        """Write and fsync ``tmp/<id>`` (in a writer pool thread, or this one)."""
        try:
            write_file(str(self.tmp_dir / it.rel.rpartition("/")[2]), b"", it.data)
        except OSError as exc:
            return exc
        it.state = 1
        return None

    def _setup_rate_limits(self, batch: list[PendingAdd]) -> None:
        """The rate limiters' tables (once per limiter and connection)."""
        live = [it for it in batch if it.error is None]
        for it in live:
            if it.rate_limit is not None:
                try:
                    it.rate_limit.setup(self.db, self._limiters_ready)
                except Exception as exc:
                    log.exception("ratelimit_setup_failed")
                    it.error = sqlite_storage_error(exc) if isinstance(exc, sqlite3.Error) else \
                        StorageError.local_error(step="ratelimit", detail=repr(exc))
                    self._rollback(it)

    def _place_in_segments(self, items: list[PendingAdd]) -> list[tuple[Any, Future[None]]]:
        """Write mid-sized messages into segments before their rows are inserted, and start
        the segments' fdatasync (in the writer threads, while the rows commit); those that
        cannot be placed stay in the index (``msg_data``)."""
        try:
            placed, written = self.segments.place(self.db, [it.data for it in items])
        except (sqlite3.Error, OSError) as exc:
            log.warning("queue_segment_place_failed", error=str(exc))
            return []
        for it, p in zip(items, placed, strict=True):
            if p is not None:
                it.rel = f"{SEGMENT_PREFIX}{it.ids[0]}"
                it.placed = p
        return [(act, self._writers.submit(Segments.sync, act)) for act in written]

    def _settle_segment_syncs(self, syncs: list[tuple[Any, Future[None]]], items: list[PendingAdd]) -> None:
        """Wait for the segments' fdatasync. When one failed, the committed messages in that
        segment are copied into the index (from memory) before they are acknowledged; if
        even that fails they are not acknowledged, and their rows go."""
        for act, fut in syncs:
            exc = fut.exception()
            if exc is None:
                continue
            self.segments.failed(act, exc)
            hit = [it for it in items if it.committed and it.placed is not None
                   and it.placed.segment == act.id]
            if hit:
                self._move_into_index(hit)

    def _move_into_index(self, items: list[PendingAdd]) -> None:
        db = self.db
        try:
            with WriteTransaction(db):
                for it in items:
                    segments.move_into_index(db, it.ids[0], it.data)
            return
        except (sqlite3.Error, OSError) as exc:
            err = sqlite_storage_error(exc)
            log.error("queue_commit_failed", error=str(exc), code=err.code, messages=len(items))
        try:  # else the next startup removes them (Segments.cleanup)
            self._alone(delete_rows, db, [i for it in items for i in it.ids])
        except (sqlite3.Error, OSError) as exc:
            log.error("queue_unacknowledged_rows_left", error=str(exc))
        for it in items:
            it.error, it.ids, it.committed = err, [], False
            self._rollback(it)

    def _fail(self, it: PendingAdd, exc: OSError, step: str) -> None:
        it.error = StorageError.from_oserror(exc, step)
        it.ids = []
        log.error("queue_write_failed", step=step, errno=exc.errno, error=str(exc),
                  code=it.error.code)
        self._rollback(it)

    def _rollback(self, it: PendingAdd) -> None:
        """Remove what this submission put on disk; fsync directories it was visible in."""
        name = it.rel.rpartition("/")[2]
        if it.state >= 2 and unlink_quiet(str(self.msg_dir / it.rel)):
            _fsync_quiet(str((self.msg_dir / it.rel).parent))
        if it.state >= 1:
            unlink_quiet(str(self.tmp_dir / name))
        it.state = 0
        newdirs = set()
        for p in it.local_paths:
            if unlink_quiet(str(p)):
                newdirs.add(str(p.parent))
        for d in newdirs:
            _fsync_quiet(d)
        it.local_paths = []


def _resolve(fut: asyncio.Future[list[int]], error: Exception | None, ids: list[int]) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(ids)


def _fsync_quiet(path: str) -> None:
    try:
        fsync_dir(path)
    except OSError:
        pass
