"""What the handler needs from the header section of a message it receives, in one scan.

* ``Received`` fields, counted: more than 100 is a mail loop (RFC 5321 §6.3).
* ``Authentication-Results`` fields that carry our own authserv-id: a forgery, or left over
  from an earlier pass; removed before ours is added (RFC 8601 §5). Others are kept.
* ``Return-Path``: only the final delivery writes it (RFC 5321 §4.4), so one from outside is
  removed before ours is added (as Postfix's ``message_drop_headers`` does).
* ``Delivered-To`` values: a message that already names the recipient it is being delivered to
  is in a loop (as Postfix's local delivery refuses it).
* whether ``Message-ID`` and ``Date`` are present: submission adds the missing ones (RFC 6409 §8).

Only the header section is scanned, once, with one regular expression that stops only at the
fields named above; the body is never looked at. Removing fields copies the message, which
happens only when there is something to remove.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["HeaderScan", "header_section", "scan", "without"]

_FIELD = re.compile(
    rb"^(received|return-path|authentication-results|delivered-to|message-id|date)[ \t]*:", re.I | re.M)
_AUTHSERV_END = re.compile(rb"[\s;(]")


@dataclass(slots=True)
class HeaderScan:
    received: int = 0
    drop: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of fields to remove
    delivered_to: set[str] = field(default_factory=set)  # lower case, without angle brackets
    message_id: bool = False
    date: bool = False


def header_section(data: bytes) -> bytes:
    """The header section of ``data`` with the CRLF of its last line (CRLF line ends, as the
    DATA reader passes messages); all of ``data`` when it has no body."""
    if data.startswith(b"\r\n"):
        return b""
    end = data.find(b"\r\n\r\n")
    return data[: end + 2] if end >= 0 else data


def _field_end(head: bytes, pos: int) -> int:
    """The end of the field starting at ``pos``: after the CRLF of its last continuation line."""
    n = len(head)
    while True:
        eol = head.find(b"\r\n", pos)
        if eol < 0:
            return n
        pos = eol + 2
        if pos >= n or head[pos] not in (0x20, 0x09):
            return pos


def _skip_cfws(value: bytes, i: int) -> int:
    """Past white space and (nested) comments (RFC 5322 §3.2.2)."""
    depth = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == 0x5C and depth:  # quoted-pair inside a comment
            i += 2
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29 and depth:
            depth -= 1
        elif not depth and c not in b" \t\r\n":
            return i
        i += 1
    return i


def authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 §2.2), lower case."""
    value = value.replace(b"\r\n", b"")
    i = _skip_cfws(value, 0)
    if value[i:i + 1] == b'"':
        out = bytearray()
        i += 1
        while i < len(value) and value[i] != 0x22:
            if value[i] == 0x5C:
                i += 1
            out += value[i:i + 1]
            i += 1
        ident = bytes(out)
    else:
        m = _AUTHSERV_END.search(value, i)
        ident = value[i: m.start() if m else len(value)]
    return ident.decode("utf-8", "replace").lower().rstrip(".")


def scan(head: bytes, own_authserv_id: str) -> HeaderScan:
    """Scan a header section (from :func:`header_section`)."""
    out = HeaderScan()
    own = own_authserv_id.lower().rstrip(".")
    for m in _FIELD.finditer(head):
        name = m.group(1).lower()
        if name == b"received":
            out.received += 1
        elif name == b"message-id":
            out.message_id = True
        elif name == b"date":
            out.date = True
        else:
            end = _field_end(head, m.end())
            if name == b"return-path":
                out.drop.append((m.start(), end))
            elif name == b"delivered-to":
                addr = head[m.end():end].strip().strip(b"<>").strip()
                out.delivered_to.add(addr.decode("utf-8", "replace").lower())
            elif authserv_id(head[m.end():end]) == own:
                out.drop.append((m.start(), end))
    return out


def without(data: bytes, drop: list[tuple[int, int]]) -> bytes:
    """``data`` without the byte ranges in ``drop`` (ascending, from :func:`scan`)."""
    parts = []
    pos = 0
    for start, end in drop:
        parts.append(data[pos:start])
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)
