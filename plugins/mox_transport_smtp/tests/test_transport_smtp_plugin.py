"""The smtp transport plugin is installed, registered and its settings validate."""

from __future__ import annotations

import pytest

from mox_core.errors import ConfigError
from mox_core.plugins.host import PluginHost
from mox_core.testing import listed_plugin, load


def test_plugin_is_installed():
    info = listed_plugin("transport_smtp")
    assert info["distribution"] == "mox-transport-smtp"
    assert info["status"] == "ok"
    assert "mox_register_transports" in info["hooks"]
    assert any(k.startswith("transport:") for k in info["kinds"])


def test_owner_is_this_plugin():
    host = PluginHost.load()
    kind = "smtp" if "smtp" != "submission" else "submission"
    assert host.transports.owner(kind) == "transport_smtp"


def test_settings_validate(tmp_path):
    cfg = load(tmp_path, '[transports.relay]\nkind = "smtp"\nhost = "Relay.Example.NET"\nport = 2525\n')
    s = cfg.transports["relay"].settings
    assert (s.host, s.port, s.no_starttls) == ("relay.example.net", 2525, False)


@pytest.mark.parametrize("host, reason", [("192.0.2.1", "not an IP address"), ("relay.example.", "must not end with a dot")])
def test_bad_host(tmp_path, host, reason):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, f'[transports.relay]\nkind = "smtp"\nhost = "{host}"\n')
    [p] = exc.value.problems
    assert p.path == "transports.relay.host" and reason in p.message


def test_starttls_options_conflict(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, '[transports.r]\nkind = "smtp"\nhost = "r.example"\nno_starttls = true\nstarttls_insecure_skip_verify = true\n')
    assert "cannot have both" in exc.value.problems[0].message


def test_destination_concurrency_default_and_override(tmp_path):
    """The queue may run 20 deliveries at once to one domain through a smarthost (direct: 1);
    the transport table's ``destination_concurrency`` overrides that."""
    from mox_core.outgoing.routing import Resolution, TransportCache
    from mox_core.queue.scheduler import destination_concurrency

    cfg = load(tmp_path, '[transports.relay]\nkind = "smtp"\nhost = "relay.example"\n'
                         '[transports.slow]\nkind = "smtp"\nhost = "relay.example"\ndestination_concurrency = 2\n')
    cache = TransportCache()

    def limit(name: str) -> int:
        entry = cfg.transports[name]
        return destination_concurrency(cfg, Resolution(name, "route", kind=entry.kind, entry=entry), cache)

    assert limit("relay") == 20
    assert limit("slow") == 2
    assert destination_concurrency(cfg, Resolution("", "default", kind="direct"), cache) == 1
