"""The queue's SQLite checkpoints and segment compaction, in a thread of their own
(:class:`CheckpointThread`).

SQLite's own checkpoint runs in the committing connection, here the queue-db thread that
every add waits on; it copies the write-ahead log into the database file and fsyncs it (4 MB
at its default of 1,000 pages: one stall per 40 messages of 100 KB). A thread with its own
connection does it instead; the writers' own checkpoint is kept as a backstop, at
``WAL_AUTOCHECKPOINT_PAGES`` (bench/RESULTS.md has the measurements). One process runs it for
all the processes using a queue: the one holding the queue's lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import structlog

from mox_core.queue import segments
from mox_core.queue.segments import Segments

__all__ = ["CHECKPOINT_INTERVAL", "COMPACT_INTERVAL", "WAL_AUTOCHECKPOINT_PAGES", "WAL_SIZE_LIMIT",
           "CheckpointThread"]

log = structlog.get_logger(component="queue.store")

# The writers' own checkpoint (PRAGMA wal_autocheckpoint), a backstop for this thread.
WAL_AUTOCHECKPOINT_PAGES = 16384
# After a burst, the log file is cut back to this size when it is next reset (it is reused
# from its start, not shrunk, otherwise).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
CHECKPOINT_INTERVAL = 0.25  # seconds at least between two checkpoints of the thread
# How often the checkpoint thread looks for segments to compact (segments.compact).
COMPACT_INTERVAL = 60.0


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
