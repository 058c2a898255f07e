"""``mox acme status`` and ``mox acme renew``: the ACME certificates of the running server
(over the ctl socket; status also without a server, from the files)."""

from __future__ import annotations

from typing import Any

import click

from mox_core.server.ctl import CtlError, CtlUnavailable, call, socket_path

__all__ = ["acme_group"]


@click.group("acme")
def acme_group() -> None:
    """Certificates from ACME (Let's Encrypt): status, renew now."""


@acme_group.command("status")
@click.pass_obj
def acme_status(state: Any) -> None:
    """Each host name with an ACME certificate: issuer, expiry, next renewal, last error."""
    cfg = state.load_config()
    try:
        rows = call(socket_path(cfg.data_dir), "acme.status")
    except CtlUnavailable:
        from mox_core.acme.manager import status_rows

        rows = status_rows(cfg)
        click.echo("mox: server not running; from the certificate files", err=True)
    except CtlError as exc:
        raise click.ClickException(str(exc)) from None
    if not rows:
        click.echo("no listener uses ACME (tls.acme in mox.toml)")
    for r in rows:
        what = "temporary self-signed" if r["temporary"] else f"issued by {r['issuer']}, valid until {r['not_after']}"
        click.echo(f"{r['name']} ({r['provider']}, listener {r['listener']}): {what}; renew at {r['renew_at']}")
        if r.get("error"):
            click.echo(f"  last attempt failed: {r['error']}")
            if r.get("fix"):
                click.echo(f"  fix: {r['fix']}")
            click.echo(f"  next attempt: {r['retry_at']}")


@acme_group.command("renew")
@click.argument("names", nargs=-1)
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the CA.")
@click.pass_obj
def acme_renew(state: Any, names: tuple[str, ...], timeout: float) -> None:
    """Have the running server obtain new certificates now, for NAMES (default: all)."""
    cfg = state.load_config()
    try:
        result = call(socket_path(cfg.data_dir), "acme.renew", {"names": list(names)}, timeout=timeout)
    except (CtlUnavailable, CtlError) as exc:
        raise click.ClickException(str(exc)) from None
    failed = False
    for name, outcome in result.items():
        click.echo(f"{name}: {outcome}")
        failed = failed or outcome.startswith("failed")
    if failed:
        raise click.exceptions.Exit(1)
