"""Admin queries on the queue's rows (``mox queue list|kick|drop|hold|unhold|fail|dump``):
list, update, remove, count.

Functions over the store's connection, called in its queue-db thread by the methods of
:class:`mox_core.queue.queuestore.QueueStore` (``list_messages``, ``get``, ``update``,
``remove``, ``count``); what the commands do with them is in :class:`mox_core.queue.Queue`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from mox_core.queue.messagedata import delete_rows
from mox_core.queue.records import COLUMNS, Filter, QueuedMessage
from mox_core.queue.transaction import WriteTransaction

__all__ = ["UPDATABLE", "count_rows", "list_rows", "remove_rows", "update_rows"]

UPDATABLE = frozenset({"next_attempt", "hold", "transport"})  # columns an admin may set


def list_rows(db: sqlite3.Connection, flt: Filter, order: str) -> list[QueuedMessage]:
    where, args = flt.where()
    sql = f"SELECT {COLUMNS} FROM msg{where} ORDER BY {order}"
    if flt.limit:
        sql += " LIMIT ?"
        args.append(flt.limit)
    return [QueuedMessage.from_row(r) for r in db.execute(sql, args)]


def update_rows(db: sqlite3.Connection, flt: Filter, assignments: dict[str, Any]) -> list[int]:
    """``UPDATE msg SET <assignments> <filter>`` in a transaction of its own; the ids changed."""
    if not set(assignments) <= UPDATABLE:
        raise ValueError(f"cannot set {sorted(set(assignments) - UPDATABLE)}")
    where, args = flt.where()
    if flt.limit:
        where = f" WHERE id IN (SELECT id FROM msg{where} ORDER BY next_attempt DESC LIMIT ?)"
        args.append(flt.limit)
    sets = ", ".join(f"{k} = ?" for k in assignments)
    with WriteTransaction(db):
        return [r[0] for r in db.execute(
            f"UPDATE msg SET {sets}{where} RETURNING id", [*assignments.values(), *args]
        )]


def remove_rows(db: sqlite3.Connection, ids: Sequence[int]) -> tuple[int, set[tuple[int, str]]]:
    """Delete rows in a transaction of their own: how many existed, and the files and
    segments to remove after it (:func:`mox_core.queue.messagedata.remove_unreferenced`)."""
    with WriteTransaction(db):
        return delete_rows(db, ids)


def count_rows(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COUNT(*) FROM msg").fetchone()[0]
