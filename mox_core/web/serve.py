"""The web process of ``mox serve``: the HTTP and HTTPS ports of the listeners, served by
uvicorn with the pipeline of :mod:`mox_core.web.pipeline`.

A process of its own, so that web traffic, a slow client or a misbehaving handler plugin
cannot hold up the SMTP listeners or the queue. The main process binds the sockets (so a
port in use stops the start at once, and low ports need no privileges here) and starts this
process with them (:mod:`mox_core.server.webprocess`); the process reloads ``domains.toml``
itself, and at once when the main process says ``reload`` on its pipe.

Slow clients (``[http]`` in mox.toml): the request head must arrive within ``head_timeout``
seconds (408) and is at most ``max_head`` bytes (431), an idle keep-alive connection is
closed after ``keepalive_timeout`` seconds; the pipeline limits request bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator, Mapping

import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mox_core.config.generation import Generation
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.plugins.kinds import ASGIApp
from mox_core.server.children import die_with_parent
from mox_core.server.components import stop_on_signals
from mox_core.server.tls import server_context
from mox_core.web.pipeline import WebApp
from mox_core.web.ports import web_ports

__all__ = ["GuardedHttpProtocol", "build_internal_services", "serve_web"]

log = structlog.get_logger(component="http")



_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with limits for slow or oversized request heads (set
    from ``[http]`` when the process starts)."""

    head_timeout = 30.0
    max_head = 16 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sslobj = transport.get_extra_info("ssl_object")
        version = sslobj.version() if sslobj is not None else None
        self._tls = {"tls_version": _TLS_VERSIONS.get(version, 0), "server_cert": None} if sslobj else None
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._head_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._tls is not None:  # the ASGI TLS extension, for the access log
            self.scope.setdefault("extensions", {})["tls"] = self._tls
        if self.url[:7].lower() == b"http://" or self.url[:8].lower() == b"https://":
            # absolute-form request target (RFC 9112 §3.2.2): its authority, not the Host
            # header, names the host the request is for (uvicorn keeps only its path)
            authority = self.url.split(b"/", 3)[2]
            self.headers[:] = [(k, v) for k, v in self.headers if k != b"host"] + [(b"host", authority)]
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("http_head_timeout", peer=self.client)
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process handles SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn(app: ASGIApp, ctx: ssl.SSLContext | None, keepalive: float) -> _Server:
    config = uvicorn.Config(
        app, http=GuardedHttpProtocol, ws="websockets-sansio", lifespan="off", log_config=None,
        access_log=False, server_header=False, proxy_headers=False, timeout_keep_alive=keepalive,
        timeout_graceful_shutdown=5, ws_max_size=16 * 1024 * 1024,
    )
    config.load()
    config.ssl = ctx
    return _Server(config)


async def _read_channel(channel: socket.socket, stop: asyncio.Event, holder: ConfigHolder) -> None:
    """Lines from the main process: ``reload`` (domains.toml changed, reload now); the end of
    the pipe means the main process is stopping or gone."""
    reader, writer = await asyncio.open_connection(sock=channel)
    with contextlib.suppress(OSError):
        while line := await reader.readline():
            if line == b"reload\n":
                await asyncio.to_thread(holder.check_now)
    stop.set()
    writer.close()


def build_internal_services(holder: ConfigHolder) -> dict[str, ASGIApp]:
    """Core's own web applications, by the service names of the listeners' settings
    (``account_http(s)``, ``admin_http(s)``). They share the session database and one
    failed-login throttle per client IP (the web process's own: the SMTP processes count
    SMTP AUTH failures in theirs)."""
    from mox_core.account import account_app
    from mox_core.accounts.db import AccountCredentials
    from mox_core.accounts.sasl import AuthFailureLimiter
    from mox_core.admin import admin_app
    from mox_core.webui import SessionStore

    data_dir = holder.get().data_dir
    sessions = SessionStore.for_data_dir(data_dir)
    limiter = AuthFailureLimiter()
    services: dict[str, ASGIApp] = {
        "account": account_app(holder, AccountCredentials(holder), data_dir, sessions=sessions, limiter=limiter),
    }
    services["admin"] = admin_app(holder, sessions=sessions, limiter=limiter)
    return services


async def serve_web(config: Config, parent: int, channel_fd: int, sockets: Mapping[tuple[str, int], int],
                    internal_services: Mapping[str, ASGIApp] | None = None) -> None:
    """Serve the web ports on the sockets the main process bound (``(ip, port)`` -> fd),
    with core's internal services (default :func:`build_internal_services`)."""
    from mox_core.queue.stats import QueueStats
    from mox_core.server.components import reload_loop

    die_with_parent(parent)
    structlog.contextvars.bind_contextvars(process="web")
    stop = asyncio.Event()
    stop_on_signals(stop)
    holder = ConfigHolder(config, generation=Generation(config.data_dir))
    limits = config.static.http
    GuardedHttpProtocol.head_timeout = limits.head_timeout
    GuardedHttpProtocol.max_head = limits.max_head
    ports = web_ports(config.static)
    stats = QueueStats(config.data_dir)
    if internal_services is None:
        internal_services = build_internal_services(holder)
    app = WebApp(holder, ports, internal_services, scrape=lambda: [stats])
    servers: list[_Server] = []
    serving: list[asyncio.Task[None]] = []
    for wp in ports:
        socks = [socket.socket(fileno=sockets[(ip, wp.port)]) for ip in wp.ips if (ip, wp.port) in sockets]
        tls = config.static.listeners[wp.listener].tls
        ctx = None
        if wp.tls and tls:
            ctx = server_context(tls, config.config_dir, alpn=["http/1.1"], data_dir=config.data_dir,
                                 hostname=wp.hostname, acme_challenges=wp.acme_tls)
        server = _uvicorn(app, ctx, limits.keepalive_timeout)
        servers.append(server)
        serving.append(asyncio.create_task(server.serve(sockets=socks)))
        log.info("listening", listener=wp.listener, service=",".join(wp.services()),
                 address=[f"{ip}:{wp.port}" for ip in wp.ips], tls=wp.tls)
    while not all(srv.started for srv in servers):
        if any(t.done() for t in serving):  # failed to start: its exception ends this process
            for t in serving:
                if t.done():
                    t.result()
            raise SystemExit(1)
        await asyncio.sleep(0.01)
    channel = socket.socket(fileno=channel_fd)
    channel.sendall(b"ready\n")
    tasks = [asyncio.create_task(_read_channel(channel, stop, holder)),
             asyncio.create_task(reload_loop(holder, stop))]
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*serving, return_exceptions=True)
        log.info("web_stopped")
