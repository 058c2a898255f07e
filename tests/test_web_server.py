"""The web server of ``mox serve``, end to end: a real server process, real HTTP/1.1 requests
(httpx, raw sockets where a client would clean the request up), for the request pipeline,
the system handlers on their host names, HTTPS with SNI, reloads, limits and metrics."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mox_testpeers import free_port, run
from mox_testpeers.moxserver import MoxServer
from tests.conftest import program

DOMAINS = """\
[domains."example.org"]
[domains."example.org".mta_sts]
policy_id = "20261206"
mode = "enforce"
max_age = 604800
mx = ["mail.example.org", "*.mx.example.org"]

[domains."plain.example"]

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]
"""


def web_static(http: int, https: int, metrics: int, extra: str = "") -> str:
    return f"""
[listeners.local.webserver_http]
enabled = true
port = {http}
[listeners.local.webserver_https]
enabled = true
port = {https}
[listeners.local.mta_sts_https]
enabled = true
port = {https}
[listeners.local.autoconfig_https]
enabled = true
port = {https}
[listeners.local.metrics_http]
enabled = true
port = {metrics}
{extra}
"""


class Web:
    """A ``mox serve`` with web ports; ``get(path, host=...)`` over HTTP or HTTPS."""

    def __init__(self, tmp_path: Path, domains: str = DOMAINS, extra: str = "", top: str = "smtp_workers = 1\n",
                 www: Path | None = None) -> None:
        self.http_port, self.https_port, self.metrics_port = free_port(), free_port(), free_port()
        self.www = www or tmp_path / "www"
        self.www.mkdir(parents=True, exist_ok=True)
        (self.www / "index.html").write_text("<p>hello</p>\n")
        self.mox = MoxServer(tmp_path / "mox", static_top=top,
                             static_extra=web_static(self.http_port, self.https_port, self.metrics_port, extra),
                             domains=domains.replace("@WWW@", str(self.www)))
        self.mox.start()
        self.client = httpx.Client(verify=False, timeout=10, trust_env=False)

    def url(self, path: str, tls: bool = False) -> str:
        return f"https://127.0.0.1:{self.https_port}{path}" if tls else f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str, host: str, tls: bool = False, **kw) -> httpx.Response:
        return self.client.get(self.url(path, tls), headers={"host": host, **kw.pop("headers", {})}, **kw)

    def metrics(self) -> str:
        return self.client.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text

    def close(self) -> None:
        self.client.close()
        self.mox.stop()


@pytest.fixture
def web(tmp_path):
    made: list[Web] = []

    def start(**kw) -> Web:
        w = Web(tmp_path / f"w{len(made)}", **kw)
        made.append(w)
        return w

    yield start
    for w in made:
        w.close()


STATIC_HANDLERS = DOMAINS + """
[[web_handlers]]
kind = "static"
domain = "www.example.org"
path_regexp = "^/"
root = "@WWW@"
"""


def test_a_handler_serves_its_domain_over_https_and_redirects_plain_http_to_https(web):
    w = web(domains=STATIC_HANDLERS)
    r = w.get("/", host="www.example.org", tls=True)
    assert r.status_code == 200 and r.text == "<p>hello</p>\n"
    r = w.get("/index.html?x=1", host="www.example.org:8080")
    assert r.status_code == 308
    assert r.headers["location"] == "https://www.example.org/index.html?x=1"  # the port is dropped
    assert w.get("/", host="other.example.org", tls=True).status_code == 404  # no handler for this host


def test_dont_redirect_plaintext_serves_plain_http(web):
    w = web(domains=STATIC_HANDLERS.replace('path_regexp = "^/"', 'path_regexp = "^/"\ndont_redirect_plaintext = true'))
    r = w.get("/", host="www.example.org")
    assert r.status_code == 200 and r.text == "<p>hello</p>\n"


def test_handlers_are_tried_in_config_order_and_a_declining_one_passes_on(web, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    (first / "only-here.txt").write_text("first\n")
    domains = DOMAINS + f"""
[[web_handlers]]
kind = "static"
domain = "www.example.org"
root = "{first}"
continue_not_found = true
dont_redirect_plaintext = true

