"""The command line of ``mox sendmail``: sendmail(1)'s options as Postfix's sendmail takes
them (flags may be grouped, ``-f addr`` or ``-faddr``), those that do not apply accepted and
ignored, those that would do something else refused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mox_core.sendmail.config import CONTROL_CHARS

__all__ = ["USAGE", "Options", "UsageError", "parse_args"]

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
