"""The direct transport plugin is installed, registered and its settings validate."""

from __future__ import annotations

import pytest

from mox_core.errors import ConfigError
from mox_core.plugins.host import PluginHost
from mox_core.testing import listed_plugin, load


def test_plugin_is_installed():
    info = listed_plugin("transport_direct")
    assert info["distribution"] == "mox-transport-direct"
    assert info["status"] == "ok"
    assert "mox_register_transports" in info["hooks"]
    assert any(k.startswith("transport:") for k in info["kinds"])


def test_owner_is_this_plugin():
    host = PluginHost.load()
    kind = "direct" if "direct" != "submission" else "submission"
    assert host.transports.owner(kind) == "transport_direct"


def test_settings_validate(tmp_path):
    cfg = load(tmp_path, '[transports.v4]\nkind = "direct"\ndisable_ipv6 = true\n')
    assert cfg.transports["v4"].settings.disable_ipv6 is True


def test_both_families_disabled_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, '[transports.none]\nkind = "direct"\ndisable_ipv4 = true\ndisable_ipv6 = true\n')
    [p] = exc.value.problems
    assert p.path == "transports.none"
    assert "both IPv4 and IPv6 are disabled" in p.message


def test_table_without_kind_is_direct(tmp_path):
    cfg = load(tmp_path, "[transports.plain]\n")
    assert cfg.transports["plain"].kind == "direct"
