"""Web handlers (``[[web_handlers]]``, checked in order) and domain redirects
(``[web_domain_redirects]``).

A handler's form is generated from core's settings of every handler
(:class:`~mox_core.config.models.WebHandlerCommon`: host, path, log name, ...) and from its
kind's settings model, so a plugin's handler kind gets its form without UI code: choose the
kind among the installed ones, then fill in its settings.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response
from tomlkit import TOMLDocument

from mox_core.admin.context import Admin, TableForm
from mox_core.admin.forms import Spec, build, parse, specs_from_model
from mox_core.admin.saving import FieldErrors, Outcome, keys_of
from mox_core.config.arrays import append_entry, move_entry, remove_entry
from mox_core.config.domains import domain_or_none
from mox_core.config.edits import EditError, table
from mox_core.config.models import WebHandlerCommon
from mox_core.config.resolved import Config
from mox_core.webui import Page

__all__ = ["handler_sections", "register"]


def handler_sections(cfg: Config, kind: str) -> list[tuple[str, list[Spec]]] | None:
    """The fieldsets of a handler of ``kind``: where it applies, then the kind's settings;
    None when no plugin provides the kind."""
    k = cfg.plugins.webhandlers.get(kind)
    if k is None:
        return None
    owner = cfg.plugins.webhandlers.owner(kind) or "?"
    return [("Requests it handles", specs_from_model(WebHandlerCommon, skip=("kind",))),
            (f"Settings of kind {kind} (plugin {owner})", specs_from_model(k.settings_model))]


def _kinds(cfg: Config) -> list[tuple[str, str, str]]:
    """(kind, plugin, description) of the installed handler kinds."""
    wh = cfg.plugins.webhandlers
    return [(name, wh.owner(name) or "", k.description) for name, k in sorted(wh.items())]


def _handlers(doc: TOMLDocument) -> list[dict[str, Any]]:
    aot = doc.get("web_handlers")
    return aot.unwrap() if aot is not None else []


async def _show(admin: Admin, page: Page, *, status: int = 200, outcome: Outcome | None = None) -> Response:
    f = await admin.saver.read()
    redirects = f.doc.get("web_domain_redirects")
    return page.render("web.html", status=status, handlers=_handlers(f.doc), kinds=_kinds(admin.cfg),
                       redirects=redirects.unwrap() if redirects is not None else {},
                       version=(page.form.get("version") or f.version) if outcome else f.version,
                       outcome=outcome, notice=admin.saved_notice(page), form=page.form)


def _status(outcome: Outcome) -> int:
    return 409 if outcome.stale else 400


def register(admin: Admin) -> None:
    _list(admin)
    _add(admin)
    _entry(admin)
    _redirects(admin)


def _list(admin: Admin) -> None:
    @admin.ui.page("/web")
    async def web_page(page: Page) -> Response:
        return await _show(admin, page)


def _add(admin: Admin) -> None:
    ui = admin.ui

    async def show_add(page: Page, kind: str, *, status: int = 200, outcome: Outcome | None = None,
                       answers: dict[str, str] | None = None) -> Response:
        sections = handler_sections(admin.cfg, kind)
        if sections is None:
            return ui.error(page.request, 404, f"No installed plugin provides web handler kind {kind!r}.",
                            page.session)
        f = await admin.saver.read()
        fields = [(legend, build(specs, None, answers, outcome.errors if outcome else None))
                  for legend, specs in sections]
        return page.render("handler.html", status=status, sections=fields, kind=kind, number=None,
                           version=(page.form.get("version") or f.version) if outcome else f.version,
                           outcome=outcome, kinds=_kinds(admin.cfg))

    @ui.page("/web/add")
    async def add_page(page: Page) -> Response:
        return await show_add(page, page.request.query_params.get("kind", ""))

    @ui.action("/web/add")
    async def add(page: Page) -> Response:
        kind = page.form.get("kind", "")
        sections = handler_sections(admin.cfg, kind)
        if sections is None:
            return await show_add(page, kind)
        specs = [s for _, specs in sections for s in specs]
        answers = dict(page.form)
        index = len(_handlers((await admin.saver.read()).doc))

        def edit(doc: TOMLDocument) -> None:
            ch = parse(specs, answers, {})
            if ch.errors:
                raise FieldErrors(ch.errors)
            append_entry(doc, "web_handlers", {"kind": kind, **ch.values})

        outcome = await admin.saver.save(edit, answers.get("version"), path=("web_handlers", index),
                                         keys=keys_of(build(specs, {})))
        if outcome.ok:
            return page.redirect("/web?saved=1")
        return await show_add(page, kind, status=409 if outcome.stale else 400, outcome=outcome, answers=answers)


def _entry(admin: Admin) -> None:
    ui = admin.ui

    async def form(page: Page) -> tuple[int, str, TableForm | None]:
        index = page.request.path_params["index"] - 1
        handlers = _handlers((await admin.saver.read()).doc)
        kind = str(handlers[index].get("kind", "")) if 0 <= index < len(handlers) else ""
        sections = handler_sections(admin.cfg, kind)
        return index, kind, TableForm(("web_handlers", index), sections) if sections is not None else None

    @ui.page("/web/{index:int}")
    async def handler_page(page: Page) -> Response:
        index, kind, tf = await form(page)
        if tf is None:
            return admin.not_found(page, f"web handler {index + 1} of an installed kind")
        return await tf.show(admin, page, "handler.html", kind=kind, number=index + 1, kinds=_kinds(admin.cfg))

    @ui.action("/web/{index:int}")
    async def handler_save(page: Page) -> Response:
        index, kind, tf = await form(page)
        if tf is None:
            return admin.not_found(page, f"web handler {index + 1} of an installed kind")
        return await tf.save(admin, page, "handler.html", f"/web/{index + 1}", kind=kind, number=index + 1,
                             kinds=_kinds(admin.cfg))

    @ui.action("/web/{index:int}/move")
    async def handler_move(page: Page) -> Response:
        index = page.request.path_params["index"] - 1
        to = index - 1 if page.form.get("to") == "up" else index + 1
        outcome = await admin.saver.save(lambda doc: move_entry(doc, "web_handlers", index, to),
                                         page.form.get("version"))
        return page.redirect("/web?saved=1") if outcome.ok else await _show(admin, page, status=_status(outcome),
                                                                           outcome=outcome)

    @ui.action("/web/{index:int}/remove")
    async def handler_remove(page: Page) -> Response:
        index = page.request.path_params["index"] - 1
        outcome = await admin.saver.save(lambda doc: remove_entry(doc, "web_handlers", index),
                                         page.form.get("version"))
        return page.redirect("/web?saved=1") if outcome.ok else await _show(admin, page, status=_status(outcome),
                                                                           outcome=outcome)


def _redirects(admin: Admin) -> None:
    ui = admin.ui

    @ui.action("/web/redirects/add")
    async def redirect_add(page: Page) -> Response:
        src, dst = page.form.get("from", "").strip().lower(), page.form.get("to", "").strip().lower()

        def edit(doc: TOMLDocument) -> None:
            if domain_or_none(src) is None or domain_or_none(dst) is None:
                raise EditError("give two domains: the one to redirect, and where to")
            t = table(doc, "web_domain_redirects", create=True)
            if src in t:
                raise EditError(f"{src} is redirected already")
            t[src] = dst

        outcome = await admin.saver.save(edit, page.form.get("version"))
        return page.redirect("/web?saved=1#redirects") if outcome.ok else await _show(
            admin, page, status=_status(outcome), outcome=outcome)

    @ui.action("/web/redirects/remove")
    async def redirect_remove(page: Page) -> Response:
        src = page.form.get("from", "")

        def edit(doc: TOMLDocument) -> None:
            t = table(doc, "web_domain_redirects")
            if src not in t:
                raise EditError(f"{src} is not redirected")
            del t[src]
            if not len(t):
                del doc["web_domain_redirects"]

        outcome = await admin.saver.save(edit, page.form.get("version"))
        return page.redirect("/web?saved=1#redirects") if outcome.ok else await _show(
            admin, page, status=_status(outcome), outcome=outcome)

