"""DKIM keys and selectors of a domain (RFC 6376): the DNS record of each selector's key
(``<selector>._domainkey.<domain>``, RFC 6376 §3.6.1; Ed25519 keys as RFC 8463 §4), as
``mox dkim gen`` prints it, and the edits of ``[domains.D.dkim]``."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

import tomlkit
from tomlkit import TOMLDocument

from mox_core.config import edits
from mox_core.config.models import DKIMSelector, Domain
from mox_core.outgoing.dkimsign import dns_record, public_key_of

__all__ = ["SELECTOR", "Selector", "add_selector", "remove_selector", "selectors_of", "set_signing"]

# RFC 6376 §3.1: a selector is a sub-domain (labels of letters, digits and hyphens)
SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class Selector:
    name: str
    key_file: str
    signing: bool
    algorithm: str  # "rsa", "ed25519" or "" when the key cannot be read
    record: str  # the DNS record to publish
    problem: str  # why the key cannot be used, "" when it can
    settings: DKIMSelector


def _selector(config_dir: Path, domain: str, name: str, sel: DKIMSelector, signing: bool) -> Selector:
    path = sel.private_key_file if sel.private_key_file.is_absolute() else config_dir / sel.private_key_file
    try:
        algorithm, public = public_key_of(path)
    except (OSError, ValueError, TypeError) as exc:
        problem = f"{path}: {exc.strerror}" if isinstance(exc, OSError) else f"{path}: {exc}"
        return Selector(name, str(sel.private_key_file), signing, "", "", problem, sel)
    return Selector(name, str(sel.private_key_file), signing, algorithm, dns_record(name, domain, public, algorithm),
                    "", sel)


async def selectors_of(config_dir: Path, domain: str, dom: Domain) -> list[Selector]:
    """The domain's selectors with their keys' DNS records (reading the keys in a thread)."""

    def read() -> list[Selector]:
        return [_selector(config_dir, domain, name, sel, name in dom.dkim.sign)
                for name, sel in dom.dkim.selectors.items()]

    return await asyncio.to_thread(read)


def add_selector(doc: TOMLDocument, domain: str, name: str, key_file: str, sign: bool) -> None:
    dom = edits.table(doc, "domains", domain)
    sel = tomlkit.table()
    sel["private_key_file"] = key_file
    if "dkim" not in dom:
        dkim = tomlkit.table()
        if sign:
            dkim["sign"] = [name]
        selectors = tomlkit.table(is_super_table=True)
        selectors[name] = sel
        dkim["selectors"] = selectors
        edits.append_table(dom, "dkim", dkim)
        return
    dkim = dom["dkim"]
    if "selectors" in dkim and name in dkim["selectors"]:
        raise edits.EditError(f"selector {name} already exists")
    if "selectors" in dkim:
        edits.append_table(dkim["selectors"], name, sel)
    else:
        selectors = tomlkit.table(is_super_table=True)
        selectors[name] = sel
        edits.append_table(dkim, "selectors", selectors)
    if sign:
        dkim["sign"] = [*dkim.get("sign", []), name]


def set_signing(doc: TOMLDocument, domain: str, names: list[str]) -> None:
    dom = edits.table(doc, "domains", domain)
    if "dkim" not in dom:
        if names:
            raise edits.EditError("the domain has no DKIM selectors")
        return
    dkim = dom["dkim"]
    if list(dkim.get("sign", [])) == names:
        return
    dkim["sign"] = names


def remove_selector(doc: TOMLDocument, domain: str, name: str) -> None:
    dkim = edits.table(doc, "domains", domain, "dkim")
    selectors = dkim.get("selectors", {})
    if name not in selectors:
        raise edits.EditError(f"no selector {name}")
    del selectors[name]
    if name in dkim.get("sign", []):
        dkim["sign"] = [s for s in dkim["sign"] if s != name]


