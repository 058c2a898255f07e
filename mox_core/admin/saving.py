"""Saving the admin pages' changes of ``domains.toml`` through the config writer, and the
problems of a refused change put next to the fields they are about.

Every form carries the version (SHA-256) of ``domains.toml`` it was made from; a save hands
it to :meth:`DomainsWriter.change`, which refuses when the file changed since
(:class:`StaleConfig`: "changed since you loaded it", nothing written). The edit runs on the
file as it is under the writer's lock; the writer validates the whole result with the code of
``mox config check`` and writes nothing when there is a problem. Each problem has a key path
(``accounts.alice.quota_message_size``, ``web_handlers[2].path_regexp``): under the table a
form edits, the rest of the path names the form's field (:func:`field_errors`); every problem
is also listed in the summary above the form.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tomlkit
from tomlkit import TOMLDocument
from tomlkit.items import Table

from mox_core.admin.forms import Changes, Field
from mox_core.config.edits import EditError, append_table, set_values
from mox_core.config.resolved import Config
from mox_core.config.writer import DomainsFile, DomainsWriter, StaleConfig
from mox_core.errors import ConfigError, ConfigProblem

__all__ = ["FieldErrors", "Outcome", "Problem", "Saver", "TablePath", "apply_changes", "field_errors", "keys_of",
           "path_text", "table_at"]

TablePath = tuple[str | int, ...]

STALE = ("domains.toml was changed since you loaded this page; nothing was written. "
         "Reload the page to see the current values, then make your change again.")


class FieldErrors(Exception):
    """Answers of a form that are not of their field's type (form key -> message); raised
    inside an edit, so nothing is written."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = dict(errors)


class NoChange(Exception):
    """The form changes nothing: nothing is written."""


@dataclass(frozen=True)
class Problem:
    """A line of the summary above a refused form; ``key``: the field it is about, if any."""

    text: str
    key: str | None = None

    def __str__(self) -> str:
        return self.text


@dataclass
class Outcome:
    """The result of a save: ``ok``, or why not (``stale``, field errors, the summary)."""

    ok: bool = True
    stale: bool = False
    changed: bool = True
    errors: dict[str, str] = field(default_factory=dict)
    summary: list[Problem | str] = field(default_factory=list)
    config: Config | None = None


def path_text(path: TablePath) -> str:
    """A key path as the config problems write it, without quotes: ``web_handlers[2]``."""
    out = ""
    for seg in path:
        out = f"{out}[{seg}]" if isinstance(seg, int) else (f"{out}.{seg}" if out else str(seg))
    return out


def table_at(doc: TOMLDocument, path: TablePath) -> Table:
    """The table at ``path`` (strings: keys, integers: entries of arrays of tables)."""
    node: Any = doc
    for i, seg in enumerate(path):
        try:
            node = node[seg]
        except (KeyError, IndexError, TypeError):
            raise EditError(f"{path_text(path[: i + 1])} is not in domains.toml (any more)") from None
    if not isinstance(node, Table):
        raise EditError(f"{path_text(path)} is not a table in domains.toml")
    return node


def keys_of(fields: Iterable[Field]) -> list[str]:
    """The form keys of ``fields`` and of the fields in their fieldsets."""
    out = []
    for f in fields:
        out.append(f.key)
        out += keys_of(f.children)
    return out


def _message(p: ConfigProblem) -> str:
    return p.message.removeprefix("Value error, ")


def field_errors(problems: Sequence[ConfigProblem], path: TablePath,
                 keys: Iterable[str]) -> tuple[dict[str, str], list[Problem | str]]:
    """(form key -> message, summary lines) of the problems: a problem under the table at
    ``path`` goes to the longest form key its path starts with."""
    base = path_text(path)
    keys = sorted(keys, key=len, reverse=True)
    errors: dict[str, str] = {}
    summary: list[Problem | str] = []
    for p in problems:
        rest = _rest(p.path.replace('"', ""), base)
        key = next((k for k in keys if rest == k or rest.startswith((k + ".", k + "["))), None) if rest else None
        if key is not None:
            errors[key] = f"{errors[key]}; {_message(p)}" if key in errors else _message(p)
        summary.append(Problem(f"{p.path or 'domains.toml'}: {_message(p)}", key))
    return errors, summary


def _rest(where: str, base: str) -> str | None:
    """The part of key path ``where`` under ``base`` ("" for ``base`` itself), else None."""
    if not base:
        return where
    if where == base:
        return ""
    if where.startswith(base) and where[len(base)] in ".[":
        return where[len(base):].lstrip(".")
    return None


def apply_changes(t: Table, ch: Changes) -> None:
    """Write ``ch`` into table ``t``: values set in place, keys removed, sub-tables changed
    (or added after the table's other contents)."""
    set_values(t, ch.values, remove=frozenset(ch.remove))
    for name, sub in ch.groups.items():
        if name in t:
            apply_changes(t[name], sub)
        else:
            new = tomlkit.table()
            apply_changes(new, sub)
            append_table(t, name, new)


class Saver:
    """The admin pages' access to ``domains.toml``: read it, change it."""

    def __init__(self, writer: DomainsWriter) -> None:
        self.writer = writer

    async def read(self) -> DomainsFile:
        return await asyncio.to_thread(self.writer.read)

    async def save(self, edit: Callable[[TOMLDocument], object], version: str | None, *,
                   path: TablePath = (), keys: Iterable[str] = ()) -> Outcome:
        """Apply ``edit`` to the file of ``version`` and write it; the outcome says how it went.
        ``path`` and ``keys``: the table the form edits and its fields, for the problems."""
        if not version:
            return Outcome(ok=False, stale=True, summary=[STALE])
        try:
            cfg = await asyncio.to_thread(self.writer.change, edit, version=version)
        except StaleConfig:
            return Outcome(ok=False, stale=True, summary=[STALE])
        except NoChange:
            return Outcome(changed=False)
        except FieldErrors as exc:
            return Outcome(ok=False, errors=exc.errors, summary=[Problem(f"{k}: {v}", k) for k, v in exc.errors.items()])
        except EditError as exc:
            return Outcome(ok=False, summary=[str(exc)])
        except ConfigError as exc:
            errors, summary = field_errors(exc.problems, path, keys)
            return Outcome(ok=False, errors=errors, summary=summary)
        return Outcome(config=cfg)
