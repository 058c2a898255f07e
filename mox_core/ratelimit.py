"""Applying rate limiters to submissions: which, in which order, and atomically per account.

An account's ``rate_limiters`` list in domains.toml names limiters in order: a name from
``[rate_limiters.NAME]`` (a configured kind with settings) or a kind used with its default
settings. Without a list, the built-ins ``messages_per_day`` then
``first_time_recipients_per_day`` apply. Check, queue and record happen under one lock per
account, so concurrent submissions cannot both pass a limit that only one of them fits.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mox_core.builtin.rate_limiters import DEFAULT_LIMITERS
from mox_core.config import Config, ConfigHolder
from mox_core.kinds import RateLimitDecision, RateLimiter, Submission


class RateLimits:
    def __init__(self, holder: ConfigHolder):
        self.holder = holder
        self._built: tuple[int, dict[str, RateLimiter]] | None = None
        self._locks: dict[str, asyncio.Lock] = {}

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

    @asynccontextmanager
    async def guard(self, account: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(account, asyncio.Lock())
        async with lock:
            yield

    async def check(self, submission: Submission) -> RateLimitDecision | None:
        for _name, limiter in self.limiters_for(self.holder.get(), submission.account):
            decision = await limiter.check(submission)
            if decision is not None:
                return decision
        return None

    async def record(self, submission: Submission) -> None:
        for _name, limiter in self.limiters_for(self.holder.get(), submission.account):
            await limiter.record(submission)


__all__ = ["RateLimits"]
