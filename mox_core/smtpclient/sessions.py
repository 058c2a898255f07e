"""Open SMTP sessions kept for the next message to the same host (Postfix's connection cache).

Relaying through a smarthost used to cost a new TCP connection, greeting, EHLO (STARTTLS, a
second EHLO, AUTH) and QUIT for every message. The queue owns one :class:`SessionCache` for
its lifetime and passes it to transports in ``DeliveryContext.sessions``; a smarthost
transport takes an idle session for its host (or opens one), delivers, and puts the session
back. An idle session is closed (QUIT) after ``idle_timeout`` seconds (Postfix
``smtp_connection_cache_time_limit``, 2 s), a session is not reused after ``max_age``
seconds (``smtp_connection_reuse_time_limit``, 300 s), and :meth:`SessionCache.aclose`
(queue shutdown) closes them all.

Reusing is safe against a session the server dropped meanwhile: such a failure comes before
any message data was sent, so nothing can have been delivered, and the message goes over a
new session instead (see :func:`mox_core.smtpclient.mx.deliver_to_host`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable

from mox_core.smtpclient.client import SMTPClient

__all__ = ["SessionCache"]


class SessionCache:
    def __init__(self, *, idle_timeout: float = 2.0, max_age: float = 300.0, max_idle: int = 50) -> None:
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.max_idle = max_idle  # per key
        self._idle: dict[Hashable, list[tuple[SMTPClient, asyncio.TimerHandle]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.reused = 0  # sessions taken from the cache, for tests and metrics

    def take(self, key: Hashable) -> SMTPClient | None:
        """An idle session for ``key`` that still looks usable, or None."""
        idle = self._idle.get(key)
        while idle:
            client, timer = idle.pop()
            timer.cancel()
            if client.reusable:
                self.reused += 1
                if not idle:
                    del self._idle[key]
                return client
            self._close(client, polite=False)
        self._idle.pop(key, None)
        return None

    def put(self, key: Hashable, client: SMTPClient) -> None:
        """Keep ``client`` for the next message to ``key``, or close it (QUIT) if it cannot be."""
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault(key, [])
        if not client.reusable or len(idle) >= self.max_idle or time.monotonic() - client.opened_at > self.max_age:
            if not idle:
                del self._idle[key]
            self._close(client, polite=True)
            return
        timer = loop.call_later(self.idle_timeout, self._expire, key, client)
        idle.append((client, timer))

    def _expire(self, key: Hashable, client: SMTPClient) -> None:
        idle = self._idle.get(key, [])
        for i, (c, _) in enumerate(idle):
            if c is client:
                del idle[i]
                break
        if not idle:
            self._idle.pop(key, None)
        self._close(client, polite=True)

    def _close(self, client: SMTPClient, *, polite: bool) -> None:
        task = asyncio.get_running_loop().create_task(client.quit() if polite else client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """QUIT every idle session and wait for sessions being closed."""
        for key in list(self._idle):
            for client, timer in self._idle.pop(key):
                timer.cancel()
                self._close(client, polite=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
