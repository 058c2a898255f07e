"""The ``internal`` handler kind: core's account/admin applications mounted under
``base_path`` as ASGI mounts do (root_path), 404 without the service."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from plugins.mox_webhandlers.tests.webhandlers_helpers import build, client


def service(name: str) -> Starlette:
    """A stand-in for one of core's web applications, telling what it saw."""

    async def show(request: Request) -> JSONResponse:
        return JSONResponse({"service": name, "route": request.scope["route"].path, "path": request.scope["path"],
                             "root_path": request.scope["root_path"], "url": str(request.url),
                             "x_url": str(request.url_for("x"))})

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.scope["root_path"] + " " + websocket.scope["path"])
        await websocket.close()

    return Starlette(routes=[
        Route("/", show), Route("/x", show, name="x"), Route("/admin/x", show), WebSocketRoute("/ws", socket),
    ])


def internal(tmp_path, base_path: str = "/admin/", name: str = "admin", path_regexp: str = "^/admin/",
             services=None):
    if services is None:
        services = {"admin": service("admin"), "account": service("account")}
    return build(tmp_path, f'kind = "internal"\ndomain = "example.org"\npath_regexp = "{path_regexp}"\n'
                           f'base_path = "{base_path}"\nservice = "{name}"', services=services)


async def test_service_is_mounted_under_base_path(tmp_path):
    async with client(internal(tmp_path)) as c:
        r = await c.get("/admin/x?y=1")
    assert r.status_code == 200
    assert r.json() == {"service": "admin", "route": "/x", "path": "/admin/x", "root_path": "/admin",
                        "url": "https://example.org/admin/x?y=1", "x_url": "https://example.org/admin/x"}
    async with client(internal(tmp_path)) as c:
        r = await c.get("/admin/")
    assert r.json()["route"] == "/"


async def test_a_path_repeating_the_base_is_not_stripped_twice(tmp_path):
    async with client(internal(tmp_path)) as c:
        r = await c.get("/admin/admin/x")
    assert r.json()["route"] == "/admin/x" and r.json()["path"] == "/admin/admin/x"


async def test_service_by_name(tmp_path):
    async with client(internal(tmp_path, "/account/", "account", "^/account/")) as c:
        r = await c.get("/account/x")
    assert r.json()["service"] == "account" and r.json()["root_path"] == "/account"


async def test_base_path_without_slash_redirects(tmp_path):
    async with client(internal(tmp_path, path_regexp="^/admin")) as c:
        r = await c.get("/admin?a=b", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/admin/?a=b"


async def test_not_offered_or_outside_base_path_is_404(tmp_path):
    async with client(internal(tmp_path, services={"account": service("account")})) as c:
        r = await c.get("/admin/x")
    assert (r.status_code, r.text) == (404, "404 - not found")
    async with client(internal(tmp_path, path_regexp="^/")) as c:
        r = await c.get("/other/x")
    assert (r.status_code, r.text) == (404, "404 - not found")


async def test_websocket_is_passed_to_the_service(tmp_path):
    app = internal(tmp_path)
    sent = []
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/admin/ws", "raw_path": b"/admin/ws", "query_string": b"",
             "root_path": "", "scheme": "wss", "headers": [(b"host", b"example.org")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 443), "subprotocols": []}
    await app(scope, receive, send)
    assert sent[0]["type"] == "websocket.accept"
    assert (sent[1]["type"], sent[1]["text"]) == ("websocket.send", "/admin /admin/ws")