[[web_handlers]]
kind = "static"
domain = "www.example.org"
root = "@WWW@"
dont_redirect_plaintext = true
"""
    w = web(domains=domains)
    assert w.get("/only-here.txt", host="www.example.org").text == "first\n"
    assert w.get("/index.html", host="www.example.org").text == "<p>hello</p>\n"  # first declined it
    assert w.get("/missing", host="www.example.org").status_code == 404


def test_domain_redirects_go_to_https_on_the_other_domain_before_any_handler(web):
    w = web(domains=STATIC_HANDLERS + '\n[web_domain_redirects]\n"old.example.org" = "www.example.org"\n')
    for tls in (False, True):
        r = w.get("/a/b?c=d", host="old.example.org", tls=tls)
        assert r.status_code == 308
        assert r.headers["location"] == "https://www.example.org/a/b?c=d"


def test_mta_sts_policy_is_served_only_on_mta_sts_host_of_a_domain_with_a_policy(web):
    w = web()
    r = w.get("/.well-known/mta-sts.txt", host="mta-sts.example.org", tls=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["cache-control"] == "no-cache, max-age=0"
    assert r.content == (b"version: STSv1\nmode: enforce\nmax_age: 604800\n"
                         b"mx: mail.example.org\nmx: *.mx.example.org\n")
    for host in ("example.org", "www.example.org", "mta-sts.plain.example", "mta-sts.unknown.example", "127.0.0.1"):
        assert w.get("/.well-known/mta-sts.txt", host=host, tls=True).status_code == 404, host
    # curl, as an administrator checks it
    out = _curl("-sk", "--resolve", f"mta-sts.example.org:{w.https_port}:127.0.0.1",
                f"https://mta-sts.example.org:{w.https_port}/.well-known/mta-sts.txt")
    assert out.startswith("version: STSv1\nmode: enforce\n")
    out = _curl("-sk", "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                f"www.example.org:{w.https_port}:127.0.0.1", f"https://www.example.org:{w.https_port}/.well-known/mta-sts.txt")
    assert out == "404"


def _curl(*args: str) -> str:
    """curl as an administrator runs it (``--resolve`` keeps it off DNS)."""
    return subprocess.run([program("curl", "curl"), "--noproxy", "*", *args], capture_output=True, text=True, check=True, timeout=30).stdout


def test_autoconfig_describes_submission_only_on_autoconfig_hosts(web):
    w = web()
    r = w.get("/mail/config-v1.1.xml?emailaddress=admin%40example.org", host="autoconfig.example.org", tls=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    assert "<hostname>mail.example.org</hostname>" in r.text
    assert f"<port>{w.mox.submissions_port}</port>" in r.text and "<socketType>SSL</socketType>" in r.text
    assert "<username>admin@example.org</username>" in r.text
    assert w.get("/mail/config-v1.1.xml", host="autoconfig.unknown.example", tls=True).status_code == 404
    assert w.get("/mail/config-v1.1.xml", host="www.example.org", tls=True).status_code == 404
    body = (b'<?xml version="1.0"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/'
            b'outlook/requestschema/2006"><Request><EMailAddress>admin@example.org</EMailAddress></Request></Autodiscover>')
    r = w.client.post(w.url("/autodiscover/autodiscover.xml", tls=True), content=body,
                      headers={"host": "autoconfig.example.org"})
    assert r.status_code == 200
    assert "<Type>SMTP</Type>" in r.text and "<LoginName>admin@example.org</LoginName>" in r.text
    assert w.get("/autodiscover/autodiscover.xml", host="autoconfig.example.org", tls=True).status_code == 405


def test_metrics_show_both_http_histograms_with_their_labels(web):
    w = web(domains=STATIC_HANDLERS.replace('path_regexp = "^/"', 'path_regexp = "^/"\nlog_name = "site"'))
    w.get("/", host="www.example.org", tls=True)
    w.get("/nothing", host="nowhere.example", tls=True)
    w.get("/x", host="www.example.org")  # the redirect to https
    text = w.metrics()
    for name in ("mox_httpserver_request_duration_seconds", "mox_httpserver_response_duration_seconds"):
        assert f'{name}_count{{code="200",handler="site",method="get",proto="https"}} 1.0' in text
        assert f'{name}_count{{code="404",handler="(nomatch)",method="get",proto="https"}} 1.0' in text
        assert f'{name}_count{{code="308",handler="site",method="get",proto="http"}} 1.0' in text
        assert f'{name}_bucket{{code="200",handler="site",le="0.001",method="get",proto="https"}}' in text
        assert f'{name}_bucket{{code="200",handler="site",le="120.0",method="get",proto="https"}} 1.0' in text
    assert 'mox_queue_messages{hold="false"} 0.0' in text


def _cert(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)])
    return cert, key


def _served_cert_names(port: int, server_name: str | None) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    c = x509.load_der_x509_certificate(der)
    return ",".join(c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(x509.DNSName))


def test_https_picks_the_certificate_by_the_host_name_the_client_asks_for(web, tmp_path):
    other_cert, other_key = _cert(tmp_path / "certs", "www.other.example")
    wild_cert, wild_key = _cert(tmp_path / "certs", "*.wild.example")
    extra = f"""
