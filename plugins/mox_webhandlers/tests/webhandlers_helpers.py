"""Helpers of the web handler tests: build a handler's app from a domains.toml entry as core
does, call it like core's web server does (scope["mox"], declining), and run real servers
(uvicorn) on 127.0.0.1 for the proxy tests."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from mox_core.plugins.host import PluginHost
from mox_core.plugins.kinds import WebHandlerContext
from mox_core.testing import load

DECLINED = 599  # what the test wrapper answers when the handler declined
_HOST: list[PluginHost] = []


# web handlers need a listener that serves them (a config error otherwise)
WEB_LISTENER = """
[listeners.web]
ips = ["127.0.0.1"]
[listeners.web.webserver_http]
enabled = true
port = 8080
"""


def plugin_host() -> PluginHost:
    """The installed plugins, loaded once for all tests."""
    if not _HOST:
        _HOST.append(PluginHost.load())
    return _HOST[0]


def build(tmp_path, entry: str, services: dict[str, Any] | None = None) -> Any:
    """The app of the single ``[[web_handlers]]`` entry in ``entry`` (TOML keys after the
    table header), wrapped as core calls it."""
    cfg = load(tmp_path, WEB_LISTENER, "[[web_handlers]]\n" + entry, host=plugin_host())
    [handler] = cfg.dynamic.web_handlers
    kind = plugin_host().webhandlers[handler.kind]
    ctx = WebHandlerContext(domain=handler.common.domain, path_regexp=handler.common.path_regexp,
                            log_name=handler.common.log_name or "0", internal_services=services or {})
    return AsCore(kind.app_factory(handler.settings, ctx), handler.common.path_regexp)


class AsCore:
    """Calls a handler app as core's web server does: with ``scope["mox"]`` (the span
    path_regexp matched); a declined request gets status 599 "declined" (HTTP) or a close with
    code 4599 (websocket). ``scopes`` keeps every scope passed, to read ``ws_bytes``."""

    def __init__(self, app: Any, path_regexp: str = "^/") -> None:
        self.app = app
        self.rx = re.compile(path_regexp)
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        m = self.rx.search(scope["path"])
        scope = dict(scope, mox={"handler": "0", "match": m.span() if m else (0, 0)})
        self.scopes.append(scope)
        answered = False

        async def watch(message: dict[str, Any]) -> None:
            nonlocal answered
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.close",
                                   "websocket.http.response.start"):
                answered = True
            await send(message)

        await self.app(scope, receive, watch)
        if not answered:
            if scope["type"] == "http":
                await PlainTextResponse("declined", DECLINED)(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 4599})


def client(app: Any, base_url: str = "https://example.org", **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, **kwargs), base_url=base_url)


@dataclass
class Result:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[dict[str, Any]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v.decode("latin-1") for k, v in self.headers if k.decode("latin-1").lower() == name.lower()]


async def call(app: Any, path: str, *, method: str = "GET", headers: list[tuple[str, str]] | None = None,
               scheme: str = "https", query: bytes = b"", body: bytes = b"", raw_path: bytes | None = None,
               **scope_extra: Any) -> Result:
    """Call ``app`` with exactly this ``path`` (no client library normalising it) and collect
    the response."""
    hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or [("host", "example.org")])]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": method, "scheme": scheme, "path": path, "raw_path": raw_path, "query_string": query,
             "root_path": "", "headers": hdrs, "client": ("192.0.2.7", 40000), "server": ("127.0.0.1", 443),
             **scope_extra}
    if raw_path is None:
        del scope["raw_path"]
    messages: list[dict[str, Any]] = []
    done = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(scope, receive, send)
    start = [m for m in messages if m["type"] == "http.response.start"]
    if not start:
        assert not messages, messages
        return Result(DECLINED, [], b"", messages)
    data = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Result(start[0]["status"], list(start[0].get("headers", [])), data, messages)


def _bound() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _server(app: Any, **options: Any) -> uvicorn.Server:
    # proxy_headers off: uvicorn would otherwise take the client's address from X-Forwarded-For
    # of connections from 127.0.0.1 (as mox's web server must not either)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", ws="websockets-sansio",
                                         timeout_graceful_shutdown=1, proxy_headers=False, **options))


@contextlib.asynccontextmanager
async def serve(app: Any, **options: Any) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in this event loop; yields
    "127.0.0.1:PORT"."""
    sock = _bound()
    server = _server(app, **options)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


