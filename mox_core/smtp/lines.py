"""Line endings of message data: SMTP allows only CRLF (RFC 5321 §2.3.8).

A bare CR or LF in a message is how SMTP smuggling works (a next hop that takes it for a line
ending may see the end of the data where this server did not), so the server refuses such
data and the client will not send it. The check runs over every byte of every message, in the
event loop, so it is written for CPython's speed: ``bytes.count`` of a single byte walks the
data a byte at a time (about 60 us per 100 KB), ``translate`` is a table lookup per byte.
"""

from __future__ import annotations

import re

# every byte but CR and LF: deleting them leaves the CRs and LFs in their order
_ALL_BUT_CR_LF = bytes(b for b in range(256) if b not in (0x0D, 0x0A))
_CR_WITHOUT_LF = re.compile(rb"\r(?!\n)")


def only_crlf(data: bytes) -> bool:
    """Whether every CR and every LF of ``data`` is part of a CRLF pair.

    First no CR without an LF right after it (one regular-expression scan, which jumps from CR
    to CR: 45 us per 100 KB of text). Then each CR has its own LF, so an LF of no pair exists
    exactly when there are more LFs than CRs: counted in the CRs and LFs alone, which
    ``translate`` extracts. 85 us per 100 KB of text where a translate and a count of CRLF in
    the whole message took 140.
    """
    if _CR_WITHOUT_LF.search(data) is not None:
        return False
    crs_and_lfs = data.translate(None, _ALL_BUT_CR_LF)
    return len(crs_and_lfs) == 2 * crs_and_lfs.count(b"\r")
