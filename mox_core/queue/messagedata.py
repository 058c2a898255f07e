"""Where a queued message's bytes are, and how they are read and removed.

A submission with N remote recipients is one stored message and N rows of ``msg`` sharing
``base_id`` (the first row's id), so the body is stored once however many recipients it has.
``msg.file`` says where it is:

- ``db/<base_id>``: in the index itself, table ``msg_data`` (messages of up to ``INLINE_MAX``
  bytes; no file to create, and no directory fsync);
- ``seg/<base_id>``: in a preallocated segment file under ``queue/seg/``, table ``msg_seg``
  (messages above ``segments.SEGMENT_MIN`` and up to ``INLINE_MAX``, from batches of several:
  :mod:`mox_core.queue.segments`);
- ``<base_id >> 13>/<base_id>``: a file of its own under ``queue/msg/`` (larger messages; 8,192
  files per directory, the layout of mox's queue).

A ``msg_data`` or ``msg_seg`` row goes with the last ``msg`` row of its message (triggers, in
the same transaction); a message file is unlinked after the transaction that deleted its last
row (:func:`remove_unreferenced`), and a file no row refers to after a crash is removed at
startup (:func:`remove_orphans`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import structlog

from mox_core.queue import segments
from mox_core.queue.segments import FREED_PREFIX, SEGMENT_PREFIX, Segments
from mox_core.store.maildir import unlink_quiet

__all__ = ["FILES_PER_DIR_SHIFT", "INLINE_MAX", "INLINE_PREFIX", "delete_rows", "is_file", "read_stored",
           "remove_orphans", "remove_unreferenced"]

log = structlog.get_logger(component="queue.store")

# Message files per directory: 8192 (queue/msg/<id >> 13>/<id>).
FILES_PER_DIR_SHIFT = 13
# Messages up to this size are stored in the index (msg_data) or, above SEGMENT_MIN, in a
# segment, instead of a file: no file to create, and no directory fsync.
INLINE_MAX = 256 * 1024
INLINE_PREFIX = "db/"  # msg.file of a message stored in msg_data: "db/<base_id>"


def is_file(rel: str) -> bool:
    """Whether ``msg.file`` (or a freed segment) names a file, not data in the index."""
    return not rel.startswith((INLINE_PREFIX, SEGMENT_PREFIX))


def read_stored(db: sqlite3.Connection, seg_dir: Path, rel: str, base_id: int) -> bytes:
    """Data in the index or a segment. A segment's message may have been moved into the
    index since its row was read (compaction): then it is read from there."""
    if rel.startswith(SEGMENT_PREFIX):
        data = segments.read(seg_dir, db, base_id)
        if data is not None:
            return data
    row = db.execute("SELECT data FROM msg_data WHERE base_id = ?", (base_id,)).fetchone()
    if row is None:
        raise FileNotFoundError(f"queue message {INLINE_PREFIX}{base_id} not found")
    return bytes(row[0])


def delete_rows(db: sqlite3.Connection, ids: Sequence[int]) -> tuple[int, set[tuple[int, str]]]:
    """In the caller's transaction, delete rows; return how many existed, and the (base_id,
    file) they referred to, with (segment id, ``segment/<id>``) for each segment this emptied
    (freed with the transaction; its file is recycled after it)."""
    n = 0
    files = set()
    for mid in ids:
        row = db.execute(
            "DELETE FROM msg WHERE id = ? RETURNING base_id, file", (mid,)
        ).fetchone()
        if row is not None:
            n += 1
            files.add((row[0], row[1]))
    if any(f.startswith(SEGMENT_PREFIX) for _, f in files):
        files |= {(sid, f"{FREED_PREFIX}{sid}") for (sid,) in db.execute(segments.FREE_SQL).fetchall()}
    return n, files


def remove_unreferenced(db: sqlite3.Connection, msg_dir: Path, segs: Segments,
                        files: set[tuple[int, str]]) -> None:
    """After the transaction of :func:`delete_rows`: unlink the message files no row refers
    to any more, recycle the freed segments."""
    # All rows of a file share its base_id (indexed), so the check stays cheap.
    # No fsync: a file whose unlink is lost in a crash is an orphan, removed at startup.
    for base_id, f in files:
        if not is_file(f):  # its msg_data/msg_seg row goes with its last msg row (trigger)
            continue
        if f.startswith(FREED_PREFIX):
            segs.recycle(base_id)
            continue
        if db.execute(
            "SELECT 1 FROM msg WHERE base_id = ? LIMIT 1", (base_id,)
        ).fetchone() is None:
            unlink_quiet(str(msg_dir / f))


def remove_orphans(db: sqlite3.Connection, tmp_dir: Path, msg_dir: Path) -> None:
    """Files a crash left behind: in tmp/, or in msg/ without a row (not acknowledged)."""
    referenced = {r[0] for r in db.execute("SELECT DISTINCT file FROM msg")}
    removed = 0
    for entry in os.scandir(tmp_dir):
        removed += unlink_quiet(entry.path)
    for sub in os.scandir(msg_dir):
        if not sub.is_dir():
            continue
        for entry in os.scandir(sub.path):
            if f"{sub.name}/{entry.name}" not in referenced:
                removed += unlink_quiet(entry.path)
    if removed:
        log.info("queue_orphans_removed", count=removed)
