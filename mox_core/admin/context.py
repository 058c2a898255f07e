"""What every admin page works with: the live config, ``domains.toml`` (read and saved
through :class:`~mox_core.admin.saving.Saver`), the sessions; and the generic page of one
table of ``domains.toml`` edited with a generated form (:class:`TableForm`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.responses import Response
from tomlkit import TOMLDocument

from mox_core.admin.forms import Spec, build, parse
from mox_core.admin.saving import FieldErrors, NoChange, Outcome, Saver, TablePath, apply_changes, keys_of, table_at
from mox_core.config.edits import EditError
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.webui import Page, SessionStore, WebUI

__all__ = ["Admin", "TableForm", "q"]


def q(s: str) -> str:
    """A name as one segment of a URL path."""
    return quote(s, safe="@+")


@dataclass
class Admin:
    """The admin app's state, handed to each group of pages."""

    ui: WebUI
    holder: ConfigHolder
    saver: Saver
    sessions: SessionStore

    @property
    def cfg(self) -> Config:
        return self.holder.get()

    @property
    def config_dir(self) -> Path:
        return self.cfg.config_dir

    @property
    def data_dir(self) -> Path:
        return self.cfg.data_dir

    def not_found(self, page: Page, what: str) -> Response:
        return self.ui.error(page.request, 404, f"There is no {what} in domains.toml.", page.session)

    def saved_notice(self, page: Page) -> str:
        saved = page.request.query_params.get("saved")
        if saved == "1":
            return "Saved. The change is in effect."
        if saved == "0":
            return "Nothing to save: no value was changed."
        return ""


@dataclass
class TableForm:
    """A form editing the table at ``path`` of domains.toml: fieldsets of specs (a legend,
    "" for none)."""

    path: TablePath
    sections: Sequence[tuple[str, Sequence[Spec]]]

    @property
    def specs(self) -> list[Spec]:
        return [s for _, specs in self.sections for s in specs]

    def fields(self, current: dict[str, Any], answers: dict[str, str] | None = None,
               errors: dict[str, str] | None = None) -> list[tuple[str, list[Any]]]:
        return [(legend, build(specs, current, answers, errors)) for legend, specs in self.sections]

    async def show(self, admin: Admin, page: Page, template: str, *, status: int = 200,
                   outcome: Outcome | None = None, answers: dict[str, str] | None = None, **ctx: Any) -> Response:
        """The page with the form: the file's values, or the ``answers`` sent back with
        errors (``outcome``: why the save was refused)."""
        f = await admin.saver.read()
        try:
            current = table_at(f.doc, self.path).unwrap()
        except EditError:
            return admin.not_found(page, "such entry")
        version = (page.form.get("version") or f.version) if outcome is not None else f.version
        sections = self.fields(current, answers, outcome.errors if outcome else None)
        return page.render(template, status=status, sections=sections, version=version, outcome=outcome,
                           notice=admin.saved_notice(page), **ctx)

    async def save(self, admin: Admin, page: Page, template: str, done: str, **ctx: Any) -> Response:
        """Save the answers: a redirect to ``done`` (with ``saved=1``, or ``saved=0`` when
        nothing changed), or the form again with the problems (nothing written)."""
        answers = dict(page.form)
        specs = self.specs

        def edit(doc: TOMLDocument) -> None:
            t = table_at(doc, self.path)
            ch = parse(specs, answers, t.unwrap())
            if ch.errors:
                raise FieldErrors(ch.errors)
            if not ch:
                raise NoChange()
            apply_changes(t, ch)

        keys = keys_of(build(specs, {}))
        outcome = await admin.saver.save(edit, answers.get("version"), path=self.path, keys=keys)
        if outcome.ok:
            return page.redirect(f"{done}?saved={1 if outcome.changed else 0}")
        return await self.show(admin, page, template, status=409 if outcome.stale else 400, outcome=outcome,
                               answers=answers, **ctx)
