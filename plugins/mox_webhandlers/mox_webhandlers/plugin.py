"""Hooks of the web handlers plugin: the kinds ``static``, ``redirect``, ``forward`` and
``internal`` (mox's WebStatic, WebRedirect, WebForward and WebInternal)."""

from __future__ import annotations

from mox_core import hookimpl
from mox_core.api import WebHandlerKind
from mox_webhandlers.settings import ForwardSettings, InternalSettings, RedirectSettings, StaticSettings

# The apps' modules (httpx, websockets) are imported when a handler is configured, not when
# plugins are listed.


def _static(settings, ctx):
    from mox_webhandlers.static import static_app

    return static_app(settings, ctx)


def _redirect(settings, ctx):
    from mox_webhandlers.redirect import redirect_app

    return redirect_app(settings, ctx)


def _forward(settings, ctx):
    from mox_webhandlers.forward import forward_app

    return forward_app(settings, ctx)


def _internal(settings, ctx):
    from mox_webhandlers.internal import internal_app

    return internal_app(settings, ctx)


@hookimpl
def mox_register_webhandlers() -> list[WebHandlerKind]:
    return [
        WebHandlerKind("static", StaticSettings, _static,
                       "Serve files from a directory (mox WebStatic)."),
        WebHandlerKind("redirect", RedirectSettings, _redirect,
                       "Redirect to another URL or path (mox WebRedirect)."),
        WebHandlerKind("forward", ForwardSettings, _forward,
                       "Reverse proxy to a backend, websockets included (mox WebForward)."),
        WebHandlerKind("internal", InternalSettings, _internal,
                       "Serve mox's account or admin web interface under a path (mox WebInternal)."),
    ]