[[listeners.local.tls.key_certs]]
cert_file = "{other_cert}"
key_file = "{other_key}"
[[listeners.local.tls.key_certs]]
cert_file = "{wild_cert}"
key_file = "{wild_key}"
"""
    w = web()
    w.mox.stop()
    text = w.mox.config_path.read_text().replace("[listeners.local.smtp]", extra.strip() + "\n\n[listeners.local.smtp]", 1)
    w.mox.config_path.write_text(text)
    w.mox.start()
    assert _served_cert_names(w.https_port, "www.other.example") == "www.other.example"
    assert _served_cert_names(w.https_port, "a.wild.example") == "*.wild.example"
    default = _served_cert_names(w.https_port, "mail.example.org")
    assert "mail.example.org" in default.split(",")
    assert _served_cert_names(w.https_port, None) == default  # no SNI: the first certificate


def test_a_domains_toml_edit_changes_the_handlers_and_keeps_open_connections(web, tmp_path):
    w = web(domains=STATIC_HANDLERS.replace('path_regexp = "^/"', 'path_regexp = "^/"\ndont_redirect_plaintext = true'))
    big = w.www / "big.bin"
    big.write_bytes(b"x" * (8 * 1024 * 1024))
    with socket.create_connection(("127.0.0.1", w.http_port)) as slow:
        slow.sendall(b"GET /big.bin HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
        first = slow.recv(65536)  # the response has started; most of it is still to come
        assert first.startswith(b"HTTP/1.1 200")
        other = tmp_path / "other"
        other.mkdir()
        (other / "index.html").write_text("<p>new site</p>\n")
        domains = w.mox.directory / "domains.toml"
        domains.write_text(domains.read_text() + f"""
