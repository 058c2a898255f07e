"""Domain names as mox compares them: IDNA ASCII, lower case, no trailing dot."""

from __future__ import annotations

import functools
import re

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


@functools.lru_cache(maxsize=8192)
def to_ascii(domain: str) -> str:
    """Return ``domain`` as lower-case IDNA ASCII; raise ValueError if it is not a domain.

    Remembered for the most recent 8192 names: every command of an SMTP session asks again
    for the same few domains, and IDNA encoding shows in profiles."""
    d = domain.strip()
    if not d:
        raise ValueError("empty domain")
    if d.endswith("."):
        raise ValueError(f"domain {domain!r} must not end with a dot")
    try:
        ascii_form = d.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(f"invalid domain {domain!r}: {exc}") from None
    if len(ascii_form) > 253:
        raise ValueError(f"domain {domain!r} is too long")
    for label in ascii_form.split("."):
        if not _LABEL.match(label):
            raise ValueError(f"invalid domain {domain!r}: bad label {label!r}")
    return ascii_form


def to_unicode(domain: str) -> str:
    """Return ``domain`` in Unicode (U-label) form, lower case."""
    a = to_ascii(domain)
    try:
        return a.encode("ascii").decode("idna").lower()
    except UnicodeError:
        return a
