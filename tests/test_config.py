"""Config files: validation with file and key paths, describe, live reload, CLI levels."""

from __future__ import annotations

import os
import time
import tomllib

import pytest
from structlog.testing import capture_logs

from mox_core.config.holder import ConfigHolder
from mox_core.config.loader import find_config_path, load_config
from mox_core.errors import ConfigError
from mox_core.outgoing.routing import routes_for
from mox_core.testing import load, write_config
from tests.conftest import run_mox


def problems(tmp_path, static="", domains="", **kw):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, static, domains, **kw)
    return [(os.path.basename(p.file), p.path, p.message) for p in exc.value.problems]


def test_minimal_config_loads(tmp_path):
    cfg = load(tmp_path)
    assert cfg.static.hostname == "mail.example.org"
    assert cfg.data_dir == tmp_path / "data"
    assert "admin@example.org" in cfg.dynamic.addresses


def test_config_check_reports_unknown_transport_unknown_key_and_bad_type(tmp_path):
    path = write_config(
        tmp_path,
        '[transports.relay]\nkind = "smtp"\nhost = "relay.example.net"\nport = "twenty-five"\n',
        '[accounts.admin.destinations."x@example.org"]\nmailboxx = "Inbox"\n'
        '[[routes]]\nto_domain = ["example.net"]\ntransport = "nosuch"\n',
    )
    r = run_mox("--config", str(path), "config", "check")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert f"{path}: transports.relay.port: Input should be a valid integer, unable to parse string as an integer" in lines
    assert f"{tmp_path}/domains.toml: accounts.admin.destinations.x@example.org.mailboxx: unknown key" in lines
    assert (f"{tmp_path}/domains.toml: routes[0].transport: global routes: route references "
            "undefined transport 'nosuch'") in lines
    assert lines[-1] == "3 problem(s) found"


def test_config_check_ok(tmp_path):
    path = write_config(tmp_path)
    r = run_mox("--config", str(path), "config", "check")
    assert r.returncode == 0 and "config OK" in r.stdout


