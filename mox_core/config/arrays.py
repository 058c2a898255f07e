"""Edits of arrays of tables in ``domains.toml`` (``[[routes]]``, ``[[web_handlers]]``, the
routes of a domain or an account): append, remove and move an entry, keeping comments.

tomlkit keeps a comment written above a ``[[header]]`` at the end of the entry before it.
Moved about as they are, such comments would end up above another entry, so these edits
first give every entry the comment block directly above it (the comment lines with no blank
line between them and the header): it moves with its entry, and goes when its entry is
removed. Everything else (blank lines, comments apart from an entry by a blank line, the
comments after the last entry) stays where it was.
"""

from __future__ import annotations

from typing import Any

import tomlkit
from tomlkit import TOMLDocument
from tomlkit.items import AoT, Comment, Null, Table, Whitespace

from mox_core.config.edits import EditError

__all__ = ["append_entry", "entries", "move_entry", "remove_entry"]

Run = list[tuple[None, Any]]


def entries(parent: Table | TOMLDocument, key: str) -> AoT | None:
    """The array of tables ``parent[key]``, None when there is none."""
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, AoT):
        raise EditError(f"{key} is not an array of tables ([[{key}]])")
    return value


def _last_table(t: Table) -> Table:
    last = None
    for _, item in t.value.body:
        if isinstance(item, Table):
            last = item
        elif isinstance(item, AoT) and item.body:
            last = item.body[-1]
    return t if last is None else _last_table(last)


def _detach_trailing(t: Table) -> Run:
    """Remove and return the comments and blank lines at the end of ``t`` (of its last
    sub-table, as the file shows them)."""
    return _detach_trailing_body(_last_table(t).value.body)


def _split(run: Run) -> tuple[Run, Run]:
    """(free, attached): the comment lines right above a header are attached to it."""
    k = len(run)
    while k > 0 and isinstance(run[k - 1][1], Comment):
        k -= 1
    return run[:k], run[k:]


def _with_gap(run: Run) -> Run:
    """``run`` with at least one line break in it (entries are separated by a blank line)."""
    if any(isinstance(item, Whitespace) and "\n" in item.s for _, item in run):
        return run
    return [(None, Whitespace("\n")), *run]


def _merge(a: Run, b: Run) -> Run:
    """Two runs as one, without two blank-line items in a row."""
    out = list(a)
    for entry in b:
        if out and isinstance(entry[1], Whitespace) and isinstance(out[-1][1], Whitespace):
            continue
        out.append(entry)
    return out


def _body(container: Table | TOMLDocument) -> list[tuple[Any, Any]]:
    return container.body if isinstance(container, TOMLDocument) else container.value.body


def _text(run: Run) -> str:
    return "".join(item.as_string() for _, item in run)


class _Before:
    """Where the comments and blank lines above the first entry are: at the end of the table
    before the array, or in the parent's own body right before it.

    tomlkit indexes a table's keys by their position in its body, so items are only ever
    removed from or added at the end of a body; in the middle of the parent's body the run
    is replaced by placeholders (``Null``, as tomlkit removes items itself) and written back
    as the text of one item."""

    def __init__(self, parent: Table | TOMLDocument, aot: AoT) -> None:
        body = _body(parent)
        i = next(n for n, (_, item) in enumerate(body) if item is aot)
        k = i
        while k > 0 and body[k - 1][0] is None and isinstance(body[k - 1][1], Comment | Whitespace | Null):
            k -= 1
        self.at: int | None = None
        if k == i and k > 0 and isinstance(body[k - 1][1], Table | AoT):
            prev = body[k - 1][1]
            self.body = _last_table(prev if isinstance(prev, Table) else prev.body[-1]).value.body
            self.run = _detach_trailing_body(self.body)
        else:
            self.body = body
            self.run = [e for e in body[k:i] if not isinstance(e[1], Null)]
            self.at = k if k < i else None
            for n in range(k, i):
                body[n] = (None, Null())

    def put(self, run: Run) -> None:
        if self.at is None:
            self.body.extend(run)
        elif run:
            self.body[self.at] = (None, Whitespace(_text(run)))


