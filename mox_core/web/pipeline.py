"""The request pipeline of mox's web server, one ASGI application for every web port.

In this order, as mox:

1. per client IP, a rate limit (429; not on a webserver port with ``rate_limit_disabled``);
2. the path is cleaned (``.``/``..`` resolved; a NUL or backslash is a 400);
3. the host is parsed from the Host header (port removed; an IP or a lower-case domain);
4. system handlers, which web handlers cannot override: ACME http-01 challenges at
   ``/.well-known/acme-challenge/`` (plain HTTP ports of listeners with ACME), the MTA-STS policy on
   ``mta-sts.<domain>``, autoconfig and autodiscover on ``autoconfig.<domain>`` and our host
   names, metrics at ``/metrics`` (and ``/`` on a metrics-only port);
5. on ports with the web server: domain redirects, then the web handlers in config order
   (domain and ``path_regexp``; plain HTTP redirected to HTTPS first unless the handler
   says not to; a handler may decline and the next is tried);
6. the internal services (account and admin pages) on the hosts they belong to;
7. else 404.

Every request gets an access-log line and an observation of the two HTTP histograms
(:mod:`mox_core.web.accesslog`), named after the handler that answered.

A request body may pause at most ``[http] body_idle_timeout`` seconds (the application then
sees the client as gone) and be at most ``[http] max_request_body`` bytes (413).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote

import structlog

from mox_core import metrics
from mox_core.acme.store import HTTP01_PREFIX, http01_key_authorization
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.metrics import METRICS
from mox_core.plugins.kinds import ASGIApp
from mox_core.web import wellknown
from mox_core.web.accesslog import Exchange
from mox_core.web.compress import accepts_gzip, compressing_send
from mox_core.web.handlers import HandlerSet, call_handler
from mox_core.web.ports import WebPort
from mox_core.web.ratelimit import RequestLimiter
from mox_core.web.request import BadRequest, Host, clean_path, client_ip, header, parse_host, send_text

__all__ = ["WebApp", "guarded_receive"]


class BodyTooLarge(Exception):
    pass


def guarded_receive(receive: Receive, idle_timeout: float, max_body: int) -> Receive:
    """``receive`` with the body limits: each piece within ``idle_timeout`` seconds, in all
    at most ``max_body`` bytes. After the body, waiting (for a disconnect) has no limit."""
    state = {"done": False, "size": 0}

    async def wrapped() -> MutableMapping[str, Any]:
        if state["done"]:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), idle_timeout)
        except TimeoutError:
            log.info("http_body_timeout")
            state["done"] = True
            return {"type": "http.disconnect"}
        if message["type"] != "http.request" or not message.get("more_body", False):
            state["done"] = True
        state["size"] += len(message.get("body", b""))
        if state["size"] > max_body:
            raise BodyTooLarge()
        return message

    return wrapped

log = structlog.get_logger(component="http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class WebApp:
    """The ASGI application behind every web socket of ``mox serve``.

    :param ports: the web ports, to find the services of the port a request came in on
        (by its local address, ``scope["server"]``).
    :param internal_services: core's web applications by service name (``account``,
        ``admin``); a port serves those of its listener that are enabled.
    :param scrape: collectors computed at each metrics request (the queue's size, ...).
    """

    def __init__(self, holder: ConfigHolder, ports: Iterable[WebPort],
                 internal_services: Mapping[str, ASGIApp] | None = None,
                 scrape: Callable[[], list[object]] | None = None) -> None:
        self.holder = holder
        ports = list(ports)
        self.ports: dict[tuple[str, int], WebPort] = {}
        for wp in ports:
            for ip in wp.ips:
                self.ports[(_norm_ip(ip), wp.port)] = wp
        self.by_port: dict[int, WebPort] = {wp.port: wp for wp in ports}
        self.internal_services = dict(internal_services or {})
        self.handlers = HandlerSet(self.internal_services)
        self.limiters = {id(wp): RequestLimiter() for wp in ports}  # one per port, as mox
        self.scrape = scrape

    def _port(self, scope: Scope) -> WebPort | None:
        server = scope.get("server")
        if not server:
            return None
        return self.ports.get((_norm_ip(server[0]), server[1])) or self.by_port.get(server[1])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        port = self._port(scope)
        if port is None:  # not one of ours (a test calling the app directly without server)
            await send_text(send, 404, "404 - not found")
            return
        ip = client_ip(scope, port.forwarded)
        if port.rate_limited and not self.limiters[id(port)].allow(ip):
            labels = ("(ratelimited)", "https" if port.tls else "http", scope.get("method", "get").lower(), "429")
            METRICS.http_request_duration.labels(*labels).observe(0)
            await send_text(send, 429, "429 - too many auth attempts")
            return
        ex = Exchange(scope, send, port.tls)
        error = ""
        if scope["type"] == "http":
            limits = self.holder.get().static.http
            receive = guarded_receive(receive, limits.body_idle_timeout, limits.max_request_body)
        try:
            await self._route(scope, receive, ex, port)
        except BodyTooLarge:
            error = "request body too large"
            if not ex.status:
                await send_text(ex.send, 413, "413 - request entity too large")
        except Exception as exc:  # a handler failed: 500 if nothing was sent yet
            log.exception("http_handler_failed", handler=ex.handler, path=scope.get("path"))
            error = f"{type(exc).__name__}: {exc}"
            if not ex.status and scope["type"] == "http":
                await send_text(ex.send, 500, "500 - internal server error")
        finally:
            ex.done(error)

    async def _route(self, scope: Scope, receive: Receive, ex: Exchange, port: WebPort) -> None:
        send = ex.send
        path = scope.get("path", "/") or "/"
        host_value = header(scope, b"host")  # the authority of an absolute-form target (web/serve.py)
        try:
            path = clean_path(path)
            host = parse_host(host_value)
        except BadRequest as exc:
            ex.handler = "(badrequest)"
            await _reject(scope, send, 400, f"400 - bad request: {exc}")
            return
        if path != scope.get("path"):
            scope["path"] = path
            scope["raw_path"] = quote(path).encode()
        cfg = self.holder.get()
        if await self._system(scope, receive, ex, port, cfg, host, path):
            return
        if port.webserver is not None and await self._webserver(scope, receive, ex, port, cfg, host, path):
            return
        if await self._internal(scope, receive, ex, port, cfg, host, path):
            return
        ex.handler = "(nomatch)"
        await _reject(scope, send, 404, "404 - not found")

    # -- 4. system handlers ------------------------------------------------------------

    async def _system(self, scope: Scope, receive: Receive, ex: Exchange, port: WebPort, cfg: Config,
                      host: Host, path: str) -> bool:
        if scope["type"] != "http":
            return False
        send = ex.send
        if port.acme_http and path.startswith(HTTP01_PREFIX):
            ex.handler = "acme-http-01"
            answer = http01_key_authorization(cfg.data_dir, path[len(HTTP01_PREFIX):])
            if answer is None:
                await send_text(send, 404, "404 - not found")
            else:
                await _send(send, 200, answer, b"application/octet-stream")
            return True
        if port.mta_sts is not None and path == wellknown.MTA_STS_PATH:
            domain = wellknown.mta_sts_domain(host)
            if domain is not None:
                ex.handler = "mtasts"
                policy = wellknown.mta_sts_policy(cfg, domain)
                if policy is None:
                    await send_text(send, 404, "404 - not found")
                else:
                    await _send(send, 200, policy, b"text/plain", [(b"cache-control", b"no-cache, max-age=0")])
                return True
        if port.autoconfig is not None and path in (wellknown.AUTOCONFIG_PATH, wellknown.AUTODISCOVER_PATH):
            domain = wellknown.autoconfig_domain(cfg, host)
            if domain is not None:
                if path == wellknown.AUTOCONFIG_PATH:
                    ex.handler = "autoconfig"
                    body = wellknown.autoconfig_xml(cfg, domain, scope.get("query_string", b""))
                    await _send(send, 200, body, b"application/xml; charset=utf-8")
                    return True
                ex.handler = "autodiscover"
                if scope["method"] != "POST":
                    await send_text(send, 405, "405 - method not allowed", [(b"allow", b"POST")])
                    return True
                request = await _read_body(receive, wellknown.MAX_AUTODISCOVER_REQUEST)
                answer = wellknown.autodiscover_xml(cfg, request or b"")
                if answer is None:
                    await send_text(send, 400, "400 - bad request: no EMailAddress in request")
                else:
                    await _send(send, 200, answer, b"application/xml; charset=utf-8")
                return True
        if port.metrics and (path == "/metrics" or (path == "/" and port.services() == ["metrics"])):
            ex.handler = "metrics"
            body = metrics.collect(self.scrape() if self.scrape else ())
            await _send(send, 200, body, b"text/plain; version=0.0.4; charset=utf-8")
            return True
        return False

    # -- 5. domain redirects and web handlers ------------------------------------------

    async def _webserver(self, scope: Scope, receive: Receive, ex: Exchange, port: WebPort, cfg: Config,
                         host: Host, path: str) -> bool:
        send = ex.send
        domain = host.domain
        if domain is None:
            return False
        target = cfg.dynamic.web_redirects.get(domain)
        if target is not None:
            ex.handler = "(domainredirect)"
            await _redirect(scope, send, 308, f"https://{target}{_path_query(scope)}")
            return True
        for h in self.handlers.get(cfg):
            if h.domain != domain:
                continue
            m = h.regexp.search(path)
            if m is None:
                continue
            ex.handler = h.name
            if not port.tls and not h.dont_redirect_plaintext:
                await _redirect(scope, send, 308, f"https://{h.domain}{_path_query(scope)}")
                return True
            scope["mox"] = {"handler": h.name, "match": m.span(), "ws_bytes": [0, 0]}
            out = send
            if h.compress and scope["type"] == "http" and accepts_gzip(header(scope, b"accept-encoding")):
                out = compressing_send(send)
            if await call_handler(h.app, scope, receive, out):
                return True
            ex.handler = "(nomatch)"
        return False

    # -- 6. internal services ----------------------------------------------------------

    async def _internal(self, scope: Scope, receive: Receive, ex: Exchange, port: WebPort, cfg: Config,
                        host: Host, path: str) -> bool:
        candidates = [("admin", port.admin), ("account", port.account)]
        # longest path first, as mox: /admin/ before an account path of /
        candidates.sort(key=lambda c: -len(c[1].path) if c[1] is not None else 0)
        for name, svc in candidates:
            if svc is None or not _internal_host(name, host, port, cfg):
                continue
            base = svc.path
            if path + "/" == base:
                ex.handler = name
                await _redirect(scope, ex.send, 303, base + (("?" + scope["query_string"].decode("latin-1"))
                                                             if scope.get("query_string") else ""))
                return True
            if not path.startswith(base):
                continue
            app = self.internal_services.get(name)
            ex.handler = name
            if app is None:
                await send_text(ex.send, 404, "404 - not found")
                return True
            sub = dict(scope)  # mounted as ASGI mounts: root_path set, path kept whole
            sub["root_path"] = scope.get("root_path", "") + base.rstrip("/")
            if port.forwarded:
                _forwarded_scope(sub)
            await app(sub, receive, ex.send)
            return True
        return False


def _forwarded_scope(scope: Scope) -> None:
    """Behind a reverse proxy: the client as the proxy saw it, for the internal services'
    login throttle and cookies: ``client`` from X-Forwarded-For, ``scheme`` from
    X-Forwarded-Proto (``Secure`` cookies when the browser used HTTPS)."""
    client = scope.get("client")
    scope["client"] = (client_ip(scope, True), client[1] if client else 0)
    proto = header(scope, b"x-forwarded-proto").split(",")[0].strip().lower()
    if proto in ("http", "https"):
        scope["scheme"] = proto


def _internal_host(service: str, host: Host, port: WebPort, cfg: Config) -> bool:
    """Admin pages only on an IP address, our host names and localhost (mox); the account
    pages there too."""
    if host.ip or host.name == "localhost":
        return True
    names = {port.hostname, cfg.static.hostname}
    return host.name in names


def _norm_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def _path_query(scope: Scope) -> str:
    q = scope.get("query_string", b"")
    return quote(scope["path"]) + ("?" + q.decode("latin-1") if q else "")


async def _send(send: Send, status: int, body: bytes, content_type: bytes,
                headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _redirect(scope: Scope, send: Send, status: int, location: str) -> None:
    if scope["type"] == "websocket":
        await _reject(scope, send, 400, "400 - websocket over plain http not redirected")
        return
    loc = location.encode("latin-1", "replace")
    if b"\r" in loc or b"\n" in loc:  # never a second header line
        loc = loc.replace(b"\r", b"%0D").replace(b"\n", b"%0A")
    body = b""
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"location", loc), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": body})


async def _reject(scope: Scope, send: Send, status: int, text: str) -> None:
    """A plain text error; for a websocket, refuse the handshake with it (or close)."""
    if scope["type"] == "websocket":
        if "websocket.http.response" in scope.get("extensions", {}):
            body = (text + "\n").encode()
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    await send_text(send, status, text)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, None when it is longer than ``limit``."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            return None
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
