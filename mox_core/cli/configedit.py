"""``mox config domain|account|address add|rm``: change ``domains.toml`` from scripts, with
the same writer as the admin pages (comments kept, validated, atomic, effective at once in a
running server)."""

from __future__ import annotations

from collections.abc import Callable

import click
from tomlkit import TOMLDocument

from mox_core.cli.state import State
from mox_core.config import edits
from mox_core.config.generation import Generation
from mox_core.config.holder import ConfigHolder
from mox_core.config.writer import DomainsWriter

__all__ = ["register"]


def _change(state: State, edit: Callable[[TOMLDocument], object], done: str) -> None:
    cfg = state.load_config()
    writer = DomainsWriter(ConfigHolder(cfg), Generation(cfg.data_dir))
    writer.change(edit)
    click.echo(done)


def register(config_group: click.Group) -> None:
    @config_group.group("domain")
    def domain() -> None:
        """Add or remove a domain."""

    @domain.command("add")
    @click.argument("name")
    @click.option("--separator", "separators", multiple=True, help="Localpart catch-all separator, e.g. +.")
    @click.pass_obj
    def domain_add(state: State, name: str, separators: tuple[str, ...]) -> None:
        """Add domain NAME (mail for it is then accepted for its addresses)."""
        _change(state, lambda doc: edits.add_domain(doc, name, separators=list(separators)),
                f"domain {name} added")

    @domain.command("rm")
    @click.argument("name")
    @click.pass_obj
    def domain_rm(state: State, name: str) -> None:
        """Remove domain NAME (refused while an account or address uses it)."""
        _change(state, lambda doc: edits.remove_domain(doc, name), f"domain {name} removed")

    @config_group.group("account")
    def account() -> None:
        """Add or remove an account."""

    @account.command("add")
    @click.argument("name")
    @click.argument("address")
    @click.pass_obj
    def account_add(state: State, name: str, address: str) -> None:
        """Add account NAME with its first ADDRESS (set a password with mox setaccountpassword)."""
        _change(state, lambda doc: edits.add_account(doc, name, address), f"account {name} added")

    @account.command("rm")
    @click.argument("name")
    @click.pass_obj
    def account_rm(state: State, name: str) -> None:
        """Remove account NAME from the config (its Maildir stays in the data directory)."""
        _change(state, lambda doc: edits.remove_account(doc, name), f"account {name} removed")

    @config_group.group("address")
    def address() -> None:
        """Add or remove an address of an account."""

    @address.command("add")
    @click.argument("address")
    @click.argument("account_name", metavar="ACCOUNT")
    @click.pass_obj
    def address_add(state: State, address: str, account_name: str) -> None:
        """Deliver ADDRESS (or @domain, a catch-all) to ACCOUNT."""
        _change(state, lambda doc: edits.add_address(doc, account_name, address),
                f"address {address} added to account {account_name}")

    @address.command("rm")
    @click.argument("address")
    @click.pass_obj
    def address_rm(state: State, address: str) -> None:
        """Stop delivering ADDRESS."""
        _change(state, lambda doc: edits.remove_address(doc, address), f"address {address} removed")
