"""The ``internal`` handler kind (mox's WebInternal): one of mox's own web applications
(``account``, ``admin``) under ``base_path`` on a domain of the administrator's choosing.

The application gets the request as a mounted ASGI application does: ``root_path`` extended
by ``base_path`` without its trailing slash, ``path`` as it came (it includes ``root_path``,
as the ASGI spec and Starlette's Mount have it; Starlette routes on the part after
``root_path``). A request for ``base_path`` without the trailing slash is redirected (307) to
it; one outside ``base_path``, or for a service the server does not offer, gets 404.
"""

from __future__ import annotations

from typing import Any

from mox_core.api import WebHandlerContext
from mox_webhandlers.common import escape_path, escape_query, respond
from mox_webhandlers.settings import InternalSettings


def internal_app(settings: InternalSettings, ctx: WebHandlerContext):
    """The ASGI app of an ``internal`` handler; see the module docstring and the README."""
    base = settings.base_path
    mount = base[:-1]
    service = ctx.internal_services.get(settings.service)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        root_path: str = scope.get("root_path", "")
        path: str = scope["path"]
        local = path[len(root_path):] if root_path and path.startswith(root_path) else path
        if local == mount and scope["type"] == "http":
            location = escape_path(root_path + base)
            if scope.get("query_string"):
                location += "?" + escape_query(scope["query_string"])
            await respond(scope, send, 307, "", [(b"location", location.encode())])
            return
        if service is None or not local.startswith(base):
            await respond(scope, send, 404, "404 - not found")
            return
        await service(dict(scope, root_path=root_path + mount, path=root_path + local), receive, send)

    return app
