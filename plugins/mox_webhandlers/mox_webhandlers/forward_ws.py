"""Websockets through a ``forward`` handler.

mox connects to the backend as a websocket client (same path, query and header rules as for
HTTP, the same host whatever the request says, no redirects followed, no proxy), then accepts
the client's websocket with the subprotocol the backend chose and the backend's handshake
headers, and copies messages both ways until one side closes; the close code and reason are
passed on. A backend that answers the handshake with anything but a websocket gives 400
"websocket not supported", one that cannot be reached 502, one that does not answer in time
504 (as HTTP responses when the server offers the ``websocket.http.response`` extension, else
as a close with code 1011).

The bytes of the messages each way are counted in ``scope["mox"]["ws_bytes"]``, a list
``[to_client, from_client]`` updated while the connection is open, for the access log.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, WebSocketException

from mox_webhandlers.common import respond
from mox_webhandlers.forward import HOP_BY_HOP, request_headers

if TYPE_CHECKING:
    from mox_webhandlers.forward import Forward

# Close codes that may be sent in a close frame (RFC 6455 7.4; 3000-4999 are for applications).
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
_NOT_PASSED_BACK = HOP_BY_HOP | {"sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions",
                                 "content-length", "date", "server"}


def close_code(code: int | None, fallback: int) -> int:
    """``code`` when it can be sent in a close frame; 1000 for "no status" (1005);
    ``fallback`` for the others (1006 abnormal closure, 1015 TLS failure, invalid codes)."""
    if code is not None and (code in _SENDABLE or 3000 <= code <= 4999):
        return code
    return 1000 if code in (None, 1005) else fallback


def _connection_factory(resource: str, keep_host: bool):
    """A ClientConnection whose handshake asks for ``resource`` exactly as given and, with
    ``keep_host``, sends the client's Host header (among the additional headers) instead of
    the one websockets derives from the URI."""

    def create(protocol: Any, **kwargs: Any) -> ClientConnection:
        make_request = protocol.connect

        def connect_request() -> Any:
            request = make_request()
            request.path = resource
            if keep_host:
                del request.headers["Host"]
            return request

        protocol.connect = connect_request
        return ClientConnection(protocol, **kwargs)

    return create


class _NoRedirects(connect):
    """websockets' connect, refusing to follow a backend's redirect."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


async def open_backend(fwd: Forward, scope: dict[str, Any]) -> ClientConnection:
    """The websocket connection to the backend; raises what websockets raises."""
    from mox_webhandlers import forward

    target = fwd.target
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request_headers(scope)]
    keep_host = any(k == "host" for k, _ in headers)
    uri = ("wss" if target.scheme == "https" else "ws") + "://" + target.netloc + "/"
    return await _NoRedirects(
        uri, additional_headers=Headers(headers), subprotocols=scope.get("subprotocols") or None,
        compression=None, user_agent_header=None, proxy=None, open_timeout=forward.CONNECT_TIMEOUT,
        ping_interval=None, max_size=None, close_timeout=5,
        create_connection=_connection_factory(target.resource(scope, fwd.strip), keep_host),
    )


async def forward_websocket(fwd: Forward, scope: dict[str, Any], receive: Any, send: Any) -> None:
    counts = scope.setdefault("mox", {}).setdefault("ws_bytes", [0, 0])
    if (await receive())["type"] != "websocket.connect":
        return  # the client went away before the handshake
    try:
        backend = await open_backend(fwd, scope)
    except TimeoutError:
        await respond(scope, send, 504, "504 - gateway timeout")
        return
    except InvalidMessage:  # no readable HTTP response
        await respond(scope, send, 502, "502 - bad gateway")
        return
    except InvalidHandshake:  # an HTTP response, but not a websocket one
        await respond(scope, send, 400, "400 - bad request - websocket not supported")
        return
    except (OSError, WebSocketException):
        await respond(scope, send, 502, "502 - bad gateway")
        return
    try:
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in backend.response.headers.raw_items()
                   if k.lower() not in _NOT_PASSED_BACK]
        await send({"type": "websocket.accept", "subprotocol": backend.subprotocol, "headers": headers + fwd.extra})
        await _copy(backend, receive, send, counts)
    finally:
        await backend.close()


async def _copy(backend: ClientConnection, receive: Any, send: Any, counts: list[int]) -> None:
    """Messages both ways until one side closes; then the other side is closed with the
    code and reason of the first."""

    async def from_client() -> tuple[int, str] | None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return message.get("code", 1005), message.get("reason") or ""
            if message["type"] != "websocket.receive":
                continue
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            counts[1] += len(data.encode()) if isinstance(data, str) else len(data)
            try:
                await backend.send(data)
            except ConnectionClosed:
                return None  # the backend closed: from_backend tells the client

    async def from_backend() -> None:
        # ends when the backend closes, or when the client is gone (send raises OSError)
        with contextlib.suppress(ConnectionClosed, OSError):
            async for data in backend:
                counts[0] += len(data.encode()) if isinstance(data, str) else len(data)
                key = "text" if isinstance(data, str) else "bytes"
                await send({"type": "websocket.send", key: data})

    client_task = asyncio.ensure_future(from_client())
    backend_task = asyncio.ensure_future(from_backend())
    try:
        done, _ = await asyncio.wait({client_task, backend_task}, return_when=asyncio.FIRST_COMPLETED)
        if client_task in done and (client_task.exception() is not None or client_task.result() is not None):
            code, reason = (1011, "") if client_task.exception() is not None else client_task.result()
            await backend.close(close_code(code, 1001), reason)
            return
        await backend_task  # finished, or finishing now that the backend has closed
        with contextlib.suppress(OSError):  # the client may be gone already
            await send({"type": "websocket.close", "code": close_code(backend.close_code, 1011),
                        "reason": backend.close_reason or ""})
    finally:
        for task in (client_task, backend_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
