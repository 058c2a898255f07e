"""What the handler kinds share: plain-text answers for HTTP and websocket requests, header
lists, and escaping of paths and queries for URLs (as Go's net/url does)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

Headers = list[tuple[bytes, bytes]]

# What Go's url.URL.EscapedPath leaves unescaped besides letters, digits and "-._~".
PATH_SAFE = "/$&+,:;=@"


def escape_path(path: str) -> str:
    """``path`` (decoded) percent-encoded for a URL: "?", "#", spaces, CR/LF and non-ASCII
    characters are encoded, "/" is kept."""
    return quote(path, safe=PATH_SAFE, errors="replace")


def escape_query(query: bytes) -> str:
    """A raw query string as ASCII for a URL or header: bytes that are not printable ASCII,
    and "#", are percent-encoded; existing escapes are kept."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x23 else f"%{b:02X}" for b in query)


def single_slash(path: str) -> str:
    """``path`` with any run of leading slashes reduced to one: "//host/x" in a Location
    header would send the browser to another host."""
    return "/" + path.lstrip("/") if path.startswith("//") else path


def header_list(headers: dict[str, str], skip: Iterable[str] = ()) -> Headers:
    """Configured headers as ASGI header pairs, without the names in ``skip`` (lower case)."""
    skip = set(skip)
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            if k.lower() not in skip]


def merge_headers(base: Headers, extra: Headers) -> Headers:
    """``base`` with the headers of ``extra`` replacing those of the same name."""
    names = {k for k, _ in extra}
    return [(k, v) for k, v in base if k not in names] + list(extra)


def request_header(scope: dict[str, Any], name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case), None when absent."""
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def text_headers(body: bytes) -> Headers:
    return [(b"content-type", b"text/plain; charset=utf-8"), (b"x-content-type-options", b"nosniff"),
            (b"content-length", str(len(body)).encode())]


async def respond(scope: dict[str, Any], send: Any, status: int, text: str = "",
                  headers: Headers | None = None) -> None:
    """Answer with ``status`` and a plain-text body. For a websocket request: an HTTP
    response when the server offers the ``websocket.http.response`` extension, else a close
    with code 1011 (the client sees the handshake fail)."""
    body = text.encode()
    hdrs = (text_headers(body) if body else [(b"content-length", b"0")]) + list(headers or [])
    if scope["type"] == "websocket":
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": hdrs})
            await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        else:
            await send({"type": "websocket.close", "code": 1011, "reason": text[:120]})
        return
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body,
                "more_body": False})
