"""The queue's SQLite write transactions, written once: :class:`WriteTransaction` and
:func:`in_savepoint`; and :func:`sqlite_storage_error`, what a failed commit is reported as.

Every change to the queue's index runs in a ``BEGIN IMMEDIATE`` transaction: the write lock
is taken at ``BEGIN``, so that several processes adding to the same queue serialise there
(``busy_timeout``) instead of failing at their first write, and a transaction either commits
whole or leaves nothing behind. Group commits (many adds, or many attempts' bookkeeping, in
one transaction) give each item a savepoint, so that one item's failure is rolled back alone
and the others still commit.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from types import TracebackType
from typing import Any

from mox_core.store import StorageError

__all__ = ["WriteTransaction", "in_savepoint", "sqlite_storage_error"]


class WriteTransaction:
    """``with WriteTransaction(db) as tx:``: ``BEGIN IMMEDIATE``; ``COMMIT`` when the block
    ends; ``ROLLBACK`` when the block (or the ``COMMIT``) raises, and the exception goes on.
    The block may end the transaction itself with :meth:`rollback` (then nothing commits).

    The caller sees the block's own exception even when the ``ROLLBACK`` fails too: a
    transaction SQLite already rolled back on its own (it does on some errors, a full disk
    among them) is not rolled back twice, and the error that caused it is what gets reported
    (:func:`sqlite_storage_error`: 452 for a full disk). A class rather than a generator
    context manager: it is entered once per group commit, on the path of every add."""

    __slots__ = ("db", "ended")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.ended = False

    def __enter__(self) -> WriteTransaction:
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def rollback(self) -> None:
        """Roll back now; the block goes on outside any transaction, and nothing commits."""
        self.db.execute("ROLLBACK")
        self.ended = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            if self.ended:
                return
            try:
                self.db.execute("COMMIT")
                return
            except BaseException:
                self._rollback_quietly()
                raise
        if not self.ended:
            self._rollback_quietly()

    def _rollback_quietly(self) -> None:
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass


def in_savepoint(db: sqlite3.Connection, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """Run ``fn(*args)`` in a savepoint of the open transaction: ``(True, its result)``, or,
    when it raised an :class:`Exception`, ``(False, that exception)`` with its changes rolled
    back (``ROLLBACK TO``) and the transaction still open for the next item.

    Raises when the transaction as a whole is lost: the exception of ``fn`` when SQLite
    rolled the transaction back on its own (``fn`` failed on a full disk, for one), or the
    error of ``ROLLBACK TO`` itself. The caller then fails every item of the transaction.
    ``BaseException`` (not ``Exception``) goes on at once: the caller's transaction is
    rolled back whole."""
    db.execute("SAVEPOINT item")
    try:
        out = fn(*args)
        db.execute("RELEASE item")
        return True, out
    except Exception as exc:
        if not db.in_transaction:
            raise
        error = exc
    db.execute("ROLLBACK TO item")
    db.execute("RELEASE item")
    return False, error


def sqlite_storage_error(exc: BaseException) -> StorageError:
    """What a failed write of the index is reported as: 452 "insufficient system storage"
    when the disk is full, else 451 "local error in processing" (RFC 5321, 4.2.3); both
    transient, so the client tries again later."""
    if isinstance(exc, OSError):
        return StorageError.from_oserror(exc, "commit")
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
        return StorageError.from_oserror(OSError(errno.ENOSPC, str(exc)), "commit")
    return StorageError.local_error(step="commit", detail=str(exc))
