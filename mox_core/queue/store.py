"""The queue's durable state: SQLite index (one row per recipient) plus the message data.

Why this shape (mox ``queue/``): a submission with N remote recipients is one stored message
and N rows sharing ``base_id``, so the body is stored once however many recipients it has,
and the scheduler can still retry, hold or fail each recipient on its own. A message of up to
``SEGMENT_MIN`` bytes is stored in the index itself (table ``msg_data``, ``msg.file`` =
``db/<base_id>``), one of up to ``INLINE_MAX`` bytes in a preallocated segment file
(``queue/seg/``, ``msg.file`` = ``seg/<base_id>``, see :mod:`mox_core.queue.segments`; in the
index while no segment is ready), larger ones in a file ``queue/msg/<id >> 13>/<id>``.

Durability of :meth:`QueueStore.add` (reliability.md A.5): a large message's file is written
into ``queue/tmp/``, fsynced, renamed into ``queue/msg/<id >> 13>/<id>`` and that directory
fsynced; then, in one SQLite write transaction (``BEGIN IMMEDIATE``), the submission's rate
limits are checked, its rows (and a small message's data) inserted and its rate-limit counts
written, the local Maildir copies of the same submission are committed, and only then is the
transaction committed (WAL, ``synchronous=FULL``: the commit is on disk when it returns). So
a small message costs no fsync of its own: the commit of its batch makes it durable. A failure
at any step removes what that submission wrote and raises :class:`StorageError` (a rate
limiter's refusal: :class:`mox_core.outgoing.ratelimit.RateLimited`). A crash between a file's rename
and the commit leaves a message file no row refers to; :meth:`QueueStore.open` removes such
orphans, so nothing half-written is ever delivered. ``msg_data`` rows go with the last row of
their message (trigger ``msg_data_ad``, same transaction). A mid-sized message's bytes are
written into its segment before the transaction and fdatasynced while it commits; ``add()``
returns after both (:mod:`mox_core.queue.segments` has the crash cases).

Picking due work must not slow down with queue size: ``domain_due`` keeps, per recipient
domain, the earliest ``next_attempt`` of its non-held rows (maintained by triggers from the
index ``(hold, recipient_domain, next_attempt)``), so finding the next due domains that are not
busy reads a handful of rows whatever the number of queued messages.

All SQLite work runs in one thread per process (one connection), and concurrent ``add()``
calls queue up behind a running commit and are then written and committed together (group
commit: one directory fsync and one commit per batch). The scheduler's bookkeeping before and
after each attempt is group-committed the same way, without an fsync of its own (a crash may
repeat a delivery, never lose a message: see ``_flush_attempts``). Several processes may add
to the same queue (stores opened with ``lock=False``): row ids come from blocks each store
reserves in ``sqlite_sequence``, and rate limits are checked and counted under SQLite's write
lock, so the limits hold across processes. Orphan cleanup (``lock=True``) must run before
other processes start adding.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import errno
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import structlog

from mox_core.errors import MoxError
from mox_core.outgoing.routing import address_domain
from mox_core.queue import segments
from mox_core.queue.records import COLUMNS, SCHEMA, Filter, QueuedMessage
from mox_core.queue.segments import FREED_PREFIX, SEGMENT_BATCH_MIN, SEGMENT_MIN, SEGMENT_PREFIX, Segments
from mox_core.smtp.lines import only_crlf
from mox_core.store import Delivery, MaildirCache, StorageError, commit_batch
from mox_core.store.maildir import fsync_dir, mkdir_durable, unlink_quiet, write_file

__all__ = ["Filter", "QueueLocked", "QueueStore", "QueuedMessage", "partition_of", "recipient_domain"]

log = structlog.get_logger(component="queue.store")

# Message files per directory: 8192, as mox (queue/<id >> 13>/<id>).
FILES_PER_DIR_SHIFT = 13
# Row ids reserved at a time by a store that adds (see QueueStore._reserve_ids).
ID_BLOCK = 1024
# Threads writing and fsyncing the message files of one batch in parallel.
FILE_WRITERS = 4
# SQLite's own checkpoint runs in the committing connection, here the queue-db thread that
# every add waits on; it copies the log into the database file and fsyncs it (4 MB at its
# default of 1,000 pages: one stall per 40 messages of 100 KB). A thread with its own
# connection does it instead (CheckpointThread); the writers' own is kept as a backstop.
WAL_AUTOCHECKPOINT_PAGES = 16384
# After a burst, the log file is cut back to this size when it is next reset (it is reused
# from its start, not shrunk, otherwise).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
CHECKPOINT_INTERVAL = 0.25  # seconds at least between two checkpoints of the thread
# Messages up to this size are stored in the index (msg_data) or, above SEGMENT_MIN, in a
# segment, instead of a file: no file to create, and no directory fsync.
INLINE_MAX = 256 * 1024
INLINE_PREFIX = "db/"  # msg.file of a message stored in msg_data: "db/<base_id>"
# How often the checkpoint thread looks for segments to compact (segments.compact).
COMPACT_INTERVAL = 60.0


def _is_file(rel: str) -> bool:
    """Whether ``msg.file`` (or a freed segment) names a file, not data in the index."""
    return not rel.startswith((INLINE_PREFIX, SEGMENT_PREFIX))


class QueueLocked(MoxError):
    """Another process (a running ``mox serve``) holds the queue."""


recipient_domain = address_domain


def partition_of(domain: str, count: int) -> int:
    """Which of ``count`` delivering processes owns ``domain`` (stable across processes and
    restarts, unlike ``hash()``): all deliveries to a domain stay in one process, so its
    limit of deliveries in flight holds."""
    return zlib.crc32(domain.encode("utf-8", "surrogateescape")) % count


@dataclass
class _Add:
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


class CheckpointThread:
    """Copies the write-ahead log into the database file (``wal_checkpoint(PASSIVE)``) in a
    thread and connection of its own, woken after commits, at most every
    ``CHECKPOINT_INTERVAL`` seconds. A passive checkpoint never blocks a writer: adds go on
    appending to the log meanwhile."""

    def __init__(self, db_path: Path, segments: Segments | None = None) -> None:
        self.db_path = db_path
        self.segments = segments  # compacted from this thread (segments.compact)
        self.compacted = 0  # messages moved out of segments, for tests
        self.count = 0  # checkpoints run, for tests
        self.last: tuple[int, int, int] | None = None  # (busy, log frames, checkpointed)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="queue-checkpoint", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            db.execute("PRAGMA synchronous=FULL")  # a compaction is durable before files go
            next_compact = time.monotonic() + COMPACT_INTERVAL
            while True:
                woken = self._wake.wait(COMPACT_INTERVAL if self.segments is not None else None)
                if self._closing.is_set():
                    return
                self._wake.clear()
                if woken:
                    try:
                        self.last = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        self.count += 1
                    except sqlite3.Error as exc:  # the writers' own checkpoint still runs
                        log.warning("queue_checkpoint_failed", error=str(exc))
                if self.segments is not None and time.monotonic() >= next_compact:
                    next_compact = time.monotonic() + COMPACT_INTERVAL
                    self.compact(db)
                if self._closing.wait(CHECKPOINT_INTERVAL):
                    return
        finally:
            db.close()

    def compact(self, db: sqlite3.Connection) -> None:
        assert self.segments is not None
        try:
            self.compacted += segments.compact(self.segments.dir, db, self.segments.recycle, time.time())
        except (sqlite3.Error, OSError) as exc:  # tried again at the next interval
            log.warning("queue_segment_compaction_failed", error=str(exc))


class QueueStore:
    """``<data_dir>/queue/``: ``index.db``, ``msg/<id >> 13>/<id>`` message files, ``seg/``
    segments, ``tmp/``.

    Create, then ``await open()``. ``lock=True`` (the server) takes an exclusive lock on
    ``queue/lock`` so that a second server, or an offline ``mox queue`` command, cannot work
    on the same queue at the same time, and removes orphaned message files.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *,
                 partition: tuple[int, int] | None = None) -> None:
        self.dir = Path(data_dir) / "queue"
        # (index, count): picking and next_due see only the domains of this partition
        # (partition_of); None: every domain
        self.partition = partition
        self.msg_dir = self.dir / "msg"
        self.tmp_dir = self.dir / "tmp"
        self.segments = Segments(self.dir / "seg")
        self.segment_min = SEGMENT_MIN  # larger messages, up to inline_max, go into segments
        # ... when a batch has this many: a lone message is as fast in the index, with one
        # fsync, as in a segment, whose sync needs a second thread (queue_add.py: 0.91-1.17x)
        self.segment_batch_min = SEGMENT_BATCH_MIN
        self.db_path = self.dir / "index.db"
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="queue-db")
        self._writers = ThreadPoolExecutor(FILE_WRITERS, thread_name_prefix="queue-write")
        self.inline_max = INLINE_MAX
        self._pending: list[_Add] = []
        self._pending_lock = threading.Lock()
        self._flush_scheduled = False
        self._maildirs = MaildirCache()
        self._known_dirs: set[str] = set()
        self._lock_fd: int | None = None
        self.checkpointer: CheckpointThread | None = None
        self.commits = 0  # add() transactions, for tests of group commit
        self._attempt_ops: list[tuple[Any, tuple[Any, ...], asyncio.AbstractEventLoop, asyncio.Future[Any]]] = []
        self._attempts_scheduled = False
        self.attempt_commits = 0  # transactions of start/finish_attempt, for tests of group commit
        self._id_next = self._id_end = 0  # reserved row ids, see _reserve_ids
        self._limiters_ready: dict[int, object] = {}

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self, *, lock: bool = True, cleanup: bool = True) -> None:
        await self._run(self._open_sync, lock, cleanup)

    def _open_sync(self, lock: bool, cleanup: bool) -> None:
        for d in (self.dir.parent, self.dir, self.msg_dir, self.tmp_dir, self.segments.dir):
            mkdir_durable(str(d))
        if lock:
            self._take_lock()
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        db.create_function("mox_partition", 2, partition_of, deterministic=True)
        db.executescript(SCHEMA)
        db.executescript(segments.SCHEMA)
        self._db = db
        self._limiters_ready = {}
        if lock and cleanup:
            self._remove_orphans()
            self.segments.cleanup(db)
        if lock:  # one checkpointer (and compactor) for all the processes using this queue
            self.checkpointer = CheckpointThread(self.db_path, self.segments)

    def _take_lock(self) -> None:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QueueLocked(f"queue {self.dir} is in use by another process") from None
        self._lock_fd = fd

    def _remove_orphans(self) -> None:
        """Files a crash left behind: in tmp/, or in msg/ without a row (not acknowledged)."""
        assert self._db is not None
        referenced = {r[0] for r in self._db.execute("SELECT DISTINCT file FROM msg")}
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            removed += unlink_quiet(entry.path)
        for sub in os.scandir(self.msg_dir):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if f"{sub.name}/{entry.name}" not in referenced:
                    removed += unlink_quiet(entry.path)
        if removed:
            log.info("queue_orphans_removed", count=removed)

    async def close(self) -> None:
        await self._run(self._close_sync)
        self._executor.shutdown(wait=True)
        self._writers.shutdown(wait=True)

    def _close_sync(self) -> None:
        try:
            self.segments.close(self._db)
        except (sqlite3.Error, OSError) as exc:  # sealed by the next startup's cleanup
            log.warning("queue_segment_close_failed", error=str(exc))
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("queue store is not open")
        return self._db

    # -- add: the 250-after-DATA path -------------------------------------------------------

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
        item = _Add(account, mail_from, list(recipients), data, list(local_deliveries), smtputf8,
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

    def _reserve_ids(self, n: int) -> None:
        """Make sure ``n`` row ids are reserved for this store. Several processes may add to
        the same queue: each takes blocks of ids (``sqlite_sequence``, one small commit per
        block) and names its message files after them, without a lock held while writing."""
        if self._id_end - self._id_next >= n:
            return
        size = max(n, ID_BLOCK)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'msg'").fetchone()
            first = (row[0] if row else 0) + 1
            if row is None:
                db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('msg', ?)", (first + size - 1,))
            else:
                db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'msg'", (first + size - 1,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._id_next, self._id_end = first, first + size

    def _commit_adds(self, batch: list[_Add]) -> None:
        # 0. Ids, from this store's reserved block: the file is named after its
        # submission's base id (mox: queue/<id >> 13>/<id>), so one batch lands in one
        # directory, which then costs one directory fsync. Ids of a failed submission are
        # not used again (gaps are harmless).
        try:
            self._reserve_ids(sum(len(it.recipients) for it in batch))
        except (sqlite3.Error, OSError) as exc:
            err = _sqlite_storage_error(exc)
            log.error("queue_commit_failed", error=str(exc), code=err.code, messages=len(batch))
            for it in batch:
                it.error = err
            return
        # 1. Message files: write+fsync in tmp/, rename into msg/<xx>/, fsync each dir once.
        # Outside the SQLite write lock: other processes adding to this queue meanwhile
        # write their files too.
        files = []
        mid_sized = []
        for it in batch:
            if not it.recipients:
                continue
            it.ids = list(range(self._id_next, self._id_next + len(it.recipients)))
            self._id_next += len(it.recipients)
            it.summary = _header_summary(it.data)
            if len(it.data) <= self.inline_max:
                it.rel = f"{INLINE_PREFIX}{it.ids[0]}"  # into msg_data, with its rows
                if len(it.data) > self.segment_min:
                    mid_sized.append(it)
                continue
            it.rel = f"{it.ids[0] >> FILES_PER_DIR_SHIFT}/{it.ids[0]}"
            files.append(it)
        syncs = []
        if len(mid_sized) >= self.segment_batch_min:
            syncs = self._place_in_segments(mid_sized)
        elif mid_sized:
            self.segments.prepare()
        # Written and fsynced in parallel when there are several: the filesystem's journal
        # then commits their metadata together instead of once per file.
        if len(files) > 1:
            errors = list(self._writers.map(self._write_tmp, files))
        else:
            errors = [self._write_tmp(it) for it in files]
        dirs: dict[str, list[_Add]] = {}
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
        # 2. Rate limiters' tables (once per limiter and connection).
        live = [it for it in batch if it.error is None]
        for it in live:
            if it.rate_limit is not None:
                try:
                    it.rate_limit.setup(self.db, self._limiters_ready)
                except Exception as exc:
                    log.exception("ratelimit_setup_failed")
                    it.error = _sqlite_storage_error(exc) if isinstance(exc, sqlite3.Error) else \
                        StorageError.local_error(step="ratelimit", detail=repr(exc))
                    self._rollback(it)
        # 3. One write transaction: per submission check its rate limits, insert its rows,
        # count it; then the local Maildir copies of the accepted ones; one commit.
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

    def _place_in_segments(self, items: list[_Add]) -> list[tuple[Any, Future[None]]]:
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

    def _settle_segment_syncs(self, syncs: list[tuple[Any, Future[None]]], items: list[_Add]) -> None:
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

    def _move_into_index(self, items: list[_Add]) -> None:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            for it in items:
                segments.move_into_index(db, it.ids[0], it.data)
            db.execute("COMMIT")
            return
        except (sqlite3.Error, OSError) as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            err = _sqlite_storage_error(exc)
            log.error("queue_commit_failed", error=str(exc), code=err.code, messages=len(items))
        try:  # else the next startup removes them (Segments.cleanup)
            self._alone(self._delete, [i for it in items for i in it.ids])
        except (sqlite3.Error, OSError) as exc:
            log.error("queue_unacknowledged_rows_left", error=str(exc))
        for it in items:
            it.error, it.ids, it.committed = err, [], False
            self._rollback(it)

    def _write_tmp(self, it: _Add) -> OSError | None:
        """Write and fsync ``tmp/<id>`` (in a writer pool thread, or this one)."""
        try:
            write_file(str(self.tmp_dir / it.rel.rpartition("/")[2]), b"", it.data)
        except OSError as exc:
            return exc
        it.state = 1
        return None

    def _transaction(self, items: list[_Add]) -> list[_Add] | None:
        """Check, insert, record, deliver local copies, commit. Returns the items to try
        again in a new transaction (local copies failed for others), else None."""
        from mox_core.outgoing.ratelimit import RateLimited

        db = self.db
        accepted: list[_Add] = []
        try:
            db.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError) as exc:
            self._fail_all(items, exc)
            return None
        for it in items:
            db.execute("SAVEPOINT item")
            try:
                if it.rate_limit is not None:
                    it.rate_limit.check(db)
                if it.recipients:
                    self._insert_rows(it)
                if it.rate_limit is not None:
                    it.rate_limit.record(db)
                db.execute("RELEASE item")
                accepted.append(it)
                continue
            except RateLimited as exc:
                it.error = exc
            except (sqlite3.Error, OSError) as exc:
                if not db.in_transaction:  # SQLite rolled back the whole transaction
                    self._fail_all(items, exc)
                    return None
                it.error = _sqlite_storage_error(exc)
                log.error("queue_insert_failed", error=str(exc), code=it.error.code)
            except Exception as exc:  # a rate limiter's bug fails its submission only
                log.exception("ratelimit_failed")
                it.error = StorageError.local_error(step="ratelimit", detail=repr(exc))
            try:
                db.execute("ROLLBACK TO item")
                db.execute("RELEASE item")
            except sqlite3.Error as exc:
                self._fail_all(items, exc)
                return None
            it.ids = []
            self._rollback(it)
        todo = [it for it in accepted if it.local and not it.local_paths]
        if todo:
            results = commit_batch([it.local for it in todo], self._maildirs)
            failed = False
            for it, res in zip(todo, results, strict=True):
                if isinstance(res, StorageError):
                    it.error = res
                    failed = True
                else:
                    it.local_paths = res
            if failed:
                # Their rows and counts must go: start over without them (rare).
                db.execute("ROLLBACK")
                for it in todo:
                    if it.error is not None:
                        it.ids = []
                        self._rollback(it)
                return [it for it in accepted if it.error is None]
        if not accepted:
            db.execute("ROLLBACK")
            return None
        try:
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._fail_all(accepted, exc)
            return None
        self.commits += 1
        for it in accepted:
            it.committed = True
        return None

    def _fail_all(self, items: list[_Add], exc: BaseException) -> None:
        db = self.db
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        err = _sqlite_storage_error(exc)
        log.error("queue_commit_failed", error=str(exc), code=err.code, messages=len(items))
        for it in items:
            if it.error is None:
                it.error = err
                it.ids = []
                self._rollback(it)

    def _insert_rows(self, it: _Add) -> None:
        if it.rel.startswith(INLINE_PREFIX):
            self.db.execute("INSERT INTO msg_data(base_id, data) VALUES (?, ?)", (it.ids[0], it.data))
        elif it.rel.startswith(SEGMENT_PREFIX):
            p = it.placed
            self.db.execute("INSERT INTO msg_seg(base_id, segment, offset, length, crc) VALUES (?,?,?,?,?)",
                            (it.ids[0], p.segment, p.offset, p.length, p.crc))
        message_id, subject = it.summary
        has_8bit = not it.data.isascii()
        smtputf8 = it.smtputf8 or not it.mail_from.isascii() or any(
            not r.isascii() for r in it.recipients
        )
        self.db.executemany(
            "INSERT INTO msg (id, base_id, account, mail_from, recipient, recipient_domain, "
            "queued, next_attempt, hold, transport, size, has_8bit, smtputf8, message_id, "
            "subject, file) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(mid, it.ids[0], it.account, it.mail_from, rcpt, recipient_domain(rcpt),
              it.now, it.now, int(it.hold), it.transport, len(it.data), int(has_8bit),
              int(smtputf8), message_id, subject, it.rel)
             for mid, rcpt in zip(it.ids, it.recipients, strict=True)],
        )

    def _fail(self, it: _Add, exc: OSError, step: str) -> None:
        it.error = StorageError.from_oserror(exc, step)
        it.ids = []
        log.error("queue_write_failed", step=step, errno=exc.errno, error=str(exc),
                  code=it.error.code)
        self._rollback(it)

    def _rollback(self, it: _Add) -> None:
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

    # -- scheduler side ---------------------------------------------------------------------

    async def pick(self, now: float, busy: set[str], limit: int, room: dict[str, int] | None = None,
                   exclude: frozenset[int] | set[int] = frozenset()) -> list[list[QueuedMessage]]:
        """Up to ``limit`` batches of due, not held rows, one per domain not in ``busy``.

        A batch is the earliest due row of its domain plus every other due row of the same
        submission to that domain: candidates for one transaction. ``room`` gives domains that
        may have more than one batch (domain -> how many); rows in ``exclude`` (those being
        delivered) are never picked.
        """
        return await self._run(self._pick_sync, now, busy, limit, room, exclude)

    def _pick_sync(self, now: float, busy: set[str], limit: int, room: dict[str, int] | None = None,
                   exclude: frozenset[int] | set[int] = frozenset()) -> list[list[QueuedMessage]]:
        db = self.db
        room = room or {}
        part, args = self._partition_sql()
        domains = [
            d for (d,) in db.execute(
                f"SELECT domain FROM domain_due WHERE next_attempt <= ? AND {part} ORDER BY next_attempt LIMIT ?",
                (now, *args, limit + len(busy) + len(room)),
            ) if d not in busy
        ]
        out: list[list[QueuedMessage]] = []
        for d in domains:
            want = min(room.get(d, 1), limit - len(out))
            if want <= 0:
                break
            heads: list[QueuedMessage] = []
            bases: set[int] = set()
            for r in db.execute(
                f"SELECT {COLUMNS} FROM msg WHERE hold = 0 AND recipient_domain = ? "
                "AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ?", (d, now, want + len(exclude)),
            ):
                m = QueuedMessage.from_row(r)
                if m.id in exclude or m.base_id in bases:
                    continue
                heads.append(m)
                bases.add(m.base_id)
                if len(heads) == want:
                    break
            for head in heads:
                rest = [
                    QueuedMessage.from_row(r) for r in db.execute(
                        # INDEXED BY: without it SQLite walks every due row of the domain
                        # (msg_domain_due) and sorts; at 1M rows of one domain 244 ms vs 24 us.
                        f"SELECT {COLUMNS} FROM msg INDEXED BY msg_base WHERE base_id = ? "
                        "AND recipient_domain = ? AND hold = 0 AND next_attempt <= ? AND id != ? ORDER BY id",
                        (head.base_id, d, now, head.id),
                    )
                ]
                out.append([head, *(m for m in rest if m.id not in exclude)])
        return out

    async def pick_and_next_due(
        self, now: float, busy: set[str], limit: int, room: dict[str, int] | None = None,
        exclude: frozenset[int] | set[int] = frozenset(),
    ) -> tuple[list[list[QueuedMessage]], float | None, bool]:
        """:meth:`pick`, then (when fewer than ``limit`` batches came back) :meth:`next_due`
        for the domains that will not be busy once these batches run, in one trip to the
        database thread: (batches, next due time, whether it was looked up)."""
        return await self._run(self._pick_and_next_due_sync, now, busy, limit, room, exclude)

    def _pick_and_next_due_sync(self, now: float, busy: set[str], limit: int,
                                room: dict[str, int] | None, exclude: frozenset[int] | set[int],
                                ) -> tuple[list[list[QueuedMessage]], float | None, bool]:
        batches = self._pick_sync(now, busy, limit, room, exclude)
        if len(batches) >= limit:
            return batches, None, False
        picked = {b[0].recipient_domain for b in batches}
        still_room = set(room or {}) - picked
        return batches, self._next_due_sync(set(busy) | picked | still_room), True

    async def next_due(self, busy: set[str]) -> float | None:
        """Earliest ``next_attempt`` of a non-held row whose domain is not busy."""
        return await self._run(self._next_due_sync, busy)

    def _partition_sql(self) -> tuple[str, tuple[int, ...]]:
        """The condition on ``domain_due.domain`` for this store's partition, and its args."""
        if self.partition is None:
            return "1", ()
        index, count = self.partition
        return "mox_partition(domain, ?) = ?", (count, index)

    def _next_due_sync(self, busy: set[str]) -> float | None:
        part, args = self._partition_sql()
        for d, t in self.db.execute(
            f"SELECT domain, next_attempt FROM domain_due WHERE {part} ORDER BY next_attempt LIMIT ?",
            (*args, len(busy) + 1),
        ):
            if d not in busy:
                return float(t)
        return None

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

    # Group commit of the attempts' bookkeeping. Each delivery used to cost two fsynced
    # commits of its own (start, finish), one after another in the single queue-db thread,
    # which was then the bottleneck of outbound delivery. Operations are queued; the thread
    # runs every operation queued meanwhile in one transaction (a savepoint each, so that one
    # failing operation fails alone) and resumes each caller only after that COMMIT returned.
    #
    # These commits are not fsynced (``synchronous=NORMAL`` for that one COMMIT), as Postfix
    # neither fsyncs the deletion of a delivered queue file nor the time stamp of a deferred
    # one: losing bookkeeping in a crash can only repeat work (the message is tried again, a
    # delivery may be repeated), never lose a message, and the next fsynced commit (any add)
    # makes every earlier one durable, since the WAL is written in order. DSNs are stored
    # durably before the rows change (Scheduler._record). Before message files are unlinked
    # after such a commit, the log is fsynced (``_sync_wal``), so that no row outlives its file.

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
        with self._pending_lock:
            ops, self._attempt_ops = self._attempt_ops, []
            self._attempts_scheduled = False
        outcomes: list[tuple[bool, Any]] = []
        db = self._db
        try:
            if db is None:
                raise RuntimeError("queue store is not open")
            db.execute("PRAGMA synchronous=NORMAL")  # for this COMMIT only (see above)
            db.execute("BEGIN IMMEDIATE")
            try:
                for fn, args, _, _ in ops:
                    db.execute("SAVEPOINT attempt_op")
                    try:
                        outcomes.append((True, fn(*args)))
                    except Exception as exc:
                        db.execute("ROLLBACK TO attempt_op")
                        outcomes.append((False, exc))
                    db.execute("RELEASE attempt_op")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
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
                if any(_is_file(f) for _, f in files):
                    self._sync_wal()  # the deletions are on disk before any file goes
                self._remove_unreferenced(files)
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
        if rows and not _is_file(rows[0].file):
            with contextlib.suppress(FileNotFoundError):  # read_message reports it
                data = self._read_stored(rows[0].file, rows[0].base_id)
        return (rows, data), files

    def _finish_rows(
        self, remove: Sequence[int], update: Sequence[tuple[int, dict[str, Any]]]
    ) -> tuple[None, set[tuple[int, str]]]:
        for mid, res in update:
            self.db.execute(
                "UPDATE msg SET results = json_set(results, '$[#-1]', json(?)) WHERE id = ?",
                (json.dumps(res), mid),
            )
        return None, self._delete(remove)[1]

    def _start_sync(
        self, plans: Sequence[tuple[int, float, int]], now: float, result: dict[str, Any]
    ) -> list[QueuedMessage]:
        """:meth:`start_attempt` alone in its own transaction (benchmarks, tools)."""
        return self._alone(self._start_rows, plans, now, result)[0]

    def _finish_sync(self, remove: Sequence[int], update: Sequence[tuple[int, dict[str, Any]]]) -> None:
        """:meth:`finish_attempt` alone in its own transaction (benchmarks, tools)."""
        self._alone(self._finish_rows, remove, update)

    def _alone(self, fn: Any, *args: Any) -> Any:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(*args)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._remove_unreferenced(out[1])
        return out

    def _delete(self, ids: Sequence[int]) -> tuple[int, set[tuple[int, str]]]:
        """Delete rows; return how many existed, and the (base_id, file) they referred to."""
        n = 0
        files = set()
        for mid in ids:
            row = self.db.execute(
                "DELETE FROM msg WHERE id = ? RETURNING base_id, file", (mid,)
            ).fetchone()
            if row is not None:
                n += 1
                files.add((row[0], row[1]))
        if any(f.startswith(SEGMENT_PREFIX) for _, f in files):
            # segments emptied by this transaction: their files are recycled after it
            files |= {(sid, f"{FREED_PREFIX}{sid}") for (sid,) in self.db.execute(segments.FREE_SQL).fetchall()}
        return n, files

    def _remove_unreferenced(self, files: set[tuple[int, str]]) -> None:
        # All rows of a file share its base_id (indexed), so the check stays cheap.
        # No fsync: a file whose unlink is lost in a crash is an orphan, removed at startup.
        for base_id, f in files:
            if not _is_file(f):  # its msg_data/msg_seg row goes with its last msg row (trigger)
                continue
            if f.startswith(FREED_PREFIX):
                self.segments.recycle(base_id)
                continue
            if self.db.execute(
                "SELECT 1 FROM msg WHERE base_id = ? LIMIT 1", (base_id,)
            ).fetchone() is None:
                unlink_quiet(str(self.msg_dir / f))

    async def read_message(self, rel: str) -> bytes:
        """The message bytes (read in a worker thread; may be large)."""
        if not _is_file(rel):
            return await self._run(self._read_stored, rel, int(rel.partition("/")[2]))
        path = self.msg_dir / rel
        return await asyncio.to_thread(path.read_bytes)

    def _read_stored(self, rel: str, base_id: int) -> bytes:
        """Data in the index or a segment. A segment's message may have been moved into the
        index since its row was read (compaction): then it is read from there."""
        if rel.startswith(SEGMENT_PREFIX):
            data = segments.read(self.segments.dir, self.db, base_id)
            if data is not None:
                return data
        return self._read_inline(base_id)

    def _read_inline(self, base_id: int) -> bytes:
        row = self.db.execute("SELECT data FROM msg_data WHERE base_id = ?", (base_id,)).fetchone()
        if row is None:
            raise FileNotFoundError(f"queue message {INLINE_PREFIX}{base_id} not found")
        return bytes(row[0])

    # -- admin side -------------------------------------------------------------------------

    async def list_messages(self, flt: Filter, *, order: str = "next_attempt DESC, id DESC") -> list[QueuedMessage]:
        return await self._run(self._list_sync, flt, order)

    def _list_sync(self, flt: Filter, order: str) -> list[QueuedMessage]:
        where, args = flt.where()
        sql = f"SELECT {COLUMNS} FROM msg{where} ORDER BY {order}"
        if flt.limit:
            sql += " LIMIT ?"
            args.append(flt.limit)
        return [QueuedMessage.from_row(r) for r in self.db.execute(sql, args)]

    async def get(self, mid: int) -> QueuedMessage | None:
        rows = await self.list_messages(Filter(ids=(mid,)))
        return rows[0] if rows else None

    async def update(self, flt: Filter, assignments: dict[str, Any]) -> list[int]:
        """``UPDATE msg SET <assignments> <filter>``; returns the ids changed."""
        return await self._run(self._update_sync, flt, assignments)

    def _update_sync(self, flt: Filter, assignments: dict[str, Any]) -> list[int]:
        allowed = {"next_attempt", "hold", "transport"}
        if not set(assignments) <= allowed:
            raise ValueError(f"cannot set {sorted(set(assignments) - allowed)}")
        where, args = flt.where()
        if flt.limit:
            where = f" WHERE id IN (SELECT id FROM msg{where} ORDER BY next_attempt DESC LIMIT ?)"
            args.append(flt.limit)
        sets = ", ".join(f"{k} = ?" for k in assignments)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            ids = [r[0] for r in db.execute(
                f"UPDATE msg SET {sets}{where} RETURNING id", [*assignments.values(), *args]
            )]
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return ids

    async def remove(self, ids: Sequence[int]) -> int:
        """Delete rows (drop, or after an admin fail); returns how many existed."""
        return await self._run(self._remove_sync, ids)

    def _remove_sync(self, ids: Sequence[int]) -> int:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            n, files = self._delete(ids)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._remove_unreferenced(files)
        return n

    async def count(self) -> int:
        return await self._run(lambda: self.db.execute("SELECT COUNT(*) FROM msg").fetchone()[0])


