"""Mid-sized queued messages in preallocated segment files (``queue/seg/``).

Why: a message stored in the index (``msg_data``) is written twice, into SQLite's log at its
commit and again into the database file by the checkpoint, and the database file grows (new
blocks) as it does. A message file costs a file creation, which on ext4 is the slowest step
of all (see bench/RESULTS.md). A segment is a file of ``SEGMENT_SIZE`` bytes whose blocks are
already allocated (written with zeros once, or an earlier segment's): appending a message is
an overwrite, and ``fdatasync`` then writes only the data, no metadata. So messages larger
than ``SEGMENT_MIN`` and up to the index's limit (``messagedata.INLINE_MAX``) go into segments, as
database systems keep their logs (PostgreSQL's WAL segments, recycled the same way).

Durability: the data of a batch is written with one ``pwritev`` before the transaction that
inserts its rows (``msg.file`` = ``seg/<base_id>``, table ``msg_seg``: segment, offset,
length, CRC-32), so no process ever reads a row without its data; one ``fdatasync`` runs in a
thread *while* that transaction commits, and no message is acknowledged before both ended
(two fsyncs one after the other made one connection 6 % slower). A failed sync moves the
batch's messages into the index before they are acknowledged. A crash between the two may
leave rows whose data never reached the disk, all in segments that were still appended to:
they were never acknowledged, and startup removes them (:meth:`Segments.cleanup`, by CRC). A
crash before the commit leaves bytes no row points at: harmless, the segment is reused once
its other messages are gone.

Life of a segment (table ``segment``): a process that adds takes a spare file, gives it the
next id (a row) and appends to it; when the next message does not fit, it seals it. A sealed
segment with no message left (``live``, kept by triggers on ``msg_seg``) is freed in the
transaction that deleted its last message, and its file is recycled as a spare (at most
``SPARE_SEGMENTS`` are kept) or removed. Spares are made by a thread (zeros, fsynced, renamed
into place); while none is ready, messages go into the index as before, so no submission ever
waits for one. A sealed segment still holding a few messages ``COMPACT_AFTER`` seconds later
(deferred mail, retried for days) has them moved into the index (``compact``), so a handful of
old messages cannot pin many segments on disk. Readers check the CRC and, when it does not
match (a segment compacted and reused meanwhile), read the message from the index.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from mox_core.queue.transaction import WriteTransaction
from mox_core.store.maildir import fsync_dir, unlink_quiet

__all__ = ["SEGMENT_MIN", "SEGMENT_PREFIX", "SEGMENT_SIZE", "Segments", "compact"]

log = structlog.get_logger(component="queue.segments")

SEGMENT_PREFIX = "seg/"  # msg.file of a message stored in a segment: "seg/<base_id>"
FREED_PREFIX = "segment/"  # "segment/<id>": a freed segment whose file is to be recycled
# Messages larger than this (and up to the index's INLINE_MAX) go into segments. Below it the
# two are alike on this machine (2 KB: within noise), and the index costs no second fsync.
SEGMENT_MIN = 16 * 1024
# ... and only from batches of at least this many such messages (see queue/adds.py)
SEGMENT_BATCH_MIN = 2
SEGMENT_SIZE = 32 * 1024 * 1024
SPARE_SEGMENTS = 2  # freed segments kept as spares; the thread makes one when none is left
COMPACT_AFTER = 600.0  # seconds after sealing
COMPACT_MAX_LIVE = SEGMENT_SIZE // 4  # bytes: segments holding more are left to drain
_ZEROS = bytes(1 << 20)

SCHEMA = """
CREATE TABLE IF NOT EXISTS segment (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    live INTEGER NOT NULL DEFAULT 0,    -- messages in it (rows of msg_seg)
    sealed REAL                         -- when appending to it ended; NULL: a process appends
);
CREATE TABLE IF NOT EXISTS msg_seg (
    base_id INTEGER PRIMARY KEY,
    segment INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS msg_seg_segment ON msg_seg(segment);
CREATE TRIGGER IF NOT EXISTS msg_seg_ad AFTER DELETE ON msg
WHEN OLD.file LIKE 'seg/%' AND NOT EXISTS (SELECT 1 FROM msg WHERE base_id = OLD.base_id) BEGIN
    DELETE FROM msg_seg WHERE base_id = OLD.base_id;
END;
CREATE TRIGGER IF NOT EXISTS msg_seg_live_ai AFTER INSERT ON msg_seg BEGIN
    UPDATE segment SET live = live + 1 WHERE id = NEW.segment;
END;
CREATE TRIGGER IF NOT EXISTS msg_seg_live_ad AFTER DELETE ON msg_seg BEGIN
    UPDATE segment SET live = live - 1 WHERE id = OLD.segment;
END;
"""

# In the transaction that deleted rows: segments now empty and sealed are freed.
FREE_SQL = "DELETE FROM segment WHERE sealed IS NOT NULL AND live <= 0 RETURNING id"


@dataclass
class Placed:
    """Where one message went: segment id, offset, length, CRC-32."""

    segment: int
    offset: int
    length: int
    crc: int


@dataclass
class _Active:
    id: int
    fd: int
    offset: int


class Segments:
    """The files of ``queue/seg/`` for one process's store: its active segment, the spares
    and the thread that makes them. The SQL runs in the caller's connection and thread
    (the store's queue-db thread)."""

    def __init__(self, directory: Path, size: int = SEGMENT_SIZE) -> None:
        self.dir = directory
        self.size = size
        self.active: _Active | None = None
        self.made = 0  # spares made with zeros, for tests
        self._want = threading.Event()
        self._closing = False
        self._retiring: list[_Active] = []  # sealed once the batch writing into them committed
        self._thread: threading.Thread | None = None
        self._prepared = float("-inf")

    # -- spares ------------------------------------------------------------------------------

    def spares(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir) if n.startswith("spare-"))
        except FileNotFoundError:
            return []

    def prepare(self) -> None:
        """Have a spare ready for the next batch (messages are coming that could use one);
        looked at no more than once a second while no segment is active."""
        now = time.monotonic()
        if self.active is None and now - self._prepared >= 1.0:
            self._prepared = now
            self._want_spare()

    def _want_spare(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._prepare_loop, name="queue-segments", daemon=True)
            self._thread.start()
        self._want.set()

    def _prepare_loop(self) -> None:
        while True:
            self._want.wait()
            self._want.clear()
            if self._closing:
                return
            if self.spares():
                continue
            try:
                self._make_spare()
            except OSError as exc:  # messages go into the index meanwhile
                if self._closing:
                    return
                log.warning("queue_segment_prepare_failed", error=str(exc), errno=exc.errno)
                time.sleep(5)

    def _make_spare(self) -> None:
        name = f"{time.time_ns()}-{os.getpid()}"
        tmp = str(self.dir / f"tmp-{name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                left = self.size
                zeros = memoryview(_ZEROS)
                while left > 0 and not self._closing:
                    left -= os.write(fd, zeros[: min(left, len(zeros))])
                if left > 0:
                    raise OSError("closing")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.dir / f"spare-{name}")
        except BaseException:
            unlink_quiet(tmp)
            raise
        fsync_dir(str(self.dir))
        self.made += 1

    def recycle(self, segment_id: int) -> None:
        """A freed segment's file becomes a spare, or goes when there are enough."""
        path = str(self.dir / str(segment_id))
        if len(self.spares()) < SPARE_SEGMENTS:
            try:
                os.rename(path, self.dir / f"spare-{time.time_ns()}-{segment_id}")
                return
            except FileNotFoundError:
                return
            except OSError:
                pass
        unlink_quiet(path)

    def close(self, db: sqlite3.Connection | None) -> None:
        """Stop the thread; seal the active segment (``db``: None when the index is gone)."""
        self._closing = True
        self._want.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.active is not None:
            self._retire(self.active)
        if db is not None:
            self.after_commit(db)
        for act in self._retiring:
            os.close(act.fd)
        self._retiring = []

    # -- appending (queue-db thread) ---------------------------------------------------------

    def place(self, db: sqlite3.Connection, datas: list[bytes]) -> tuple[list[Placed | None], list[_Active]]:
        """Write ``datas`` into segments (so far into the page cache): where each went, None
        for each that is to go into the index instead (no spare ready, or the write failed),
        and the segments written to. Each of those must be synced (:meth:`sync`) before any
        of its messages is acknowledged; the sync may run while their rows are committed
        (a crash in between is what :meth:`cleanup` checks for)."""
        out: list[Placed | None] = []
        groups: list[tuple[_Active, int, list[bytes]]] = []  # per segment: start, buffers
        for data in datas:
            act = self.active
            if act is None or act.offset + len(data) > self.size:
                if act is not None:
                    self._retire(act)
                act = self._activate(db)
                if act is None:
                    out.append(None)
                    continue
            if not groups or groups[-1][0] is not act:
                groups.append((act, act.offset, []))
            groups[-1][2].append(data)
            out.append(Placed(act.id, act.offset, len(data), zlib.crc32(data)))
            act.offset += len(data)
        written = []
        for act, start, bufs in groups:
            try:
                if os.pwritev(act.fd, bufs, start) != sum(map(len, bufs)):
                    raise OSError(errno.EIO, "short write to queue segment")
            except OSError as exc:
                self.failed(act, exc)
                out = [None if p is not None and p.segment == act.id else p for p in out]
                continue
            written.append(act)
        return out, written

    @staticmethod
    def sync(act: _Active) -> None:
        os.fdatasync(act.fd)

    def failed(self, act: _Active, exc: OSError) -> None:
        """A write or sync failed: nothing more goes into that segment (a failed fsync
        cannot be repeated: the kernel may have dropped the pages it could not write)."""
        log.error("queue_segment_write_failed", segment=act.id, error=str(exc), errno=exc.errno)
        if self.active is act:
            self._retire(act)

    def _activate(self, db: sqlite3.Connection) -> _Active | None:
        spares = self.spares()
        if not spares:
            self._want_spare()
            return None
        with WriteTransaction(db):
            (sid,) = db.execute("INSERT INTO segment(live) VALUES (0) RETURNING id").fetchone()
        path = self.dir / str(sid)
        for name in spares:  # another process may take one first
            try:
                os.rename(self.dir / name, path)
                break
            except FileNotFoundError:
                continue
        else:
            self._free(db, sid)
            self._want_spare()
            return None
        try:
            fsync_dir(str(self.dir))  # the name rows will point to is durable before they are
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            log.error("queue_segment_open_failed", segment=sid, error=str(exc), errno=exc.errno)
            self._free(db, sid)
            return None
        self.active = _Active(sid, fd, 0)
        if len(spares) < 2:  # the next one is made while this one fills
            self._want_spare()
        return self.active

    def _retire(self, act: _Active) -> None:
        self.active = None
        self._retiring.append(act)

    def after_commit(self, db: sqlite3.Connection) -> None:
        """Seal the segments the last batch filled, once its rows are committed (sealed with
        none of them counted yet, a segment would be freed under them); free empty ones."""
        retiring, self._retiring = self._retiring, []
        for act in retiring:
            os.close(act.fd)
            self._alone(db, "UPDATE segment SET sealed = ? WHERE id = ?", (time.time(), act.id))
        if retiring:
            for (sid,) in self._alone(db, FREE_SQL):
                self.recycle(sid)

    def _free(self, db: sqlite3.Connection, sid: int) -> None:
        self._alone(db, "DELETE FROM segment WHERE id = ?", (sid,))

    @staticmethod
    def _alone(db: sqlite3.Connection, sql: str, args: tuple[object, ...] = ()) -> list[tuple[int]]:
        with WriteTransaction(db):
            return db.execute(sql, args).fetchall()

    # -- startup (the process holding the queue lock, before others add) --------------------

    def cleanup(self, db: sqlite3.Connection) -> None:
        """After a crash or stop: no process appends any more, so every segment is sealed;
        empty ones are freed, files without a row (a crash between a row's removal and its
        file's) recycled, half-made spares removed.

        A segment that was still appended to may hold messages whose rows were committed
        while their data's sync ran, and a crash came before the sync ended: such a message
        was never acknowledged, and its data may not be on disk. Each of its messages is
        checked against its CRC; those that fail are removed."""
        bad = []
        for (sid,) in db.execute("SELECT id FROM segment WHERE sealed IS NULL").fetchall():
            for (base_id,) in db.execute("SELECT base_id FROM msg_seg WHERE segment = ?", (sid,)).fetchall():
                if read(self.dir, db, base_id) is None:
                    bad.append(base_id)
        if bad:
            with WriteTransaction(db):
                db.executemany("DELETE FROM msg WHERE base_id = ?", [(b,) for b in bad])
            log.warning("queue_unacknowledged_messages_removed", count=len(bad), base_ids=bad[:20])
        self._alone(db, "UPDATE segment SET sealed = ? WHERE sealed IS NULL", (time.time(),))
        for (sid,) in self._alone(db, FREE_SQL):
            self.recycle(sid)
        known = {str(r[0]) for r in db.execute("SELECT id FROM segment")}
        for name in os.listdir(self.dir):
            if name.startswith("tmp-"):
                unlink_quiet(str(self.dir / name))
            elif name.isdigit() and name not in known:
                self.recycle(int(name))


def read(directory: Path, db: sqlite3.Connection, base_id: int) -> bytes | None:
    """A message's bytes from its segment; None when it is not (or no longer) there."""
    row = db.execute(
        "SELECT segment, offset, length, crc FROM msg_seg WHERE base_id = ?", (base_id,)
    ).fetchone()
    if row is None:
        return None
    sid, offset, length, crc = row
    try:
        fd = os.open(directory / str(sid), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length or zlib.crc32(data) != crc:
        return None
    return data


def move_into_index(db: sqlite3.Connection, base_id: int, data: bytes) -> None:
    """In the caller's transaction: the message is stored in ``msg_data`` from now on."""
    db.execute("INSERT INTO msg_data(base_id, data) VALUES (?, ?)", (base_id, data))
    db.execute("UPDATE msg SET file = ? WHERE base_id = ?", (f"db/{base_id}", base_id))
    db.execute("DELETE FROM msg_seg WHERE base_id = ?", (base_id,))


def compact(directory: Path, db: sqlite3.Connection, recycle: Callable[[int], None], now: float) -> int:
    """Move the messages of segments sealed more than ``COMPACT_AFTER`` seconds ago and
    holding at most ``COMPACT_MAX_LIVE`` bytes into the index; free those segments. Runs in
    its own connection (the checkpoint thread's). Returns how many messages moved."""
    moved = 0
    candidates = db.execute(
        "SELECT s.id FROM segment s WHERE s.sealed IS NOT NULL AND s.sealed < ? AND s.live > 0 "
        "AND (SELECT SUM(length) FROM msg_seg WHERE segment = s.id) <= ?",
        (now - COMPACT_AFTER, COMPACT_MAX_LIVE),
    ).fetchall()
    for (sid,) in candidates:
        with WriteTransaction(db):
            for (base_id,) in db.execute("SELECT base_id FROM msg_seg WHERE segment = ?", (sid,)).fetchall():
                data = read(directory, db, base_id)
                if data is None:
                    log.error("queue_segment_message_unreadable", segment=sid, base_id=base_id)
                    continue  # left where it is: its reader reports it
                move_into_index(db, base_id, data)
                moved += 1
            freed = db.execute(FREE_SQL).fetchall()
        for (fid,) in freed:
            recycle(fid)
    if moved:
        log.info("queue_segments_compacted", messages=moved, segments=len(candidates))
    return moved