[[web_handlers]]
kind = "static"
domain = "new.example.org"
root = "{other}"
dont_redirect_plaintext = true
""")
        deadline = time.monotonic() + 10
        while w.get("/", host="new.example.org").status_code != 200:
            assert time.monotonic() < deadline, "the new handler did not take effect"
            time.sleep(0.1)
        assert w.get("/", host="new.example.org").text == "<p>new site</p>\n"
        got = len(first)
        slow.settimeout(10)
        while chunk := slow.recv(1 << 20):
            got += len(chunk)
            if got >= 8 * 1024 * 1024:
                break
    assert got >= 8 * 1024 * 1024  # the download in flight finished


def _within_one_minute(requests):
    """Run ``requests()`` inside one wall-clock minute, the limiter's fixed window (it counts
    from ``time() - time() % 60``): a run that crosses into the next minute is started again at
    the next minute's beginning, once (a loaded machine may need more than a minute's rest)."""
    for _ in range(2):
        start = time.time()
        result = requests()
        if int(time.time() // 60) == int(start // 60):
            return result
        time.sleep(60 - time.time() % 60 + 0.05)
    raise AssertionError("1001 requests did not fit in one minute twice")


def test_too_many_requests_from_one_ip_get_429_unless_the_port_has_no_limit(web):
    w = web(domains=STATIC_HANDLERS)
    codes = _within_one_minute(lambda: [w.get("/", host="www.example.org", tls=True).status_code
                                        for _ in range(1001)])
    assert codes[:1000] == [200] * 1000
    r = w.get("/", host="www.example.org", tls=True)
    assert codes[1000] == 429 and r.status_code == 429 and r.text == "429 - too many auth attempts\n"
    assert 'handler="(ratelimited)"' in w.metrics()


def test_a_port_with_rate_limit_disabled_serves_every_request(web):
    w = web(domains=STATIC_HANDLERS, extra="")
    w.mox.stop()
    text = w.mox.config_path.read_text().replace(
        f"[listeners.local.webserver_https]\nenabled = true\nport = {w.https_port}\n",
        f"[listeners.local.webserver_https]\nenabled = true\nport = {w.https_port}\nrate_limit_disabled = true\n")
    w.mox.config_path.write_text(text)
    w.mox.start()
    codes = {w.get("/", host="www.example.org", tls=True).status_code for _ in range(1050)}
    assert codes == {200}


def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_bad_hosts_and_paths_get_400(web):
    w = web(domains=STATIC_HANDLERS)
    assert _raw(w.http_port, b"GET / HTTP/1.1\r\nHost: bad host\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 400")
    for path in (b"/a%00b", b"/a%5c..%5cb"):
        out = _raw(w.http_port, b"GET " + path + b" HTTP/1.1\r\nHost: www.example.org\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400"), path


def test_dot_segments_are_resolved_before_matching(web, tmp_path):
    w = web(domains=STATIC_HANDLERS.replace('path_regexp = "^/"', 'path_regexp = "^/pub/"\ndont_redirect_plaintext = true'))
    (w.www / "pub").mkdir()
    (w.www / "pub" / "a.txt").write_text("public\n")
    (w.www / "secret.txt").write_text("secret\n")
    out = _raw(w.http_port, b"GET /pub/../secret.txt HTTP/1.1\r\nHost: www.example.org\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404") and b"secret" not in out  # /secret.txt does not match ^/pub/
    out = _raw(w.http_port, b"GET /pub/./x/../a.txt HTTP/1.1\r\nHost: www.example.org\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"public\n")


def test_slow_and_oversized_request_heads_are_cut_off(web):
    w = web(domains=STATIC_HANDLERS, extra="[http]\nhead_timeout = 1.0\nmax_head = 2048\n")
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", w.http_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: www.exa")  # and nothing more
        out = s.recv(4096)
        assert s.recv(4096) == b""  # closed
    assert out.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5
    out = _raw(w.http_port, b"GET / HTTP/1.1\r\nHost: www.example.org\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    assert w.get("/", host="www.example.org", tls=True).status_code == 200  # others are served meanwhile


def test_a_request_body_over_the_limit_gets_413(web):
    w = web(extra="[http]\nmax_request_body = 100\n")
    body = b"<EMailAddress>admin@example.org</EMailAddress>" + b" " * 200
    r = w.client.post(w.url("/autodiscover/autodiscover.xml", tls=True), content=body,
                      headers={"host": "autoconfig.example.org"})
    assert r.status_code == 413


def test_the_access_log_has_mox_fields(web):
    w = web(domains=STATIC_HANDLERS.replace('path_regexp = "^/"', 'path_regexp = "^/"\nlog_name = "site"'),
            extra='[package_log_levels]\nhttp = "debug"\n')
    w.get("/index.html?q=1", host="www.example.org", tls=True, headers={"user-agent": "test-agent", "referer": "r"})
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in w.mox.log_text().splitlines()
                 if line.startswith("{") and '"http_request"' in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [entry] = [e for e in lines if e.get("handler") == "site"]
    assert entry["method"] == "get" and entry["url"] == "/index.html?q=1" and entry["statuscode"] == 200
    assert entry["host"] == "www.example.org" and entry["proto"] == "http/1.1"
    assert entry["tlsinfo"] in ("tls1.2", "tls1.3") and entry["useragent"] == "test-agent"
    assert entry["referer"] == "r" and entry["size"] == len("<p>hello</p>\n")
    assert entry["remoteaddr"].startswith("127.0.0.1:") and entry["duration"] >= 0


def test_a_web_port_in_use_stops_the_start_naming_it(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        m = MoxServer(tmp_path / "mox", static_top="smtp_workers = 1\n",
                      static_extra=f"[listeners.local.webserver_http]\nenabled = true\nport = {port}\n",
                      domains=DOMAINS.split("[domains.\"example.org\".mta_sts]")[0] + "[accounts.admin]\n"
                      "domain = \"example.org\"\n[accounts.admin.destinations.\"admin@example.org\"]\n")
        r = m.mox("serve", check=False)
        assert r.returncode != 0
        assert f"listener local: webserver_http on 127.0.0.1:{port}" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        busy.close()


def test_the_web_process_is_started_again_when_it_dies(web):
    w = web(domains=STATIC_HANDLERS)
    assert w.get("/", host="www.example.org", tls=True).status_code == 200
    deadline = time.monotonic() + 15
    while not (pids := [json.loads(line)["pid"] for line in w.mox.log_text().splitlines()
                        if '"web_process_started"' in line]):  # logged once the child said it is ready
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [pid] = pids
    subprocess.run(["kill", "-9", str(pid)], check=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            if w.get("/", host="www.example.org", tls=True).status_code == 200 and '"web_process_exited"' in w.mox.log_text():
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_forward_and_a_websocket_echo_through_mox_serve(web):
    import asyncio

    import websockets
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute

    from plugins.mox_webhandlers.tests.webhandlers_helpers import ThreadServer

    async def echo(request):
        return JSONResponse({"path": request.url.path, "query": request.url.query,
                             "xff": request.headers.get("x-forwarded-for"),
                             "xfh": request.headers.get("x-forwarded-host"),
                             "xfp": request.headers.get("x-forwarded-proto"),
                             "spoofed": request.headers.get("x-forwarded-server")})

    async def ws_echo(ws):
        await ws.accept()
        while True:
            msg = await ws.receive_text()
            await ws.send_text("echo " + msg)

    backend = ThreadServer(Starlette(routes=[WebSocketRoute("/base/ws", ws_echo), Route("/{p:path}", echo)]))
    try:
        domains = DOMAINS + f"""
