"""Domains: the list, adding one, and a domain's page (:mod:`mox_core.admin.domainpage`):
saving its settings, removing it."""

from __future__ import annotations

from starlette.responses import Response
from tomlkit import TOMLDocument

from mox_core.admin.context import Admin, q
from mox_core.admin.domainpage import domain_context, domain_form, show_domain
from mox_core.admin.saving import Outcome
from mox_core.config import edits
from mox_core.webui import Page

__all__ = ["register"]


def register(admin: Admin) -> None:
    _list(admin)
    _domain(admin)


def _addresses(admin: Admin) -> dict[str, int]:
    """Domain -> how many addresses (catch-alls included) the accounts have in it."""
    out: dict[str, int] = {}
    for acc in admin.cfg.dynamic.model.accounts.values():
        for addr in acc.destinations:
            d = addr.rpartition("@")[2]
            out[d] = out.get(d, 0) + 1
    return out


def _list(admin: Admin) -> None:
    ui = admin.ui

    async def show(page: Page, status: int = 200, outcome: Outcome | None = None) -> Response:
        f = await admin.saver.read()
        removed = page.request.query_params.get("removed", "")
        return page.render("domains.html", status=status, domains=admin.cfg.dynamic.model.domains,
                           addresses=_addresses(admin), version=page.form.get("version") if outcome else f.version,
                           outcome=outcome, form=page.form,
                           notice=f"Domain {removed} removed." if removed else "")

    @ui.page("/domains")
    async def domains_page(page: Page) -> Response:
        return await show(page)

    @ui.action("/domains/add")
    async def add(page: Page) -> Response:
        name = page.form.get("name", "").strip()
        description = page.form.get("description", "").strip()
        added: list[str] = []

        def edit(doc: TOMLDocument) -> None:
            added.append(edits.add_domain(doc, name, description=description))

        outcome = await admin.saver.save(edit, page.form.get("version"))
        if outcome.ok:
            return page.redirect(f"/domains/{q(added[0])}?saved=1")
        return await show(page, 409 if outcome.stale else 400, outcome)


def _domain(admin: Admin) -> None:
    ui = admin.ui

    @ui.page("/domains/{name}")
    async def domain_page(page: Page) -> Response:
        return await show_domain(admin, page, page.request.path_params["name"])

    @ui.action("/domains/{name}")
    async def domain_save(page: Page) -> Response:
        name = page.request.path_params["name"]
        ctx = await domain_context(admin, name)
        if ctx is None:
            return admin.not_found(page, f"domain {name}")
        return await domain_form(name).save(admin, page, "domain.html", f"/domains/{q(name)}", **ctx)

    @ui.action("/domains/{name}/remove")
    async def domain_remove(page: Page) -> Response:
        name = page.request.path_params["name"]
        outcome = await admin.saver.save(lambda doc: edits.remove_domain(doc, name), page.form.get("version"))
        if outcome.ok:
            return page.redirect(f"/domains?removed={q(name)}")
        return await show_domain(admin, page, name, outcome=outcome)
