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


def reverse_proxy_app(settings: ReverseProxySettings, ctx: Any):
    raise NotImplementedError("reverse_proxy: forwarding is not built yet (web issue)")
