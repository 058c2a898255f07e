"""Routes at each level (global ``[[routes]]``, ``[[domains.D.routes]]``,
``[[accounts.A.routes]]``): list in order, add, edit, move up and down, remove; and the
"which route would this message take" box, which shows the lines of
:func:`mox_core.outgoing.routing.explain` (what ``mox routes explain`` prints).

A route's form is generated: the transport is one of mox.toml's transports, and every route
criterion the installed plugins registered (route matcher kinds) is a field of its
``value_type``, empty when the route does not use it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from tomlkit import TOMLDocument

from mox_core.admin.context import Admin, TableForm, q
from mox_core.admin.forms import Spec, build, parse, spec_for
from mox_core.admin.saving import FieldErrors, Outcome, TablePath, keys_of, table_at
from mox_core.config.arrays import append_entry, move_entry, remove_entry
from mox_core.config.edits import EditError
from mox_core.config.resolved import Config
from mox_core.outgoing.routing import explain
from mox_core.webui import Page

__all__ = ["Level", "register", "route_specs"]


@dataclass(frozen=True)
class Level:
    """Where a list of routes is: global, a domain's or an account's."""

    kind: str  # global, domain, account
    name: str = ""

    @property
    def path(self) -> TablePath:
        return () if self.kind == "global" else ("domains" if self.kind == "domain" else "accounts", self.name)

    @property
    def base(self) -> str:
        return "" if self.kind == "global" else f"/{self.kind}s/{q(self.name)}"

    @property
    def title(self) -> str:
        return "Global routes" if self.kind == "global" else f"Routes of {self.kind} {self.name}"

    def exists(self, cfg: Config) -> bool:
        model = cfg.dynamic.model
        return (self.kind == "global" or (self.kind == "domain" and self.name in model.domains)
                or (self.kind == "account" and self.name in model.accounts))

    def parent(self, doc: TOMLDocument) -> Any:
        return doc if self.kind == "global" else table_at(doc, self.path)


def route_specs(cfg: Config) -> list[Spec]:
    """The fields of a route: its transport, then one per installed route criterion."""
    plugins = cfg.plugins
    specs = [spec_for("transport", str, choices=sorted(cfg.transports),
                      description="The transport (from mox.toml) that delivers what this route matches.")]
    for name, matcher in sorted(plugins.route_matchers.items()):
        owner = plugins.route_matchers.owner(name)
        plugin = "" if owner is None or owner.startswith("core.") else f" (plugin {owner})"
        specs.append(spec_for(name, typing.Optional[matcher.value_type],  # noqa: UP045
                              description=f"{matcher.description}{plugin} Empty: not a criterion of this route.",
                              default=None))
    return specs


def _level(page: Page, kind: str) -> Level:
    return Level(kind, page.request.path_params.get("name", ""))


def _raw_routes(doc: TOMLDocument, level: Level) -> list[dict[str, Any]]:
    try:
        parent = level.parent(doc)
    except EditError:
        return []
    routes = parent.get("routes")
    return routes.unwrap() if routes is not None else []


def _explanation(cfg: Config, page: Page, level: Level) -> dict[str, Any] | None:
    params = page.request.query_params
    if "to" not in params:
        return None
    sender, to, attempt_text = params.get("from", "").strip(), params.get("to", "").strip(), params.get("attempt", "1")
    asked = {"from": sender, "to": to, "attempt": attempt_text}
    try:
        attempt = int(attempt_text)
        if attempt < 1 or "@" not in to:
            raise ValueError
    except ValueError:
        return {"asked": asked, "error": "Give a recipient address and an attempt of 1 or more."}
    account = level.name if level.kind == "account" else None
    result = explain(cfg, sender, to, attempt, account=account)
    return {"asked": asked, "lines": result.lines(), "result": result}


async def _show(admin: Admin, page: Page, level: Level, *, status: int = 200, outcome: Outcome | None = None,
                add_answers: dict[str, str] | None = None) -> Response:
    cfg = admin.cfg
    if not level.exists(cfg):
        return admin.not_found(page, f"{level.kind} {level.name}")
    f = await admin.saver.read()
    raw = _raw_routes(f.doc, level)
    specs = route_specs(cfg)
    add_fields = build(specs, None, add_answers, outcome.errors if outcome else None)
    dyn = cfg.dynamic
    counts = {"domain": {d: len(m.routes) for d, m in dyn.model.domains.items() if m.routes},
              "account": {a: len(m.routes) for a, m in dyn.model.accounts.items() if m.routes}}
    return page.render("routes.html", status=status, level=level, routes=raw, add_fields=add_fields,
                       version=(page.form.get("version") or f.version) if outcome else f.version,
                       outcome=outcome, notice=admin.saved_notice(page), transports=sorted(cfg.transports),
                       explained=_explanation(cfg, page, level), counts=counts, global_count=len(dyn.model.routes))


def register(admin: Admin) -> None:
    for kind, prefix in (("global", ""), ("domain", "/domains/{name}"), ("account", "/accounts/{name}")):
        _register_level(admin, kind, prefix)


def _register_level(admin: Admin, kind: str, prefix: str) -> None:
    ui = admin.ui

    @ui.page(prefix + "/routes")
    async def routes_page(page: Page) -> Response:
        return await _show(admin, page, _level(page, kind))

    @ui.action(prefix + "/routes/add")
    async def add(page: Page) -> Response:
        level = _level(page, kind)
        if not level.exists(admin.cfg):
            return admin.not_found(page, f"{level.kind} {level.name}")
        specs = route_specs(admin.cfg)
        answers = dict(page.form)
        index = len(_raw_routes((await admin.saver.read()).doc, level))

        def edit(doc: TOMLDocument) -> None:
            ch = parse(specs, answers, {})
            if ch.errors:
                raise FieldErrors(ch.errors)
            append_entry(level.parent(doc), "routes", ch.values)

        outcome = await admin.saver.save(edit, answers.get("version"), path=(*level.path, "routes", index),
                                         keys=keys_of(build(specs, {})))
        if outcome.ok:
            return page.redirect(f"{level.base}/routes?saved=1")
        return await _show(admin, page, level, status=409 if outcome.stale else 400, outcome=outcome,
                           add_answers=answers)

    _register_entry(admin, kind, prefix)


def _register_entry(admin: Admin, kind: str, prefix: str) -> None:
    ui = admin.ui

    def form(page: Page) -> tuple[Level, int, TableForm]:
        level, index = _level(page, kind), page.request.path_params["index"] - 1
        return level, index, TableForm((*level.path, "routes", index), [("", route_specs(admin.cfg))])

    @ui.page(prefix + "/routes/{index:int}")
    async def route_page(page: Page) -> Response:
        level, index, tf = form(page)
        return await tf.show(admin, page, "route.html", level=level, number=index + 1)

    @ui.action(prefix + "/routes/{index:int}")
    async def route_save(page: Page) -> Response:
        level, index, tf = form(page)
        return await tf.save(admin, page, "route.html", f"{level.base}/routes/{index + 1}", level=level,
                             number=index + 1)

    @ui.action(prefix + "/routes/{index:int}/move")
    async def route_move(page: Page) -> Response:
        level, index, _ = form(page)
        to = index - 1 if page.form.get("to") == "up" else index + 1
        outcome = await admin.saver.save(lambda doc: move_entry(level.parent(doc), "routes", index, to),
                                         page.form.get("version"))
        if outcome.ok:
            return page.redirect(f"{level.base}/routes?saved=1")
        return await _show(admin, page, level, status=409 if outcome.stale else 400, outcome=outcome)

    @ui.action(prefix + "/routes/{index:int}/remove")
    async def route_remove(page: Page) -> Response:
        level, index, _ = form(page)
        outcome = await admin.saver.save(lambda doc: remove_entry(level.parent(doc), "routes", index),
                                         page.form.get("version"))
        if outcome.ok:
            return page.redirect(f"{level.base}/routes?saved=1")
        return await _show(admin, page, level, status=409 if outcome.stale else 400, outcome=outcome)
