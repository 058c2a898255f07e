"""What goes over the wire between mox's SMTP client and a server: replies (RFC 5321
§4.2, enhanced codes of RFC 3463), the extensions EHLO announces, and the DATA payload."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mox_core.smtp.lines import only_crlf

__all__ = ["Extensions", "Reply", "Timeouts", "ascii_domain", "needs_smtputf8", "parse_extensions", "prepare_data"]


@dataclass(frozen=True)
class Timeouts:
    """Seconds; defaults follow RFC 5321 §4.5.3.2 (greeting/MAIL/RCPT 5 min, DATA end 10 min)."""

    connect: float = 30.0  # TCP connect (whole budget per host; split over its IPs)
    command: float = 300.0  # each command reply, and the greeting
    data: float = 600.0  # writing the message plus the reply to the final dot
    tls_handshake: float = 60.0


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]  # text of each line, without "250-"

    @property
    def enhanced_code(self) -> str | None:
        """RFC 3463 code from the first line when its class matches the reply's (``5.1.1``)."""
        m = _ENHANCED.match(self.lines[0] if self.lines else "")
        if m and int(m.group(1)) == self.code // 100:
            return m.group(0).strip()
        return None

    @property
    def text(self) -> str:
        first = self.lines[0] if self.lines else ""
        if self.enhanced_code:
            first = first[len(self.enhanced_code):].lstrip()
        return " ".join([first, *self.lines[1:]]).strip()

    def __str__(self) -> str:
        return " ".join(str(x) for x in (self.code, self.enhanced_code, self.text) if x)


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


@dataclass
class Extensions:
    """What EHLO announced (RFC 5321 §4.1.1.1 and the extension RFCs)."""

    esmtp: bool = False
    starttls: bool = False  # RFC 3207
    pipelining: bool = False  # RFC 2920
    size: int | None = None  # RFC 1870; 0 means no fixed limit
    eightbitmime: bool = False  # RFC 6152
    smtputf8: bool = False  # RFC 6531
    enhancedstatuscodes: bool = False  # RFC 2034
    requiretls: bool = False  # RFC 8689
    auth: tuple[str, ...] = ()  # RFC 4954
    rcptmax: int | None = None  # RFC 9422 LIMITS
    names: set[str] = field(default_factory=set)


_FLAGS = {"STARTTLS": "starttls", "PIPELINING": "pipelining", "8BITMIME": "eightbitmime",
          "SMTPUTF8": "smtputf8", "ENHANCEDSTATUSCODES": "enhancedstatuscodes", "REQUIRETLS": "requiretls"}


def parse_extensions(lines: Sequence[str]) -> Extensions:
    """Parse the EHLO reply lines after the first (the greeting line)."""
    ext = Extensions(esmtp=True)
    for line in lines:
        words = line.split()
        if not words:
            continue
        name, args = words[0].upper(), words[1:]
        ext.names.add(name)
        if name in _FLAGS:  # parameters ignored (a server may send some, e.g. after SMTPUTF8)
            setattr(ext, _FLAGS[name], True)
        elif name == "SIZE":
            ext.size = int(args[0]) if args and args[0].isdigit() else 0
        elif name == "AUTH":
            ext.auth = tuple(dict.fromkeys(a.upper() for a in args))
        elif name == "LIMITS":
            ext.rcptmax = _parse_limits(args)
    return ext


def _parse_limits(args: Sequence[str]) -> int | None:
    """RCPTMAX of ``LIMITS``; the whole extension is ignored when malformed (RFC 9422 §5)."""
    seen: dict[str, int] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        key = key.upper()
        if not eq or key in seen or not re.fullmatch(r"[0-9]{1,6}", value) or int(value) == 0:
            return None
        seen[key] = int(value)
    return seen.get("RCPTMAX")


_BARE_CR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def prepare_data(data: bytes) -> bytes:
    """DATA payload: dot-stuffed (RFC 5321 §4.5.2), ending in CRLF, plus ``.\\r\\n``.

    Raises ``ValueError`` for a bare CR or LF: such bytes could be read as a line ending by
    the next hop and so end the data early (SMTP smuggling); fixing them silently would change
    a signed message, so callers normalise line endings before queueing.
    """
    m = None if only_crlf(data) else _BARE_CR_LF.search(data)  # the regex: 60 us per 2 KB
    if m:
        what = "carriage return" if data[m.start():m.start() + 1] == b"\r" else "newline"
        raise ValueError(f"message contains bare {what} at offset {m.start()}, refusing to send")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if data.rfind(b"\r\n.") >= 0:  # (rfind: twice as fast as replace's search when there is none)
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + b".\r\n"


def needs_smtputf8(address: str) -> bool:
    localpart = address.rpartition("@")[0] if "@" in address else address
    return not localpart.isascii()


def ascii_domain(address: str) -> str:
    """IDNA-encode the domain so the address can go out without SMTPUTF8 (RFC 5890)."""
    localpart, at, domain = address.rpartition("@")
    if not at or domain.isascii() or domain.startswith("["):
        return address
    try:
        return f"{localpart}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address
