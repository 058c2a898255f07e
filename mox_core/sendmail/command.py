"""``mox sendmail``: a sendmail(1) drop-in that submits each message over SMTP with SASL.

Programs that send mail by piping it into ``/usr/sbin/sendmail`` (cron, git send-email, mailx,
PHP) get a submission client with the options they expect. Postfix's sendmail(1) is the model
for the options; mox's own ``mox sendmail`` for the rest, except that ``-f`` works (mox issue
#400), recipients may be many, and ``-t`` reads To, Cc and Bcc and removes Bcc.

Flow: parse the options (exit 64 on error, before stdin is read) -> load the config (exit 78)
-> read the message -> add missing From/Date/Message-ID, CRLF line endings -> one SMTP
session through :mod:`mox_core.smtpclient` -> exit 0 only after the server said 250 to the
data. From reading the message on, every failure saves the message in the failures folder
and prints where, so nothing is lost.

Exit status (sysexits.h): 0 accepted; 64 EX_USAGE; 65 EX_DATAERR (the message itself is
unusable: bare CR, bad recipient header, no recipients with -t); 69 EX_UNAVAILABLE (permanent
refusal, 5xx); 75 EX_TEMPFAIL (4xx, connection, DNS, TLS, timeout); 78 EX_CONFIG.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formataddr
from pathlib import Path
from typing import BinaryIO, TextIO

import click

from mox_core import logging as moxlog
from mox_core.errors import ConfigError
from mox_core.outgoing.results import DeliveryStatus, RecipientResult
from mox_core.sendmail.config import (
    CONTROL_CHARS,
    AddressError,
    SendmailConfig,
    config_path,
    load_config,
    parse_address_list,
    parse_single_address,
)
from mox_core.sendmail.message import DataError, compose, dedup, msgid_domain, read_message, resolve_recipients
from mox_core.sendmail.options import USAGE, Options, UsageError, parse_args
from mox_core.smtpclient.client import Timeouts, open_client
from mox_core.smtpclient.dial import dial_host
from mox_core.smtpclient.errors import SMTPClientError
from mox_core.smtpclient.sasl import AuthCredentials
from mox_core.smtpclient.tls import TLSMode, make_ssl_context

__all__ = [
    "Options",
    "compose",
    "main",
    "parse_args",
    "read_message",
    "run",
    "save_failure",
    "sendmail_command",
    "submit",
]

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

# --------------------------------------------------------------------------------------------
# submitting


async def submit(cfg: SendmailConfig, sender: str, recipients: Sequence[str], data: bytes,
                 err: TextIO, verbose: int = 0) -> list[RecipientResult]:
    """One SMTP session: connect, TLS, AUTH, one transaction. Raises :class:`SMTPClientError`."""
    port = cfg.effective_port
    async with asyncio.timeout(cfg.timeout):
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(cfg.host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise SMTPClientError(False, None, None, cfg.host, f"looking up {cfg.host}: {exc.strerror}",
                                  command="dial") from None
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        # the submission server is chosen by the administrator: private addresses are fine
        (reader, writer), ip = await dial_host(cfg.host, ips, port, timeout=min(30.0, cfg.timeout),
                                               allow_private=True)
        if verbose:
            print(f"connected to {cfg.host} ({ip}) port {port}, tls {cfg.tls}", file=err)
        ssl_context = None
        if cfg.tls != "none":
            ssl_context = make_ssl_context(verify=cfg.verify_certificate,
                                           ca_file=str(cfg.ca_file) if cfg.ca_file else None)
        tls_mode = {"implicit": TLSMode.IMMEDIATE, "none": TLSMode.SKIP}.get(
            cfg.tls, TLSMode.REQUIRED_VERIFIED if cfg.verify_certificate else TLSMode.REQUIRED_UNVERIFIED)
        auth = None
        if cfg.username is not None:
            auth = AuthCredentials(cfg.username, cfg.read_password(), cfg.mechanisms)
        client = await open_client(reader, writer, remote_host=cfg.host, ehlo_name=cfg.effective_ehlo_name,
                                   tls_mode=tls_mode, ssl_context=ssl_context, auth=auth,
                                   timeouts=Timeouts(connect=30.0, command=cfg.timeout, data=cfg.timeout))
        try:
            return await client.deliver(sender, recipients, data, has_8bit=not data.isascii(),
                                        require_8bitmime=True)
        finally:
            await client.quit()  # a failing QUIT changes nothing: the 250 was received


def save_failure(cfg: SendmailConfig | None, data: bytes) -> Path:
    """Write ``data`` to a new file (mode 0600) in the failures folder (created mode 0700)."""
    folder = cfg.failures_dir if cfg is not None and cfg.failures_dir else Path.home() / "moxsubmit.failures"
    try:
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)  # mkdir's mode is reduced by the umask
    except FileExistsError:
        pass  # an existing folder keeps its mode: the files themselves are 0600
    name = f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(4)}.eml"
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


# --------------------------------------------------------------------------------------------
# the command


@dataclass
class _Attempt:
    """What is known about the message being sent: what to save if it fails, and the envelope."""

    data: bytes
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)


def run(args: Sequence[str], *, stdin: BinaryIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None, prog: str = "sendmail") -> int:
    """Do everything ``sendmail ARGS`` does; returns the exit status."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr

    def say(msg: str) -> None:
        print(f"{prog}: {msg}", file=err)

    try:
        opts = parse_args(args)
    except UsageError as exc:
        say(str(exc))
        print(USAGE, file=err)
        return EX_USAGE
    if opts.help:
        print(USAGE, file=out)
        return EX_OK
    if opts.verbose > 1:  # -vv: TLS and AUTH steps; -vvv: the SMTP commands (AUTH data hidden)
        moxlog.set_levels("debug" if opts.verbose == 2 else "trace")

    try:
        cfg = load_config(config_path(opts.config))
    except ConfigError as exc:
        for p in exc.problems:
            say(str(p))
        return EX_CONFIG

    try:
        arg_rcpts = resolve_recipients(opts.recipients, cfg, "recipient")
        sender_opt = None
        if opts.sender is not None:
            sender_opt = "" if opts.sender.strip() in ("", "<>") else parse_single_address(opts.sender)
    except AddressError as exc:
        say(str(exc))
        return EX_USAGE
    if not arg_rcpts and not opts.extract:
        say("no recipients given (use -t to take them from the message header)")
        print(USAGE, file=err)
        return EX_USAGE

    try:
        attempt = _Attempt(read_message(stdin, opts.dot_ends))
    except KeyboardInterrupt:
        say("interrupted while reading the message; nothing sent")
        return EX_TEMPFAIL
    try:
        code = _deliver(attempt, opts, cfg, arg_rcpts, sender_opt, say, err)
    except KeyboardInterrupt:
        say("interrupted")
        code = EX_TEMPFAIL
    if code == EX_OK:
        return EX_OK
    try:
        saved = save_failure(cfg, attempt.data)
    except (OSError, RuntimeError) as exc:  # RuntimeError: no home directory
        say(f"could not save the message: {exc}")
        return code
    say(f"message saved in {saved}")
    if attempt.recipients and attempt.sender is not None:
        config = ["-C", opts.config] if opts.config else []
        argv = [*config, "-i", "-f", attempt.sender or "<>", "--", *attempt.recipients]
        say(f"to retry: {prog} {shlex.join(argv)} < {shlex.quote(str(saved))}")
    return code


