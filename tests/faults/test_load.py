"""Case 35 and the load test: many sessions, slow clients (slowloris), idle ones, TLS
handshakes that stop half way, and one address trying to take every session, against a real
``mox serve`` (two SMTP worker processes), while normal clients must still be served.

The clients come from many loopback addresses (127.0.x.y all reach 127.0.0.1's listener), as
a crowd would, so that the per-address session limit (``smtp_max_sessions_per_ip``) applies
to the one address that tries to exceed it, not to the crowd.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import threading
import time

from mox_core.smtp import codes
from mox_core.smtpserver.sessionlimit import SessionLimit
from tests.security.smtpraw import Raw, message, stuffed, transaction, wait_for


def test_b35a_session_limit_counts_per_address_and_ipv6_per_64():
    limit = SessionLimit(2)
    a, b = limit.acquire("192.0.2.1"), limit.acquire("192.0.2.1")
    assert a and b and limit.acquire("192.0.2.1") is None
    assert limit.acquire("192.0.2.2") is not None  # another address has its own count
    limit.release(a)
    assert limit.acquire("192.0.2.1") is not None
    assert limit.acquire("2001:db8::1") and limit.acquire("2001:db8::2")
    assert limit.acquire("2001:db8::3") is None  # the same /64
    assert limit.acquire("::ffff:192.0.2.2") is not None  # IPv4-mapped is the IPv4 address
    assert limit.open_sessions("192.0.2.2") == 2


def test_b35a_one_address_cannot_take_all_sessions(own_site):
    site = own_site(listener_extra="smtp_max_sessions_per_ip = 20")
    hog = [Raw(site.smtp_port, source="127.0.0.35") for _ in range(20)]
    try:
        assert all(c.greeting.startswith("220") for c in hog)
        with Raw(site.smtp_port, source="127.0.0.35", greeting=False) as extra:
            assert extra.reply() == codes.TOO_MANY_SESSIONS
            assert extra.closed()
        with Raw(site.smtp_port, source="127.0.0.36") as other:  # everyone else is still served
            other.ehlo()
            transaction(other)
            assert other.cmd(stuffed(message("not-hogged"))).startswith("250")
        hog.pop().close()  # one session ends: the address may open one again

        def greeted() -> bool:
            with Raw(site.smtp_port, source="127.0.0.35", greeting=False) as c:
                return c.reply().startswith("220")
        wait_for(greeted, what="a session freed by the closed one")
    finally:
        for c in hog:
            c.close()


def test_b35b_a_trickled_command_is_cut_off_at_the_idle_timeout(own_site):
    site = own_site(listener_extra="smtp_idle_timeout = 3")
    with Raw(site.smtp_port) as c:
        c.ehlo()
        start = time.monotonic()
        c.sock.settimeout(1.0)
        reply = ""
        for byte in b"MAIL FROM:<slow@ext.test>":  # one byte a second, never a whole line
            try:
                c.send(bytes([byte]))
                reply = c.reply()
                break
            except (TimeoutError, EOFError, BrokenPipeError, ConnectionResetError):
                continue
        elapsed = time.monotonic() - start
        assert reply.startswith("421 4.4.2"), reply
        assert 2.5 < elapsed < 6, elapsed


class Crowd:
    """Hostile and idle sessions on one event loop in a thread: ``idle`` connect and wait,
    ``slow`` send a command one byte every 2 s, ``tls_stalled`` send half a TLS ClientHello
    (to the implicit-TLS port, and after STARTTLS) and stop."""

    def __init__(self, site, idle: int, slow: int, tls_stalled: int, sources: int = 40) -> None:
        self.site, self.counts = site, {"idle": idle, "slow": slow, "tls": tls_stalled}
        self.sources = [f"127.0.{1 + i // 200}.{10 + i % 200}" for i in range(sources)]
        self.connected = {"idle": 0, "slow": 0, "tls": 0}
        self.refused: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)

    async def _open(self, n: int, port: int):
        src = self.sources[n % len(self.sources)]
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))

    async def _session(self, kind: str, n: int) -> None:
        try:
            if kind == "tls" and n % 2:
                reader, writer = await self._open(n, self.site.mox.submissions_port)
            else:
                reader, writer = await self._open(n, self.site.smtp_port if kind != "tls" else
                                                  self.site.submission_port)
                greeting = await asyncio.wait_for(reader.readline(), 30)
                if not greeting.startswith(b"220"):
                    self.refused.append(greeting.decode(errors="replace"))
                    return
            if kind == "tls" and not n % 2:
                writer.write(b"EHLO crowd.test\r\n")
                while (await reader.readline())[3:4] == b"-":
                    pass
                writer.write(b"STARTTLS\r\n")
                await reader.readline()
            if kind == "tls":  # the first bytes of a TLS ClientHello, then nothing
                writer.write(bytes.fromhex("16030100f4010000f00303") + os.urandom(20))
            self.connected[kind] += 1
            if kind == "slow":
                for byte in b"EHLO slowloris.test\r\n":
                    writer.write(bytes([byte]))
                    try:
                        await asyncio.wait_for(self.stop.wait(), 2)
                        break
                    except TimeoutError:
                        pass
            await self.stop.wait()
            writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.refused.append(f"{kind}: {exc!r}")

    async def _main(self) -> None:
        tasks = []
        n = 0
        for kind, count in self.counts.items():
            for _ in range(count):
                tasks.append(asyncio.create_task(self._session(kind, n)))
                n += 1
                if n % 50 == 0:
                    await asyncio.sleep(0.02)  # a crowd arrives, not one SYN flood
        self.ready.set()
        await asyncio.gather(*tasks)


def test_b35_1000_hostile_sessions_while_normal_clients_are_served(own_site):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
    site = own_site(static_top="", listener_extra="smtp_idle_timeout = 60")
    crowd = Crowd(site, idle=600, slow=250, tls_stalled=150)
    latencies: list[float] = []
    try:
        crowd.start()
        wait_for(lambda: sum(crowd.connected.values()) + len(crowd.refused) >= 1000, timeout=60,
                 what="1000 sessions open")
        assert crowd.refused == []
        held = dict(crowd.connected)
        for i in range(40):  # normal clients: SMTP and submission, one after the other
            t0 = time.monotonic()
            if i % 2:
                site.submit("alice@local.test", ["x@ext.test"], message(f"load-out-{i}", "alice@local.test", "x@ext.test"))
            else:
                with Raw(site.smtp_port, timeout=30) as c:
                    c.ehlo()
                    transaction(c)
                    assert c.cmd(stuffed(message(f"load-in-{i}", body=b"x" * 20_000 + b"\r\n"))).startswith("250")
            latencies.append(time.monotonic() - t0)
        wait_for(lambda: len([m for m in site.sent() if "load-out-" in m.text]) == 20, what="the submissions")
        wait_for(lambda: len([d for d in site.stored().values() if b"load-in-" in d]) == 20, what="the SMTP messages")
        # the crowd is still there: the server did not shed it to serve the others
        assert sum(1 for _ in _established(site.smtp_port)) >= held["idle"] + held["slow"] - 10
    finally:
        crowd.close()
    print(f"\nload: {sum(held.values())} sessions held ({held['idle']} idle, {held['slow']} slowloris, "
          f"{held['tls']} stalled TLS handshakes) from {len(crowd.sources)} addresses; 40 normal clients served, "
          f"latency median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < 10  # far inside every client timeout (RFC 5321: minutes)


def _established(port: int):
    """Established TCP connections to ``port`` on this machine (server side), from /proc."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    yield local
