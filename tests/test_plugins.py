"""Plugin loading and every hook, through real plugin registrations."""

from __future__ import annotations

import json
import sqlite3

import click
import pytest
from click.testing import CliRunner

from mox_core.errors import PluginError
from mox_core.outgoing.routing import route_matches
from mox_core.plugins.host import PluginHost
from mox_core.plugins.kinds import OutgoingMessage, RouteContext, Submission, WebHandlerContext
from mox_core.testing import load
from tests.conftest import ROOT, run_mox
from tests.plugins import every_hook

SHIPPED = {
    "transport_direct": ("mox-transport-direct", ["transport:direct"]),
    "transport_smtp": ("mox-transport-smtp", ["transport:smtp"]),
    "transport_submission": ("mox-transport-submission", ["transport:submission", "transport:submissions"]),
    "transport_socks": ("mox-transport-socks", ["transport:socks"]),
    "webhandlers": ("mox-webhandlers", ["webhandler:forward", "webhandler:internal", "webhandler:redirect",
                                        "webhandler:static"]),
}


def test_every_plugin_directory_is_a_distribution_with_an_entry_point():
    import tomllib

    dirs = sorted(p for p in (ROOT / "plugins").iterdir() if p.is_dir())
    assert [d.name for d in dirs] == sorted(["mox_transport_direct", "mox_transport_smtp",
                                             "mox_transport_submission", "mox_transport_socks",
                                             "mox_webhandlers"])
    for d in dirs:
        meta = tomllib.loads((d / "pyproject.toml").read_text())
        assert meta["project"]["entry-points"]["mox.plugins"], d
        assert (d / "README.md").exists() and list((d / "tests").glob("test_*.py")), d