def test_config_path_from_env_then_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no mox localserve folder there
    monkeypatch.setenv("MOX_CONFIG", "/etc/elsewhere/mox.toml")
    assert str(find_config_path(None)) == "/etc/elsewhere/mox.toml"
    assert str(find_config_path("x/mox.toml")) == "x/mox.toml"
    monkeypatch.delenv("MOX_CONFIG")
    assert str(find_config_path(None)) == "config/mox.toml"
    path = write_config(tmp_path / "config")
    r = run_mox("config", "check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_mox("config", "check", env={"MOX_CONFIG": str(path)})
    assert r.returncode == 0, r.stderr


def test_toml_syntax_error_names_the_file(tmp_path, host):
    path = write_config(tmp_path)
    path.write_text("hostname = \n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, host)
    [p] = [p for p in exc.value.problems if p.file == str(path)]
    assert p.message.startswith("invalid TOML") and "line 1" in p.message


def test_unknown_route_criterion_and_bad_domain(tmp_path):
    got = problems(tmp_path, "[transports.t]\n",
                   '[[routes]]\nto_domainn = ["x.example"]\ntransport = "t"\n'
                   '[[routes]]\nfrom_domain = ["bad..example"]\ntransport = "t"\n'
                   '[[routes]]\nminimum_attempts = "3"\ntransport = "t"\n')
    assert got[0][1] == "routes[0].to_domainn" and got[0][2].startswith("unknown route criterion")
    assert got[1][1] == "routes[1].from_domain" and "invalid domain 'bad..example'" in got[1][2]
    assert got[2][1] == "routes[2].minimum_attempts" and "valid integer" in got[2][2]


def test_routes_at_three_levels_in_order(tmp_path):
    cfg = load(tmp_path, "[transports.a]\n[transports.d]\n[transports.g]\n", '''
        [[domains."example.org".routes]]
        transport = "d"
        [[accounts.admin.routes]]
        transport = "a"
        [[routes]]
        transport = "g"
    ''')
    assert [r.transport for r in routes_for(cfg, "admin", "example.org")] == ["a", "d", "g"]
    assert [r.transport for r in routes_for(cfg, None, "other.example")] == ["g"]


def test_routes_in_mox_toml_are_an_unknown_key(tmp_path):
    got = problems(tmp_path, '[[routes]]\ntransport = "x"\n')
    assert ("mox.toml", "routes", "unknown key") in got


@pytest.mark.parametrize("domain_cfg, destinations, message", [
    ('localpart_catchall_separator = "+"\nlocalpart_catchall_separators = ["-"]', "",
     "cannot have both localpart_catchall_separator and localpart_catchall_separators"),
    ('localpart_catchall_separators = ["+", "+"]', "", "duplicate localpart catchall separator +"),
    ('localpart_catchall_separators = ["+"]', '[accounts.admin.destinations."a+b@example.org"]',
     "localpart of address a+b@example.org includes domain catchall separator +"),
    ("", '[accounts.admin.destinations."Admin@example.org"]',
     "duplicate canonicalized destination address admin@example.org"),
    ("", '[accounts.admin.destinations."x@unknown.example"]', "unknown domain for address"),
    ("", '[accounts.admin.destinations."@example.org"]\n[accounts.other]\n'
         '[accounts.other.destinations."@example.org"]',
     "duplicate canonicalized catchall destination address @example.org"),
])
def test_address_config_errors(tmp_path, domain_cfg, destinations, message):
    domains = f'[domains."example.org"]\n{domain_cfg}\n[accounts.admin]\n' \
              f'[accounts.admin.destinations."admin@example.org"]\n{destinations}\n'
    got = problems(tmp_path, domains=domains, base=False,
                   static='hostname = "mail.example.org"\n[postmaster]\naccount = "admin"\n')
    assert any(message in m for _, _, m in got), got


def test_case_sensitive_domain_keeps_distinct_addresses(tmp_path):
    cfg = load(tmp_path, base=False, static='hostname = "m.example.org"\n[postmaster]\naccount = "admin"\n',
               domains='[domains."example.org"]\nlocalpart_case_sensitive = true\n[accounts.admin]\n'
                       '[accounts.admin.destinations."Admin@example.org"]\n'
                       '[accounts.admin.destinations."admin@example.org"]\n')
    assert {"Admin@example.org", "admin@example.org"} <= set(cfg.dynamic.addresses)


def test_postmaster_account_must_exist(tmp_path):
    got = problems(tmp_path, base=False, static='hostname = "m.example.org"\n[postmaster]\naccount = "nobody"\n',
                   domains='[domains."example.org"]\n')
    assert any("postmaster account 'nobody'" in m for _, _, m in got)


def test_describe_is_a_valid_commented_example(tmp_path):
    r = run_mox("config", "describe")
    assert r.returncode == 0, r.stderr
    static, domains = r.stdout.split("# ===== domains.toml")
    tomllib.loads(static)
    tomllib.loads(domains.split("\n", 1)[1])
    for key in ("remote_hostname", "disable_ipv6", "mechanisms", "strip_prefix", "base_url",
                "localpart_catchall_separators", "max_first_time_recipients_per_day"):
        assert f"{key} =" in r.stdout, key
    assert "# Transport kind 'socks' from plugin transport_socks." in r.stdout


def test_domains_toml_reloads_and_keeps_previous_on_error(tmp_path):
    cfg = load(tmp_path)
    holder = ConfigHolder(cfg, interval=0)
    domains = tmp_path / "domains.toml"
    text = domains.read_text()
    domains.write_text(text + '[accounts.admin.destinations."new@example.org"]\n')
    os.utime(domains, (time.time() + 2, time.time() + 2))
    assert "new@example.org" in holder.get().dynamic.addresses
    domains.write_text(text + "[accounts.admin.destinations.\"x@example.org\"]\nbogus = 1\n")
    os.utime(domains, (time.time() + 4, time.time() + 4))
    with capture_logs() as logs:
        current = holder.get()
    assert "new@example.org" in current.dynamic.addresses
    [event] = [e for e in logs if e["event"] == "domains_config_reload_failed"]
    assert any("bogus: unknown key" in p for p in event["problems"])


def test_reload_is_checked_at_most_once_per_interval(tmp_path):
    cfg = load(tmp_path)
    holder = ConfigHolder(cfg, interval=3600)
    domains = tmp_path / "domains.toml"
    domains.write_text(domains.read_text() + '[accounts.admin.destinations."new@example.org"]\n')
    os.utime(domains, (time.time() + 2, time.time() + 2))
    assert "new@example.org" not in holder.get().dynamic.addresses


def test_cli_level_is_reapplied_after_config_except_for_serve(tmp_path):
    path = write_config(tmp_path, base=False, static='hostname = "mail.example.org"\nlog_level = "debug"\n'
                        '[postmaster]\naccount = "admin"\n', domains='[domains."example.org"]\n[accounts.admin]\n')
    quiet = run_mox("--config", str(path), "config", "check")
    assert "config_loaded" not in quiet.stderr
    loud = run_mox("--config", str(path), "--loglevel", "debug", "config", "check")
    assert "config_loaded" in loud.stderr
    bad = run_mox("--loglevel", "loud", "plugins", "list")
    assert bad.returncode == 2 and "unknown loglevel 'loud'" in bad.stderr
