"""Message-ID and Subject of a queued message (:func:`header_summary`), stored with its rows
for ``mox queue list`` and for the ``References`` field of a DSN about it (RFC 3464,
:mod:`mox_core.outgoing.dsn`).

Parsed once per submission, on the path of the 250 reply: the common header (one-line
``Message-ID: <x>``, plain ASCII ``Subject``, CRLF line ends) is read without the email
parser (:func:`header_summary_quick`); anything else goes to the parser, which decides.
"""

from __future__ import annotations

import email.policy
import re
from email.parser import BytesHeaderParser

from mox_core.smtp.lines import only_crlf

__all__ = ["header_summary", "header_summary_quick"]

# msg-id (RFC 5322 3.6.4) in its dot-atom form, and a header field name (RFC 5322 3.6.8)
_MSGID = re.compile(rb"[ \t]*(<[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                    rb"@[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*>)[ \t]*")
_FIELD = re.compile(rb"([!-9;-~]+):")
_SUBJECT = re.compile(rb"[ \t]*([ -~]*?)[ \t]*")


def header_summary(data: bytes) -> tuple[str, str]:
    """Message-ID and Subject for listings and DSN References; parse the header only."""
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2] if end >= 0 else data[:65536]
    quick = header_summary_quick(head)
    if quick is not None:
        return quick
    try:
        msg = BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        mid = str(msg.get("Message-ID", "") or "").strip()
        subject = str(msg.get("Subject", "") or "").strip()
    except Exception:  # a broken header must not fail the submission
        return "", ""
    return mid[:998], subject[:200]


def header_summary_quick(head: bytes) -> tuple[str, str] | None:
    """The common case without the email parser: one-line ``Message-ID: <x>`` and plain
    ASCII ``Subject``, at most one of each, CRLF lines. None: let the parser decide."""
    if not only_crlf(head):
        return None
    mid = subject = None
    last = b""
    for line in head.split(b"\r\n"):
        if not line:
            break
        if line[0] in b" \t":
            if last in (b"message-id", b"subject"):
                return None  # folded: the parser unfolds
            continue
        m = _FIELD.match(line)
        if m is None:
            return None  # the parser would end the header here
        last = m.group(1).lower()
        value = line[m.end():]
        if last == b"message-id":
            m = _MSGID.fullmatch(value)
            if mid is not None or m is None:
                return None
            mid = m.group(1).decode()
        elif last == b"subject":
            m = _SUBJECT.fullmatch(value)
            if subject is not None or m is None or b"=?" in value:
                return None
            subject = m.group(1).decode()
    return (mid or "")[:998], (subject or "")[:200]