def _detach_trailing_body(body: list[tuple[Any, Any]]) -> Run:
    out: Run = []
    while body and body[-1][0] is None and isinstance(body[-1][1], Comment | Whitespace):
        out.insert(0, body.pop())
    return out


class _Blocks:
    """The entries of an array as blocks (the comments attached above it, its table), and
    the runs of blank lines and free comments around them: ``runs[0]`` before the first
    block, ``runs[i]`` between blocks i-1 and i, ``runs[-1]`` after the last. A block's
    comments are written into its header's indentation (``trivia.indent``), which tomlkit
    writes as it is right before the ``[[header]]`` line."""

    def __init__(self, parent: Table | TOMLDocument, aot: AoT) -> None:
        self.aot = aot
        self.before = _Before(parent, aot)
        tables = list(aot.body)
        leads = [self.before.run] + [_detach_trailing(t) for t in tables]
        self.runs: list[Run] = []
        self.blocks: list[tuple[str, Table]] = []
        for lead, table in zip(leads, tables, strict=False):
            free, attached = _split(lead)
            self.runs.append(free)
            self.blocks.append((_text(attached) + table.trivia.indent, table))
        self.runs.append(leads[-1])

    def remove(self, index: int) -> None:
        del self.blocks[index]
        above, below = self.runs[index], self.runs[index + 1]
        if 0 < index == len(self.blocks):  # it was the last: the blank line above it goes too
            kept = [e for e in above if isinstance(e[1], Comment)]
            self.runs[index:index + 2] = [(_with_gap(kept) if kept else []) + below]
        else:
            self.runs[index:index + 2] = [_merge(above, below)]

    def write(self) -> None:
        del self.aot[:]
        for attached, t in self.blocks:
            t.trivia.indent = attached
            self.aot.append(t)
        self.before.put(self.runs[0])
        for i, (_, table) in enumerate(self.blocks):
            tail = _with_gap(self.runs[i + 1]) if i + 1 < len(self.blocks) else self.runs[-1]
            _last_table(table).value.body.extend(tail)


def _checked(aot: AoT | None, key: str, index: int) -> AoT:
    if aot is None or not 0 <= index < len(aot):
        raise EditError(f"no entry {index + 1} in {key}")
    return aot


def remove_entry(parent: Table | TOMLDocument, key: str, index: int) -> None:
    """Remove entry ``index`` (0-based) of ``parent[key]`` with the comments directly above
    it; the key goes with its last entry."""
    aot = _checked(entries(parent, key), key, index)
    blocks = _Blocks(parent, aot)
    blocks.remove(index)
    if blocks.blocks:
        blocks.write()
        return
    run = blocks.runs[0]
    del parent[key]
    blocks.before.put(run)


def move_entry(parent: Table | TOMLDocument, key: str, index: int, to: int) -> None:
    """Move entry ``index`` to position ``to`` (both 0-based), with its comments."""
    aot = _checked(entries(parent, key), key, index)
    if not 0 <= to < len(aot):
        raise EditError(f"no position {to + 1} in {key}")
    if to == index:
        return
    blocks = _Blocks(parent, aot)
    blocks.blocks.insert(to, blocks.blocks.pop(index))
    blocks.write()


def append_entry(parent: Table | TOMLDocument, key: str, new: Table | dict[str, Any]) -> int:
    """Add ``new`` as the last entry of ``parent[key]`` (the array is made when missing);
    returns its index."""
    table = new if isinstance(new, Table) else _table(new)
    aot = entries(parent, key)
    if aot is None:
        trailing = _detach_trailing(parent) if isinstance(parent, Table) and len(parent) else []
        if trailing or isinstance(parent, Table):
            _last_table(parent).value.body.append((None, Whitespace("\n")))
        parent[key] = tomlkit.aot()
        parent[key].append(table)
        _last_table(table).value.body.extend(_with_gap(trailing) if trailing else [])
        return 0
    blocks = _Blocks(parent, aot)
    blocks.blocks.append((table.trivia.indent, table))
    blocks.runs.insert(len(blocks.runs) - 1, [(None, Whitespace("\n"))])
    blocks.write()
    return len(aot) - 1


def _table(values: dict[str, Any]) -> Table:
    t = tomlkit.table()
    for k, v in values.items():
        t[k] = v
    return t

