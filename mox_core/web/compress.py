"""Transparent gzip for web handlers that set ``compress``, under mox's rules: only a 200
response without a Content-Encoding, of a compressible type (text, JSON, XML, JavaScript,
CSV, icons, fonts), to a client whose Accept-Encoding allows gzip, and when the size is
known, between 1 KiB and 10 MiB. Compressed at the fastest level, as it streams."""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["accepts_gzip", "compressing_send", "compressible"]

MIN_SIZE = 1024
MAX_SIZE = 10 * 1024 * 1024
_TYPES = frozenset({
    "application/csv", "application/javascript", "application/json", "application/x-javascript",
    "application/xml", "image/vnd.microsoft.icon", "image/x-icon", "font/ttf", "font/eot", "font/otf",
    "font/opentype", "image/svg+xml",
})

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def compressible(content_type: str) -> bool:
    ct = content_type.split(";")[0].strip().lower()
    return ct.startswith("text/") or ct.endswith("+json") or ct.endswith("+xml") or ct in _TYPES


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether Accept-Encoding (RFC 9110 §12.5.3) allows gzip: listed, and not with q=0."""
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        q = params.replace(" ", "").lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def compressing_send(send: Send) -> Send:
    """A ``send`` that gzips the response when the rules above allow it."""
    state: dict[str, Any] = {"z": None}

    async def wrapped(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {k.lower(): v for k, v in headers}
            size = names.get(b"content-length")
            ok = (message["status"] == 200 and b"content-encoding" not in names
                  and compressible(names.get(b"content-type", b"").decode("latin-1"))
                  and (size is None or MIN_SIZE <= int(size) <= MAX_SIZE))
            if ok:
                state["z"] = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: gzip wrapper
                headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"etag")]
                headers += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
                message = {**message, "headers": headers}
            await send(message)
            return
        z = state["z"]
        if message["type"] == "http.response.body" and z is not None:
            body = z.compress(message.get("body", b""))
            more = message.get("more_body", False)
            if not more:
                body += z.flush()
            message = {**message, "body": body}
        await send(message)

    return wrapped
