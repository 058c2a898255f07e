"""Applying rate limiters to submissions: which, in which order, and atomically.

An account's ``rate_limiters`` list in domains.toml names limiters in order: a name from
``[rate_limiters.NAME]`` (a configured kind with settings) or a kind used with its default
settings. Without a list, the built-ins ``messages_per_day`` then
``first_time_recipients_per_day`` apply.

The SMTP session builds a :class:`RateLimitCheck` (:meth:`RateLimits.prepare`) and hands it to
the queue with the message. The queue's writer thread runs it inside the SQLite write
transaction that inserts the message's rows (``BEGIN IMMEDIATE``): check every limiter,
insert, record every limiter, one commit. So concurrent submissions, in this process or
another one adding to the same queue, cannot both pass a limit that only one of them fits,
and nothing is counted that was not queued (or queued that was not counted).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass

import structlog

from mox_core.builtin.rate_limiters import DEFAULT_LIMITERS
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.errors import MoxError
from mox_core.plugins.kinds import RateLimitDecision, RateLimiter, Submission

log = structlog.get_logger(component="ratelimit")


class RateLimited(MoxError):
    """A rate limiter refused the submission; ``reply`` is the SMTP reply."""

    def __init__(self, decision: RateLimitDecision):
        self.decision = decision
        super().__init__(self.reply)

    @property
    def reply(self) -> str:
        d = self.decision
        return f"{d.code} {d.enhanced_code} {d.text}"


@dataclass
class RateLimitCheck:
    """One submission and the limiters that apply to it, run by the queue's writer thread."""

    submission: Submission
    limiters: list[tuple[str, RateLimiter]]

    def setup(self, db: sqlite3.Connection, ready: dict[int, object]) -> None:
        """``setup(db)`` of limiters not yet set up on ``db`` (outside a transaction).
        ``ready`` (per connection) keeps the limiters done, so their ids stay unique."""
        for _name, limiter in self.limiters:
            if id(limiter) in ready:
                continue
            fn = getattr(limiter, "setup", None)
            if fn is not None:
                fn(db)
            ready[id(limiter)] = limiter

    def check(self, db: sqlite3.Connection) -> None:
        """Raise :class:`RateLimited` with the first limiter's refusal, in list order."""
        for name, limiter in self.limiters:
            decision = limiter.check(db, self.submission)
            if decision is not None:
                log.info("submission_rate_limited", account=self.submission.account, limiter=name,
                         setting=decision.setting)
                raise RateLimited(decision)

    def record(self, db: sqlite3.Connection) -> None:
        for _name, limiter in self.limiters:
            limiter.record(db, self.submission)


class RateLimits:
    def __init__(self, holder: ConfigHolder):
        self.holder = holder
        self._built: tuple[int, dict[str, RateLimiter]] | None = None

    def _instances(self, cfg: Config) -> dict[str, RateLimiter]:
        key = id(cfg.dynamic)
        if self._built is None or self._built[0] != key:
            out: dict[str, RateLimiter] = {}
            root = cfg.data_dir / "ratelimit"
            for name, entry in cfg.dynamic.rate_limiters.items():
                kind = cfg.plugins.rate_limiters[entry.kind]
                out[name] = kind.factory(name, entry.settings, root / entry.kind)
            self._built = (key, out)
        inst = self._built[1]
        return inst

    def _get(self, cfg: Config, name: str) -> RateLimiter | None:
        """A configured limiter, else a kind used by name with its default settings."""
        inst = self._instances(cfg)
        if name not in inst:
            kind = cfg.plugins.rate_limiters.get(name)
            if kind is None:
                return None
            inst[name] = kind.factory(name, kind.settings_model(), cfg.data_dir / "ratelimit" / name)
        return inst[name]

    def limiters_for(self, cfg: Config, account: str) -> list[tuple[str, RateLimiter]]:
        acc = cfg.account(account)
        names = acc.rate_limiters if acc is not None and acc.rate_limiters is not None else list(DEFAULT_LIMITERS)
        out = []
        for n in names:
            limiter = self._get(cfg, n)
            if limiter is not None:
                out.append((n, limiter))
        return out

    def submission(self, account: str, mail_from: str, recipients: list[str], size: int = 0) -> Submission:
        cfg = self.holder.get()
        return Submission(account=account, mail_from=mail_from, recipients=recipients, size=size,
                          id=uuid.uuid4().hex, time=time.time(), account_config=cfg.account(account))

    def prepare(self, account: str, mail_from: str, recipients: list[str], size: int = 0) -> RateLimitCheck | None:
        """What the queue runs for this submission; ``None`` when no limiter applies."""
        limiters = self.limiters_for(self.holder.get(), account)
        if not limiters:
            return None
        return RateLimitCheck(self.submission(account, mail_from, recipients, size), limiters)


__all__ = ["RateLimitCheck", "RateLimited", "RateLimits"]
