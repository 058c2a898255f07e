"""``mox localserve``: start the whole server on this machine with zero configuration.

The first start makes the folder (:mod:`mox_core.localserve.create`); every start runs
``mox serve`` on it and prints where everything is. Ctrl-C or SIGTERM stops it within a few
seconds (messages accepted are on disk before the 250, so nothing is lost).
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from pathlib import Path

import click

from mox_core import logging as moxlog
from mox_core.config.loader import localserve_dir
from mox_core.errors import MoxError
from mox_core.localserve.create import ACCOUNT, ADDRESS, ADMIN_PASSWORD, PASSWORD, ensure

__all__ = ["banner", "localserve_command"]

def banner(directory: Path, static) -> str:  # static: StaticConfig
    lst = static.listeners["local"]
    host = lst.ips[0] if ":" not in lst.ips[0] else f"[{lst.ips[0]}]"
    p = {"smtp": lst.smtp.port, "submission": lst.submission.port, "submissions": lst.submissions.port,
         "http": lst.webserver_http.port, "https": lst.webserver_https.port, "metrics": lst.metrics_http.port}
    mox = sys.argv[0] if sys.argv and sys.argv[0].endswith("mox") else "mox"

    def addr(port: int) -> str:
        return f"{host}:{port}".ljust(len(host) + 7)

    return f"""
mox localserve is running; everything stays on this machine.

  Folder:        {directory}   (mox.toml, domains.toml, data/ with the Maildirs)
  Account:       {ACCOUNT}, address {ADDRESS}, password {PASSWORD}
                 (mail for any address that no account has arrives here too)
  Admin:         password {ADMIN_PASSWORD}

  SMTP:          {addr(p["smtp"])} no login; incoming mail
  Submission:    {addr(p["submission"])} login {ADDRESS} / {PASSWORD}, STARTTLS optional
  Submissions:   {addr(p["submissions"])} login {ADDRESS} / {PASSWORD}, TLS (self-signed)
  Account pages: http://{host}:{p["http"]}/account/   (the messages that arrived)
  Admin pages:   http://{host}:{p["http"]}/admin/
  HTTPS:         https://{host}:{p["https"]}/account/   (self-signed certificate)
  Metrics:       http://{host}:{p["metrics"]}/metrics

Send a first message:
  swaks --server {host}:{p["submission"]} --auth-user {ADDRESS} --auth-password {PASSWORD} \\
        --from {ADDRESS} --to someone@example.com
  printf 'Subject: hi\\n\\nhello\\n' | {mox} sendmail -C {directory / "sendmail.toml"} someone@example.com

Simulate failures with the recipient's local part: x-temperror@ (451), x-permerror@ (550),
x-552@ (any code 400-599), x-timeout@ (no answer), at the end of DATA; rcptto-temperror@ and
the like at RCPT TO, mailfrom-temperror@ as sender at MAIL FROM. Submissions are delivered to
the SMTP listener by the queue: a failure at DATA comes back as a DSN in the Inbox.
Commands run in {directory} find its config (mox queue list, mox config check, ...).
Stop with Ctrl-C.
"""


@click.command("localserve")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The folder (default ~/.config/mox-localserve); made on the first start.")
@click.option("--ip", default=None, help="Listen on this address instead of 127.0.0.1 and ::1 (new folder only).")
@click.option("--init-only", is_flag=True, help="Make the folder and exit.")
@click.pass_obj
def localserve_command(state, directory: Path | None, ip: str | None, init_only: bool) -> None:
    """Run mox for local development: all services on loopback, every message kept locally."""
    directory = (directory or localserve_dir()).expanduser().absolute()
    made = ensure(directory, ip)
    if init_only:
        click.echo(f"{'made' if made.created else 'using'} {directory}")
        return
    os.environ[moxlog.CONSOLE_ENV] = "1"  # readable logs, also from the web process
    moxlog.configure(json=False)
    state.config_option = str(made.config)
    cfg = state.load_config(reapply_cli_level=False)
    if state.loglevel:
        moxlog.set_levels(state.loglevel)
    from mox_core.server import metricsdir

    metricsdir.prepare(cfg.data_dir)
    from mox_core.server.main import run_loop, serve

    started = asyncio.Event()

    async def main() -> None:
        async def announce() -> None:
            await started.wait()
            click.echo(banner(directory, cfg.static), err=True)

        task = asyncio.create_task(announce())
        try:
            await serve(cfg, started=started)
        finally:
            task.cancel()

    try:
        run_loop(main())
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL) and (exc.strerror or "").startswith("listener "):
            raise MoxError(f"{exc.strerror}\n(the ports are set in {made.config}; another mox localserve "
                           "may be running)") from None
        raise