def _deliver(attempt: _Attempt, opts: Options, cfg: SendmailConfig, arg_rcpts: list[str],
             sender_opt: str | None, say, err: TextIO) -> int:
    """Compose and submit; returns the exit status. ``attempt`` records what to save."""
    account_address = cfg.username if cfg.username and "@" in cfg.username else None
    from_address = sender_opt or cfg.from_address or account_address
    full_name = opts.full_name if opts.full_name is not None else os.environ.get("NAME", "")
    from_header = None
    if from_address:
        from_header = formataddr((CONTROL_CHARS.sub("", full_name), from_address), charset="utf-8")
    ehlo_name = cfg.effective_ehlo_name
    try:
        composed = compose(attempt.data, from_header=from_header,
                           msgid_domain=msgid_domain(from_address, ehlo_name),
                           to_recipients=() if opts.extract else arg_rcpts)
    except DataError as exc:
        say(str(exc))
        return EX_DATAERR
    attempt.data = composed.data  # from now on the saved copy is what would have been sent

    try:
        recipients = list(arg_rcpts)
        if opts.extract:
            recipients += resolve_recipients(composed.to_cc_bcc, cfg, "address in To/Cc/Bcc header")
        header_from = []
        for value in composed.from_values:
            try:
                header_from += [a for a in parse_address_list(value, "From") if "@" in a]
            except AddressError:
                pass  # the From header is the server's business; only its address helps here
    except AddressError as exc:
        say(str(exc))
        return EX_DATAERR
    recipients = dedup(recipients)
    if not recipients:
        say("no recipients: none given and none in the To, Cc or Bcc header")
        return EX_DATAERR
    if sender_opt is not None:
        sender = sender_opt
    elif cfg.from_address:
        sender = cfg.from_address
    elif len(header_from) == 1:
        sender = header_from[0]
    elif account_address:
        sender = account_address
    else:
        say("no sender address: use -f ADDRESS, or set from_address in the config")
        return EX_USAGE
    attempt.sender, attempt.recipients = sender, recipients

    try:
        results = asyncio.run(submit(cfg, sender, recipients, composed.data, err, opts.verbose))
    except SMTPClientError as exc:
        say(f"submission to {cfg.host} port {cfg.effective_port} failed: {exc}")
        return EX_UNAVAILABLE if exc.permanent else EX_TEMPFAIL
    except TimeoutError:
        say(f"submission to {cfg.host} port {cfg.effective_port} timed out after {cfg.timeout:g}s")
        return EX_TEMPFAIL
    failed = [r for r in results if r.status is not DeliveryStatus.DELIVERED]
    if opts.verbose:
        for r in results:
            if r.status is DeliveryStatus.DELIVERED:
                print(f"{r.recipient}: accepted: {r.code} {r.enhanced_code or ''} {r.text}".rstrip(), file=err)
    if not failed:
        return EX_OK
    for r in failed:
        reply = " ".join(str(x) for x in (r.code, r.enhanced_code) if x)
        say(f"{r.recipient}: {r.status.value} failure: {(reply + ' ') if reply else ''}{r.text}")
    if len(failed) < len(results):
        say(f"the message was accepted for {len(results) - len(failed)} other recipient(s)")
    attempt.recipients = [r.recipient for r in failed]
    return EX_TEMPFAIL if any(r.status is DeliveryStatus.TEMPORARY for r in failed) else EX_UNAVAILABLE


class _RawArgsCommand(click.Command):
    """A click command that leaves every argument alone, ``--`` included.

    click's parser would drop the first ``--`` even with ``ignore_unknown_options``, and the
    ``--`` is what protects a recipient starting with ``-`` (Postfix sendmail(1), SECURITY).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.args = list(args)
        return ctx.args


@click.command("sendmail", cls=_RawArgsCommand, add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               short_help="Submit a message from stdin, like sendmail(1).")
@click.pass_context
def sendmail_command(ctx: click.Context) -> None:
    """Submit the message on stdin to the configured submission server, like sendmail(1).

    Options are sendmail's (-t, -i, -f, -F, -C ...), see 'mox sendmail --help'.
    """
    ctx.exit(run(ctx.args, prog="mox sendmail"))


def main(argv: list[str] | None = None) -> int:
    """Console script ``sendmail``: ``argv`` without the program name (default ``sys.argv[1:]``)."""
    moxlog.configure(json=False)
    moxlog.set_levels("warn")
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