# ------------------------------------------------------------------------------------------
# helpers


def _resolve(fut: asyncio.Future[list[int]], error: Exception | None, ids: list[int]) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(ids)


def _settle(fut: asyncio.Future[Any], ok: bool, res: Any) -> None:
    if fut.done():  # the caller was cancelled (shutdown); its operation is committed anyway
        return
    if ok:
        fut.set_result(res)
    else:
        fut.set_exception(res)


def _sqlite_storage_error(exc: BaseException) -> StorageError:
    """A failed commit: 452 when the disk is full, else 451 (reliability.md A.5 step 5)."""
    if isinstance(exc, OSError):
        return StorageError.from_oserror(exc, "commit")
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
        return StorageError.from_oserror(OSError(errno.ENOSPC, str(exc)), "commit")
    return StorageError.local_error(step="commit", detail=str(exc))


_MSGID = re.compile(rb"[ \t]*(<[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                    rb"@[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*>)[ \t]*")
_FIELD = re.compile(rb"([!-9;-~]+):")
_SUBJECT = re.compile(rb"[ \t]*([ -~]*?)[ \t]*")


def _header_summary(data: bytes) -> tuple[str, str]:
    """Message-ID and Subject for listings and DSN References; parse the header only."""
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2] if end >= 0 else data[:65536]
    quick = _header_summary_quick(head)
    if quick is not None:
        return quick
    try:
        msg = BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        mid = str(msg.get("Message-ID", "") or "").strip()
        subject = str(msg.get("Subject", "") or "").strip()
    except Exception:  # a broken header must not fail the submission
        return "", ""
    return mid[:998], subject[:200]


def _header_summary_quick(head: bytes) -> tuple[str, str] | None:
    """The common case without the email parser: one-line ``Message-ID: <x>`` and plain
    ASCII ``Subject``, at most one of each, CRLF lines. None: let the parser decide."""
    if not only_crlf(head):
        return None
    mid = subject = None
    last = b""
    for line in head.split(b"\r\n"):
        if not line:
            break
        if line[0] in b" \t":
            if last in (b"message-id", b"subject"):
                return None  # folded: the parser unfolds
            continue
        m = _FIELD.match(line)
        if m is None:
            return None  # the parser would end the header here
        last = m.group(1).lower()
        value = line[m.end():]
        if last == b"message-id":
            m = _MSGID.fullmatch(value)
            if mid is not None or m is None:
                return None
            mid = m.group(1).decode()
        elif last == b"subject":
            m = _SUBJECT.fullmatch(value)
            if subject is not None or m is None or b"=?" in value:
                return None
            subject = m.group(1).decode()
    return (mid or "")[:998], (subject or "")[:200]


def _fsync_quiet(path: str) -> None:
    try:
        fsync_dir(path)
    except OSError:
        pass
