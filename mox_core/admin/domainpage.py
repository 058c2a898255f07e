"""A domain's page: its settings in a form generated from
:class:`~mox_core.config.models.Domain` (localpart separators, case sensitivity,
description, disabled, the MTA-STS policy), its DKIM selectors with their DNS records, its
addresses and the link to its routes. Shown by the domain's own actions and by the DKIM
section's (:mod:`mox_core.admin.dkim`)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from mox_core.admin.context import Admin, TableForm
from mox_core.admin.dkimkeys import selectors_of
from mox_core.admin.forms import specs_from_model
from mox_core.admin.saving import Outcome
from mox_core.config.models import Domain
from mox_core.webui import Page

__all__ = ["domain_context", "domain_form", "show_domain"]


def domain_form(name: str) -> TableForm:
    return TableForm(("domains", name), [("", specs_from_model(Domain, skip=("dkim", "routes")))])


async def domain_context(admin: Admin, name: str) -> dict[str, Any] | None:
    """What the domain's page shows besides its form; None when there is no such domain."""
    model = admin.cfg.dynamic.model
    dom = model.domains.get(name)
    if dom is None:
        return None
    users = [(a, addr) for a, acc in model.accounts.items() for addr in acc.destinations
             if addr.rpartition("@")[2] == name]
    return {"name": name, "domain": dom, "selectors": await selectors_of(admin.config_dir, name, dom),
            "users": users, "algorithms": ("rsa", "ed25519")}


async def show_domain(admin: Admin, page: Page, name: str, *, outcome: Outcome | None = None,
                      answers: dict[str, str] | None = None, **extra: Any) -> Response:
    """The domain's page; with ``outcome``, after a refused change (status 409 when stale,
    else 400)."""
    ctx = await domain_context(admin, name)
    if ctx is None:
        return admin.not_found(page, f"domain {name}")
    status = 200 if outcome is None else (409 if outcome.stale else 400)
    return await domain_form(name).show(admin, page, "domain.html", status=status, outcome=outcome,
                                        answers=answers, **ctx, **extra)
