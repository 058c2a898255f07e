"""The ``forward`` handler kind over HTTP: path, query and header rules, streaming, 502/504,
and the target never chosen by the request (a second backend must see nothing)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from plugins.mox_webhandlers.tests.webhandlers_helpers import (
    Backend,
    Switch,
    ThreadServer,
    build,
    call,
    client,
    raw_request,
)


@pytest.fixture(scope="module")
def servers():
    """A backend, a second ("evil") backend and a front server for the handler under test,
    each in a thread of its own, shared by the tests of this module."""
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
    """A second backend: no test may make mox connect to it."""
    servers[1].reset()
    yield servers[1]
    assert servers[1].seen == []


@pytest.fixture
def front(servers):
    """The front server: set ``front.app`` to the handler's app."""
    servers[2].app = None
    return servers[2]


def forward(tmp_path, url: str, extra: str = "", path_regexp: str = "^/"):
    return build(tmp_path, f'kind = "forward"\ndomain = "example.org"\npath_regexp = "{path_regexp}"\n'
                           f'url = "{url}"\n{extra}')


def headers_of(seen: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in seen["headers"]:
        out.setdefault(k, []).append(v)
    return out


async def test_forwards_request_and_response(tmp_path, backend):
    app = forward(tmp_path, f"http://{backend.hostport}/base/?k=v", 'strip_path = true\n'
                  'response_headers = { "X-Served-By" = "mox" }', path_regexp="^/app/")
    async with client(app, client=("192.0.2.9", 1234)) as c:
        r = await c.post("/app/x/y?q=1", content=b"payload", headers={
            "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "X-Forwarded": "x",
            "X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "evil", "User-Agent": "test-agent",
            "Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5", "TE": "trailers",
            "Expect": "100-continue",
        })
    assert r.status_code == 201
    assert r.headers["x-served-by"] == "mox" and r.headers["x-backend"] == "yes"
    assert "x-private" not in r.headers and "connection" not in r.headers  # hop-by-hop from the backend
    [seen] = backend.seen
    assert (seen["method"], seen["raw_path"], seen["query"], seen["body"]) == ("POST", "/base/x/y", "k=v&q=1", "payload")
    h = headers_of(seen)
    assert h["host"] == ["example.org"] and h["user-agent"] == ["test-agent"]
    assert h["x-forwarded-for"] == ["192.0.2.9"]
    assert h["x-forwarded-host"] == ["example.org"] and h["x-forwarded-proto"] == ["https"]
    for name in ("forwarded", "x-forwarded", "x-hop", "keep-alive", "te", "expect"):
        assert name not in h, name
    assert h["content-length"] == ["7"]


async def test_proto_is_http_for_plain_requests(tmp_path, backend):
    app = forward(tmp_path, f"http://{backend.hostport}/")
    async with client(app, base_url="http://example.org:8080") as c:
        await c.get("/")
    h = headers_of(backend.seen[0])
    assert h["x-forwarded-proto"] == ["http"] and h["x-forwarded-host"] == ["example.org:8080"]


@pytest.mark.parametrize(("path_regexp", "url_path", "strip", "asked", "expected"), [
    ("^/app/", "/", True, "/app/x", "/x"),
    ("^/app/", "/base", True, "/app/x/", "/base/x/"),
    ("^/app/", "/base", True, "/app/", "/base"),  # empty rest: no slash added
    ("^/app/", "/base/", True, "/app/", "/base/"),
    ("^/app", "/base", True, "/app/x", "/base/x"),
    ("^/app", "", True, "/appx", "/x"),  # rest without slash gets one
    ("^/app", "", True, "/app", "/"),
    ("^/app/", "/base", False, "/app/x", "/base/app/x"),
    ("^/app/", "/base/", False, "/app/x", "/base/app/x"),
    ("^/", "", False, "/a/b", "/a/b"),
    ("^/", "", False, "/a%2Fb", "/a%2Fb"),  # the raw path, as Go keeps RawPath
    ("^/x/", "", True, "/x/a%2Fb", "/a/b"),  # stripping works on the decoded path, as Go
    ("^/", "", False, "/a%20b/%C3%A9", "/a%20b/%C3%A9"),
])
async def test_paths(tmp_path, backend, path_regexp, url_path, strip, asked, expected):
    app = forward(tmp_path, f"http://{backend.hostport}{url_path}", f"strip_path = {str(strip).lower()}",
                  path_regexp=path_regexp)
    async with client(app) as c:
        r = await c.get(asked)
    assert r.status_code == 201
    assert backend.seen[-1]["raw_path"] == expected


@pytest.mark.parametrize(("url_query", "asked", "expected"), [
    ("", "/p", ""), ("?k=v", "/p", "k=v"), ("", "/p?a=1&b=2", "a=1&b=2"), ("?k=v", "/p?a=%20", "k=v&a=%20"),
])
async def test_query(tmp_path, backend, url_query, asked, expected):
    app = forward(tmp_path, f"http://{backend.hostport}/{url_query}")
    async with client(app) as c:
        await c.get(asked)
    assert backend.seen[-1]["query"] == expected


async def test_get_without_body_is_sent_without_one(tmp_path, backend):
    async with client(forward(tmp_path, f"http://{backend.hostport}/")) as c:
        r = await c.get("/x")
        h = await c.head("/x")
    assert r.status_code == 201 and h.status_code == 201 and h.content == b""
    for seen in backend.seen:
        assert "content-length" not in headers_of(seen) and "transfer-encoding" not in headers_of(seen)


async def test_bodies_stream_both_ways(tmp_path, backend, front):
    front.app = forward(tmp_path, f"http://{backend.hostport}/")

    async def upload():
        for i in range(5):
            yield f"part{i};".encode()

    async with httpx.AsyncClient(trust_env=False) as c:
        r = await c.put(f"http://{front.hostport}/up", content=upload(), headers={"Host": "example.org"})
        assert r.status_code == 201 and r.json()["body"] == "part0;part1;part2;part3;part4;"
        assert "transfer-encoding" in headers_of(backend.seen[-1])  # chunked, as it came
        async with c.stream("GET", f"http://{front.hostport}/stream") as s:
            chunks = [chunk async for chunk in s.aiter_text()]
        assert "".join(chunks) == "chunk0\nchunk1\nchunk2\n"


async def test_backend_redirect_is_passed_on_not_followed(tmp_path, backend, evil):
    backend.location = f"http://{evil.hostport}/stolen"
    async with client(forward(tmp_path, f"http://{backend.hostport}/")) as c:
        r = await c.get("/redirect-me")
    assert r.status_code == 302 and r.headers["location"] == f"http://{evil.hostport}/stolen"


async def test_backend_down_is_502(tmp_path):
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    r = await call(forward(tmp_path, f"http://127.0.0.1:{port}/"), "/")
    assert (r.status, r.body) == (502, b"502 - bad gateway")


async def test_slow_backend_is_504(tmp_path, backend, monkeypatch):
    from mox_webhandlers import forward as mod

    monkeypatch.setattr(mod, "HEADER_TIMEOUT", 0.3)
    r = await call(forward(tmp_path, f"http://{backend.hostport}/"), "/slow")
    assert (r.status, r.body) == (504, b"504 - gateway timeout")


async def test_silent_backend_is_504(tmp_path, monkeypatch):
    from mox_webhandlers import forward as mod

    monkeypatch.setattr(mod, "HEADER_TIMEOUT", 0.3)
    got = []

    async def silent(reader, writer):
        got.append(await reader.read(100))
        await asyncio.sleep(5)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await call(forward(tmp_path, f"http://127.0.0.1:{port}/"), "/")
    finally:
        server.close()
    assert (r.status, r.body) == (504, b"504 - gateway timeout") and got[0].startswith(b"GET / HTTP/1.1")


async def test_allowed_on_loopback_without_allow_private_targets(tmp_path, backend):
    """The administrator configured the target: loopback is fine (WebHandlerContext's
    allow_private_targets is False in these tests)."""
    async with client(forward(tmp_path, f"http://{backend.hostport}/")) as c:
        assert (await c.get("/")).status_code == 201


# ---- the request never chooses the target ------------------------------------------------

async def test_absolute_request_target_and_host_header_do_not_change_the_target(tmp_path, backend, evil, front):
    front.app = forward(tmp_path, f"http://{backend.hostport}/")
    for target in (f"http://{evil.hostport}/steal", f"//{evil.hostport}/steal",
                   f"http://{evil.hostport}@{evil.hostport}/steal"):
        raw = await raw_request(front.hostport, f"GET {target} HTTP/1.1\r\nHost: {evil.hostport}\r\n"
                                                "Connection: close\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.1 201 "), raw[:100]
    assert len(backend.seen) == 3  # the configured backend got them all
    for seen in backend.seen:
        assert headers_of(seen)["host"] == [evil.hostport]  # passed on unmodified, not used to connect


async def test_path_with_authority_does_not_change_the_target(tmp_path, backend, evil):
    app = forward(tmp_path, f"http://{backend.hostport}")
    for path in (f"//{evil.hostport}/x", f"/@{evil.hostport}/x", f"/\\\\{evil.hostport}/x", f"/..//{evil.hostport}"):
        r = await call(app, path, headers=[("host", evil.hostport)])
        assert r.status == 201, path
    assert [s["raw_path"] for s in backend.seen][:2] == [f"//{evil.hostport}/x", f"/@{evil.hostport}/x"]


async def test_proxy_environment_is_ignored(tmp_path, backend, evil, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://{evil.hostport}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with client(forward(tmp_path, f"http://{backend.hostport}/")) as c:
        assert (await c.get("/via-env")).status_code == 201
    assert backend.seen[-1]["raw_path"] == "/via-env"


async def test_aclose_releases_connections_and_the_app_still_works(tmp_path, backend):
    app = forward(tmp_path, f"http://{backend.hostport}/")
    assert (await call(app, "/one")).status == 201
    await app.app.aclose()
    assert app.app._client is None
    assert (await call(app, "/two")).status == 201
    await app.app.aclose()
