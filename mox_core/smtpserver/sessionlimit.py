"""How many SMTP sessions one client address has open: one address cannot take every session
of a listener (Postfix ``smtpd_client_connection_count_limit``, mox's per-IP connection limit).

One :class:`SessionLimit` per service of a listener, in each process that serves it: with
several SMTP worker processes, an address may have up to the limit in each of them.
"""

from __future__ import annotations

from mox_core.accounts.sasl import AuthFailureLimiter

__all__ = ["SessionLimit"]


class SessionLimit:
    """Open sessions per client address (an IPv6 address counts for its /64, as for failed
    logins); at most ``limit`` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, ip: str) -> str | None:
        """Count a new session of ``ip``: the key to :meth:`release` it with, or None when the
        address is at its limit (the session must then be refused)."""
        key = AuthFailureLimiter.key(ip)
        n = self._open.get(key, 0)
        if n >= self.limit:
            return None
        self._open[key] = n + 1
        return key

    def release(self, key: str) -> None:
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)

    def open_sessions(self, ip: str) -> int:
        return self._open.get(AuthFailureLimiter.key(ip), 0)
