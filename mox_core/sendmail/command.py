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
import re
import secrets
import shlex
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formataddr, formatdate, make_msgid
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
from mox_core.smtp.domain import to_ascii
from mox_core.smtpclient import (
    AuthCredentials,
    SMTPClientError,
    Timeouts,
    TLSMode,
    dial_host,
    make_ssl_context,
    open_client,
)

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

USAGE = """\
usage: sendmail [-t] [-i] [-f sender] [-F full_name] [-C config.toml] [-v] [option ...] [--] [recipient ...]
  -t          also send to the To, Cc and Bcc addresses of the message (Bcc is removed)
  -i, -oi     a line with only "." does not end the message
  -f ADDR     envelope sender (also -r); -f '<>' for none
  -F NAME     full name for the From header added to messages without one
  -C FILE     config file (default $MOX_SENDMAIL_CONFIG, else /etc/mox/sendmail.toml)
  -v          print what happens on stderr (-vv, -vvv: more)
Accepted and ignored: -Am -Ac -B type -G -U -m -n -L label -N dsn -R ret -V envid -X file -O opt=val
-h hops -o* (-odb, -odi, -oem, -om, ...) -bm -bh -bH."""


class UsageError(Exception):
    """Bad command line: exit 64."""


class DataError(Exception):
    """The message cannot be sent as it is: exit 65."""


# --------------------------------------------------------------------------------------------
# options


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    dot_ends: bool = True  # without -i/-oi a line with only "." ends the input
    sender: str | None = None  # -f/-r; "" is the null sender
    full_name: str | None = None  # -F
    config: str | None = None  # -C
    verbose: int = 0
    help: bool = False


_FLAGS = frozenset("tivGUmn")
_WITH_VALUE = frozenset("ABCFLNORVXbfhor")
# modes of Postfix's sendmail that are not about submitting a message
_REFUSED = {
    "q": "-q (queue runs) is not supported: the queue of mox is managed with 'mox queue'",
    "I": "-I (newaliases) is not supported: mox has no aliases database",
}
# -b modes: m is the default (deliver mail); h/H are ignored by Postfix too
_B_MODES_OK = frozenset({"m", "h", "H"})


def parse_args(args: Sequence[str]) -> Options:
    """Parse sendmail options like POSIX getopt (Postfix uses ``getopt("+...")``).

    Options end at ``--`` or at the first argument that does not start with ``-``; what
    follows are recipients. A value may be attached (``-fADDR``, ``-oi``) or separate
    (``-f ADDR``). Flags may be grouped (``-ti``).
    """
    opts = Options()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name == "help" and not eq:
                opts.help = True
            elif name == "config":
                if not eq:
                    i += 1
                    if i >= len(args):
                        raise UsageError("option --config requires a value")
                    value = args[i]
                opts.config = value
            else:
                raise UsageError(f"unknown option {arg}")
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            c = arg[j]
            if c in _FLAGS:
                _flag(opts, c)
                j += 1
                continue
            if c in _REFUSED:
                raise UsageError(_REFUSED[c])
            if c not in _WITH_VALUE:
                raise UsageError(f"unknown option -{c}")
            separate = j + 1 == len(arg)
            if separate:
                i += 1
                if i >= len(args):
                    raise UsageError(f"option -{c} requires a value")
                value = args[i]
            else:
                value = arg[j + 1:]
            if c == "o" and separate and len(value) == 1 and value not in "i78m":
                i += 1  # "-o x value" (sendmail.cf option): the value is the next argument
                if i >= len(args):
                    raise UsageError(f"option -o {value} requires a value")
            _option(opts, c, value)
            break
        i += 1
    opts.recipients = list(args[i:])
    return opts


def _flag(opts: Options, c: str) -> None:
    if c == "t":
        opts.extract = True
    elif c == "i":
        opts.dot_ends = False
    elif c == "v":
        opts.verbose += 1
    # G (gateway submission), U (initial user submission), m, n: ignored, as Postfix does


def _option(opts: Options, c: str, value: str) -> None:
    if c in ("f", "r"):
        if CONTROL_CHARS.search(value):
            raise UsageError(f"-{c}: control character in sender address {value!r}")
        opts.sender = value
    elif c == "F":
        if CONTROL_CHARS.search(value):  # would inject a header line into the From we add
            raise UsageError(f"-F: control character in full name {value!r}")
        opts.full_name = value
    elif c == "C":
        opts.config = value
    elif c == "o":
        if value == "i":
            opts.dot_ends = False
        # -odb, -odi, -oem, -oee, -om, -o7, -o8, -oA..., -o x value: ignored
    elif c == "b":
        if value not in _B_MODES_OK:
            raise UsageError(f"-b{value} is not supported: mox sendmail only submits a message (-bm)")
    elif c == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise UsageError(f"-B {value}: body type must be 7BIT or 8BITMIME")
    # A (m/c), L label, N dsn, O option=value, R return, V envid, X log file, h hops: ignored.
    # DSN options are not passed on: the client does not request DSNs (RFC 3461).


