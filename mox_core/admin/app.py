"""The admin pages as one ASGI app (:func:`admin_app`), on the web UI framework
(:mod:`mox_core.webui`): a password-only login, sessions, CSRF and origin checks, the login
throttle. The pages, by group:

- ``/``: the overview; ``/transports`` (read-only, from mox.toml); ``/plugins``
  (:mod:`mox_core.admin.system`);
- ``/domains/...``: domains, their DKIM selectors and keys, MTA-STS
  (:mod:`mox_core.admin.domains`, :mod:`mox_core.admin.dkim`);
- ``/accounts/...``: accounts, passwords, addresses (:mod:`mox_core.admin.accounts`);
- ``/routes``, ``/domains/<d>/routes``, ``/accounts/<a>/routes``: routes at each level, with
  the "which route would this message take" box (:mod:`mox_core.admin.routes`);
- ``/web/...``: web handlers and domain redirects (:mod:`mox_core.admin.web`);
- ``/queue/...``: the queue of the running server, through its ctl socket
  (:mod:`mox_core.admin.queue`).

Changes of ``domains.toml`` go through the config writer (:mod:`mox_core.admin.saving`).
``mox serve``'s web process mounts the app at the listener's ``admin_http(s)`` path
(:func:`mox_core.web.serve.build_internal_services`).
"""

from __future__ import annotations

import re
from pathlib import Path

from markupsafe import Markup, escape

from mox_core.accounts.adminpasswd import check_admin_password
from mox_core.accounts.sasl import AuthFailureLimiter
from mox_core.admin import accounts, dkim, dns, domains, queue, routes, system, web
from mox_core.admin.context import Admin, q
from mox_core.admin.forms import Spec, toml_text
from mox_core.admin.saving import Saver
from mox_core.config.generation import Generation
from mox_core.config.holder import ConfigHolder
from mox_core.config.writer import DomainsWriter
from mox_core.plugins.kinds import ASGIApp
from mox_core.webui import SessionStore, WebUI

__all__ = ["NAV", "admin_app"]

HERE = Path(__file__).resolve().parent
NAV = [("Overview", "/"), ("Domains", "/domains"), ("Accounts", "/accounts"), ("Routes", "/routes"),
       ("Web", "/web"), ("Transports", "/transports"), ("Queue", "/queue"), ("Plugins", "/plugins")]

_KIND_LABELS = {"text": "text", "path": "file name", "int": "whole number", "float": "number",
                "bool": "true/false", "choice": "one of", "group": "table", "toml": "TOML value"}


def kind_label(spec: Spec) -> str:
    """The type of a setting in words (the transports page documents the kinds' settings)."""
    if spec.kind == "choice":
        return "one of " + ", ".join(str(o) for o in spec.options)
    if spec.kind == "lines" and spec.item is not None:
        return "list of " + kind_label(spec.item)
    if spec.kind == "pairs" and spec.item is not None:
        return "names to " + kind_label(spec.item)
    return _KIND_LABELS.get(spec.kind, spec.kind)


def ticks(text: str) -> Markup:
    """Text with `backticks` shown as code (the models' descriptions use them)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def admin_app(holder: ConfigHolder, *, sessions: SessionStore | None = None,
              limiter: AuthFailureLimiter | None = None, writer: DomainsWriter | None = None) -> ASGIApp:
    """The admin pages as an ASGI app.

    :param holder: the live config; changes are written through ``writer`` (default: a
        writer of this config that bumps ``<data_dir>/config-generation``, so every process
        uses a change at once).
    :param sessions: the session store (default ``<data_dir>/web/sessions.db``).
    :param limiter: failed logins per client IP (default a new one for this app).
    """
    cfg = holder.get()
    config_dir = cfg.config_dir

    def check_login(_username: str, password: str) -> str | None:
        return "admin" if check_admin_password(config_dir, password) else None

    sessions = sessions or SessionStore.for_data_dir(cfg.data_dir)
    ui = WebUI("admin", "Admin", check_login, sessions, limiter, user_label=None,
               templates=HERE / "templates", nav=NAV)
    ui.renderer.env.filters["q"] = q
    ui.renderer.env.filters["kind_label"] = kind_label
    ui.renderer.env.filters["ticks"] = ticks
    ui.renderer.env.filters["tomlv"] = toml_text
    writer = writer or DomainsWriter(holder, Generation(cfg.data_dir))
    admin = Admin(ui, holder, Saver(writer), sessions)
    for group in (system, domains, dkim, dns, accounts, routes, web, queue):
        group.register(admin)
    return ui.app()
