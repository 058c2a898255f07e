"""Row ids of queued messages, reserved in blocks (:class:`RowIds`).

Several processes may add to the same queue (``mox serve`` with ``smtp_workers``; stores
opened with ``lock=False``). Each takes blocks of ``ID_BLOCK`` ids from ``sqlite_sequence``
(the counter behind ``msg.id INTEGER PRIMARY KEY AUTOINCREMENT``), one small commit per block,
and names its message files after ids of its own block, so that files are written without a
lock held. Ids of a failed submission are not used again: gaps are harmless.
"""

from __future__ import annotations

import sqlite3

from mox_core.queue.transaction import WriteTransaction

__all__ = ["ID_BLOCK", "RowIds"]

ID_BLOCK = 1024  # row ids reserved at a time


class RowIds:
    """The ids one store has reserved and not used yet: ``next`` up to ``end`` (excluded).
    Used in the queue-db thread only."""

    __slots__ = ("end", "next")

    def __init__(self) -> None:
        self.next = self.end = 0

    def reserve(self, db: sqlite3.Connection, n: int) -> None:
        """Make sure ``n`` ids are reserved (a new block, committed, when fewer are left)."""
        if self.end - self.next >= n:
            return
        size = max(n, ID_BLOCK)
        with WriteTransaction(db):
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'msg'").fetchone()
            first = (row[0] if row else 0) + 1
            if row is None:
                db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('msg', ?)", (first + size - 1,))
            else:
                db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'msg'", (first + size - 1,))
        self.next, self.end = first, first + size

    def take(self, n: int) -> list[int]:
        """The next ``n`` reserved ids (:meth:`reserve` them first)."""
        first = self.next
        self.next = first + n
        return list(range(first, first + n))
