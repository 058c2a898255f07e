"""The parts of a request the pipeline decides on: its cleaned path, its host, the client's
IP address, and plain text responses in the form mox gives them ("404 - not found")."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mox_core.smtp.domain import to_ascii

__all__ = ["BadRequest", "Host", "clean_path", "client_ip", "header", "parse_host", "send_text"]

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class BadRequest(Exception):
    """The request cannot be routed: answered with 400 and its text."""


def clean_path(path: str) -> str:
    """``path`` with ``.`` and ``..`` segments resolved and repeated slashes collapsed, as
    Go's ``path.Clean`` (mox): empty is ``/``, ``..`` at the root stays at the root, and a
    trailing slash is kept. The path is already percent-decoded (by the HTTP server); a NUL
    or a backslash in it is refused, since a file system or a backend might read them as
    something else than the URL says."""
    if "\x00" in path or "\\" in path:
        raise BadRequest("bad path")
    if not path.startswith("/"):
        path = "/" + path
    out: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    clean = "/" + "/".join(out)
    if path.endswith("/") and clean != "/":
        clean += "/"
    return clean


class Host:
    """The Host header without its port: an IP address, or a domain in lower-case ASCII."""

    __slots__ = ("ip", "name", "port")

    def __init__(self, name: str, ip: bool, port: str) -> None:
        self.name = name
        self.ip = ip
        self.port = port

    @property
    def domain(self) -> str | None:
        return None if self.ip else self.name


def parse_host(value: str) -> Host:
    """Parse a Host header (RFC 9110 §7.2): ``name[:port]`` or ``[v6]:port``."""
    if not value:
        raise BadRequest("missing host")
    port = ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise BadRequest("bad host")
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            raise BadRequest("bad host")
        port = rest[1:]
        if port and not port.isdigit():
            raise BadRequest("bad host")
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise BadRequest("bad host") from None
        return Host(name.lower(), True, port)
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        raise BadRequest("bad host")
    try:
        ipaddress.IPv4Address(name)
        return Host(name, True, port)
    except ValueError:
        pass
    try:
        return Host(to_ascii(name.rstrip(".")), False, port)
    except ValueError:
        raise BadRequest("bad host") from None


def header(scope: Scope, name: bytes) -> str:
    """The first header ``name`` (lower-case bytes) of the request, "" when absent."""
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return ""


def client_ip(scope: Scope, forwarded: bool) -> str:
    """The client's IP: the peer's, or behind a reverse proxy the first X-Forwarded-For
    address (when it is an IP address)."""
    if forwarded:
        first = header(scope, b"x-forwarded-for").split(",")[0].strip()
        try:
            return str(ipaddress.ip_address(first))
        except ValueError:
            pass
    client = scope.get("client")
    return client[0] if client else ""


async def send_text(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A ``text/plain`` response; ``text`` gets a newline."""
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"), *headers]})
    await send({"type": "http.response.body", "body": body})