[[web_handlers]]
kind = "forward"
domain = "app.example.org"
path_regexp = "^/app/"
url = "http://{backend.hostport}/base/"
strip_path = true
dont_redirect_plaintext = true
"""
        w = web(domains=domains)
        r = w.get("/app/x/y?q=1", host="app.example.org",
                  headers={"x-forwarded-for": "6.6.6.6", "x-forwarded-server": "evil"})
        assert r.status_code == 200
        got = r.json()
        assert got["path"] == "/base/x/y" and got["query"] == "q=1"
        assert got["xff"] == "127.0.0.1" and got["xfh"] == "app.example.org" and got["xfp"] == "http"
        assert got["spoofed"] is None  # incoming X-Forwarded-* are dropped

        async def talk() -> list[str]:
            # the Host header from the URL, the connection to loopback (no DNS)
            async with websockets.connect(f"ws://app.example.org:{w.http_port}/app/ws",
                                          host="127.0.0.1", port=w.http_port) as c:
                out = []
                for text in ("one", "two"):
                    await c.send(text)
                    out.append(await c.recv())
                return out

        assert asyncio.run(talk()) == ["echo one", "echo two"]  # /app/ws -> the backend's /base/ws
    finally:
        backend.stop()


def test_a_third_party_handler_kind_serves_requests_through_mox_serve(web, fake_dist):
    site = fake_dist("mox-webhandler-hello", {"webhandler_hello": "mox_webhandler_hello"}, {
        "mox_webhandler_hello": '''
            from pydantic import BaseModel, ConfigDict
            from mox_core import hookimpl
            from mox_core.api import WebHandlerKind

            class Settings(BaseModel):
                model_config = ConfigDict(extra="forbid")
                greeting: str

            def factory(settings, ctx):
                async def app(scope, receive, send):
                    body = f"{settings.greeting} from {ctx.domain} at {scope['path']}".encode()
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"text/plain")]})
                    await send({"type": "http.response.body", "body": body})
                return app

            @hookimpl
            def mox_register_webhandlers():
                return [WebHandlerKind("hello", Settings, factory, "Says hello.")]
        '''})
    import os

    os.environ["PYTHONPATH"] = f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    try:
        w = web(domains=DOMAINS + '\n[[web_handlers]]\nkind = "hello"\ndomain = "hi.example.org"\ngreeting = "hej"\n')
        r = w.get("/there", host="hi.example.org", tls=True)
        assert r.status_code == 200 and r.text == "hej from hi.example.org at /there"
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
