"""Hooks of the web handlers plugin."""

from __future__ import annotations

from mox_core import hookimpl
from mox_core.api import WebHandlerKind
from mox_webhandlers.settings import RedirectSettings, ReverseProxySettings, StaticSettings


def _static(settings, ctx):
    from mox_webhandlers.apps import static_app

    return static_app(settings, ctx)


def _redirect(settings, ctx):
    from mox_webhandlers.apps import redirect_app

    return redirect_app(settings, ctx)


def _reverse_proxy(settings, ctx):
    from mox_webhandlers.apps import reverse_proxy_app

    return reverse_proxy_app(settings, ctx)


@hookimpl
def mox_register_webhandlers() -> list[WebHandlerKind]:
    return [
        WebHandlerKind("static", StaticSettings, _static, "Serve files from a directory."),
        WebHandlerKind("redirect", RedirectSettings, _redirect, "Redirect to another URL."),
        WebHandlerKind("reverse_proxy", ReverseProxySettings, _reverse_proxy, "Forward to a backend."),
    ]
