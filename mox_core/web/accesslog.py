"""One access-log line and one observation of the two HTTP histograms per request.

The log line is ``http_request`` at level debug with component ``http``
(``package_log_levels = {http = "debug"}`` shows them), with mox's fields: handler, method,
url, host, duration, status code, protocol, remote address, TLS version, user agent,
referer, size (or, for a websocket, the bytes each way).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog

from mox_core.metrics import METRICS
from mox_core.web.request import header

__all__ = ["Exchange"]

log = structlog.get_logger(component="http")

_METHODS = frozenset({"get", "head", "post", "put", "delete", "connect", "options", "trace", "patch"})


def _method(scope: MutableMapping[str, Any]) -> str:
    m = scope.get("method", "GET" if scope["type"] == "websocket" else "").lower()
    return m if m in _METHODS else "(other)"


def _tls_info(scope: MutableMapping[str, Any]) -> str:
    if scope.get("scheme") not in ("https", "wss"):
        return "plain"
    ext = scope.get("extensions", {}).get("tls", {})
    version = ext.get("tls_version")
    names = {0x0301: "tls1.0", 0x0302: "tls1.1", 0x0303: "tls1.2", 0x0304: "tls1.3"}
    return names.get(version, "(other)") if version is not None else "tls"


class Exchange:
    """Watches one request's response (status, size, when it started) through :meth:`send`."""

    __slots__ = ("handler", "scope", "send_next", "size", "start", "started_at", "status", "tls")

    def __init__(self, scope: MutableMapping[str, Any], send: Callable[[Any], Awaitable[None]],
                 tls: bool) -> None:
        self.scope = scope
        self.send_next = send
        self.start = time.monotonic()
        self.started_at: float | None = None
        self.status = 0
        self.size = 0
        self.handler = "(nomatch)"
        self.tls = tls

    async def send(self, message: MutableMapping[str, Any]) -> None:
        t = message["type"]
        if t in ("http.response.start", "websocket.http.response.start"):
            self.status = message["status"]
            self.started_at = time.monotonic()
        elif t == "websocket.accept":
            self.status = 101
            self.started_at = time.monotonic()
        elif t in ("http.response.body", "websocket.http.response.body"):
            self.size += len(message.get("body", b""))
        await self.send_next(message)

    @property
    def proto(self) -> str:
        if self.scope["type"] == "websocket":
            return "wss" if self.tls else "ws"
        return "https" if self.tls else "http"

    def done(self, error: str = "") -> None:
        """Log the request and observe both histograms (after the response was sent)."""
        end = time.monotonic()
        status = self.status or 500
        labels = (self.handler, self.proto, _method(self.scope), str(status))
        first = (self.started_at or end) - self.start
        METRICS.http_request_duration.labels(*labels).observe(first)
        METRICS.http_response_duration.labels(*labels).observe(end - self.start)
        scope = self.scope
        fields: dict[str, Any] = {
            "httpaccess": "", "handler": self.handler, "method": _method(scope),
            "url": scope.get("path", "") + (("?" + scope["query_string"].decode("latin-1"))
                                             if scope.get("query_string") else ""),
            "host": header(scope, b"host"), "duration": round(end - self.start, 6), "statuscode": status,
            "proto": f"http/{scope.get('http_version', '1.1')}", "remoteaddr": _remote(scope),
            "tlsinfo": _tls_info(scope), "useragent": header(scope, b"user-agent"),
            "referer": header(scope, b"referer"),
        }
        ws = scope.get("mox", {}).get("ws_bytes") if isinstance(scope.get("mox"), dict) else None
        if scope["type"] == "websocket":
            fields["websocket"] = True
            if ws:
                fields["sizetoclient"], fields["sizefromclient"] = ws[0], ws[1]
        else:
            fields["size"] = self.size
        if error:
            fields["err"] = error
        log.debug("http_request", **fields)


def _remote(scope: MutableMapping[str, Any]) -> str:
    client = scope.get("client")
    if not client:
        return ""
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
