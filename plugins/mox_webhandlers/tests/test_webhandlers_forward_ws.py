"""The ``forward`` handler kind with websockets, through real servers: mox's front (uvicorn
with the forward app), a backend and a second backend that must see nothing, each on
127.0.0.1; the client is the ``websockets`` package."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from plugins.mox_webhandlers.tests.webhandlers_helpers import Backend, Switch, ThreadServer, build, raw_request


@pytest.fixture(scope="module")
def servers():
    backend, evil, front = Backend(), Backend(), Switch()
    running = [ThreadServer(backend.app), ThreadServer(evil.app), ThreadServer(front)]
    backend.hostport, evil.hostport, front.hostport = (s.hostport for s in running)
    yield backend, evil, front
    ThreadServer.stop_all(running)


@pytest.fixture
def backend(servers):
    servers[0].reset()
    return servers[0]


@pytest.fixture
def evil(servers):
    servers[1].reset()
    yield servers[1]
    assert servers[1].seen == []


@pytest.fixture
def front(servers):
    servers[2].app = None
    return servers[2]


def forward(tmp_path, url: str, extra: str = "", path_regexp: str = "^/"):
    return build(tmp_path, f'kind = "forward"\ndomain = "example.org"\npath_regexp = "{path_regexp}"\n'
                           f'url = "{url}"\n{extra}')


def ws(front, path: str, **kwargs):
    return connect(f"ws://{front.hostport}{path}", proxy=None, open_timeout=5, **kwargs)


async def test_messages_both_ways_with_subprotocol_headers_and_counts(tmp_path, backend, front):
    app = front.app = forward(tmp_path, f"http://{backend.hostport}/base/?k=v", 'strip_path = true\n'
                              'response_headers = { "X-Served-By" = "mox" }', path_regexp="^/app/")
    headers = {"Origin": "https://example.org", "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=x",
               "Cookie": "session=1"}
    async with ws(front, "/app/ws/echo?q=1", subprotocols=["chat.v1", "chat.v2"],
                  additional_headers=headers) as c:
        assert c.subprotocol == "chat.v2"  # the backend's choice
        assert c.response.headers["X-Served-By"] == "mox" and c.response.headers["Set-Cookie"] == "backend=1"
        first = await c.recv()
        seen = json.loads(first)["seen"]
        await c.send("hi")
        assert await c.recv() == "echo:hi"
        await c.send(b"\x00\x01")
        assert await c.recv() == b"echo:\x00\x01"
        await c.close(4002, "bye")
    assert await backend.closed() == (4002, "bye")
    assert (seen["type"], seen["path"], seen["query"]) == ("websocket", "/base/ws/echo", "k=v&q=1")
    assert seen["subprotocols"] == ["chat.v1", "chat.v2"]
    h: dict[str, list[str]] = {}
    for k, v in seen["headers"]:
        h.setdefault(k, []).append(v)
    assert h["host"] == [front.hostport] and h["origin"] == ["https://example.org"] and h["cookie"] == ["session=1"]
    assert h["x-forwarded-for"] == ["127.0.0.1"] and h["x-forwarded-host"] == [front.hostport]
    assert h["x-forwarded-proto"] == ["http"] and "forwarded" not in h
    assert len(h["user-agent"]) == 1 and len(h["sec-websocket-key"]) == 1  # the client's; none added
    assert h["sec-websocket-protocol"] == ["chat.v1, chat.v2"]
    for _ in range(100):  # the front's thread counts the close too; wait for it
        if app.scopes[-1]["mox"].get("ws_bytes") == [len(first.encode()) + 7 + 7, 2 + 2]:
            break
        await asyncio.sleep(0.01)
    assert app.scopes[-1]["mox"]["ws_bytes"] == [len(first.encode()) + 7 + 7, 2 + 2]


@pytest.mark.parametrize(("code", "reason"), [(4001, "going"), (1000, ""), (1001, "restart"), (1008, "policy")])
async def test_backend_close_code_is_passed_on(tmp_path, backend, front, code, reason):
    front.app = forward(tmp_path, f"http://{backend.hostport}/")
    async with ws(front, "/ws") as c:
        await c.recv()
        await c.send(f"close:{code}:{reason}")
        with pytest.raises(ConnectionClosed):
            await c.recv()
    assert (c.close_code, c.close_reason) == (code, reason)


async def test_client_close_code_is_passed_on(tmp_path, backend, front):
    front.app = forward(tmp_path, f"http://{backend.hostport}/")
    async with ws(front, "/ws") as c:
        await c.recv()
    assert await backend.closed() == (1000, "")


async def test_backend_refusing_websocket_is_400(tmp_path, backend, front):
    front.app = forward(tmp_path, f"http://{backend.hostport}/")
    with pytest.raises(InvalidStatus) as exc:
        async with ws(front, "/ws/redirect"):  # answers the handshake with a redirect
            pass
    assert exc.value.response.status_code == 400
    assert exc.value.response.body == b"400 - bad request - websocket not supported"


async def test_plain_http_backend_is_400(tmp_path, front):
    async def plain(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    try:
        front.app = forward(tmp_path, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        with pytest.raises(InvalidStatus) as exc:
            async with ws(front, "/ws"):
                pass
    finally:
        server.close()
    assert exc.value.response.status_code == 400


async def test_backend_redirect_is_not_followed(tmp_path, backend, evil, front):
    backend.location = f"ws://{evil.hostport}/stolen"
    front.app = forward(tmp_path, f"http://{backend.hostport}/")
    with pytest.raises(InvalidStatus) as exc:
        async with ws(front, "/ws/redirect"):
            pass
    assert exc.value.response.status_code == 400 and backend.seen[-1]["path"] == "/ws/redirect"


async def test_backend_down_is_502(tmp_path, front):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    front.app = forward(tmp_path, f"http://127.0.0.1:{port}/")
    with pytest.raises(InvalidStatus) as exc:
        async with ws(front, "/ws"):
            pass
    assert (exc.value.response.status_code, exc.value.response.body) == (502, b"502 - bad gateway")


async def test_silent_backend_is_504(tmp_path, front, monkeypatch):
    from mox_webhandlers import forward as mod

    monkeypatch.setattr(mod, "CONNECT_TIMEOUT", 0.3)

    async def silent(reader, writer):
        await asyncio.sleep(3)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        front.app = forward(tmp_path, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        with pytest.raises(InvalidStatus) as exc:
            async with ws(front, "/ws"):
                pass
    finally:
        server.close()
    assert (exc.value.response.status_code, exc.value.response.body) == (504, b"504 - gateway timeout")


async def test_without_the_http_response_extension_the_refusal_is_a_close(tmp_path, backend):
    app = forward(tmp_path, f"http://{backend.hostport}/")
    sent = []
    messages = [{"type": "websocket.connect"}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws/redirect", "raw_path": b"/ws/redirect", "query_string": b"",
             "scheme": "ws", "headers": [(b"host", b"example.org")], "client": ("127.0.0.1", 1), "subprotocols": []}
    await app(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1011, "reason": "400 - bad request - websocket not supported"}]


# ---- the request never chooses the target ------------------------------------------------

def _handshake(target: str, host: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


async def test_absolute_target_and_host_header_do_not_change_the_target(tmp_path, backend, evil, front):
    front.app = forward(tmp_path, f"http://{backend.hostport}/")
    for target in (f"http://{evil.hostport}/ws", f"//{evil.hostport}/ws"):
        reader, writer = await asyncio.open_connection(*front.hostport.split(":"))
        writer.write(_handshake(target, evil.hostport))
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status.startswith(b"HTTP/1.1 101"), status
    assert len(backend.seen) == 2
    assert all(dict(s["headers"])["host"] == evil.hostport for s in backend.seen)


async def test_proxy_environment_is_ignored(tmp_path, backend, evil, front, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://{evil.hostport}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    front.app = forward(tmp_path, f"http://{backend.hostport}/")
    async with ws(front, "/via-env") as c:
        assert json.loads(await c.recv())["seen"]["path"] == "/via-env"


async def test_http_request_with_upgrade_header_is_forwarded_as_http(tmp_path, backend, front):
    """Without a websocket scope (a server without websocket support) the request is plain
    HTTP: the Upgrade header is hop-by-hop and not passed on."""
    front.app = forward(tmp_path, f"http://{backend.hostport}/")
    raw = await raw_request(front.hostport, b"GET /x HTTP/1.1\r\nHost: example.org\r\nUpgrade: h2c\r\n"
                                            b"Connection: Upgrade, close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 201 ")
    assert "upgrade" not in dict(backend.seen[-1]["headers"])
