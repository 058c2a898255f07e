"""Core's outgoing rate limiters (mox's per-account daily limits), registered through the
rate-limiter hook.

Both keep their counts in the outgoing queue's database (``queue/index.db``), written in the
transaction that queues the submission, and read them inside the same write transaction, so
concurrent submissions (other sessions, other processes) cannot both pass a limit only one
of them fits.

Tables (created by :meth:`OutgoingLog.setup`):

- ``outgoing``: a row per recipient of every queued submission, never pruned (the record,
  as mox's Outgoing table).
- ``outgoing_first``: per account and recipient, the time of its first record ever:
  "first-time recipient" means never sent to before, ever.
- ``outgoing_minute``: per account and minute, the number of records (``n``) and of first
  records (``first_n``) of that minute. Counting the rolling 24 hours reads at most 1,441 of
  these plus the records of the one minute the window starts in, whatever the volume.

The window is the rolling 24 hours before now (strictly newer than now - 24 h).

- ``messages_per_day``: n + r > limit refuses (n: records in the window, r: recipients of the
  new submission); limit from the account's ``max_outgoing_messages_per_day`` (default 1000).
- ``first_time_recipients_per_day``: if n + r reaches the limit (``max_first_time_recipients_
  per_day``, default 200), count first-time recipients: new recipients never sent to, plus
  recipients in the window whose earliest record there had no record before it (that is,
  whose first record ever is in the window); more than the limit refuses.

Records of versions that kept them in ``ratelimit/outgoing.db`` are imported once by
:meth:`OutgoingLog.setup` (the old file is then renamed ``outgoing.db.imported``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field

from mox_core import hookimpl
from mox_core.plugins.kinds import RateLimitDecision, RateLimiterKind, Submission

log = structlog.get_logger(component="ratelimit")

DAY = 24 * 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS outgoing (
    account TEXT NOT NULL,
    recipient TEXT NOT NULL,
    submitted REAL NOT NULL,
    submission TEXT NOT NULL,
    UNIQUE (submission, recipient)
);
CREATE INDEX IF NOT EXISTS outgoing_account_time ON outgoing(account, submitted);
CREATE TABLE IF NOT EXISTS outgoing_first (
    account TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first REAL NOT NULL,
    PRIMARY KEY (account, recipient)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outgoing_first_time ON outgoing_first(account, first);
CREATE TABLE IF NOT EXISTS outgoing_minute (
    account TEXT NOT NULL,
    minute INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    first_n INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account, minute)
) WITHOUT ROWID;
"""

_REBUILD = """
DELETE FROM outgoing_first;
DELETE FROM outgoing_minute;
INSERT INTO outgoing_first(account, recipient, first)
    SELECT account, recipient, MIN(submitted) FROM outgoing GROUP BY account, recipient;
INSERT INTO outgoing_minute(account, minute, n)
    SELECT account, CAST(submitted / 60 AS INTEGER) AS m, COUNT(*) FROM outgoing GROUP BY account, m;
INSERT INTO outgoing_minute(account, minute, first_n)
    SELECT account, CAST(first / 60 AS INTEGER) AS m, COUNT(*) FROM outgoing_first GROUP BY account, m
    ON CONFLICT(account, minute) DO UPDATE SET first_n = excluded.first_n;
"""


