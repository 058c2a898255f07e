"""Accounts: the list, adding one (name and first address), and an account's page: its
settings (a form generated from :class:`~mox_core.config.models.Account`: default domain,
names, outgoing limits, rate limiters, quota), its password, its addresses (catch-all
``@domain`` included) each with its destination settings, the use of its limits, and its
routes (:mod:`mox_core.admin.routes`); removing it."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from starlette.responses import Response
from tomlkit import TOMLDocument

from mox_core.account.app import MIN_PASSWORD
from mox_core.account.usage import account_addresses, account_limits
from mox_core.accounts.db import db_path, set_password
from mox_core.admin.context import Admin, TableForm, q
from mox_core.admin.forms import Spec, specs_from_model
from mox_core.admin.saving import Outcome
from mox_core.config import edits
from mox_core.config.models import Account, Destination
from mox_core.config.resolved import Config
from mox_core.webui import Page

__all__ = ["ACCOUNT_NAME", "account_form", "register"]

# account names are directory names under <data_dir>/accounts/
ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# the fieldsets of the account's form; keys of the model not named here go to "Other"
SECTIONS = (
    ("Identity", ("domain", "full_name", "description")),
    ("Sending limits", ("max_outgoing_messages_per_day", "max_first_time_recipients_per_day", "rate_limiters")),
    ("Storage", ("quota_message_size",)),
)


def _grouped(specs: Sequence[Spec]) -> list[tuple[str, list[Spec]]]:
    named = {n for _, names in SECTIONS for n in names}
    by_name = {s.name: s for s in specs}
    out = [(legend, [by_name[n] for n in names if n in by_name]) for legend, names in SECTIONS]
    rest = [s for s in specs if s.name not in named]
    return out + ([("Other", rest)] if rest else [])


def account_form(cfg: Config, name: str) -> TableForm:
    domains = sorted(cfg.dynamic.model.domains)
    specs = specs_from_model(Account, skip=("destinations", "routes"), choices={"domain": domains})
    known = sorted(cfg.plugins.rate_limiters) + sorted(cfg.dynamic.model.rate_limiters)
    specs = [replace(s, description=f"{s.description} Known: {', '.join(f'`{k}`' for k in known)}.")
             if s.name == "rate_limiters" else s for s in specs]
    return TableForm(("accounts", name), _grouped(specs))


def _password_set(cfg: Config, account: str) -> float | None:
    """When the account's password was set; None when it has none."""
    path = db_path(cfg)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            row = db.execute("SELECT updated FROM credentials WHERE account = ?", (account,)).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


async def _context(admin: Admin, name: str) -> dict[str, Any] | None:
    cfg = admin.cfg
    acc = cfg.account(name)
    if acc is None:
        return None
    limits = await asyncio.to_thread(account_limits, cfg, name, cfg.data_dir)
    password = await asyncio.to_thread(_password_set, cfg, name)
    return {"name": name, "account": acc, "addresses": account_addresses(cfg, name), "limits": limits,
            "password_set": password, "domains": sorted(cfg.dynamic.model.domains), "min_password": MIN_PASSWORD}


async def _show(admin: Admin, page: Page, name: str, *, outcome: Outcome | None = None,
                answers: dict[str, str] | None = None, status: int | None = None, **extra: Any) -> Response:
    ctx = await _context(admin, name)
    if ctx is None:
        return admin.not_found(page, f"account {name}")
    if status is None:
        status = 200 if outcome is None else (409 if outcome.stale else 400)
    done = page.request.query_params.get("password") == "1"
    return await account_form(admin.cfg, name).show(admin, page, "account.html", status=status, outcome=outcome,
                                                    answers=answers, password_done=done, **ctx, **extra)


def register(admin: Admin) -> None:
    _list(admin)
    _account(admin)
    _password(admin)
    _addresses(admin)


def _list(admin: Admin) -> None:
    async def show(page: Page, outcome: Outcome | None = None) -> Response:
        f = await admin.saver.read()
        removed = page.request.query_params.get("removed", "")
        status = 200 if outcome is None else (409 if outcome.stale else 400)
        return page.render("accounts.html", status=status, accounts=admin.cfg.dynamic.model.accounts,
                           domains=sorted(admin.cfg.dynamic.model.domains), outcome=outcome, form=page.form,
                           version=page.form.get("version") if outcome else f.version,
                           notice=f"Account {removed} removed. Its mail stays in the data directory." if removed else "")

    @admin.ui.page("/accounts")
    async def accounts_page(page: Page) -> Response:
        return await show(page)

    @admin.ui.action("/accounts/add")
    async def add(page: Page) -> Response:
        name = page.form.get("name", "").strip()
        address = page.form.get("address", "").strip()
        if not ACCOUNT_NAME.match(name):
            return await show(page, Outcome(ok=False, errors={"name": "not a valid name"}, summary=[
                "name: an account name is 1 to 64 letters, digits, dots, hyphens and underscores, "
                "starting with a letter or digit"]))
        outcome = await admin.saver.save(lambda doc: edits.add_account(doc, name, address), page.form.get("version"))
        if outcome.ok:
            return page.redirect(f"/accounts/{q(name)}?saved=1")
        return await show(page, outcome)


