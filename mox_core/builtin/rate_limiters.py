"""Core's outgoing rate limiters (mox section 7), registered through the rate-limiter hook.

Both read one table of outgoing recipients per data directory (SQLite ``ratelimit.db``): a
row per recipient of every queued submission, never pruned, since "first-time recipient"
means never sent to before, ever. The window is the rolling 24 hours before now.

- ``messages_per_day``: n + r > limit refuses (n: records in the window, r: recipients of the
  new submission); limit from the account's ``max_outgoing_messages_per_day`` (default 1000).
- ``first_time_recipients_per_day``: if n + r reaches the limit (``max_first_time_recipients_
  per_day``, default 200), count first-time recipients: new recipients never sent to, plus
  recipients in the window whose earliest record there had no record before it; more than
  the limit refuses.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mox_core import hookimpl
from mox_core.kinds import RateLimitDecision, RateLimiterKind, Submission

DAY = 24 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outgoing (
    account TEXT NOT NULL,
    recipient TEXT NOT NULL,
    submitted REAL NOT NULL,
    submission TEXT NOT NULL,
    UNIQUE (submission, recipient)
);
CREATE INDEX IF NOT EXISTS outgoing_account_time ON outgoing(account, submitted);
CREATE INDEX IF NOT EXISTS outgoing_account_recipient ON outgoing(account, recipient, submitted);
"""


class OutgoingLog:
    """The outgoing-recipients table; one per database file, shared by both limiters."""

    _instances: dict[str, OutgoingLog] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)
        self.lock = threading.Lock()

    @classmethod
    def for_path(cls, path: Path) -> OutgoingLog:
        with cls._guard:
            key = str(path.resolve())
            if key not in cls._instances:
                cls._instances[key] = cls(path)
            return cls._instances[key]

    def in_window(self, account: str, now: float) -> int:
        with self.lock:
            return self.conn.execute(
                "SELECT COUNT(*) FROM outgoing WHERE account = ? AND submitted > ?",
                (account, now - DAY)).fetchone()[0]

    def first_time_count(self, account: str, recipients: list[str], now: float) -> int:
        with self.lock:
            count = 0
            for r in set(recipients):
                seen = self.conn.execute(
                    "SELECT 1 FROM outgoing WHERE account = ? AND recipient = ? AND submitted <= ? LIMIT 1",
                    (account, r, now)).fetchone()
                if seen is None:
                    count += 1
            # Recipients in the window whose earliest record in the window was their first ever.
            count += self.conn.execute(
                """SELECT COUNT(*) FROM (
                       SELECT recipient, MIN(submitted) AS first FROM outgoing
                       WHERE account = ? AND submitted > ? GROUP BY recipient) w
                   WHERE NOT EXISTS (SELECT 1 FROM outgoing o WHERE o.account = ?
                                     AND o.recipient = w.recipient AND o.submitted < w.first)""",
                (account, now - DAY, account)).fetchone()[0]
            return count

    def record(self, submission: Submission) -> None:
        now = submission.time or time.time()
        with self.lock:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT OR IGNORE INTO outgoing(account, recipient, submitted, submission) VALUES (?, ?, ?, ?)",
                [(submission.account, r, now, submission.id) for r in submission.recipients])
            self.conn.execute("COMMIT")


class LimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(
        None, description="Limit for every account using this limiter; default the account's setting."
    )


class _Limiter:
    setting = ""

    def __init__(self, name: str, settings: LimitSettings, state_dir: Path):
        self.name = name
        self.settings = settings
        self.log = OutgoingLog.for_path(Path(state_dir).parent / "outgoing.db")

    def limit(self, submission: Submission) -> int:
        if self.settings.limit is not None:
            return self.settings.limit
        value = getattr(submission.account_config, self.setting, None)
        return value if isinstance(value, int) and value != 0 else self.default

    async def record(self, submission: Submission) -> None:
        await asyncio.to_thread(self.log.record, submission)


class MessagesPerDay(_Limiter):
    setting = "max_outgoing_messages_per_day"
    default = 1000

    async def check(self, submission: Submission) -> RateLimitDecision | None:
        now = submission.time or time.time()
        n = await asyncio.to_thread(self.log.in_window, submission.account, now)
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

    def _check(self, submission: Submission, limit: int) -> bool:
        now = submission.time or time.time()
        n = self.log.in_window(submission.account, now)
        if n + len(submission.recipients) < limit:
            return True
        return self.log.first_time_count(submission.account, list(submission.recipients), now) <= limit

    async def check(self, submission: Submission) -> RateLimitDecision | None:
        limit = self.limit(submission)
        if await asyncio.to_thread(self._check, submission, limit):
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
