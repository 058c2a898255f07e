"""Picking due work: which rows the scheduler delivers next, and when the next one is due.

Picking must not slow down with queue size: ``domain_due`` keeps, per recipient domain, the
earliest ``next_attempt`` of its non-held rows (maintained by triggers from the index
``(hold, recipient_domain, next_attempt)``, see :mod:`mox_core.queue.records`), so finding
the next due domains that are not busy reads a handful of rows whatever the number of queued
messages.

Functions over the store's connection, called in its queue-db thread by the methods of
:class:`mox_core.queue.queuestore.QueueStore` (``pick``, ``pick_and_next_due``, ``next_due``).
"""

from __future__ import annotations

import sqlite3
import zlib

from mox_core.queue.records import COLUMNS, QueuedMessage

__all__ = ["next_due", "partition_of", "pick", "pick_and_next_due"]

Partition = tuple[int, int] | None  # (index, count), see partition_of; None: every domain


def partition_of(domain: str, count: int) -> int:
    """Which of ``count`` delivering processes owns ``domain`` (stable across processes and
    restarts, unlike ``hash()``): all deliveries to a domain stay in one process, so its
    limit of deliveries in flight holds."""
    return zlib.crc32(domain.encode("utf-8", "surrogateescape")) % count


def partition_sql(partition: Partition) -> tuple[str, tuple[int, ...]]:
    """The condition on ``domain_due.domain`` for ``partition``, and its args (the SQL
    function ``mox_partition`` is :func:`partition_of`, registered on the connection)."""
    if partition is None:
        return "1", ()
    index, count = partition
    return "mox_partition(domain, ?) = ?", (count, index)


def pick(db: sqlite3.Connection, partition: Partition, now: float, busy: set[str], limit: int,
         room: dict[str, int] | None = None,
         exclude: frozenset[int] | set[int] = frozenset()) -> list[list[QueuedMessage]]:
    """Up to ``limit`` batches of due, not held rows, one per domain not in ``busy``.

    A batch is the earliest due row of its domain plus every other due row of the same
    submission to that domain: candidates for one transaction. ``room`` gives domains that
    may have more than one batch (domain -> how many); rows in ``exclude`` (those being
    delivered) are never picked.
    """
    room = room or {}
    part, args = partition_sql(partition)
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


def pick_and_next_due(db: sqlite3.Connection, partition: Partition, now: float, busy: set[str],
                      limit: int, room: dict[str, int] | None, exclude: frozenset[int] | set[int],
                      ) -> tuple[list[list[QueuedMessage]], float | None, bool]:
    """:func:`pick`, then (when fewer than ``limit`` batches came back) :func:`next_due` for
    the domains that will not be busy once these batches run: (batches, next due time,
    whether it was looked up)."""
    batches = pick(db, partition, now, busy, limit, room, exclude)
    if len(batches) >= limit:
        return batches, None, False
    picked = {b[0].recipient_domain for b in batches}
    still_room = set(room or {}) - picked
    return batches, next_due(db, partition, set(busy) | picked | still_room), True


def next_due(db: sqlite3.Connection, partition: Partition, busy: set[str]) -> float | None:
    """Earliest ``next_attempt`` of a non-held row whose domain is not busy."""
    part, args = partition_sql(partition)
    for d, t in db.execute(
        f"SELECT domain, next_attempt FROM domain_due WHERE {part} ORDER BY next_attempt LIMIT ?",
        (*args, len(busy) + 1),
    ):
        if d not in busy:
            return float(t)
    return None
