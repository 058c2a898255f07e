"""Abuse of the built-in web server through a real ``mox serve``, with raw requests (a client
library would clean them up): path traversal in static handlers, server-side request forgery
and header spoofing through the reverse proxy, request smuggling, open redirects.

The number in each test name is the case of the project's security catalogue (the web
server's cases are all number 48, split by kind here).
"""

from __future__ import annotations

import os
import socket

import pytest

from mox_testpeers import free_port
from mox_testpeers.moxserver import MoxServer
from plugins.mox_webhandlers.tests.webhandlers_helpers import Backend, ThreadServer

DOMAINS = """\
[domains."example.org"]
[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[[web_handlers]]
kind = "static"
domain = "www.example.org"
path_regexp = "^/static/"
strip_prefix = "/static/"
root = "@ROOT@"
dont_redirect_plaintext = true

[[web_handlers]]
kind = "forward"
domain = "www.example.org"
path_regexp = "^/app/"
url = "http://@BACKEND@/base/"
strip_path = true
dont_redirect_plaintext = true

[[web_handlers]]
kind = "redirect"
domain = "www.example.org"
path_regexp = "^/go/"
base_url = "https://target.example.org"
dont_redirect_plaintext = true
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("b7")
    root = tmp / "www"
    root.mkdir()
    (root / "index.html").write_text("public index\n")
    (root / "ok.txt").write_text("public\n")
    os.symlink("/etc", root / "etc-link")
    os.symlink("/etc/passwd", root / "passwd.gz")  # a precompressed-looking link out of the root
    backend, evil = Backend(), Backend()
    servers = [ThreadServer(backend.app), ThreadServer(evil.app)]
    port = free_port()
    m = MoxServer(tmp / "mox", static_top="smtp_workers = 1\n",
                  static_extra=f"[listeners.local.webserver_http]\nenabled = true\nport = {port}\n",
                  domains=DOMAINS.replace("@ROOT@", str(root)).replace("@BACKEND@", servers[0].hostport))
    m.start()
    yield port, backend, evil, servers[1].hostport
    m.stop()
    ThreadServer.stop_all(servers)


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def get(port: int, target: bytes, host: bytes = b"www.example.org", extra: bytes = b"") -> bytes:
    return raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("target", [
    b"/static/../../etc/passwd", b"/static/%2e%2e/%2e%2e/etc/passwd", b"/static/..%2f..%2fetc%2fpasswd",
    b"/static/%252e%252e/%252e%252e/etc/passwd", b"/static/..\\..\\etc\\passwd", b"/static/a%00.html",
    b"/static/etc-link/passwd", b"/static/passwd.gz", b"/static//etc/passwd", b"/static/%2fetc%2fpasswd",
])
def test_b48_static_never_serves_a_file_outside_its_root(site, target):
    port = site[0]
    out = get(port, target)
    status = int(out.split(b" ", 2)[1])
    assert status in (400, 404), out[:200]
    assert b"root:" not in out


def test_b48_static_still_serves_inside_its_root(site):
    out = get(site[0], b"/static/ok.txt")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"public\n")


def test_b48_the_proxy_connects_only_to_its_configured_backend(site):
    port, backend, evil, evil_hostport = site
    evil.seen.clear()
    backend.seen.clear()
    # an absolute-form target naming another host: its host is the request's host (RFC 9112
    # §3.2.2), for which no handler is configured
    out = get(port, b"http://" + evil_hostport.encode() + b"/app/x")
    assert out.startswith(b"HTTP/1.1 404")
    out = get(port, b"http://169.254.169.254/latest")
    assert out.startswith(b"HTTP/1.1 404")
    # //host in the path and a spoofed Host header of the backend request
    for target in (b"/app//" + evil_hostport.encode() + b"/x", b"/app/@" + evil_hostport.encode() + b"/x"):
        out = get(port, target, extra=b"X-Forwarded-For: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\n")
        assert out.startswith(b"HTTP/1.1 201"), out[:300]  # the backend answered
    assert evil.seen == []
    assert len(backend.seen) == 2
    for req in backend.seen:
        headers = {k.lower(): v for k, v in req["headers"].items()} if isinstance(req["headers"], dict) else \
            {k.lower(): v for k, v in req["headers"]}
        assert headers["x-forwarded-for"] == "127.0.0.1"  # replaced, not the client's claim
        assert "forwarded" not in headers


@pytest.mark.parametrize("request_bytes", [
    # Content-Length and Transfer-Encoding together (RFC 9112 §6.3)
    b"POST /app/x HTTP/1.1\r\nHost: www.example.org\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: www.example.org\r\n\r\n",
    # two different Content-Length values
    b"POST /app/x HTTP/1.1\r\nHost: www.example.org\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
    # an obsolete line folding (RFC 9112 §5.2: reject)
    b"GET /app/x HTTP/1.1\r\nHost: www.example.org\r\nX-A: a\r\n b\r\n\r\n",
])
def test_b48_ambiguous_requests_are_refused_before_the_proxy(site, request_bytes):
    port, backend, _, _ = site
    backend.seen.clear()
    out = raw(port, request_bytes)
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert [r for r in backend.seen if "smuggled" in r.get("path", "")] == []


@pytest.mark.parametrize("target", [b"//evil.test/%2e%2e", b"/go///evil.test/%2e%2e", b"/go//evil.test/x",
                                    b"/go/%2f%2fevil.test/x", b"/go/\\evil.test"])
def test_b48_a_redirect_does_not_leave_its_destination(site, target):
    out = get(site[0], target)
    head = out.split(b"\r\n\r\n")[0].decode("latin-1")
    locations = [line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("location:")]
    for location in locations:  # a redirect, if any, stays on the configured destination
        assert location.startswith("https://target.example.org/"), location
    assert locations or int(head.split(" ", 2)[1]) in (400, 404)
