"""Which account receives mail for an address, resolved as mox does.

Lookup order for ``lp@domain``: postmaster at our host name (or without domain) goes to the
postmaster account; the domain must be configured and enabled; the localpart is canonicalised
(lower case unless the domain is case sensitive, cut at the first of each catch-all
separator); then an exact destination, else the domain's catch-all ``@domain``, else
``postmaster@domain`` falls back to the postmaster account, else the address is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mox_core.config.models import Destination
from mox_core.config.resolved import Config
from mox_core.smtp.domain import to_ascii


class AddressNotFound(Exception):
    """No account for the address. ``reason``: domain_not_found, domain_disabled, address_not_found."""

    def __init__(self, reason: str, address: str):
        self.reason = reason
        self.address = address
        super().__init__(f"{reason.replace('_', ' ')}: {address}")


@dataclass(frozen=True)
class Resolved:
    account: str
    mailbox: str
    canonical: str  # canonical address: lp@ascii-domain
    destination: Destination | None  # None for the postmaster fallback
    catchall: bool = False


def split_address(address: str) -> tuple[str, str]:
    """``lp@domain`` -> (localpart, domain). A quoted localpart is unquoted; no domain -> ""."""
    if address.startswith('"'):
        end = address.rfind('"')
        if end <= 0:
            raise ValueError(f"bad address {address!r}")
        lp = address[1:end].replace('\\"', '"').replace("\\\\", "\\")
        rest = address[end + 1:]
        if rest and not rest.startswith("@"):
            raise ValueError(f"bad address {address!r}")
        return lp, rest[1:]
    lp, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return lp, domain


def is_local_domain(config: Config, domain: str) -> bool:
    try:
        return to_ascii(domain) in config.dynamic.domains
    except ValueError:
        return False


_hostnames: dict[int, tuple[Any, frozenset[str]]] = {}


def _smtp_hostnames(config: Config) -> frozenset[str]:
    """The host names whose postmaster@ is ours; from mox.toml, so once per static config."""
    static = config.static
    hit = _hostnames.get(id(static))
    if hit is not None and hit[0] is static:
        return hit[1]
    names = frozenset({static.hostname} | {
        (lst.hostname or "").lower() for lst in static.listeners.values() if lst.smtp.enabled})
    if len(_hostnames) > 64:
        _hostnames.clear()
    _hostnames[id(static)] = (static, names)
    return names


def lookup(config: Config, address: str) -> Resolved:
    """Resolve ``address`` to an account; raise :class:`AddressNotFound`."""
    lp, domain = split_address(address)
    pm = config.static.postmaster
    hostnames = _smtp_hostnames(config)
    if lp.lower() == "postmaster" and (domain == "" or domain.lower() in hostnames):
        return Resolved(pm.account, pm.mailbox, f"postmaster@{config.static.hostname}", None)
    try:
        ad = to_ascii(domain)
    except ValueError:
        raise AddressNotFound("domain_not_found", address) from None
    dom = config.dynamic.domains.get(ad)
    if dom is None:
        raise AddressNotFound("domain_not_found", address)
    if dom.disabled:
        raise AddressNotFound("domain_disabled", address)
    canon = f"{dom.canonical_localpart(lp)}@{ad}"
    dest = config.dynamic.addresses.get(canon)
    if dest is not None:
        return Resolved(dest.account, dest.destination.mailbox, canon, dest.destination)
    catchall = config.dynamic.catchalls.get(ad)
    if catchall is not None:
        return Resolved(catchall.account, catchall.destination.mailbox, canon,
                        catchall.destination, catchall=True)
    if canon.split("@")[0].lower() == "postmaster":
        return Resolved(pm.account, pm.mailbox, canon, None)
    raise AddressNotFound("address_not_found", address)