# --------------------------------------------------------------------------------------------
# recipients


def _resolve_recipients(values: Sequence[str], cfg: SendmailConfig, what: str) -> list[str]:
    out: list[str] = []
    for value in values:
        for addr in parse_address_list(value, what):
            if "@" not in addr:
                if not cfg.default_destination:
                    raise AddressError(f"{what} {addr!r} has no domain and default_destination is not configured")
                addr = cfg.default_destination
            out.append(addr)
    return out


def _dedup(addresses: Sequence[str]) -> list[str]:
    seen: set[tuple[str, str]] = set()
    out = []
    for a in addresses:
        local, _, domain = a.rpartition("@")
        key = (local, domain.lower())
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


# --------------------------------------------------------------------------------------------
# the message


def read_message(stream: BinaryIO, dot_ends: bool) -> bytes:
    """All of stdin; without -i up to a line with only ``.`` (classic sendmail)."""
    if not dot_ends:
        return stream.read()
    chunks = []
    for line in iter(stream.readline, b""):
        if line in (b".\n", b".\r\n", b"."):
            break
        chunks.append(line)
    return b"".join(chunks)


# RFC 5322 §3.6.8 field name (printable ASCII except ":"), obsolete WSP before the colon allowed
_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


def _lines(raw: bytes) -> list[bytes]:
    """Lines without their endings; LF and CRLF both end a line, a bare CR is refused.

    Why refuse rather than turn CR into CRLF (as qmail-remote does): a CR right before CRLF
    would become an empty line and could end the header early, silently changing the
    message. The sender gets exit 65 and the message is saved (reliability B.1 #8).
    """
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise DataError(f"line {n} of the message contains a bare carriage return (CR without LF)")
        out.append(line)
    return out


@dataclass
class Composed:
    """The message as it will be sent, and what its header says about addresses."""

    data: bytes
    to_cc_bcc: list[str]  # raw values of To, Cc and Bcc (for -t)
    from_values: list[str]  # raw values of From


def _value(field_lines: list[bytes]) -> str:
    unfolded = b"".join(field_lines)  # RFC 5322 §2.2.3: unfolding removes only the CRLF
    return unfolded.split(b":", 1)[1].decode("utf-8", "surrogateescape")


def compose(raw: bytes, *, from_header: str | None, msgid_domain: str) -> Composed:
    """Parse ``raw`` into header and body, drop Bcc, add From/Date/Message-ID when missing.

    ``from_header``: the From value to add if the message has none (``None``: add none). The
    header ends at the first empty line, or at the first line that is neither a header field
    nor a continuation; then an empty line is inserted so the body stays the body. A leading
    mbox ``From `` line is dropped, as Postfix does.
    """
    lines = _lines(raw)
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    fields: list[list[bytes]] = []
    body_start = len(lines)
    for i, line in enumerate(lines):
        if line == b"":
            body_start = i + 1
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD.match(line):
            fields.append([line])
        else:
            body_start = i
            break
    names = [f[0].split(b":", 1)[0].strip().lower() for f in fields]
    rcpt_values = [_value(f) for f, n in zip(fields, names) if n in (b"to", b"cc", b"bcc")]
    from_values = [_value(f) for f, n in zip(fields, names) if n == b"from"]
    # Bcc never leaves: with -t its addresses are recipients; without -t, Postfix drops it too
    out = [line for f, n in zip(fields, names) if n != b"bcc" for line in f]
    if b"from" not in names and from_header is not None:
        out.append(b"From: " + from_header.encode("utf-8"))
    if b"date" not in names:
        out.append(b"Date: " + formatdate(localtime=True).encode())
    if b"message-id" not in names:
        out.append(b"Message-ID: " + make_msgid(domain=msgid_domain).encode())
    out.append(b"")
    out.extend(lines[body_start:])
    return Composed(b"\r\n".join(out) + b"\r\n", rcpt_values, from_values)


def _msgid_domain(address: str | None, fallback: str) -> str:
    domain = (address or "").rpartition("@")[2]
    try:
        return to_ascii(domain)
    except ValueError:
        return fallback


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
        arg_rcpts = _resolve_recipients(opts.recipients, cfg, "recipient")
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
        argv = ["-i", "-f", attempt.sender or "<>", "--", *attempt.recipients]
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
                           msgid_domain=_msgid_domain(from_address, ehlo_name))
    except DataError as exc:
        say(str(exc))
        return EX_DATAERR
    attempt.data = composed.data  # from now on the saved copy is what would have been sent

    try:
        recipients = list(arg_rcpts)
        if opts.extract:
            recipients += _resolve_recipients(composed.to_cc_bcc, cfg, "address in To/Cc/Bcc header")
        header_from = []
        for value in composed.from_values:
            try:
                header_from += [a for a in parse_address_list(value, "From") if "@" in a]
            except AddressError:
                pass  # the From header is the server's business; only its address helps here
    except AddressError as exc:
        say(str(exc))
        return EX_DATAERR
    recipients = _dedup(recipients)
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
