"""The queue's durable state (:class:`QueueStore`): an SQLite index, ``queue/index.db``, with one
row per recipient, plus the message data.

A submission with N remote recipients is one stored message and N rows sharing ``base_id``,
so the body is stored once however many recipients it has, and the scheduler can still
retry, hold or fail each recipient on its own.

Where each part lives:

- this module: the class, its state, opening (schema, queue lock, orphan cleanup) and
  closing, and the entry points of picking and admin queries;
- :mod:`~mox_core.queue.adds`: ``add()``, batching and writing the data of a group commit;
  :mod:`~mox_core.queue.commit`: its write transaction (rate limits, rows, local copies);
- :mod:`~mox_core.queue.attempts`: ``start_attempt``/``finish_attempt`` and their group commit;
- :mod:`~mox_core.queue.pick`: which rows are due (``pick``, ``next_due``, partitions);
- :mod:`~mox_core.queue.admin`: list, update, remove, count;
- :mod:`~mox_core.queue.messagedata`: where a message's bytes are (index, segment, file),
  reading and removing them; :mod:`~mox_core.queue.segments`: the segment files;
- :mod:`~mox_core.queue.ids`: row ids, reserved in blocks;
- :mod:`~mox_core.queue.transaction`: the write transaction and savepoint helpers, and the
  451/452 a failed commit is reported as;
- :mod:`~mox_core.queue.checkpoint`: the checkpoint (and compaction) thread;
- :mod:`~mox_core.queue.headers`: Message-ID and Subject for the rows;
- :mod:`~mox_core.queue.records`: the schema, rows and admin filters.

Why mixins (:class:`~mox_core.queue.adds.Adds` and :class:`~mox_core.queue.commit.AddCommit`,
the two halves of the add path, and :class:`~mox_core.queue.attempts.AttemptBookkeeping`)
rather than objects of their own: they share the state that matters, created here. All
SQLite work runs on one connection (opened, and replaced, by ``open``) in one thread per
process (``queue-db``); both group commits queue their work for that thread under one lock,
wake the one checkpoint thread, and write and remove data in the same directories and
segments; adds reuse an attempt's step (a failed segment sync deletes rows as
``finish_attempt`` does). Tests and benchmarks tune and observe them as attributes of the
store (``inline_max``, ``commits``, ``attempt_commits``). As separate objects each would
hold a reference back to the store for all of that. Parts with state of their own are
objects (:class:`~mox_core.queue.ids.RowIds`, :class:`~mox_core.queue.segments.Segments`,
:class:`~mox_core.queue.checkpoint.CheckpointThread`); queries without state are functions
over the connection (``pick``, ``admin``).

Several processes may add to the same queue (stores opened with ``lock=False``): row ids come
from blocks each store reserves, and rate limits are checked and counted under SQLite's
write lock, so the limits hold across processes. Orphan cleanup (``lock=True``) must run
before other processes start adding.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from mox_core.errors import MoxError
from mox_core.queue import admin, pick, segments
from mox_core.queue.adds import Adds, PendingAdd
from mox_core.queue.attempts import AttemptBookkeeping, AttemptOp
from mox_core.queue.checkpoint import WAL_AUTOCHECKPOINT_PAGES, WAL_SIZE_LIMIT, CheckpointThread
from mox_core.queue.commit import AddCommit
from mox_core.queue.ids import RowIds
from mox_core.queue.messagedata import INLINE_MAX, is_file, read_stored, remove_orphans, remove_unreferenced
from mox_core.queue.records import SCHEMA, Filter, QueuedMessage
from mox_core.queue.segments import SEGMENT_BATCH_MIN, SEGMENT_MIN, Segments
from mox_core.store import MaildirCache
from mox_core.store.maildir import mkdir_durable

__all__ = ["QueueLocked", "QueueStore"]

log = structlog.get_logger(component="queue.store")

# Threads writing and fsyncing the message files of one batch in parallel.
FILE_WRITERS = 4


class QueueLocked(MoxError):
    """Another process (a running ``mox serve``) holds the queue."""


class QueueStore(Adds, AddCommit, AttemptBookkeeping):
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
        # fsync, as in a segment, whose sync needs a second thread (bench/queue_add.py:
        # 0.91-1.17x, bench/RESULTS.md)
        self.segment_batch_min = SEGMENT_BATCH_MIN
        self.db_path = self.dir / "index.db"
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="queue-db")
        self._lock_fd: int | None = None
        self.checkpointer: CheckpointThread | None = None
        # adds (Adds, AddCommit)
        self._writers = ThreadPoolExecutor(FILE_WRITERS, thread_name_prefix="queue-write")
        self.inline_max = INLINE_MAX
        self._pending: list[PendingAdd] = []
        self._pending_lock = threading.Lock()  # also for the attempts' operations
        self._flush_scheduled = False
        self._maildirs = MaildirCache()
        self._known_dirs: set[str] = set()
        self.commits = 0  # add() transactions, for tests of group commit
        self._ids = RowIds()
        self._limiters_ready: dict[int, object] = {}
        # attempts' bookkeeping (AttemptBookkeeping)
        self._attempt_ops: list[AttemptOp] = []
        self._attempts_scheduled = False
        self.attempt_commits = 0  # transactions of start/finish_attempt, for tests of group commit

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
        db.create_function("mox_partition", 2, pick.partition_of, deterministic=True)
        db.executescript(SCHEMA)
        db.executescript(segments.SCHEMA)
        self._db = db
        self._limiters_ready = {}
        if lock and cleanup:
            remove_orphans(db, self.tmp_dir, self.msg_dir)
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

    async def read_message(self, rel: str) -> bytes:
        """The message bytes (read in a worker thread; may be large)."""
        if not is_file(rel):
            return await self._run(self._read_stored, rel, int(rel.partition("/")[2]))
        path = self.msg_dir / rel
        return await asyncio.to_thread(path.read_bytes)

    def _read_stored(self, rel: str, base_id: int) -> bytes:
        return read_stored(self.db, self.segments.dir, rel, base_id)

    # -- picking due work (pick.py) ---------------------------------------------------------

    async def pick(self, now: float, busy: set[str], limit: int, room: dict[str, int] | None = None,
                   exclude: frozenset[int] | set[int] = frozenset()) -> list[list[QueuedMessage]]:
        """Up to ``limit`` batches of due, not held rows, one per domain not in ``busy``:
        :func:`mox_core.queue.pick.pick`."""
        return await self._run(self._pick_sync, now, busy, limit, room, exclude)

    def _pick_sync(self, now: float, busy: set[str], limit: int, room: dict[str, int] | None = None,
                   exclude: frozenset[int] | set[int] = frozenset()) -> list[list[QueuedMessage]]:
        return pick.pick(self.db, self.partition, now, busy, limit, room, exclude)

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
        return pick.pick_and_next_due(self.db, self.partition, now, busy, limit, room, exclude)

    async def next_due(self, busy: set[str]) -> float | None:
        """Earliest ``next_attempt`` of a non-held row whose domain is not busy."""
        return await self._run(self._next_due_sync, busy)

    def _next_due_sync(self, busy: set[str]) -> float | None:
        return pick.next_due(self.db, self.partition, busy)

    # -- admin queries (admin.py) -----------------------------------------------------------

    async def list_messages(self, flt: Filter, *, order: str = "next_attempt DESC, id DESC") -> list[QueuedMessage]:
        return await self._run(self._list_sync, flt, order)

    def _list_sync(self, flt: Filter, order: str) -> list[QueuedMessage]:
        return admin.list_rows(self.db, flt, order)

    async def get(self, mid: int) -> QueuedMessage | None:
        rows = await self.list_messages(Filter(ids=(mid,)))
        return rows[0] if rows else None

    async def update(self, flt: Filter, assignments: dict[str, Any]) -> list[int]:
        """``UPDATE msg SET <assignments> <filter>``; returns the ids changed."""
        return await self._run(self._update_sync, flt, assignments)

    def _update_sync(self, flt: Filter, assignments: dict[str, Any]) -> list[int]:
        return admin.update_rows(self.db, flt, assignments)

    async def remove(self, ids: Sequence[int]) -> int:
        """Delete rows (drop, or after an admin fail); returns how many existed."""
        return await self._run(self._remove_sync, ids)

    def _remove_sync(self, ids: Sequence[int]) -> int:
        n, files = admin.remove_rows(self.db, ids)
        remove_unreferenced(self.db, self.msg_dir, self.segments, files)
        return n

    async def count(self) -> int:
        return await self._run(lambda: admin.count_rows(self.db))