class ThreadServer:
    """``app`` served by uvicorn on 127.0.0.1 in a thread of its own (with its own event
    loop), for servers shared by the tests of a module: ``.hostport``, ``.stop()``."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.sock = _bound()
        self.hostport = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = _server(app, **options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    @staticmethod
    def stop_all(servers: list[ThreadServer]) -> None:
        """Stop ``servers`` at once (each takes a few tenths of a second)."""
        for s in servers:
            s.server.should_exit = True
        for s in servers:
            s.stop()


class Switch:
    """An ASGI app that passes everything to ``.app``, set by each test: one front server for
    the handler apps of a module's tests."""

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)


class Backend:
    """A backend on 127.0.0.1 that answers what it received (HTTP: JSON, status 201;
    websocket: echoes), and records every request in ``seen``."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.ws_closed: queue.Queue[tuple[int, str]] = queue.Queue()  # filled in the server's thread
        self.app = Starlette(routes=[
            Route("/redirect-me", self.redirect, methods=["GET"]),
            Route("/slow", self.slow, methods=["GET"]),
            Route("/stream", self.stream, methods=["GET"]),
            WebSocketRoute("/ws/redirect", self.ws_redirect),
            WebSocketRoute("/{path:path}", self.ws_echo),
            Route("/{path:path}", self.echo, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        ])
        self.location = ""
        self.hostport = ""

    def reset(self) -> None:
        self.seen.clear()
        self.location = ""
        while not self.ws_closed.empty():
            self.ws_closed.get_nowait()

    async def closed(self) -> tuple[int, str]:
        """The code and reason of the next websocket close the backend saw."""
        return await asyncio.to_thread(self.ws_closed.get, True, 5)

    def record(self, scope: dict[str, Any]) -> dict[str, Any]:
        seen = {"type": scope["type"], "method": scope.get("method", "GET"), "path": scope["path"],
                "raw_path": scope["raw_path"].decode("latin-1"), "query": scope["query_string"].decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "subprotocols": scope.get("subprotocols", [])}
        self.seen.append(seen)
        return seen

    async def echo(self, request: Request) -> Response:
        seen = self.record(request.scope)
        seen["body"] = (await request.body()).decode()
        return JSONResponse(seen, status_code=201, headers={"x-backend": "yes", "connection": "x-private",
                                                            "x-private": "hop", "cache-control": "no-store"})

    async def redirect(self, request: Request) -> Response:
        self.record(request.scope)
        return RedirectResponse(self.location, status_code=302)

    async def slow(self, request: Request) -> Response:
        self.record(request.scope)
        await asyncio.sleep(0.8)  # longer than the tests' HEADER_TIMEOUT; short for the shutdown
        return PlainTextResponse("late")

    async def stream(self, request: Request) -> Response:
        self.record(request.scope)

        async def chunks():
            for i in range(3):
                yield f"chunk{i}\n".encode()
                await asyncio.sleep(0)

        from starlette.responses import StreamingResponse

        return StreamingResponse(chunks(), media_type="text/plain")

    async def ws_redirect(self, websocket: WebSocket) -> None:
        self.record(websocket.scope)
        await websocket.send_denial_response(RedirectResponse(self.location, status_code=302))

    async def ws_echo(self, websocket: WebSocket) -> None:
        seen = self.record(websocket.scope)
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol="chat.v2" if "chat.v2" in offered else None,
                               headers=[(b"set-cookie", b"backend=1")])
        await websocket.send_json({"seen": seen})
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    self.ws_closed.put((message.get("code", 1005), message.get("reason") or ""))
                    return
                if message.get("text") is not None:
                    text = message["text"]
                    if text.startswith("close:"):
                        _, code, reason = text.split(":", 2)
                        await websocket.close(int(code), reason)
                        return
                    await websocket.send_text("echo:" + text)
                else:
                    await websocket.send_bytes(b"echo:" + message["bytes"])
        except WebSocketDisconnect as exc:
            self.ws_closed.put((exc.code, exc.reason or ""))


async def raw_request(hostport: str, request: bytes) -> bytes:
    """Send ``request`` as is over a new connection and read the answer until the server
    closes (requests should say Connection: close)."""
    return await asyncio.to_thread(raw_request_sync, hostport, request)


def raw_request_sync(hostport: str, request: bytes) -> bytes:
    host, port = hostport.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)

