"""The message and its recipients as ``mox sendmail`` submits them: read from stdin, line
endings made CRLF (a bare CR refused), Bcc removed, From, Date and Message-ID added when
missing, and the recipients of ``-t`` taken from To, Cc and Bcc."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate, make_msgid
from typing import BinaryIO

from mox_core.sendmail.config import AddressError, SendmailConfig, parse_address_list
from mox_core.smtp.domain import to_ascii

__all__ = ["Composed", "DataError", "compose", "dedup", "msgid_domain", "read_message", "resolve_recipients"]


class DataError(Exception):
    """The message cannot be sent as it is: exit 65."""


# --------------------------------------------------------------------------------------------
# recipients


def resolve_recipients(values: Sequence[str], cfg: SendmailConfig, what: str) -> list[str]:
    out: list[str] = []
    for value in values:
        for addr in parse_address_list(value, what):
            if "@" not in addr:
                if not cfg.default_destination:
                    raise AddressError(f"{what} {addr!r} has no domain and default_destination is not configured")
                addr = cfg.default_destination
            out.append(addr)
    return out


def dedup(addresses: Sequence[str]) -> list[str]:
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
    message; a bare CR is also how SMTP smuggling starts. The sender gets exit 65 and the
    message is saved.
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


def _to_field(recipients: Sequence[str]) -> bytes:
    """``To:`` with ``recipients``, folded before a line would pass 78 characters."""
    out = b"To: "
    line = len(out)
    for i, r in enumerate(recipients):
        addr = r.encode("utf-8") + (b"," if i < len(recipients) - 1 else b"")
        if i and line + 1 + len(addr) > 78:
            out += b"\r\n\t"
            line = 1
        elif i:
            out += b" "
            line += 1
        out += addr
        line += len(addr)
    return out


def compose(raw: bytes, *, from_header: str | None, msgid_domain: str,
            to_recipients: Sequence[str] = ()) -> Composed:
    """Parse ``raw`` into header and body, drop Bcc, add From/Date/Message-ID when missing.

    ``from_header``: the From value to add if the message has none (``None``: add none).
    ``to_recipients``: the command-line recipients, written as ``To`` when the message has no
    To, Cc or Bcc (as mox's sendmail does; the caller passes none with ``-t``). The
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
    rcpt_values = [_value(f) for f, n in zip(fields, names, strict=True) if n in (b"to", b"cc", b"bcc")]
    from_values = [_value(f) for f, n in zip(fields, names, strict=True) if n == b"from"]
    # Bcc never leaves: with -t its addresses are recipients; without -t, Postfix drops it too
    out = [line for f, n in zip(fields, names, strict=True) if n != b"bcc" for line in f]
    if b"from" not in names and from_header is not None:
        out.append(b"From: " + from_header.encode("utf-8"))
    if b"date" not in names:
        out.append(b"Date: " + formatdate(localtime=True).encode())
    if b"message-id" not in names:
        out.append(b"Message-ID: " + make_msgid(domain=msgid_domain).encode())
    if to_recipients and not any(n in (b"to", b"cc", b"bcc") for n in names):
        out.append(_to_field(to_recipients))
    out.append(b"")
    out.extend(lines[body_start:])
    return Composed(b"\r\n".join(out) + b"\r\n", rcpt_values, from_values)


def msgid_domain(address: str | None, fallback: str) -> str:
    domain = (address or "").rpartition("@")[2]
    try:
        return to_ascii(domain)
    except ValueError:
        return fallback
