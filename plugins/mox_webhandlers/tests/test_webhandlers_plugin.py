"""The web handlers plugin is installed, its kinds validate, static and redirect serve."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from mox_core.errors import ConfigError
from mox_core.plugins.host import PluginHost
from mox_core.plugins.kinds import WebHandlerContext
from mox_core.testing import listed_plugin, load


def test_plugin_is_installed():
    info = listed_plugin("webhandlers")
    assert info["status"] == "ok"
    assert sorted(info["kinds"]) == ["webhandler:redirect", "webhandler:reverse_proxy", "webhandler:static"]


def _app(tmp_path, body):
    cfg = load(tmp_path, domains=body)
    [entry] = cfg.dynamic.web_handlers
    kind = PluginHost.load().webhandlers[entry.kind]
    ctx = WebHandlerContext(domain=entry.common.domain, path_regexp=entry.common.path_regexp, log_name="")
    return TestClient(kind.app_factory(entry.settings, ctx))


def test_static_serves_files_and_refuses_traversal(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello")
    (tmp_path / "secret.txt").write_text("secret")
    client = _app(tmp_path, f'[[web_handlers]]\nkind = "static"\ndomain = "example.org"\nroot = "{root}"\n')
    assert client.get("/").text == "hello"
    r = client.get("/../secret.txt")
    assert r.status_code == 404 and "secret" not in r.text
    assert client.get("/%2e%2e/secret.txt").status_code == 404


def test_redirect_with_base_url_and_replace(tmp_path):
    client = _app(tmp_path, '''
        [[web_handlers]]
        kind = "redirect"
        domain = "example.org"
        base_url = "https://www.example.org"
        orig_path_regexp = "^/old/(.*)$"
        replace_path = "/new/$1"
    ''')
    r = client.get("/old/page?x=1", follow_redirects=False)
    assert r.status_code == 308
    assert r.headers["location"] == "https://www.example.org/new/page?x=1"
    assert client.get("/other", follow_redirects=False).status_code == 404


def test_redirect_needs_a_target(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, domains='[[web_handlers]]\nkind = "redirect"\ndomain = "example.org"\nreplace_path = "/x"\n')
    assert "orig_path_regexp and replace_path must be set together" in exc.value.problems[0].message


@pytest.fixture
def backend():
    """A real HTTP server on 127.0.0.1 that answers with what it received."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers),
                               "body": self.rfile.read(length).decode()}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_reverse_proxy_forwards_with_x_forwarded_headers(tmp_path, backend):
    client = _app(tmp_path, f'''
        [[web_handlers]]
        kind = "reverse_proxy"
        domain = "example.org"
        path_regexp = "^/app/"
        url = "{backend}/base/?k=v"
        strip_path = true
        response_headers = {{ "X-Served-By" = "mox" }}
    ''')
    r = client.post("/app/x/y?q=1", content=b"payload",
                    headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "Host": "example.org"})
    assert r.status_code == 201 and r.headers["x-served-by"] == "mox"
    seen = r.json()
    assert seen["method"] == "POST" and seen["body"] == "payload"
    assert seen["path"] == "/base/x/y?k=v&q=1"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-forwarded-host"] == "example.org" and headers["host"] == "example.org"
    assert headers["x-forwarded-for"] != "6.6.6.6" and "forwarded" not in headers


def test_reverse_proxy_backend_down_is_502(tmp_path):
    from mox_testpeers import free_port

    client = _app(tmp_path, f'[[web_handlers]]\nkind = "reverse_proxy"\ndomain = "example.org"\n'
                            f'url = "http://127.0.0.1:{free_port()}/"\n')
    r = client.get("/")
    assert (r.status_code, r.text) == (502, "502 - bad gateway")
