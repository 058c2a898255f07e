"""The ``redirect`` handler kind (mox's WebRedirect).

The new path is the request path, or ``orig_path_regexp``'s matches in it replaced by
``replace_path`` (Go's ReplaceAllString and Expand: ``$1``, ``${1}``, ``${name}``, ``$$``); a
path that does not match gets 404. With ``base_url`` the target takes its scheme, host, query
(the request's appended with ``&``) and fragment; without, the Location is relative.

A redirect to the very URL requested (same scheme, host and path) would loop: the handler
declines it and the next handler gets the request. That makes an ``https://`` redirect on
``^/`` send plain HTTP requests to HTTPS while HTTPS requests fall through.

Every part of the Location is percent-encoded or checked, so no CR/LF from the request (raw or
decoded from ``%0d%0a``) can start another header line.
"""

from __future__ import annotations

import html
import re
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit

from mox_core.api import WebHandlerContext
from mox_webhandlers.common import escape_path, escape_query, request_header, respond, single_slash
from mox_webhandlers.settings import RedirectSettings

_NAME = re.compile(r"[A-Za-z0-9_]+")


def _extract(template: str, i: int) -> tuple[str | None, int]:
    """The group name at ``template[i:]`` (after a ``$``) and where it ends, as Go's extract."""
    if i < len(template) and template[i] == "{":
        end = template.find("}", i + 1)
        if end < 0:
            return None, i
        name = template[i + 1:end]
        return (name, end + 1) if _NAME.fullmatch(name) else (None, i)
    m = _NAME.match(template, i)
    return (m.group(), m.end()) if m else (None, i)


def expand(template: str, m: re.Match[str]) -> str:
    """``template`` with ``$1``/``${1}``/``$name``/``${name}`` replaced by the groups of ``m``
    (unknown or unmatched groups by nothing) and ``$$`` by ``$``, as Go's Regexp.Expand."""
    out: list[str] = []
    i = 0
    while i < len(template):
        c = template[i]
        i += 1
        if c != "$":
            out.append(c)
            continue
        if i < len(template) and template[i] == "$":
            out.append("$")
            i += 1
            continue
        name, i = _extract(template, i)
        if name is None:
            out.append("$")
            continue
        group: str | int = int(name) if name.isdigit() else name
        try:
            value = m.group(group)
        except IndexError:  # no such group
            value = None
        if value is not None:
            out.append(value)
    return "".join(out)


def replace_all(rx: re.Pattern[str], s: str, template: str) -> str:
    """Go's ReplaceAllString: every non-overlapping match replaced, an empty match right
    after a previous match not replaced."""
    out: list[str] = []
    last = pos = 0
    while pos <= len(s):
        m = rx.search(s, pos)
        if m is None:
            break
        out.append(s[last:m.start()])
        if m.end() > last or m.start() == 0:
            out.append(expand(template, m))
        last = m.end()
        pos = pos + 1 if pos + 1 > m.end() else m.end()
    out.append(s[last:])
    return "".join(out)


def clean(path: str) -> str:
    """A rooted path without empty, ``.`` and ``..`` segments, the trailing slash kept (Go's
    http.Redirect cleans a relative target this way)."""
    parts: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if parts:
                parts.pop()
            continue
        parts.append(seg)
    out = "/" + "/".join(parts)
    return out + "/" if path.endswith("/") and out != "/" else out


def _no_controls(s: str) -> str:
    """Last line of defence for a header value: control characters and spaces encoded."""
    return "".join(f"%{ord(c):02X}" if ord(c) <= 0x20 or ord(c) == 0x7F else c for c in s)


def redirect_app(settings: RedirectSettings, ctx: WebHandlerContext):
    """The ASGI app of a ``redirect`` handler; see the module docstring and the README."""
    orig = re.compile(settings.orig_path_regexp) if settings.orig_path_regexp else None
    base = urlsplit(settings.base_url) if settings.base_url else None
    reason = HTTPStatus(settings.status_code).phrase if settings.status_code in HTTPStatus._value2member_map_ \
        else "Redirect"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope["path"]
        if orig is None:
            new = path
        elif orig.search(path) is None:
            await respond(scope, send, 404, "404 - not found")
            return
        else:
            new = replace_all(orig, path, settings.replace_path)
        req_scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        req_host = request_header(scope, b"host") or ""
        query = escape_query(scope.get("query_string") or b"")
        if base is None:
            if not new.startswith("/"):
                new = path[: path.rfind("/") + 1] + new  # relative to the request's directory, as Go
            new = clean(new)
            if new == path:
                return  # would redirect to itself: decline
            location = single_slash(escape_path(new)) + ("?" + query if query else "")
        else:
            if base.scheme == req_scheme and base.netloc.lower() == req_host.lower() and new == path:
                return  # would redirect to itself: decline, the next handler gets it
            q = "&".join(x for x in (base.query, query) if x)
            p = escape_path(new)
            if p and not p.startswith("/"):
                p = "/" + p
            location = (f"{base.scheme}:" if base.scheme else "") + "//" + base.netloc + p
            location += ("?" + q if q else "") + ("#" + quote(base.fragment, safe="/?%!$&'()*+,;=:@") if base.fragment
                                                  else "")
        location = _no_controls(location)
        body = b""
        headers = [(b"location", location.encode("latin-1"))]
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            body = f'<a href="{html.escape(location)}">{reason}</a>.\n'.encode()
            headers += [(b"content-type", b"text/html; charset=utf-8")]
        await _send(scope, send, settings.status_code, headers, body)

    return app


async def _send(scope: dict[str, Any], send: Any, status: int, headers: list[tuple[bytes, bytes]],
                body: bytes) -> None:
    if scope["type"] != "http":
        await respond(scope, send, status, "", headers)
        return
    headers = headers + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body,
                "more_body": False})