def test_plugins_list_json_shows_the_five_shipped_plugins():
    r = run_mox("plugins", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = {p["name"]: p for p in json.loads(r.stdout)}
    for name, (dist, kinds) in SHIPPED.items():
        assert listed[name]["distribution"] == dist
        assert listed[name]["status"] == "ok"
        assert listed[name]["version"] == "0.1.0"
        assert sorted(listed[name]["kinds"]) == sorted(kinds)
    assert not any(p["builtin"] for p in listed.values())


def test_plugins_list_all_includes_core_route_matchers():
    r = run_mox("plugins", "list", "--all", "--json")
    core = {p["name"]: p for p in json.loads(r.stdout)}["core.route_matchers"]
    assert core["kinds"] == ["route_matcher:from_domain", "route_matcher:to_domain",
                             "route_matcher:minimum_attempts"]


def test_core_never_imports_a_plugin():
    for path in (ROOT / "mox_core").rglob("*.py"):
        text = path.read_text()
        for plugin in ("mox_transport_", "mox_webhandlers"):
            assert f"import {plugin}" not in text and f"from {plugin}" not in text, path


def test_every_hook_through_a_registered_plugin(bare_host: PluginHost):
    info = bare_host.register(every_hook, "every_hook")
    assert info.status == "ok", info.error
    assert info.hooks == sorted([
        "mox_add_cli_commands", "mox_register_rate_limiters", "mox_register_route_matchers",
        "mox_register_transports", "mox_register_webhandlers",
    ])
    assert sorted(info.kinds) == ["rate_limiter:cap", "route_matcher:to_localpart_prefix",
                                  "transport:memory", "webhandler:hello"]
    assert bare_host.transports.owner("memory") == "every_hook"


async def test_registered_transport_delivers(bare_host: PluginHost, tmp_path):
    bare_host.register(every_hook, "every_hook")
    cfg = load(tmp_path, '[transports.m]\nkind = "memory"\nlabel = "x"\n', host=bare_host)
    entry = cfg.transports["m"]
    transport = bare_host.transports[entry.kind].factory("m", entry.settings)
    [res] = await transport.deliver(OutgoingMessage("a@example.org", ["b@example.net"], b"x\r\n"), None)
    assert res.recipient == "b@example.net" and res.remote_host == "x" and not res.permanent


def test_registered_route_matcher_is_a_route_criterion(bare_host: PluginHost, tmp_path):
    bare_host.register(every_hook, "every_hook")
    cfg = load(tmp_path, '[transports.m]\nkind = "memory"\n',
               '[[routes]]\nto_localpart_prefix = "bulk-"\ntransport = "m"\n', host=bare_host)
    [route] = cfg.dynamic.routes_global
    hit = RouteContext("example.org", "example.net", 0, recipient="bulk-1@example.net")
    miss = RouteContext("example.org", "example.net", 0, recipient="alice@example.net")
    assert route_matches(cfg, route, hit) and not route_matches(cfg, route, miss)


def test_registered_rate_limiter_checks_and_records(bare_host: PluginHost, tmp_path):
    bare_host.register(every_hook, "every_hook")
    cfg = load(tmp_path, domains='[rate_limiters.small]\nkind = "cap"\nmax_recipients = 2\n', host=bare_host)
    entry = cfg.dynamic.rate_limiters["small"]
    limiter = bare_host.rate_limiters["cap"].factory("small", entry.settings, tmp_path)
    db = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
    limiter.setup(db)
    sub = Submission("admin", "admin@example.org", ["x@example.net", "y@example.net"])
    db.execute("BEGIN IMMEDIATE")
    assert limiter.check(db, sub) is None
    limiter.record(db, sub)
    db.execute("COMMIT")
    decision = limiter.check(db, Submission("admin", "admin@example.org", ["z@example.net"]))
    assert decision is not None and decision.setting == "max_recipients"
    db.close()


async def test_registered_webhandler_builds_an_asgi_app(bare_host: PluginHost, tmp_path):
    bare_host.register(every_hook, "every_hook")
    cfg = load(tmp_path, '[listeners.web]\nips = ["127.0.0.1"]\n[listeners.web.webserver_http]\nenabled = true\n',
               '[[web_handlers]]\nkind = "hello"\ndomain = "example.org"\ngreeting = "hi"\n', host=bare_host)
    [entry] = cfg.dynamic.web_handlers
    app = bare_host.webhandlers["hello"].app_factory(entry.settings, WebHandlerContext("example.org", "^/", ""))
    sent = []

    async def send(m):
        sent.append(m)

    await app({"type": "http", "path": "/"}, None, send)
    assert sent[1]["body"] == b"hi example.org"


def test_registered_cli_command(bare_host: PluginHost):
    bare_host.register(every_hook, "every_hook")

    @click.group()
    def cli():
        pass

    bare_host.add_cli_commands(cli)
    assert "hello" in cli.commands
    assert CliRunner().invoke(cli, ["hello"]).output == "hello from every_hook\n"
    assert "command:hello" in bare_host.infos["every_hook"].kinds


def test_cli_command_name_clash_is_reported(bare_host: PluginHost):
    bare_host.register(every_hook, "every_hook")

    @click.group()
    def cli():
        pass

    @cli.command("hello")
    def original():
        click.echo("original")

    bare_host.add_cli_commands(cli)
    assert cli.commands["hello"] is original
    info = bare_host.infos["every_hook"]
    assert info.status == "error" and "already taken: hello" in info.error


def test_two_plugins_with_the_same_kind_is_an_error_naming_both(bare_host: PluginHost):
    from tests.plugins import duplicate_memory

    bare_host.register(every_hook, "every_hook")
    info = bare_host.register(duplicate_memory, "duplicate_memory")
    assert info.status == "error"
    assert "'memory' is registered by both plugin 'every_hook' and plugin 'duplicate_memory'" in info.error
    with pytest.raises(PluginError, match="every_hook.*duplicate_memory"):
        bare_host.raise_for_errors()
    assert bare_host.transports.owner("memory") == "every_hook"


def test_misspelt_hook_is_an_error(bare_host: PluginHost):
    from tests.plugins import unknown_hook

    info = bare_host.register(unknown_hook, "unknown_hook")
    assert info.status == "error" and "unknown hook(s): mox_register_transport" in info.error


BROKEN = {"mox_broken_plugin": "raise RuntimeError('cannot start: missing libfoo')\n"}


def test_broken_plugin_is_listed_with_its_error(fake_dist):
    site = fake_dist("mox-broken", {"broken": "mox_broken_plugin"}, BROKEN)
    r = run_mox("plugins", "list", "--json", pythonpath=site)
    assert r.returncode == 0, r.stderr
    broken = {p["name"]: p for p in json.loads(r.stdout)}["broken"]
    assert broken["status"] == "error"
    assert broken["distribution"] == "mox-broken"
    assert "RuntimeError: cannot start: missing libfoo" in broken["error"]
    table = run_mox("plugins", "list", pythonpath=site)
    assert table.returncode == 0 and "error: import failed" in table.stdout


def test_serve_refuses_to_start_with_a_broken_plugin(fake_dist, tmp_path):
    from mox_core.testing import write_config

    site = fake_dist("mox-broken", {"broken": "mox_broken_plugin"}, BROKEN)
    path = write_config(tmp_path / "cfg")
    r = run_mox("--config", str(path), "serve", pythonpath=site)
    assert r.returncode == 1
    assert "plugin 'broken' (distribution mox-broken) failed to load" in r.stderr


def test_disabled_plugin_by_env_and_by_config(fake_dist, tmp_path):
    from mox_core.testing import write_config

    site = fake_dist("mox-broken", {"broken": "mox_broken_plugin"}, BROKEN)
    r = run_mox("plugins", "list", "--json", pythonpath=site, env={"MOX_DISABLED_PLUGINS": "broken,transport_socks"})
    listed = {p["name"]: p["status"] for p in json.loads(r.stdout)}
    assert listed["broken"] == "disabled" and listed["transport_socks"] == "disabled"

    path = write_config(tmp_path / "cfg", base=False, static='hostname = "mail.example.org"\n'
                        'disabled_plugins = ["broken"]\n[postmaster]\naccount = "admin"\n',
                        domains='[domains."example.org"]\n[accounts.admin]\n')
    r = run_mox("--config", str(path), "config", "check", pythonpath=site)
    assert r.returncode == 0, r.stderr


def test_disabled_transport_plugin_makes_its_transports_unknown(tmp_path):
    from mox_core.testing import write_config

    path = write_config(tmp_path, '[transports.relay]\nkind = "smtp"\nhost = "relay.example.net"\n')
    ok = run_mox("--config", str(path), "config", "check")
    assert ok.returncode == 0, ok.stderr
    off = run_mox("--config", str(path), "config", "check", env={"MOX_DISABLED_PLUGINS": "transport_smtp"})
    assert off.returncode == 1 and "unknown transport kind 'smtp'" in off.stderr
