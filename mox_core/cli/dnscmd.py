"""``mox dnscheck DOMAIN`` and ``mox dnsrecords DOMAIN`` (mox_core/dnscheck/)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from mox_core.errors import MoxError

__all__ = ["dnscheck_command", "dnsrecords_command"]


def _domain_of(cfg: Any, domain: str) -> str:
    if cfg.domain(domain) is None:
        raise MoxError(f"unknown domain {domain!r} (not in {cfg.domains_path})")
    return domain


@click.command("dnscheck")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds for all checks together.")
@click.pass_obj
def dnscheck_command(state: Any, domain: str, as_json: bool, timeout: float) -> None:
    """Check the DNS records of DOMAIN: MX, SPF, DKIM, DMARC, MTA-STS, TLSRPT, autoconfig,
    SRV, reverse DNS. Prints pass, warning or failure per check with the records to publish;
    exit status 1 on any failure."""
    from mox_core.dnscheck import check_domain, format_table

    cfg = state.load_config()
    result = asyncio.run(check_domain(cfg, _domain_of(cfg, domain), timeout=timeout))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(format_table(result), nl=False)
    if not result.ok:
        sys.exit(1)


@click.command("dnsrecords")
@click.argument("domain")
@click.pass_obj
def dnsrecords_command(state: Any, domain: str) -> None:
    """Print the DNS records DOMAIN needs with this config, as a zone-file fragment."""
    from mox_core.dnscheck import format_zone, suggested_records

    cfg = state.load_config()
    click.echo(format_zone(suggested_records(cfg, _domain_of(cfg, domain))), nl=False)
