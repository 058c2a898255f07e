"""The web handlers plugin is installed, its kinds validate, static and redirect serve."""

from __future__ import annotations

import pytest
from mox_core.errors import ConfigError
from mox_core.kinds import WebHandlerContext
from mox_core.plugins import PluginHost
from mox_core.testconfig import listed_plugin, load
from starlette.testclient import TestClient


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
