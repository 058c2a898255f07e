"""Edits of ``domains.toml`` as a document (tomlkit), for :class:`DomainsWriter.change`:
each changes only what it must, so comments and the order of everything else stay.

They check what they need to find their way (an account that does not exist, an address
already taken) and raise :class:`EditError`; everything else is checked by validating the
whole result, as ``mox config check`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomlkit
from tomlkit import TOMLDocument
from tomlkit.items import Comment, Table, Whitespace

from mox_core.errors import MoxError
from mox_core.smtp.domain import to_ascii, to_unicode

__all__ = [
    "EditError",
    "add_account",
    "add_address",
    "add_domain",
    "remove_account",
    "remove_address",
    "remove_domain",
    "set_values",
    "table",
]


class EditError(MoxError):
    """The edit does not apply to this document (a name that does not exist, or exists)."""


def table(doc: TOMLDocument, *keys: str, create: bool = False) -> Table:
    """The table at ``keys`` (e.g. ``"accounts", "alice"``); created (as a super table for
    the levels in between, so no empty ``[accounts]`` header appears) when ``create``."""
    node: Any = doc
    for i, key in enumerate(keys):
        if key not in node:
            if not create:
                raise EditError(f"no {'.'.join(keys[: i + 1])} in domains.toml")
            node[key] = tomlkit.table(is_super_table=i < len(keys) - 1)
        node = node[key]
    return node


def _last_table(t: Table) -> Table:
    """The table that comes last in the file among ``t`` and its sub-tables."""
    last = None
    for _, item in t.value.body:
        if isinstance(item, Table):
            last = item
    return t if last is None else _last_table(last)


def append_table(parent: Table | TOMLDocument, key: str, new: Table) -> None:
    """Add ``new`` as the last child of ``parent``, after a blank line and followed by one.
    Comments that were written above the table following ``parent`` (tomlkit keeps them at
    the end of the last sub-table) move along, to stay above it."""
    trailing: list[tuple[None, Any]] = []
    if isinstance(parent, Table) and len(parent):
        body = _last_table(parent).value.body
        while body and body[-1][0] is None and isinstance(body[-1][1], Comment | Whitespace):
            trailing.insert(0, body.pop())
    if not trailing or not isinstance(trailing[0][1], Whitespace):
        trailing.insert(0, (None, Whitespace("\n")))
    parent[key] = new
    _last_table(new).value.body.extend(trailing)


def _unicode_domain(name: str) -> str:
    try:
        return to_unicode(to_ascii(name))
    except ValueError as exc:
        raise EditError(f"invalid domain {name!r}: {exc}") from None


def add_domain(doc: TOMLDocument, name: str, *, separators: list[str] | None = None,
               description: str = "") -> str:
    """Add domain ``name`` (in its lower-case Unicode form, as config keys are); returns it."""
    name = _unicode_domain(name)
    domains = table(doc, "domains", create=True)
    if name in domains:
        raise EditError(f"domain {name} already exists")
    t = tomlkit.table()
    if description:
        t["description"] = description
    if separators:
        t["localpart_catchall_separators"] = separators
    append_table(domains, name, t)
    return name


def remove_domain(doc: TOMLDocument, name: str) -> None:
    """Remove a domain; refused while addresses or accounts still use it."""
    name = _unicode_domain(name)
    domains = table(doc, "domains")
    if name not in domains:
        raise EditError(f"no domain {name}")
    users = []
    for acc_name, acc in doc.get("accounts", {}).items():
        if acc.get("domain") == name:
            users.append(f"account {acc_name} (its default domain)")
        users += [f"address {a} of account {acc_name}" for a in acc.get("destinations", {})
                  if a.rpartition("@")[2] == name]
    if users:
        raise EditError(f"domain {name} is still used by: {', '.join(users)}; remove or change those first")
    del domains[name]


def _find_address(doc: TOMLDocument, address: str) -> str | None:
    for acc_name, acc in doc.get("accounts", {}).items():
        if address in acc.get("destinations", {}):
            return acc_name
    return None


def add_account(doc: TOMLDocument, name: str, address: str) -> None:
    """A new account ``name`` with its first address (its domain becomes the account's)."""
    accounts = table(doc, "accounts", create=True)
    if name in accounts:
        raise EditError(f"account {name} already exists")
    if "@" not in address or address.startswith("@"):
        raise EditError(f"{address!r} is not an address (localpart@domain)")
    owner = _find_address(doc, address)
    if owner is not None:
        raise EditError(f"address {address} already belongs to account {owner}")
    t = tomlkit.table()
    t["domain"] = address.rpartition("@")[2]
    dests = tomlkit.table(is_super_table=True)
    dests[address] = tomlkit.table()
    t["destinations"] = dests
    append_table(accounts, name, t)


def remove_account(doc: TOMLDocument, name: str) -> None:
    accounts = table(doc, "accounts")
    if name not in accounts:
        raise EditError(f"no account {name}")
    del accounts[name]


def add_address(doc: TOMLDocument, account: str, address: str) -> None:
    """Deliver ``address`` (``lp@domain``, or ``@domain`` for a catch-all) to ``account``."""
    if "@" not in address:
        raise EditError(f"{address!r} is not an address (localpart@domain, or @domain for a catch-all)")
    owner = _find_address(doc, address)
    if owner is not None:
        raise EditError(f"address {address} already belongs to account {owner}")
    acc = table(doc, "accounts", account)
    if "destinations" not in acc:
        append_table(acc, "destinations", tomlkit.table(is_super_table=True))
    append_table(acc["destinations"], address, tomlkit.table())


def remove_address(doc: TOMLDocument, address: str) -> str:
    """Stop delivering ``address``; returns the account that had it."""
    owner = _find_address(doc, address)
    if owner is None:
        raise EditError(f"no account has address {address}")
    dests = doc["accounts"][owner]["destinations"]
    if len(dests) == 1:
        raise EditError(f"{address} is the last address of account {owner}; remove the account instead")
    del dests[address]
    return owner


def set_values(t: Table, values: Mapping[str, Any], *, remove: frozenset[str] = frozenset()) -> None:
    """Set the keys of ``values`` in table ``t`` (replacing their values, keeping their place
    and the comments around them) and remove the keys in ``remove``."""
    for key in remove:
        if key in t:
            del t[key]
    for key, value in values.items():
        t[key] = value