def _minute(t: float) -> int:
    return int(t // 60)


class OutgoingLog:
    """The outgoing-recipient tables: stateless, every method takes the connection."""

    def __init__(self, legacy: Path | None = None):
        self.legacy = legacy  # ratelimit/outgoing.db of earlier versions, imported by setup

    def setup(self, db: sqlite3.Connection) -> None:
        db.executescript(SCHEMA)
        if self.legacy is not None and self.legacy.exists():
            self._import(db, self.legacy)

    @staticmethod
    def _import(db: sqlite3.Connection, path: Path) -> None:
        """Import the records of ``path``; idempotent (two processes may both do it)."""
        db.execute("ATTACH DATABASE ? AS legacy", (str(path),))
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                n = db.execute(
                    "INSERT OR IGNORE INTO outgoing(account, recipient, submitted, submission) "
                    "SELECT account, recipient, submitted, submission FROM legacy.outgoing").rowcount
                OutgoingLog.rebuild(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            db.execute("DETACH DATABASE legacy")
        try:
            os.replace(path, path.with_name(path.name + ".imported"))
        except FileNotFoundError:  # another process imported it just now
            pass
        log.info("ratelimit_records_imported", file=str(path), records=n)

    @staticmethod
    def rebuild(db: sqlite3.Connection) -> None:
        """Recompute ``outgoing_first`` and ``outgoing_minute`` from ``outgoing``, in the
        caller's transaction."""
        for stmt in _REBUILD.split(";"):  # (executescript would commit first)
            if stmt.strip():
                db.execute(stmt)

    @staticmethod
    def in_window(db: sqlite3.Connection, account: str, now: float) -> int:
        """Records of ``account`` newer than ``now`` - 24 h."""
        start = now - DAY
        m = _minute(start)
        (buckets,) = db.execute(
            "SELECT COALESCE(SUM(n), 0) FROM outgoing_minute WHERE account = ? AND minute > ?",
            (account, m)).fetchone()
        (edge,) = db.execute(
            "SELECT COUNT(*) FROM outgoing WHERE account = ? AND submitted > ? AND submitted < ?",
            (account, start, (m + 1) * 60)).fetchone()
        return buckets + edge

    @staticmethod
    def first_time_count(db: sqlite3.Connection, account: str, recipients: list[str], now: float) -> int:
        """New recipients never sent to before ``now``, plus recipients first sent to in the
        window."""
        count = 0
        for r in set(recipients):
            row = db.execute("SELECT first FROM outgoing_first WHERE account = ? AND recipient = ?",
                             (account, r)).fetchone()
            if row is None or row[0] > now:
                count += 1
        start = now - DAY
        m = _minute(start)
        (buckets,) = db.execute(
            "SELECT COALESCE(SUM(first_n), 0) FROM outgoing_minute WHERE account = ? AND minute > ?",
            (account, m)).fetchone()
        (edge,) = db.execute(
            "SELECT COUNT(*) FROM outgoing_first WHERE account = ? AND first > ? AND first < ?",
            (account, start, (m + 1) * 60)).fetchone()
        return count + buckets + edge

    @staticmethod
    def record(db: sqlite3.Connection, submission: Submission) -> None:
        """Count ``submission`` (idempotent per submission id). Runs in the caller's
        transaction."""
        now = submission.time or time.time()
        account = submission.account
        minute = _minute(now)
        added = 0
        firsts = 0
        for r in dict.fromkeys(submission.recipients):
            cur = db.execute(
                "INSERT OR IGNORE INTO outgoing(account, recipient, submitted, submission) VALUES (?, ?, ?, ?)",
                (account, r, now, submission.id))
            if cur.rowcount <= 0:
                continue
            added += 1
            row = db.execute("SELECT first FROM outgoing_first WHERE account = ? AND recipient = ?",
                             (account, r)).fetchone()
            if row is None:
                db.execute("INSERT INTO outgoing_first(account, recipient, first) VALUES (?, ?, ?)",
                           (account, r, now))
                firsts += 1
            elif now < row[0]:  # a record older than the first known (clock moved back)
                db.execute("UPDATE outgoing_first SET first = ? WHERE account = ? AND recipient = ?",
                           (now, account, r))
                db.execute("UPDATE outgoing_minute SET first_n = first_n - 1 WHERE account = ? AND minute = ?",
                           (account, _minute(row[0])))
                firsts += 1
        if added:
            db.execute(
                "INSERT INTO outgoing_minute(account, minute, n, first_n) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(account, minute) DO UPDATE SET n = n + excluded.n, first_n = first_n + excluded.first_n",
                (account, minute, added, firsts))


class LimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(
        None, description="Limit for every account using this limiter; default the account's setting."
    )


class _Limiter:
    setting = ""
    default = 0

    def __init__(self, name: str, settings: LimitSettings, state_dir: Path):
        self.name = name
        self.settings = settings
        self.log = OutgoingLog(Path(state_dir).parent / "outgoing.db")

    def setup(self, db: sqlite3.Connection) -> None:
        self.log.setup(db)

    def limit(self, submission: Submission) -> int:
        if self.settings.limit is not None:
            return self.settings.limit
        value = getattr(submission.account_config, self.setting, None)
        return value if isinstance(value, int) and value != 0 else self.default

    def record(self, db: sqlite3.Connection, submission: Submission) -> None:
        # Both built-ins share the tables; the second record() of a submission adds nothing.
        self.log.record(db, submission)


class MessagesPerDay(_Limiter):
    setting = "max_outgoing_messages_per_day"
    default = 1000

    def check(self, db: sqlite3.Connection, submission: Submission) -> RateLimitDecision | None:
        now = submission.time or time.time()
        n = self.log.in_window(db, submission.account, now)
        limit = self.limit(submission)
        if n + len(submission.recipients) > limit:
            return RateLimitDecision(
                451, "4.7.1",
                f"max number of messages ({limit}) over past 24h reached, try increasing "
                f"per-account setting {self.setting}", setting=self.setting)
        return None


class FirstTimeRecipientsPerDay(_Limiter):
    setting = "max_first_time_recipients_per_day"
    default = 200

    def check(self, db: sqlite3.Connection, submission: Submission) -> RateLimitDecision | None:
        limit = self.limit(submission)
        now = submission.time or time.time()
        n = self.log.in_window(db, submission.account, now)
        if n + len(submission.recipients) < limit:
            return None
        if self.log.first_time_count(db, submission.account, list(submission.recipients), now) <= limit:
            return None
        return RateLimitDecision(
            451, "4.7.1",
            f"max number of new/first-time recipients ({limit}) over past 24h reached, try "
            f"increasing per-account setting {self.setting}", setting=self.setting)


DEFAULT_LIMITERS = ("messages_per_day", "first_time_recipients_per_day")


@hookimpl
def mox_register_rate_limiters() -> list[RateLimiterKind]:
    return [
        RateLimiterKind("messages_per_day", LimitSettings, MessagesPerDay,
                        "Recipients per rolling 24 hours (account max_outgoing_messages_per_day)."),
        RateLimiterKind("first_time_recipients_per_day", LimitSettings, FirstTimeRecipientsPerDay,
                        "New recipients per rolling 24 hours (account max_first_time_recipients_per_day)."),
    ]
