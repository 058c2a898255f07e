"""A domain's DNS page: the records the config needs (as ``mox dnsrecords`` prints them) and,
when asked, the check of what is published (as ``mox dnscheck``: every check at once, with
pass, warning or failure and what to change). The check only reads DNS and the MTA-STS
policy; nothing is changed, so it is a GET."""

from __future__ import annotations

from starlette.responses import Response

from mox_core.admin.context import Admin
from mox_core.dnscheck import check_domain, suggested_records
from mox_core.webui import Page

__all__ = ["register"]


def register(admin: Admin) -> None:
    ui = admin.ui

    @ui.page("/domains/{name}/dns")
    async def dns_page(page: Page) -> Response:
        name = page.request.path_params["name"]
        cfg = admin.cfg
        if name not in cfg.dynamic.model.domains:
            return admin.not_found(page, f"domain {name}")
        records = suggested_records(cfg, name)
        check = None
        if page.request.query_params.get("check"):
            check = await check_domain(cfg, name)
        return page.render("dns.html", name=name, records=records, check=check)
