"""The ``forward`` handler kind (mox's WebForward): a reverse proxy to the configured URL.

Where a request goes is decided by config alone: the scheme, host and port of ``url``; the
request only adds to the path and query. An absolute request target (``GET http://other/``),
a path like ``//other/x`` or a Host header naming another host cannot change the host mox
connects to. Backend redirects are passed to the client, never followed; proxy environment
variables are ignored.

Requests: ``Forwarded``, ``X-Forwarded`` and ``X-Forwarded-*`` from the client are removed and
``X-Forwarded-For`` (client IP), ``X-Forwarded-Host`` (the Host header) and
``X-Forwarded-Proto`` (http or https) set; the Host header is passed on as it came. Hop-by-hop
headers (and those named in Connection) are not forwarded. Bodies are streamed both ways.
A backend that cannot be reached gives 502, one that does not answer in time 504.

Websocket requests (ASGI scope type ``websocket``) are forwarded by :mod:`forward_ws`.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import httpx

from mox_core.api import WebHandlerContext
from mox_webhandlers.common import escape_path, escape_query, header_list, request_header, respond
from mox_webhandlers.settings import ForwardSettings

CONNECT_TIMEOUT = 30.0  # seconds to connect to the backend (and for a websocket: its handshake)
HEADER_TIMEOUT = 300.0  # seconds to wait for the backend's response headers; then 504

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade",
})
# Never forwarded besides: "expect" (mox's server already answered 100-continue, httpx does not do it).
_NOT_FORWARDED = HOP_BY_HOP | {"expect"}
_WEBSOCKET_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
    "sec-websocket-accept",
})


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[str]:
    """Header names listed in Connection headers: hop-by-hop too (RFC 9110 7.6.1)."""
    out = set()
    for k, v in headers:
        if k.lower() == b"connection":
            out |= {t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip()}
    return out


def is_forwarded_header(name: str) -> bool:
    return name == "forwarded" or name == "x-forwarded" or name.startswith("x-forwarded-")


def request_headers(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The client's headers for the backend: without hop-by-hop, forwarded and (for a
    websocket) handshake headers; with our X-Forwarded-For/-Host/-Proto. Host stays."""
    websocket = scope["type"] == "websocket"
    raw = list(scope.get("headers", ()))
    drop = _NOT_FORWARDED | _connection_tokens(raw) | (_WEBSOCKET_HANDSHAKE if websocket else frozenset())
    out = []
    for k, v in raw:
        name = k.decode("latin-1").lower()
        if name in drop or is_forwarded_header(name):
            continue
        out.append((name.encode("latin-1"), v))
    client = scope.get("client") or ("", 0)
    host = request_header(scope, b"host")
    proto = "https" if scope.get("scheme") in ("https", "wss") else "http"
    if client[0]:
        out.append((b"x-forwarded-for", client[0].encode("latin-1")))
    if host is not None:
        out.append((b"x-forwarded-host", host.encode("latin-1")))
    out.append((b"x-forwarded-proto", proto.encode()))
    return out


def response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The backend's response headers for the client: without hop-by-hop headers."""
    drop = HOP_BY_HOP | _connection_tokens(raw)
    return [(k.lower(), v) for k, v in raw if k.decode("latin-1").lower() not in drop]


def join_path(base: str, path: str) -> str:
    """``base`` and ``path`` with a single slash between (Go's singleJoiningSlash); an empty
    ``path`` leaves ``base`` as it is ("/" when that is empty too)."""
    if not path:
        return base or "/"
    if base.endswith("/") and path.startswith("/"):
        return base + path[1:]
    if not base.endswith("/") and not path.startswith("/"):
        return base + "/" + path
    return base + path


def request_path(scope: dict[str, Any], strip: re.Pattern[str] | None) -> str:
    """The request's path as it goes to the backend, percent-encoded. With ``strip`` (the
    handler's path_regexp) the span it matched is removed (``scope["mox"]["match"]``); a
    non-empty rest gets a leading slash, an empty rest stays empty. Without, the request's raw
    path is kept when it encodes the (cleaned) path, so %2F stays %2F."""
    path: str = scope["path"]
    if strip is not None:
        span = (scope.get("mox") or {}).get("match")
        if span is None:
            m = strip.search(path)
            span = m.span() if m else (0, 0)
        rest = path[: span[0]] + path[span[1]:]
        if rest and not rest.startswith("/"):
            rest = "/" + rest
        return escape_path(rest)
    raw = scope.get("raw_path")
    if raw:
        text = raw.decode("latin-1")
        usable = all(0x21 <= b <= 0x7E for b in raw) and "?" not in text and "#" not in text
        if usable and unquote(text, errors="replace") == path:
            return text
    return escape_path(path)


class Target:
    """The backend: scheme, host and port from config; path and query joined with the
    request's."""

    def __init__(self, url: str) -> None:
        self.url = httpx.URL(url)
        u = urlsplit(url)
        self.scheme, self.netloc, self.path, self.query = u.scheme, u.netloc, u.path, u.query

    def resource(self, scope: dict[str, Any], strip: re.Pattern[str] | None) -> str:
        """Path and query for the backend's request line."""
        path = join_path(self.path, request_path(scope, strip))
        query = "&".join(q for q in (self.query, escape_query(scope.get("query_string") or b"")) if q)
        return path + ("?" + query if query else "")


def forward_app(settings: ForwardSettings, ctx: WebHandlerContext):
    """The ASGI app of a ``forward`` handler; see the module docstring and the README."""
    return Forward(settings, ctx)


class Forward:
    def __init__(self, settings: ForwardSettings, ctx: WebHandlerContext) -> None:
        self.settings = settings
        self.target = Target(settings.url)
        self.strip = re.compile(ctx.path_regexp) if settings.strip_path else None
        self.extra = header_list(settings.response_headers)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (the app may be used from more than one)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT, pool=None), follow_redirects=False,
                trust_env=False, limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
            )
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the kept-alive backend connections; for a server that drops this app (on a
        reload of domains.toml). A later request opens new ones."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            from mox_webhandlers.forward_ws import forward_websocket

            await forward_websocket(self, scope, receive, send)
            return
        if scope["type"] != "http":
            return
        await self.forward_http(scope, receive, send)

    async def forward_http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        url = self.target.url.copy_with(raw_path=self.target.resource(scope, self.strip).encode("ascii"))
        has_body = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope.get("headers", ()))
        request = httpx.Request(scope["method"], url, headers=request_headers(scope),
                                content=_body(receive) if has_body else None)
        try:
            with anyio.fail_after(HEADER_TIMEOUT):
                response = await self.client().send(request, stream=True)
        except (TimeoutError, httpx.TimeoutException):
            await respond(scope, send, 504, "504 - gateway timeout")
            return
        except (httpx.HTTPError, OSError):
            await respond(scope, send, 502, "502 - bad gateway")
            return
        try:
            headers = response_headers(response.headers.raw) + self.extra
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        except httpx.HTTPError:
            pass  # the backend broke off: the response ends short, the server closes the connection
        finally:
            await response.aclose()


async def _body(receive: Any):
    """The request body from the client, as it arrives."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


async def _cancel_on_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
    """Stop streaming the backend's response when the client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
