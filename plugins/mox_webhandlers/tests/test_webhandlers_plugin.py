"""The web handlers plugin is installed, registers its four kinds, and their settings are
validated with mox's messages and described by ``mox config describe``."""

from __future__ import annotations

import tomllib

import pytest

from mox_core.errors import ConfigError
from mox_core.testing import listed_plugin, load
from plugins.mox_webhandlers.tests.webhandlers_helpers import WEB_LISTENER, plugin_host


def test_plugin_is_installed():
    info = listed_plugin("webhandlers")
    assert info["status"] == "ok"
    assert sorted(info["kinds"]) == ["webhandler:forward", "webhandler:internal", "webhandler:redirect",
                                     "webhandler:static"]


def _problems(tmp_path, entry: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, WEB_LISTENER, '[[web_handlers]]\ndomain = "example.org"\n' + entry, host=plugin_host())
    return [f"{p.path}: {p.message}" for p in exc.value.problems]


def _ok(tmp_path, entry: str):
    cfg = load(tmp_path, WEB_LISTENER, '[[web_handlers]]\ndomain = "example.org"\n' + entry, host=plugin_host())
    [handler] = cfg.dynamic.web_handlers
    return handler.settings


@pytest.mark.parametrize(("entry", "message"), [
    ('kind = "static"\nroot = "www"\nstrip_prefix = "files"',
     "static: prefix to strip files must start with a slash"),
    ('kind = "static"\nroot = "www"\nresponse_headers = { " X-A" = "1" }', 'static: bad header " X-A"'),
    ('kind = "static"\nroot = "www"\nresponse_headers = { "" = "1" }', 'static: bad header ""'),
    ('kind = "static"\nroot = "www"\nresponse_headers = { "X A" = "1" }', 'static: bad header "X A"'),
    ('kind = "static"\nroot = "www"\nresponse_headers = { "X-A" = "1\\r\\nSet-Cookie: x=1" }',
     'static: bad value for header "X-A": must not contain CR, LF or NUL'),
    ('kind = "static"\nroot = "www"\nresponse_headers = { "Content-Length" = "1" }',
     'static: header "Content-Length" is set by the server, not in config'),
    ('kind = "static"', "root: Field required"),
    ('kind = "static"\nroot = "www"\nlist = true', "list: unknown key"),
    ('kind = "redirect"\nreplace_path = "/x"',
     "redirect: must have either both orig_path_regexp and replace_path, or neither"),
    ('kind = "redirect"\norig_path_regexp = "^/x"',
     "redirect: must have either both orig_path_regexp and replace_path, or neither"),
    ('kind = "redirect"', "redirect: must have at least one of base_url and orig_path_regexp+replace_path"),
    ('kind = "redirect"\nbase_url = "https://example.com/path"', "redirect: base_url must have empty path"),
    ('kind = "redirect"\nbase_url = "https://example.com"\nstatus_code = 200',
     "redirect: invalid redirect status code 200"),
    ('kind = "redirect"\nbase_url = "https://example.com"\nstatus_code = 400',
     "redirect: invalid redirect status code 400"),
    ('kind = "redirect"\norig_path_regexp = "(x"\nreplace_path = "/"', "redirect: compiling regexp (x: "),
    ('kind = "redirect"\nbase_url = "https://exa mple.com"', "must not contain spaces or control characters"),
    ('kind = "redirect"\nbase_url = "ftp://example.com"', "must be http://host, https://host or //host"),
    ('kind = "forward"\nurl = "ftp://backend/"', "forward: url ftp://backend/ must be http:// or https:// with a host"),
    ('kind = "forward"\nurl = "http:///x"', "must be http:// or https:// with a host"),
    ('kind = "forward"\nurl = "backend:8080"', "must be http:// or https:// with a host"),
    ('kind = "forward"\nurl = "http://u:p@backend/"', "must not contain a user name or password"),
    ('kind = "forward"\nurl = "http://backend:99999/"', "forward: parsing url http://backend:99999/: "),
    ('kind = "forward"\nurl = "http://backend/"\nresponse_headers = { "X-A " = "1" }', 'forward: bad header "X-A "'),
    ('kind = "internal"\nbase_path = "/admin"\nservice = "admin"',
     'internal service: base path "/admin" must start and end with /'),
    ('kind = "internal"\nbase_path = "admin/"\nservice = "admin"',
     'internal service: base path "admin/" must start and end with /'),
    ('kind = "internal"\nbase_path = "/x/"\nservice = "webmail"', 'internal service: unknown service "webmail"'),
    ('kind = "reverse_proxy"\nurl = "http://backend/"', "unknown web handler kind 'reverse_proxy'"),
])
def test_config_errors(tmp_path, entry, message):
    problems = _problems(tmp_path, entry)
    assert any(message in p for p in problems), problems


def test_valid_settings_and_defaults(tmp_path):
    s = _ok(tmp_path, 'kind = "static"\nroot = "www"')
    assert (s.strip_prefix, s.list_files, s.continue_not_found, s.response_headers) == ("", False, False, {})
    s = _ok(tmp_path, 'kind = "redirect"\nbase_url = "//example.com"')
    assert s.status_code == 308
    s = _ok(tmp_path, 'kind = "redirect"\norig_path_regexp = "^/a(.*)"\nreplace_path = "/b$1"\nstatus_code = 301')
    assert s.status_code == 301
    s = _ok(tmp_path, 'kind = "forward"\nurl = "http://127.0.0.1:8080/"')
    assert (s.strip_path, s.response_headers) == (False, {})
    s = _ok(tmp_path, 'kind = "internal"\nbase_path = "/admin/"\nservice = "admin"')
    assert s.service == "admin"


def test_describe_documents_every_setting():
    from mox_core.config.describe import describe

    text = describe(plugin_host())
    domains = text.split("# ===== domains.toml")[1].split("\n", 1)[1]
    tomllib.loads(domains)
    for kind in ("static", "redirect", "forward", "internal"):
        assert f"# Web handler kind '{kind}' from plugin webhandlers." in text
    for key in ("root", "strip_prefix", "list_files", "continue_not_found", "response_headers", "base_url",
                "orig_path_regexp", "replace_path", "status_code", "url", "strip_path", "base_path", "service"):
        assert f"\n{key} = " in domains or f"\n# {key} = " in domains, key
    assert "# Which of mox's web applications: account, admin." in text
