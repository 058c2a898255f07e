"""The overview, the transports (read-only: they live in mox.toml) and the plugins (as
``mox plugins list`` shows them)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from mox_core.admin.context import Admin
from mox_core.admin.forms import build, specs_from_model
from mox_core.admin.queue import queue_counts
from mox_core.config.models import TransportCommon
from mox_core.config.resolved import Config
from mox_core.plugins.host import PluginInfo
from mox_core.webui import Page

__all__ = ["register"]


@dataclass(frozen=True)
class TransportView:
    name: str
    kind: str
    plugin: str | None
    dist: str | None
    version: str | None
    description: str
    common: list[Any]
    settings: list[Any]
    used_by: list[str]


@dataclass(frozen=True)
class KindView:
    name: str
    plugin: str | None
    dist: str | None
    description: str
    settings: list[Any]


def _info(cfg: Config, plugin: str | None) -> PluginInfo | None:
    return cfg.plugins.infos.get(plugin) if plugin else None


def _route_users(cfg: Config) -> dict[str, list[str]]:
    """Transport name -> where routes name it ("global route 1", "account alice route 2")."""
    dyn = cfg.dynamic
    out: dict[str, list[str]] = {}
    levels = [dyn.routes_global, *dyn.routes_domain.values(), *dyn.routes_account.values()]
    for routes in levels:
        for r in routes:
            out.setdefault(r.transport, []).append(f"{r.where} route {r.index + 1}")
    return out


def transports(cfg: Config) -> list[TransportView]:
    users = _route_users(cfg)
    out = []
    for name, entry in sorted(cfg.transports.items()):
        raw = cfg.static.transports.get(name, {})
        kind = cfg.plugins.transports.get(entry.kind)
        plugin = cfg.plugins.transports.owner(entry.kind)
        info = _info(cfg, plugin)
        common = build(specs_from_model(TransportCommon, skip=("kind",)), raw)
        settings = build(specs_from_model(kind.settings_model), raw) if kind is not None else []
        out.append(TransportView(name, entry.kind, plugin, info.dist if info else None, info.version if info else None,
                                 kind.description if kind else "", common, settings, users.get(name, [])))
    return out


def transport_kinds(cfg: Config) -> list[KindView]:
    out = []
    for name, kind in sorted(cfg.plugins.transports.items()):
        plugin = cfg.plugins.transports.owner(name)
        info = _info(cfg, plugin)
        out.append(KindView(name, plugin, info.dist if info else None, kind.description,
                            build(specs_from_model(kind.settings_model), None)))
    return out


def register(admin: Admin) -> None:
    ui = admin.ui

    @ui.page("/")
    async def overview(page: Page) -> Response:
        cfg = admin.cfg
        counts = await asyncio.to_thread(queue_counts, cfg.data_dir)
        model = cfg.dynamic.model
        infos = list(cfg.plugins.infos.values())
        return page.render(
            "overview.html", domains=model.domains, accounts=model.accounts, counts=counts,
            plugins=[i for i in infos if not i.builtin], broken=[i for i in infos if i.status == "error"],
            transports=sorted(cfg.transports.values(), key=lambda t: t.name), cfg=cfg,
            handlers=len(model.web_handlers), redirects=len(model.web_domain_redirects),
            routes=len(model.routes) + sum(len(d.routes) for d in model.domains.values())
            + sum(len(a.routes) for a in model.accounts.values()))

    @ui.page("/transports")
    async def transports_page(page: Page) -> Response:
        cfg = admin.cfg
        return page.render("transports.html", transports=transports(cfg), kinds=transport_kinds(cfg),
                           config_path=cfg.path)

    @ui.page("/plugins")
    async def plugins_page(page: Page) -> Response:
        infos = sorted(admin.cfg.plugins.infos.values(), key=lambda i: (i.builtin, i.name))
        return page.render("plugins.html", infos=infos)
