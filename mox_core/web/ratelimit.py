"""Requests per client IP, as mox limits them: per minute and per hour, for the address and
for the two networks around it, so that one host or one network cannot take the server.

The classes (IPv4 /32, /26, /21; IPv6 /64, /48, /32) may make 1000, 3000 and 9000 requests a
minute and 5000, 15000 and 45000 an hour; a request over any limit gets 429. Counts are
kept in fixed windows, in memory, per web process.
"""

from __future__ import annotations

import ipaddress
import time

__all__ = ["RequestLimiter"]

PREFIXES_V4 = (32, 26, 21)
PREFIXES_V6 = (64, 48, 32)
PER_MINUTE = (1000, 3000, 9000)
PER_HOUR = (5000, 15000, 45000)


class _Window:
    __slots__ = ("counts", "length", "limits", "start")

    def __init__(self, length: float, limits: tuple[int, int, int]) -> None:
        self.length = length
        self.limits = limits
        self.start = 0.0
        self.counts: dict[tuple[int, int, int], int] = {}

    def allow(self, keys: list[tuple[int, int, int]], now: float) -> bool:
        if now - self.start >= self.length:
            self.start = now - (now % self.length)
            self.counts = {}
        for i, key in enumerate(keys):
            if self.counts.get(key, 0) >= self.limits[i]:
                return False
        for key in keys:
            self.counts[key] = self.counts.get(key, 0) + 1
        return True


class RequestLimiter:
    """``allow(ip)`` counts a request of ``ip`` and says whether it is within the limits."""

    def __init__(self, per_minute: tuple[int, int, int] = PER_MINUTE,
                 per_hour: tuple[int, int, int] = PER_HOUR) -> None:
        self._windows = (_Window(60.0, per_minute), _Window(3600.0, per_hour))

    def allow(self, ip: str, now: float | None = None) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return True  # a Unix socket or a test client: nothing to count by
        now = time.time() if now is None else now
        prefixes = PREFIXES_V4 if addr.version == 4 else PREFIXES_V6
        bits = addr.max_prefixlen
        value = int(addr)
        keys = [(addr.version, n, value >> (bits - n)) for n in prefixes]
        return all(w.allow(keys, now) for w in self._windows)
