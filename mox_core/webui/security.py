"""The protections every page of the web UI gets: security headers, the same-origin check of
state-changing requests, CSRF tokens and the session cookie's attributes.

- Headers (:class:`SecurityHeaders`, on every response of the app): a Content-Security-Policy
  that allows only the app's own files (no inline script or style, no framing), ``nosniff``,
  ``Referrer-Policy: same-origin``, and ``Cache-Control: no-store`` unless the response set
  its own (only the static files do).
- Same origin (:func:`same_origin`): a POST must name our host in ``Origin`` (RFC 6454 §7),
  or, when a browser sent none, in ``Referer`` (RFC 9110 §10.1.3); checked before the body is
  read, else 403.
- CSRF token (:func:`token_matches`): every form carries the session's token in the hidden
  field ``csrf``; the login form, which has no session yet, carries a token that must equal
  the one in a cookie of its own (a "double submit" that the same-origin check completes).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CSP", "SecurityHeaders", "cookie_header", "same_origin", "token_matches"]

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),  # for browsers without frame-ancestors
]
_NAMES = frozenset(k for k, _ in _HEADERS)


class SecurityHeaders:
    """ASGI middleware adding the headers above to every HTTP response of ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _NAMES]
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers + _HEADERS
            await send(message)

        await self.app(scope, receive, add_headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


def _host_port(netloc: str, scheme: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower().rstrip("."), port or (443 if scheme == "https" else 80)


def same_origin(scope: Scope) -> bool:
    """Whether the request's ``Origin`` (else ``Referer``) names the host of its ``Host``
    header (host and port). Neither header, ``Origin: null``, or a non-HTTP origin: False."""
    host = _header(scope, b"host")
    if not host:
        return False
    source = _header(scope, b"origin")
    if source is None:
        source = _header(scope, b"referer")
    if not source:
        return False
    try:
        origin = urlsplit(source)
    except ValueError:
        return False
    if origin.scheme not in ("http", "https") or not origin.netloc:
        return False
    theirs = _host_port(origin.netloc, origin.scheme)
    ours = _host_port(host, scope.get("scheme", "http"))
    return theirs is not None and theirs == ours


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token; an empty token never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def cookie_header(name: str, value: str, path: str, secure: bool, max_age: int | None = None) -> str:
    """A ``Set-Cookie`` value (RFC 6265 §4.1): HttpOnly, SameSite=Strict, Secure over HTTPS."""
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
