"""The ``mox`` command. Plugins add subcommands through ``mox_add_cli_commands``."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any

import click
import structlog

from mox_core import __version__
from mox_core import logging as moxlog
from mox_core.cli.state import State
from mox_core.errors import ConfigError, MoxError
from mox_core.plugins.host import PluginHost

log = structlog.get_logger(component="cli")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", metavar="PATH", default=None,
              help="mox.toml to use (default: $MOX_CONFIG, else config/mox.toml).")
@click.option("--loglevel", default=None, metavar="LEVEL",
              help="tracedata, traceauth, trace, debug, info, warn or error.")
@click.version_option(__version__, prog_name="mox")
@click.pass_context
def cli(ctx: click.Context, config: str | None, loglevel: str | None) -> None:
    """mox: a complete mail server, with transports and web handlers as plugins."""
    if loglevel is not None:
        moxlog.parse_level(loglevel)
    moxlog.set_levels(loglevel or "info")
    host = ctx.obj if isinstance(ctx.obj, PluginHost) else PluginHost.load()
    ctx.obj = State(config, loglevel, host)


# --------------------------------------------------------------------------------------------
# mox serve


@cli.command()
@click.pass_obj
def serve(state: State) -> None:
    """Run the mail server with the config in mox.toml and domains.toml."""
    moxlog.configure(json=True)
    moxlog.set_levels("debug")  # until the config is loaded, as mox does
    host = state.plugins_for_config()
    host.raise_for_errors()
    cfg = state.load_config(reapply_cli_level=False)
    from mox_core.server import metricsdir

    metricsdir.prepare(cfg.data_dir)  # before anything imports prometheus_client
    from mox_core.server.main import run

    try:
        run(cfg)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL) and (exc.strerror or "").startswith("listener "):
            raise MoxError(exc.strerror) from None  # "listener NAME: SERVICE on IP:PORT: why"
        raise


@cli.command("smtp-worker", hidden=True)
@click.option("--index", type=int, required=True)
@click.option("--count", type=int, required=True, help="number of workers (for the delivery share)")
@click.option("--parent", type=int, required=True)
@click.option("--channel", type=int, required=True)
@click.option("--link", type=int, required=True, help="socket to the main process's queue")
@click.option("--socket", "sockets", multiple=True, metavar="FD:LISTENER:SERVICE:IP")
@click.option("--cpu", type=int, default=None, help="run only on this CPU")
@click.pass_obj
def smtp_worker(state: State, index: int, count: int, parent: int, channel: int, link: int,
                sockets: tuple[str, ...], cpu: int | None) -> None:
    """Serve SMTP and submission on sockets from mox serve, and deliver queued messages to a
    share of the recipient domains (started by mox serve, not by hand)."""
    from urllib.parse import unquote

    from mox_core.server.main import run_loop
    from mox_core.server.workers import serve_worker

    moxlog.configure(json=True)
    cfg = state.load_config(reapply_cli_level=False)
    by_key = {}
    for spec in sockets:
        fd, name, service, ip = spec.split(":", 3)
        by_key[(unquote(name), service, ip)] = int(fd)
    run_loop(serve_worker(cfg, index, count, parent, channel, link, by_key, cpu))


@cli.command("web-worker", hidden=True)
@click.option("--parent", type=int, required=True)
@click.option("--channel", type=int, required=True)
@click.option("--socket", "sockets", multiple=True, metavar="FD:PORT:IP")
@click.pass_obj
def web_worker(state: State, parent: int, channel: int, sockets: tuple[str, ...]) -> None:
    """Serve the web ports on sockets from mox serve (started by mox serve, not by hand)."""
    from mox_core.server.main import run_loop
    from mox_core.web.serve import serve_web

    moxlog.configure(json=True)
    cfg = state.load_config(reapply_cli_level=False)
    by_addr = {}
    for spec in sockets:
        fd, port, ip = spec.split(":", 2)
        by_addr[(ip, int(port))] = int(fd)
    run_loop(serve_web(cfg, parent, channel, by_addr))


@cli.command("setaccountpassword")
@click.argument("account")
@click.pass_obj
def setaccountpassword(state: State, account: str) -> None:
    """Set the password of ACCOUNT (read from the terminal, or the first line of stdin).

    Only derived credentials are stored (salted hash, SCRAM keys, CRAM-MD5 states). The
    account's web sessions end: its pages ask for the new password.
    """
    from mox_core.accounts.db import set_password
    from mox_core.webui.sessions import end_sessions

    cfg = state.load_config()
    if account not in cfg.dynamic.model.accounts:
        raise MoxError(f"no account {account!r} in {cfg.domains_path}")
    set_password(cfg, account, _read_password())
    ended = end_sessions(cfg.data_dir, "account", account)
    click.echo(f"password for account {account} set" + _sessions_ended(ended))


@cli.command("setadminpassword")
@click.pass_obj
def setadminpassword(state: State) -> None:
    """Set the password of the admin pages (read from the terminal, or the first line of stdin).

    Only a salted scrypt hash is stored, in the file adminpasswd beside mox.toml (mode 0600).
    Every session of the admin pages ends: they ask for the new password.
    """
    from mox_core.accounts.adminpasswd import set_admin_password
    from mox_core.webui.sessions import end_sessions

    cfg = state.load_config()
    path = set_admin_password(cfg.config_dir, _read_password())
    ended = end_sessions(cfg.data_dir, "admin", "admin")
    click.echo(f"admin password set in {path}" + _sessions_ended(ended))


def _sessions_ended(n: int) -> str:
    return f"; {n} web session{'' if n == 1 else 's'} ended" if n else ""


def _read_password() -> str:
    """A new password: typed twice on a terminal, else the first line of stdin."""
    import getpass

    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if getpass.getpass("repeat password: ") != pw:
            raise MoxError("passwords do not match")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise MoxError("empty password")
    return pw


@cli.group()
def dkim() -> None:
    """DKIM keys."""


@dkim.command("gen")
@click.option("--selector", required=True, help="Selector name, e.g. 2026a.")
@click.option("--domain", required=True, help="Domain the key signs for.")
@click.option("--algorithm", default="rsa", show_default=True, type=click.Choice(["rsa", "ed25519"]),
              help="rsa (rsa-sha256, verified everywhere) or ed25519 (ed25519-sha256, RFC 8463: not by every receiver yet, so sign with an RSA selector too).")
@click.option("--bits", default=2048, show_default=True, type=click.IntRange(1024, 8192), help="RSA key size.")
@click.argument("keyfile", type=click.Path(dir_okay=False, path_type=Path))
def dkim_gen(selector: str, domain: str, algorithm: str, bits: int, keyfile: Path) -> None:
    """Create a key in KEYFILE and print the DNS record to publish, and the config to add."""
    from mox_core.outgoing.dkimsign import dns_record, generate_key

    if keyfile.exists():
        raise MoxError(f"{keyfile} exists, not overwriting")
    public = generate_key(keyfile, bits, algorithm)
    click.echo(dns_record(selector, domain, public, algorithm))
    click.echo(f"""
