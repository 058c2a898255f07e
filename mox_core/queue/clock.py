"""The queue's clock: real time, or time that a test moves (:class:`FakeClock`), so retry
schedules of hours are tested in milliseconds."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "RealClock"]


class Clock(Protocol):
    """Wall-clock time (epoch seconds) and a way to sleep that an event can interrupt."""

    def now(self) -> float: ...

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        """Return when ``event`` is set or ``timeout`` seconds passed (None: no timeout)."""
        ...


class RealClock:
    def now(self) -> float:
        return time.time()

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass


class FakeClock:
    """Time that only moves when a test calls :meth:`advance`; waiters past their deadline
    are woken then."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start
        self._waiters: list[tuple[float, asyncio.Event]] = []

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for deadline, ev in list(self._waiters):
            if deadline <= self.t:
                ev.set()

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.t + timeout if timeout is not None else math.inf, event)
        self._waiters.append(entry)
        try:
            await event.wait()
        finally:
            self._waiters.remove(entry)
