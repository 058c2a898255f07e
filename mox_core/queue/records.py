"""What the queue stores: the SQLite schema, one row per recipient, and admin filters.

Kept apart from :class:`mox_core.queue.queuestore.QueueStore` (which does the I/O) so the CLI can decode
rows sent over the ctl socket without loading the store.

``domain_due`` is what keeps picking fast at any queue size: per recipient domain, the
earliest ``next_attempt`` of its non-held rows, kept current by triggers that read the index
``(hold, recipient_domain, next_attempt)`` (O(log n) per change). The scheduler reads the
first few ``domain_due`` rows instead of walking every due message of a busy domain.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["COLUMNS", "SCHEMA", "Filter", "QueuedMessage"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS msg (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    base_id INTEGER NOT NULL,
    account TEXT,
    mail_from TEXT NOT NULL,
    recipient TEXT NOT NULL,
    recipient_domain TEXT NOT NULL,
    queued REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_attempt REAL,
    results TEXT NOT NULL DEFAULT '[]',
    hold INTEGER NOT NULL DEFAULT 0,
    transport TEXT,
    size INTEGER NOT NULL,
    has_8bit INTEGER NOT NULL DEFAULT 0,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    message_id TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    file TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS msg_base ON msg(base_id);
CREATE INDEX IF NOT EXISTS msg_domain_due ON msg(hold, recipient_domain, next_attempt);
CREATE INDEX IF NOT EXISTS msg_next ON msg(next_attempt);

CREATE TABLE IF NOT EXISTS domain_due (
    domain TEXT PRIMARY KEY,
    next_attempt REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS domain_due_next ON domain_due(next_attempt);

CREATE TRIGGER IF NOT EXISTS msg_ai AFTER INSERT ON msg WHEN NEW.hold = 0 BEGIN
    INSERT INTO domain_due(domain, next_attempt) VALUES (NEW.recipient_domain, NEW.next_attempt)
    ON CONFLICT(domain) DO UPDATE SET next_attempt = MIN(next_attempt, excluded.next_attempt);
END;
CREATE TRIGGER IF NOT EXISTS msg_au AFTER UPDATE OF next_attempt, hold ON msg
WHEN OLD.next_attempt IS NOT NEW.next_attempt OR OLD.hold IS NOT NEW.hold BEGIN
    DELETE FROM domain_due WHERE domain = NEW.recipient_domain;
    INSERT INTO domain_due(domain, next_attempt)
        SELECT recipient_domain, next_attempt FROM msg
        WHERE hold = 0 AND recipient_domain = NEW.recipient_domain
        ORDER BY next_attempt LIMIT 1;
END;
CREATE TRIGGER IF NOT EXISTS msg_ad AFTER DELETE ON msg WHEN OLD.hold = 0 BEGIN
    DELETE FROM domain_due WHERE domain = OLD.recipient_domain;
    INSERT INTO domain_due(domain, next_attempt)
        SELECT recipient_domain, next_attempt FROM msg
        WHERE hold = 0 AND recipient_domain = OLD.recipient_domain
        ORDER BY next_attempt LIMIT 1;
END;

-- Small messages are stored here instead of in a file (msg.file = "db/<base_id>"): written
-- in the transaction that inserts their rows, removed with the last of them.
CREATE TABLE IF NOT EXISTS msg_data (
    base_id INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS msg_data_ad AFTER DELETE ON msg
WHEN NOT EXISTS (SELECT 1 FROM msg WHERE base_id = OLD.base_id) BEGIN
    DELETE FROM msg_data WHERE base_id = OLD.base_id;
END;
"""

COLUMNS = (
    "id, base_id, account, mail_from, recipient, recipient_domain, queued, attempts, "
    "max_attempts, next_attempt, last_attempt, results, hold, transport, size, has_8bit, "
    "smtputf8, message_id, subject, file"
)



@dataclass(frozen=True)
class QueuedMessage:
    """One row: one recipient of one queued submission."""

    id: int
    base_id: int
    account: str | None
    mail_from: str
    recipient: str
    recipient_domain: str
    queued: float
    attempts: int
    max_attempts: int  # 0 until the first attempt sets the effective value
    next_attempt: float
    last_attempt: float | None
    results: list[dict[str, Any]]
    hold: bool
    transport: str | None  # admin override; None: routes decide
    size: int
    has_8bit: bool
    smtputf8: bool
    message_id: str
    subject: str
    file: str  # relative to queue/msg/

    @classmethod
    def from_row(cls, row: sqlite3.Row | Sequence[Any]) -> QueuedMessage:
        r = list(row)
        r[11] = json.loads(r[11])
        r[12], r[15], r[16] = bool(r[12]), bool(r[15]), bool(r[16])
        return cls(*r)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QueuedMessage:
        return cls(**d)

    @property
    def last_error(self) -> str:
        for r in reversed(self.results):
            if not r.get("success") and r.get("text"):
                return str(r["text"])
        return ""


@dataclass(frozen=True)
class Filter:
    """Which messages an admin command acts on; all given criteria must hold (mox HEAD)."""

    ids: tuple[int, ...] = ()
    account: str | None = None
    from_: str | None = None  # substring of the envelope sender ("@example.com" for a domain)
    to: str | None = None  # substring of the recipient
    transport: str | None = None  # exact override; "" selects messages without override
    hold: bool | None = None
    limit: int | None = None

    def where(self) -> tuple[str, list[Any]]:
        conds: list[str] = []
        args: list[Any] = []
        if self.ids:
            conds.append(f"id IN ({','.join('?' * len(self.ids))})")
            args += list(self.ids)
        if self.account is not None:
            conds.append("account = ?")
            args.append(self.account)
        if self.from_:
            conds.append("instr(lower(mail_from), ?) > 0")
            args.append(self.from_.lower())
        if self.to:
            conds.append("instr(lower(recipient), ?) > 0")
            args.append(self.to.lower())
        if self.transport is not None:
            if self.transport == "":
                conds.append("transport IS NULL")
            else:
                conds.append("transport = ?")
                args.append(self.transport)
        if self.hold is not None:
            conds.append("hold = ?")
            args.append(int(self.hold))
        return (" WHERE " + " AND ".join(conds)) if conds else "", args

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ids"] = list(self.ids)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Filter:
        d = dict(d or {})
        d["ids"] = tuple(int(i) for i in d.get("ids") or ())
        return cls(**d)