def _account(admin: Admin) -> None:
    @admin.ui.page("/accounts/{name}")
    async def account_page(page: Page) -> Response:
        return await _show(admin, page, page.request.path_params["name"])

    @admin.ui.action("/accounts/{name}")
    async def account_save(page: Page) -> Response:
        name = page.request.path_params["name"]
        ctx = await _context(admin, name)
        if ctx is None:
            return admin.not_found(page, f"account {name}")
        return await account_form(admin.cfg, name).save(admin, page, "account.html", f"/accounts/{q(name)}", **ctx)

    @admin.ui.action("/accounts/{name}/remove")
    async def account_remove(page: Page) -> Response:
        name = page.request.path_params["name"]
        if page.form.get("confirm") != "true":
            return await _show(admin, page, name, outcome=Outcome(ok=False, summary=[
                f"Tick the box to confirm that account {name} is to be removed."]))
        outcome = await admin.saver.save(lambda doc: edits.remove_account(doc, name), page.form.get("version"))
        if outcome.ok:
            admin.sessions.delete_principal("account", name)
            return page.redirect(f"/accounts?removed={q(name)}")
        return await _show(admin, page, name, outcome=outcome)


def _password(admin: Admin) -> None:
    @admin.ui.action("/accounts/{name}/password")
    async def password(page: Page) -> Response:
        name = page.request.path_params["name"]
        new, repeat = page.form.get("password", ""), page.form.get("repeat", "")
        if admin.cfg.account(name) is None:
            return admin.not_found(page, f"account {name}")
        problem = ""
        if len(new) < MIN_PASSWORD:
            problem = f"The password must have at least {MIN_PASSWORD} characters."
        elif new != repeat:
            problem = "The password and its repetition differ."
        if problem:
            return await _show(admin, page, name, status=400, password_error=problem)
        await asyncio.to_thread(set_password, admin.cfg, name, new)
        admin.sessions.delete_principal("account", name)  # the account pages log in again
        return page.redirect(f"/accounts/{q(name)}?password=1#password")


def destination_form(account: str, address: str) -> TableForm:
    return TableForm(("accounts", account, "destinations", address), [("", specs_from_model(Destination))])


def _addresses(admin: Admin) -> None:
    ui = admin.ui

    @ui.action("/accounts/{name}/addresses/add")
    async def address_add(page: Page) -> Response:
        name = page.request.path_params["name"]
        address = page.form.get("address", "").strip()
        outcome = await admin.saver.save(lambda doc: edits.add_address(doc, name, address), page.form.get("version"))
        if outcome.ok:
            return page.redirect(f"/accounts/{q(name)}?saved=1#addresses")
        return await _show(admin, page, name, outcome=outcome, address_form=page.form)

    @ui.action("/accounts/{name}/addresses/{address}/remove")
    async def address_remove(page: Page) -> Response:
        name, address = page.request.path_params["name"], page.request.path_params["address"]
        def edit(doc: TOMLDocument) -> None:
            if address not in edits.table(doc, "accounts", name).get("destinations", {}):
                raise edits.EditError(f"address {address} is not an address of account {name}")
            edits.remove_address(doc, address)

        outcome = await admin.saver.save(edit, page.form.get("version"))
        if outcome.ok:
            return page.redirect(f"/accounts/{q(name)}?saved=1#addresses")
        return await _show(admin, page, name, outcome=outcome)

    @ui.page("/accounts/{name}/addresses/{address}")
    async def destination_page(page: Page) -> Response:
        name, address = page.request.path_params["name"], page.request.path_params["address"]
        return await destination_form(name, address).show(admin, page, "destination.html", name=name,
                                                          address=address)

    @ui.action("/accounts/{name}/addresses/{address}")
    async def destination_save(page: Page) -> Response:
        name, address = page.request.path_params["name"], page.request.path_params["address"]
        return await destination_form(name, address).save(
            admin, page, "destination.html", f"/accounts/{q(name)}/addresses/{q(address)}", name=name,
            address=address)
