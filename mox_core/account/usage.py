"""What the overview page shows of an account: its addresses, and its outgoing limits with
the use of the last 24 hours.

The use is read from the rate limiters' tables in the queue database
(``<data_dir>/queue/index.db``, opened read-only) with the functions the limiters use
themselves (:class:`mox_core.builtin.rate_limiters.OutgoingLog`), and each limit is the one
the limiter applies (the ``limit`` of a ``[rate_limiters.NAME]`` table, else the account's
setting, else the default), so the page shows what a submission would be checked against.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mox_core.builtin.rate_limiters import (
    DEFAULT_LIMITERS,
    FirstTimeRecipientsPerDay,
    LimitSettings,
    MessagesPerDay,
    OutgoingLog,
)
from mox_core.config.resolved import Config
from mox_core.plugins.kinds import Submission

__all__ = ["Address", "Limit", "SubmissionPort", "account_addresses", "account_limits", "submission_ports"]


@dataclass(frozen=True)
class Address:
    address: str  # as configured; "@example.org" for a catch-all
    catchall: bool
    mailbox: str
    full_name: str


@dataclass(frozen=True)
class Limit:
    name: str  # the limiter's name in the config
    label: str
    description: str
    limit: int | None  # None: a plugin's limiter, whose numbers this page does not know
    used: int | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.used / self.limit) if self.limit and self.used is not None else 0.0


@dataclass(frozen=True)
class SubmissionPort:
    """Where a mail client sends the account's mail (RFC 8314 §3.3: implicit TLS first)."""

    host: str
    port: int
    security: str  # "TLS", "STARTTLS" or "none"


def submission_ports(cfg: Config) -> list[SubmissionPort]:
    """The submission ports of the listeners: implicit TLS (submissions) before STARTTLS."""
    tls: list[SubmissionPort] = []
    starttls: list[SubmissionPort] = []
    for lst in cfg.static.listeners.values():
        host = lst.hostname or cfg.static.hostname
        if lst.submissions.enabled:
            tls.append(SubmissionPort(host, lst.submissions.port, "TLS"))
        if lst.submission.enabled:
            plain = lst.tls is None and lst.submission.no_require_starttls
            starttls.append(SubmissionPort(host, lst.submission.port, "none" if plain else "STARTTLS"))
    return list(dict.fromkeys(tls + starttls))


def account_addresses(cfg: Config, account: str) -> list[Address]:
    """The account's destinations: exact addresses first (sorted), then catch-alls."""
    acc = cfg.account(account)
    if acc is None:
        return []
    out = [Address(addr, addr.startswith("@"), dest.mailbox, dest.full_name or acc.full_name)
           for addr, dest in acc.destinations.items()]
    return sorted(out, key=lambda a: (a.catchall, a.address.partition("@")[2], a.address))


_BUILTIN = {
    "messages_per_day": (MessagesPerDay, "Messages sent",
                         "Recipients of the messages sent in the last 24 hours (each recipient counts)."),
    "first_time_recipients_per_day": (FirstTimeRecipientsPerDay, "First-time recipients",
                                      "Recipients never sent to before, in the last 24 hours."),
}


def account_limits(cfg: Config, account: str, data_dir: Path, now: float | None = None) -> list[Limit]:
    """The account's outgoing rate limiters in the order they are checked, with the use of
    the last 24 hours for the built-in ones."""
    acc = cfg.account(account)
    if acc is None:
        return []
    now = time.time() if now is None else now
    names = acc.rate_limiters if acc.rate_limiters is not None else list(DEFAULT_LIMITERS)
    db = _open_queue_db(Path(data_dir) / "queue" / "index.db")
    out = []
    try:
        for name in names:
            entry = cfg.dynamic.rate_limiters.get(name)
            kind = entry.kind if entry is not None else name
            builtin = _BUILTIN.get(kind)
            if builtin is None:
                out.append(Limit(name, name, f"Rate limiter of kind {kind!r} (a plugin).", None, None))
                continue
            cls, label, description = builtin
            settings = entry.settings if entry is not None else LimitSettings()
            limiter = cls(name, settings, Path(data_dir) / "ratelimit" / name)  # type: ignore[arg-type]
            limit = limiter.limit(Submission(account=account, mail_from="", recipients=(), account_config=acc))
            out.append(Limit(name, label, description, limit, _used(db, kind, account, now)))
    finally:
        if db is not None:
            db.close()
    return out


def _open_queue_db(path: Path) -> sqlite3.Connection | None:
    if not path.exists():
        return None
    try:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None


def _used(db: sqlite3.Connection | None, kind: str, account: str, now: float) -> int:
    """Records in the window (messages_per_day) or first-time recipients in it; 0 when
    nothing was ever sent (no queue database or no tables yet)."""
    if db is None:
        return 0
    try:
        if kind == "messages_per_day":
            return OutgoingLog.in_window(db, account, now)
        return OutgoingLog.first_time_count(db, account, [], now)
    except sqlite3.OperationalError:  # the tables are made at the first submission
        return 0