# domains.toml (key file relative to the config directory, or absolute):
[domains."{domain}".dkim.selectors."{selector}"]
private_key_file = "{keyfile}"
[domains."{domain}".dkim]
sign = ["{selector}"]""")


# --------------------------------------------------------------------------------------------
# mox plugins


@cli.group()
def plugins() -> None:
    """Installed plugins."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@click.option("--all", "show_all", is_flag=True, help="Include core's built-in plugins.")
@click.pass_obj
def plugins_list(state: State, as_json: bool, show_all: bool) -> None:
    """List plugins: name, distribution, version, hooks, kinds and status."""
    host = state.host
    infos = [i for i in host.infos.values() if show_all or not i.builtin]
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    rows = [("NAME", "DISTRIBUTION", "VERSION", "HOOKS", "KINDS", "STATUS")]
    for i in infos:
        status = i.status if i.status != "error" else f"error: {i.error}"
        hooks = ",".join(h.removeprefix("mox_") for h in i.hooks) or "-"
        rows.append((i.name, i.dist or "-", i.version or "-", hooks, ",".join(i.kinds) or "-", status))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5])


# --------------------------------------------------------------------------------------------
# mox config


@cli.group("config")
def config_group() -> None:
    """Check, describe and change the config files."""


@config_group.command("check")
@click.pass_obj
def config_check(state: State) -> None:
    """Validate mox.toml and domains.toml; print every problem, exit 1 if any."""
    try:
        cfg = state.load_config()
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(str(p), err=True)
        click.echo(f"{len(exc.problems)} problem(s) found", err=True)
        sys.exit(1)
    click.echo(f"{cfg.path} and {cfg.domains_path}: config OK")


@config_group.command("describe")
@click.pass_obj
def config_describe(state: State) -> None:
    """Print a commented example of both config files, plugins' settings included."""
    from mox_core.config.describe import describe

    click.echo(describe(state.host), nl=False)


# --------------------------------------------------------------------------------------------

from mox_core.cli.acmecmd import acme_group  # noqa: E402
from mox_core.cli.configedit import register as _register_config_edits  # noqa: E402
from mox_core.cli.dnscmd import dnscheck_command, dnsrecords_command  # noqa: E402
from mox_core.cli.queue import register as _register_queue_commands  # noqa: E402
from mox_core.localserve.command import localserve_command  # noqa: E402
from mox_core.quickstart.command import quickstart_command  # noqa: E402
from mox_core.sendmail.command import sendmail_command  # noqa: E402

_register_config_edits(config_group)
_register_queue_commands(cli)
cli.add_command(localserve_command)
cli.add_command(acme_group)
cli.add_command(quickstart_command)
cli.add_command(dnscheck_command)
cli.add_command(dnsrecords_command)
cli.add_command(sendmail_command)


def main(argv: list[str] | None = None) -> Any:
    if Path(sys.argv[0]).name == "sendmail":  # the mox command linked as sendmail
        from mox_core.sendmail.command import command as sendmail

        sys.exit(sendmail.main(argv))
    moxlog.configure(json=False)
    try:
        host = PluginHost.load()
    except Exception as exc:  # pragma: no cover - PluginHost.load catches plugin errors
        click.echo(f"mox: loading plugins: {exc}", err=True)
        sys.exit(1)
    host.add_cli_commands(cli)
    try:
        return cli.main(args=argv, obj=host, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(f"mox: {p}", err=True)
        sys.exit(1)
    except MoxError as exc:
        click.echo(f"mox: {exc}", err=True)
        sys.exit(2 if isinstance(exc, moxlog.UsageError) else 1)
