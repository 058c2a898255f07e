"""The account pages: a user logs in with an address of the account (not a catch-all) or the
account name and the account's password, the same check as SMTP AUTH PLAIN
(:func:`mox_core.accounts.passwords.verify_password` on the stored credentials), and sees:

- ``/``: the overview: addresses, outgoing limits and the use of the last 24 hours;
- ``/messages``: the Inbox, newest first, 50 a page, and the other mailboxes
  (``?mailbox=Lists``: the Maildir++ folders where destinations with a ``mailbox`` deliver);
  ``/messages/<id>`` one message (its headers and text), ``/raw/<id>`` the message as a file
  (``Content-Disposition: attachment``), each with the same ``mailbox`` parameter;
- ``/password``: change the password (the current one is required); the account's other
  sessions end, this one stays.

Built by :func:`account_app`; ``mox serve``'s web process mounts it at the listener's
``account_http(s)`` path (:func:`mox_core.web.serve.serve_web`).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from urllib.parse import quote

from starlette.responses import FileResponse, Response

from mox_core.account.mail import Mailbox, mailboxes, open_mailbox
from mox_core.account.usage import account_addresses, account_limits, submission_ports
from mox_core.accounts.db import account_for_login, set_password
from mox_core.accounts.passwords import verify_password
from mox_core.accounts.sasl import AuthFailureLimiter, CredentialStore
from mox_core.config.holder import ConfigHolder
from mox_core.plugins.kinds import ASGIApp
from mox_core.webui import Page, SessionStore, WebUI

__all__ = ["MIN_PASSWORD", "PER_PAGE", "account_app"]

HERE = Path(__file__).resolve().parent
PER_PAGE = 50
MIN_PASSWORD = 8
NAV = [("Overview", "/"), ("Messages", "/messages"), ("Password", "/password")]


def account_app(holder: ConfigHolder, credentials: CredentialStore, data_dir: Path, *,
                sessions: SessionStore | None = None, limiter: AuthFailureLimiter | None = None) -> ASGIApp:
    """The account pages as an ASGI app.

    :param holder: the live config (accounts and addresses as they are now).
    :param credentials: the accounts' stored credentials
        (:class:`mox_core.accounts.db.AccountCredentials`).
    :param data_dir: mox's data directory: Maildirs, the queue database, the sessions.
    :param sessions: the session store (default ``<data_dir>/web/sessions.db``).
    :param limiter: failed logins per client IP (default a new one for this app).
    """
    data_dir = Path(data_dir)

    def check_login(username: str, password: str) -> str | None:
        creds = credentials.lookup(username) if username else None
        if not verify_password(creds, password):
            return None
        return account_for_login(holder.get(), username)

    ui = WebUI("account", "Account", check_login, sessions or SessionStore.for_data_dir(data_dir), limiter,
               templates=HERE / "templates", nav=NAV,
               principal_exists=lambda account: holder.get().account(account) is not None)
    _overview(ui, holder, data_dir)
    _messages(ui, data_dir)
    _password(ui, holder, credentials)
    return ui.app()


def _overview(ui: WebUI, holder: ConfigHolder, data_dir: Path) -> None:
    @ui.page("/")
    async def overview(page: Page) -> Response:
        cfg = holder.get()
        limits = await asyncio.to_thread(account_limits, cfg, page.principal, data_dir)
        acc = cfg.account(page.principal)
        return page.render("overview.html", account=acc, addresses=account_addresses(cfg, page.principal),
                           limits=limits, submission=submission_ports(cfg))


def _messages(ui: WebUI, data_dir: Path) -> None:
    def account_root(page: Page) -> Path:
        return data_dir / "accounts" / page.principal / "Maildir"

    def mailbox(page: Page) -> Mailbox | None:
        return open_mailbox(account_root(page), page.request.query_params.get("mailbox", "Inbox"))

    def no_mailbox(page: Page) -> Response:
        return ui.error(page.request, 404, "There is no such mailbox in your account.", page.session)

    @ui.page("/messages")
    async def messages(page: Page) -> Response:
        try:
            number = max(1, int(page.request.query_params.get("page", "1")))
        except ValueError:
            number = 1
        box = await asyncio.to_thread(mailbox, page)
        if box is None:
            return no_mailbox(page)
        items, total = await asyncio.to_thread(box.page, number, PER_PAGE)
        names = await asyncio.to_thread(mailboxes, account_root(page))
        pages = max(1, -(-total // PER_PAGE))
        return page.render("messages.html", messages=items, total=total, number=number, pages=pages,
                           first=(number - 1) * PER_PAGE + 1, last=(number - 1) * PER_PAGE + len(items),
                           mailbox=box.name, mailboxes=names, in_box=_in_box(box.name))

    @ui.page("/messages/{msg_id:path}")
    async def message(page: Page) -> Response:
        box = await asyncio.to_thread(mailbox, page)
        view = await asyncio.to_thread(box.view, page.request.path_params["msg_id"]) if box else None
        if view is None:
            return ui.error(page.request, 404, "There is no such message in your mailbox.", page.session)
        return page.render("message.html", msg=view, mailbox=box.name, in_box=_in_box(box.name))

    @ui.page("/raw/{msg_id:path}")
    async def raw(page: Page) -> Response:
        msg_id = page.request.path_params["msg_id"]
        box = await asyncio.to_thread(mailbox, page)
        path = await asyncio.to_thread(box.find, msg_id) if box else None
        if path is None:
            return ui.error(page.request, 404, "There is no such message in your mailbox.", page.session)
        return FileResponse(path, media_type="message/rfc822", filename=f"{msg_id}.eml")


def _in_box(name: str) -> str:
    """The query that names mailbox ``name`` in a link ("" for the Inbox)."""
    return "" if name == "Inbox" else "mailbox=" + quote(name, safe="/")


def _password(ui: WebUI, holder: ConfigHolder, credentials: CredentialStore) -> None:
    @ui.page("/password")
    async def password_form(page: Page) -> Response:
        changed = page.request.query_params.get("changed") == "1"
        return page.render("password.html", notice="Your password was changed." if changed else "")

    @ui.action("/password")
    async def password_change(page: Page) -> Response:
        current, new, repeat = (page.form.get(k, "") for k in ("current", "new", "repeat"))
        ip = page.request.client.host if page.request.client else ""
        error = _password_problem(new, repeat)
        wait = ui.limiter.blocked_for(ip)
        if wait > 0:  # the current password is guessed no faster here than at the login
            error = f"Too many failed logins from your address; try again in {math.ceil(wait)} seconds."
        elif error is None:
            creds = credentials.lookup(page.principal)
            if not await asyncio.to_thread(verify_password, creds, current):
                ui.limiter.failed(ip)
                error = "The current password is not right."
        if error is not None:
            return page.render("password.html", status=400, error=error)
        await asyncio.to_thread(set_password, holder.get(), page.principal, new)
        ui.sessions.delete_principal(ui.service, page.principal, keep=page.session.id)
        return page.redirect("/password?changed=1")


def _password_problem(new: str, repeat: str) -> str | None:
    if len(new) < MIN_PASSWORD:
        return f"The new password must have at least {MIN_PASSWORD} characters."
    if new != repeat:
        return "The new password and its repetition differ."
    return None
