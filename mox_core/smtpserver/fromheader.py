"""The submission From check's common case, without the email header parser.

:func:`lean_from_address` finds the address of the one ``From`` header in the forms nearly
every client writes; for anything else it returns ``None`` and the caller asks
``email.parser`` (with ``policy.default``), whose result it would have matched (the tests
compare the two on unusual and broken headers). On a typical header the parser took 130 us
of the event loop, this 4 us.
"""

from __future__ import annotations

import re

from mox_core.smtp.lines import only_crlf

__all__ = ["lean_from_address"]

# The common From header: one dot-atom address, bare or in <>, with at most a display name of
# plain atoms or a simple quoted string. Anything else (comments, groups, encoded words,
# quoted local parts, domain literals, non-ASCII, a second address) goes to the parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ADDR = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_FROM_FAST = re.compile(
    rf"[ \t]*(?:(?:{_ATEXT}+(?:[ \t]+{_ATEXT}+)*|\"[^\"\\]*\")?[ \t]*<({_ADDR})>|({_ADDR}))[ \t]*")
_FIELD = re.compile(rb"[!-9;-~]+:")


def lean_from_address(head: bytes) -> str | None:
    """The address of the one From header of ``head`` (CRLF header lines) in the common
    forms; None when the email parser must decide (anything unusual, or any problem)."""
    if not only_crlf(head):
        return None
    value: bytes | None = None
    in_from = False
    seen = False
    for line in head.split(b"\r\n"):
        if not line:
            break  # end of the header (as the parser)
        if line[0] in b" \t":
            if not seen:
                return None
            if in_from:
                value += line  # type: ignore[operator]
            continue
        m = _FIELD.match(line)
        if m is None:
            return None
        seen = True
        in_from = m.end() == 5 and line[:4].lower() == b"from"
        if in_from:
            if value is not None:
                return None  # a second From: the parser gives the error
            value = line[5:]
    if value is None or not value.isascii() or b"=?" in value:
        return None
    m = _FROM_FAST.fullmatch(value.decode("ascii"))
    if m is None:
        return None
    return m.group(1) or m.group(2)
