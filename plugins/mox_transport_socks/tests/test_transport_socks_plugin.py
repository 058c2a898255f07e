"""The socks transport plugin is installed, registered and its settings validate."""

from __future__ import annotations

import pytest

from mox_core.errors import ConfigError
from mox_core.plugins.host import PluginHost
from mox_core.testing import listed_plugin, load


def test_plugin_is_installed():
    info = listed_plugin("transport_socks")
    assert info["distribution"] == "mox-transport-socks"
    assert info["status"] == "ok"
    assert "mox_register_transports" in info["hooks"]
    assert any(k.startswith("transport:") for k in info["kinds"])


def test_owner_is_this_plugin():
    host = PluginHost.load()
    kind = "socks" if "socks" != "submission" else "submission"
    assert host.transports.owner(kind) == "transport_socks"


def test_settings_validate(tmp_path):
    cfg = load(tmp_path, '''
        [transports.proxy]
        kind = "socks"
        address = "127.0.0.1:1080"
        fallback_addresses = ["127.0.0.1:1081"]
        remote_ips = ["192.0.2.10"]
        remote_hostname = "out.example.org"
    ''')
    assert cfg.transports["proxy"].settings.fallback_addresses == ["127.0.0.1:1081"]


@pytest.mark.parametrize("field, value, message", [
    ("address", '"127.0.0.1"', "bad address"),
    ("remote_ips", '["not-an-ip"]', "bad ip not-an-ip"),
])
def test_bad_values(tmp_path, field, value, message):
    settings = {"address": '"127.0.0.1:1080"', "remote_ips": '["192.0.2.10"]', "remote_hostname": '"out.example.org"'}
    settings[field] = value
    body = "\n".join(f"{k} = {v}" for k, v in settings.items())
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, f'[transports.p]\nkind = "socks"\n{body}\n')
    [p] = exc.value.problems
    assert p.path == f"transports.p.{field}" and message in p.message
