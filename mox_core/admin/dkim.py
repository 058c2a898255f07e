"""The DKIM section of a domain's page: which selectors sign, a new key generated into the
config directory (``dkim/<selector>.<domain>.pem``, RSA or Ed25519) with its selector added,
removing a selector, and each selector's settings (a form generated from
:class:`~mox_core.config.models.DKIMSelector`)."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.responses import Response

from mox_core.admin.context import Admin, TableForm, q
from mox_core.admin.dkimkeys import SELECTOR, add_selector, remove_selector, set_signing
from mox_core.admin.domainpage import show_domain
from mox_core.admin.forms import specs_from_model
from mox_core.admin.saving import Outcome
from mox_core.config.models import DKIMSelector
from mox_core.outgoing.dkimsign import generate_key
from mox_core.smtp.domain import to_ascii
from mox_core.webui import Page

__all__ = ["register", "selector_form"]


def register(admin: Admin) -> None:
    _generate(admin)
    _sign_and_remove(admin)
    _selector_form(admin)


def _domain_page(page: Page, notice: str) -> Response:
    name = page.request.path_params["name"]
    return page.redirect(f"/domains/{q(name)}?{notice}#dkim")


async def _refused(admin: Admin, page: Page, outcome: Outcome) -> Response:
    return await show_domain(admin, page, page.request.path_params["name"], outcome=outcome, dkim_form=page.form)


def _generate(admin: Admin) -> None:
    @admin.ui.action("/domains/{name}/dkim/generate")
    async def generate(page: Page) -> Response:
        name = page.request.path_params["name"]
        selector = page.form.get("selector", "").strip()
        algorithm = page.form.get("algorithm", "rsa")
        if name not in admin.cfg.dynamic.model.domains:
            return admin.not_found(page, f"domain {name}")
        if not SELECTOR.match(selector) or algorithm not in ("rsa", "ed25519"):
            return await _refused(admin, page, Outcome(ok=False, errors={"selector": "letters, digits, hyphens"},
                                                       summary=["selector: a selector is letters, digits and "
                                                                "hyphens, e.g. 2026a"]))
        rel = f"dkim/{selector}.{to_ascii(name)}.pem"
        path = admin.config_dir / rel
        if path.exists():
            return await _refused(admin, page, Outcome(ok=False, summary=[f"{path} exists already; choose "
                                                                          "another selector"]))
        path.parent.mkdir(mode=0o700, exist_ok=True)
        await asyncio.to_thread(generate_key, path, 2048, algorithm)
        sign = page.form.get("sign") == "true"
        outcome = await admin.saver.save(lambda doc: add_selector(doc, name, selector, rel, sign),
                                         page.form.get("version"))
        if not outcome.ok:
            with contextlib.suppress(OSError):
                path.unlink()  # nothing left behind
            return await _refused(admin, page, outcome)
        return _domain_page(page, f"saved=1&key={q(selector)}")


def _sign_and_remove(admin: Admin) -> None:
    @admin.ui.action("/domains/{name}/dkim/sign")
    async def sign(page: Page) -> Response:
        name = page.request.path_params["name"]
        dom = admin.cfg.dynamic.model.domains.get(name)
        if dom is None:
            return admin.not_found(page, f"domain {name}")
        names = [s for s in dom.dkim.selectors if page.form.get(f"sign.{s}") == "true"]
        outcome = await admin.saver.save(lambda doc: set_signing(doc, name, names), page.form.get("version"))
        return _domain_page(page, "saved=1") if outcome.ok else await _refused(admin, page, outcome)

    @admin.ui.action("/domains/{name}/dkim/{selector}/remove")
    async def remove(page: Page) -> Response:
        name, selector = page.request.path_params["name"], page.request.path_params["selector"]
        outcome = await admin.saver.save(lambda doc: remove_selector(doc, name, selector), page.form.get("version"))
        return _domain_page(page, "saved=1") if outcome.ok else await _refused(admin, page, outcome)


def selector_form(domain: str, selector: str) -> TableForm:
    return TableForm(("domains", domain, "dkim", "selectors", selector), [("", specs_from_model(DKIMSelector))])


def _selector_form(admin: Admin) -> None:
    @admin.ui.page("/domains/{name}/dkim/{selector}")
    async def selector_page(page: Page) -> Response:
        name, selector = page.request.path_params["name"], page.request.path_params["selector"]
        return await selector_form(name, selector).show(admin, page, "selector.html", name=name, selector=selector)

    @admin.ui.action("/domains/{name}/dkim/{selector}")
    async def selector_save(page: Page) -> Response:
        name, selector = page.request.path_params["name"], page.request.path_params["selector"]
        return await selector_form(name, selector).save(admin, page, "selector.html",
                                                        f"/domains/{q(name)}/dkim/{q(selector)}",
                                                        name=name, selector=selector)
