"""ASGI applications of the web handler kinds."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from mox_webhandlers.settings import RedirectSettings, ReverseProxySettings, StaticSettings


def static_app(settings: StaticSettings, ctx: Any):
    """Files under ``root``; Starlette's StaticFiles refuses paths that leave the root."""
    files = StaticFiles(directory=settings.root, html=True, check_dir=False)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if settings.strip_prefix:
            if not path.startswith(settings.strip_prefix):
                await PlainTextResponse("404 - not found", 404)(scope, receive, send)
                return
            path = path[len(settings.strip_prefix):] or "/"
        if scope["method"] not in ("GET", "HEAD"):
            await PlainTextResponse("405 - method not allowed", 405)(scope, receive, send)
            return
        headers = settings.response_headers

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and headers:
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in headers.items()
                ]
            await send(message)

        try:
            await files(dict(scope, path=path), receive, send_with_headers)
        except HTTPException as exc:  # StaticFiles raises for 404/405 outside a Starlette app
            text = {404: "404 - not found", 405: "405 - method not allowed"}.get(exc.status_code, exc.detail)
            await PlainTextResponse(text, exc.status_code)(scope, receive, send)

    return app


def redirect_app(settings: RedirectSettings, ctx: Any):
    orig = re.compile(settings.orig_path_regexp) if settings.orig_path_regexp else None
    base = urlsplit(settings.base_url) if settings.base_url else None
    replace = re.sub(r"\$(\d+)", r"\\\1", settings.replace_path)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if orig is not None:
            if not orig.search(path):
                await PlainTextResponse("404 - not found", 404)(scope, receive, send)
                return
            path = orig.sub(replace, path)
        query = scope.get("query_string", b"").decode("latin-1")
        if base is not None:
            query = "&".join(q for q in (base.query, query) if q)
            target = urlunsplit((base.scheme, base.netloc, path, query, base.fragment))
        else:
            target = urlunsplit(("", "", path, query, ""))
        await RedirectResponse(target, settings.status_code)(scope, receive, send)

    return app


_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host",
})


def _join_path(base: str, path: str) -> str:
    """Join with a single slash (mox WebForward): "/a/" + "/b" -> "/a/b"."""
    if not path:
        return base or "/"
    return base.rstrip("/") + "/" + path.lstrip("/")


def reverse_proxy_app(settings: ReverseProxySettings, ctx: Any):
    """Forward to ``url`` (mox WebForward): the matched prefix stripped with ``strip_path``,
    incoming Forwarded/X-Forwarded-* replaced by our own X-Forwarded-For/-Host/-Proto, the
    Host header passed on, the body streamed both ways; 502 when the backend fails, 504 on a
    timeout. The backend URL comes from config only, never from the request (no SSRF)."""
    import httpx

    target = urlsplit(settings.url)
    prefix = re.compile(ctx.path_regexp) if settings.strip_path else None
    client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=300.0), follow_redirects=False,
                               trust_env=False)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await PlainTextResponse("websockets are not forwarded", 400)(scope, receive, send)
            return
        path = scope.get("raw_path", scope["path"].encode()).decode("latin-1").split("?", 1)[0]
        if prefix is not None:
            m = prefix.search(path)
            if m is not None:
                path = path[: m.start()] + path[m.end():]
                if path and not path.startswith("/"):
                    path = "/" + path
        query = "&".join(q for q in (target.query, scope.get("query_string", b"").decode("latin-1")) if q)
        url = urlunsplit((target.scheme, target.netloc, _join_path(target.path, path), query, ""))
        headers = []
        host = ""
        for k, v in scope["headers"]:
            name = k.decode("latin-1").lower()
            if name == "host":
                host = v.decode("latin-1")
            if name in _HOP_BY_HOP or name == "forwarded" or name.startswith("x-forwarded"):
                continue
            headers.append((k, v))
        client_ip = (scope.get("client") or ("", 0))[0]
        headers += [(b"x-forwarded-for", client_ip.encode()), (b"x-forwarded-host", host.encode()),
                    (b"x-forwarded-proto", scope.get("scheme", "http").encode())]
        if host:
            headers.append((b"host", host.encode()))

        async def body():
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        request = client.build_request(scope["method"], url, headers=headers, content=body())
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            await PlainTextResponse("504 - gateway timeout", 504)(scope, receive, send)
            return
        except httpx.HTTPError:
            await PlainTextResponse("502 - bad gateway", 502)(scope, receive, send)
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in _HOP_BY_HOP]
            out += [(k.lower().encode(), v.encode()) for k, v in settings.response_headers.items()]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    return app
