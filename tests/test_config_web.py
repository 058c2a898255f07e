"""Config errors of the web server's settings, each with its file, key and mox's meaning."""

from __future__ import annotations

import os

import pytest

from mox_core.errors import ConfigError
from mox_core.testing import load, write_config
from tests.conftest import run_mox

WEB_LISTENER = """
[listeners.web]
ips = ["127.0.0.1"]
[listeners.web.webserver_http]
enabled = true
port = 8080
"""


def problems(tmp_path, static="", domains=""):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, static, domains)
    return [(os.path.basename(p.file), p.path, p.message) for p in exc.value.problems]


def handler(**keys: str) -> str:
    body = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return f"\n[[web_handlers]]\n{body}\n"


def test_a_path_regexp_must_start_with_a_caret(tmp_path):
    got = problems(tmp_path, WEB_LISTENER, handler(kind='"static"', domain='"www.example.org"',
                                                    path_regexp='"/app/"', root='"/srv"'))
    assert got == [("domains.toml", "web_handlers[0].path_regexp",
                    "webhandler www.example.org /app/: path regexp must start with a ^")]


def test_a_path_regexp_must_compile(tmp_path):
    [(_, key, msg)] = problems(tmp_path, WEB_LISTENER, handler(kind='"static"', domain='"www.example.org"',
                                                              path_regexp='"^/(unclosed"', root='"/srv"'))
    assert key == "web_handlers[0].path_regexp"
    assert msg.startswith("webhandler www.example.org ^/(unclosed: compiling regexp: missing )")


def test_a_handler_must_name_exactly_one_kind(tmp_path):
    [(_, key, msg)] = problems(tmp_path, WEB_LISTENER, handler(domain='"www.example.org"', root='"/srv"'))
    assert key == "web_handlers[0].kind"
    assert msg.startswith("must have exactly one handler: kind is one of ")
    assert "static" in msg and "redirect" in msg


def test_an_unknown_kind_lists_the_known_ones(tmp_path):
    [(_, key, msg)] = problems(tmp_path, WEB_LISTENER, handler(kind='"php"', domain='"www.example.org"'))
    assert key == "web_handlers[0].kind"
    assert msg.startswith("unknown web handler kind 'php' (known kinds: ") and "static" in msg


def test_a_domain_is_not_redirected_to_itself_nor_twice(tmp_path):
    got = problems(tmp_path, WEB_LISTENER, """
[web_domain_redirects]
"a.example.org" = "A.example.org"
"b.example.org" = "c.example.org"
"B.example.org" = "d.example.org"
""")
    assert ("domains.toml", 'web_domain_redirects."a.example.org"',
            "will not redirect domain a.example.org to itself") in got
    assert ("domains.toml", 'web_domain_redirects."B.example.org"', "duplicate redirect domain B.example.org") in got


def test_handlers_without_a_web_listener_are_an_error(tmp_path):
    got = problems(tmp_path, "", handler(kind='"static"', domain='"www.example.org"', root='"/srv"'))
    assert got == [("domains.toml", "web_handlers",
                    "web_domain_redirects or web_handlers configured but no listener with webserver_http or "
                    "webserver_https enabled (mox.toml)")]


def test_an_mta_sts_policy_needs_a_listener_that_serves_it(tmp_path):
    got = problems(tmp_path, "", '[domains."example.org".mta_sts]\npolicy_id = "1"\n')
    assert got == [("domains.toml", 'domains."example.org".mta_sts',
                    "MTA-STS policy configured but no listener with mta_sts_https enabled (mox.toml)")]


def test_an_mta_sts_policy_id_is_letters_and_digits(tmp_path):
    static = WEB_LISTENER + "[listeners.web.mta_sts_https]\nenabled = true\nport = 8443\nnon_tls = true\n"
    [(_, key, msg)] = problems(tmp_path, static, '[domains."example.org".mta_sts]\npolicy_id = "a-b"\n')
    assert key == "domains.example.org.mta_sts.policy_id"
    assert "policy_id must be 1 to 32 letters and digits" in msg


def test_https_services_need_tls_and_a_port_is_either_http_or_https(tmp_path):
    [(_, key, msg)] = problems(tmp_path, WEB_LISTENER + "[listeners.web.admin_https]\nenabled = true\n")
    assert key == "listeners.web" and "admin_https needs tls" in msg
    static = WEB_LISTENER + """[listeners.web.tls]
cert_file = "c.pem"
key_file = "k.pem"
[listeners.web.account_https]
enabled = true
port = 8080
"""
    [(_, key, msg)] = problems(tmp_path, static)
    assert "share port 8080, but one is HTTPS and the other not" in msg


def test_config_check_names_file_and_key_of_a_web_error(tmp_path):
    path = write_config(tmp_path, WEB_LISTENER, handler(kind='"static"', domain='"www.example.org"',
                                                         path_regexp='"app"', root='"/srv"'))
    r = run_mox("--config", str(path), "config", "check")
    assert r.returncode == 1
    assert f"{tmp_path / 'domains.toml'}: web_handlers[0].path_regexp: webhandler www.example.org app: " \
           "path regexp must start with a ^" in r.stderr
