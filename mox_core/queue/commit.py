"""The write transaction of a batch of adds (:class:`AddCommit`, part of
:class:`mox_core.queue.queuestore.QueueStore`; the steps before it are in
:mod:`mox_core.queue.adds`).

In one ``BEGIN IMMEDIATE`` transaction, per submission, in a savepoint of its own: check its
rate limits, insert its rows (and a small message's data, or where its segment holds it),
count it in the rate limits. A submission refused or failing there is rolled back to its
savepoint alone; the others go on. Then the local Maildir copies of the accepted submissions
are committed (:func:`mox_core.store.commit_batch`), and only then the transaction. Rate
limits are checked and counted under SQLite's write lock, so they hold across the processes
adding to one queue.

When a local copy fails, the transaction is rolled back and started over without that
submission (rare). When the transaction as a whole fails (``BEGIN``, a lost transaction,
``COMMIT``), every submission still in it fails with 451, or 452 on a full disk
(:func:`mox_core.queue.transaction.sqlite_storage_error`), and what it wrote is removed.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import structlog

from mox_core.outgoing.routing import address_domain
from mox_core.queue.adds import PendingAdd
from mox_core.queue.messagedata import INLINE_PREFIX
from mox_core.queue.segments import SEGMENT_PREFIX
from mox_core.queue.transaction import WriteTransaction, in_savepoint, sqlite_storage_error
from mox_core.store import MaildirCache, StorageError, commit_batch

__all__ = ["AddCommit", "recipient_domain"]

log = structlog.get_logger(component="queue.store")

recipient_domain = address_domain


class AddCommit:
    """Mixin of :class:`~mox_core.queue.queuestore.QueueStore`, with
    :class:`mox_core.queue.adds.Adds` (which calls :meth:`_transaction`); its state
    (``commits``, the Maildir cache) is created in ``QueueStore.__init__``."""

    # defined by QueueStore (and Adds)
    db: sqlite3.Connection
    commits: int
    _maildirs: MaildirCache
    _rollback: Any

    def _transaction(self, items: list[PendingAdd]) -> list[PendingAdd] | None:
        """Check, insert, record, deliver local copies, commit. Returns the items to try
        again in a new transaction (local copies failed for others), else None."""
        db = self.db
        accepted: list[PendingAdd] = []
        try:
            with WriteTransaction(db) as tx:
                accepted = self._insert_items(db, items)
                failed = self._commit_local_copies(accepted)
                if failed:  # their rows and counts must go: start over without them (rare)
                    tx.rollback()
                    for it in failed:
                        it.ids = []
                        self._rollback(it)
                    return [it for it in accepted if it.error is None]
                if not accepted:
                    tx.rollback()
                    return None
        except (sqlite3.Error, OSError) as exc:
            self._fail_all(items, exc)
            return None
        self.commits += 1
        for it in accepted:
            it.committed = True
        return None

    def _insert_items(self, db: sqlite3.Connection, items: list[PendingAdd]) -> list[PendingAdd]:
        """Each submission in its savepoint (:meth:`_add_item`); those that fail are rolled
        back alone. Returns the accepted ones; raises when the transaction is lost."""
        accepted = []
        for it in items:
            ok, exc = in_savepoint(db, self._add_item, it)
            if ok:
                accepted.append(it)
                continue
            it.error = _item_error(exc)
            it.ids = []
            self._rollback(it)
        return accepted

    def _add_item(self, it: PendingAdd) -> None:
        if it.rate_limit is not None:
            it.rate_limit.check(self.db)
        if it.recipients:
            self._insert_rows(it)
        if it.rate_limit is not None:
            it.rate_limit.record(self.db)

    def _insert_rows(self, it: PendingAdd) -> None:
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

    def _commit_local_copies(self, accepted: list[PendingAdd]) -> list[PendingAdd]:
        """Commit the local Maildir copies of the accepted submissions (those not done in an
        earlier round yet). Returns the submissions whose copies failed (with their error)."""
        todo = [it for it in accepted if it.local and not it.local_paths]
        if not todo:
            return []
        results = commit_batch([it.local for it in todo], self._maildirs)
        failed = []
        for it, res in zip(todo, results, strict=True):
            if isinstance(res, StorageError):
                it.error = res
                failed.append(it)
            else:
                it.local_paths = res
        return failed

    def _fail_all(self, items: list[PendingAdd], exc: BaseException) -> None:
        """The transaction failed as a whole (and is rolled back): so does every submission
        in it that had not failed yet."""
        failing = [it for it in items if it.error is None]
        err = sqlite_storage_error(exc)
        log.error("queue_commit_failed", error=str(exc), code=err.code, messages=len(failing))
        for it in failing:
            it.error = err
            it.ids = []
            self._rollback(it)


def _item_error(exc: BaseException) -> Exception:
    """What one submission that failed in its savepoint is told."""
    from mox_core.outgoing.ratelimit import RateLimited

    if isinstance(exc, RateLimited):
        return exc
    if isinstance(exc, (sqlite3.Error, OSError)):
        err = sqlite_storage_error(exc)
        log.error("queue_insert_failed", error=str(exc), code=err.code)
        return err
    log.error("ratelimit_failed", exc_info=exc)  # a rate limiter's bug fails its submission only
    return StorageError.local_error(step="ratelimit", detail=repr(exc))
