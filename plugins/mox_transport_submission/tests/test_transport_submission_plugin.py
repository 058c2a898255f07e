"""The submission transport plugin is installed, registered and its settings validate."""

from __future__ import annotations

import pytest

from mox_core.errors import ConfigError
from mox_core.plugins.host import PluginHost
from mox_core.testing import listed_plugin, load


def test_plugin_is_installed():
    info = listed_plugin("transport_submission")
    assert info["distribution"] == "mox-transport-submission"
    assert info["status"] == "ok"
    assert "mox_register_transports" in info["hooks"]
    assert any(k.startswith("transport:") for k in info["kinds"])


def test_owner_is_this_plugin():
    host = PluginHost.load()
    kind = "submission" if "submission" != "submission" else "submission"
    assert host.transports.owner(kind) == "transport_submission"


def test_both_kinds_registered():
    host = PluginHost.load()
    assert host.transports.owner("submissions") == "transport_submission"


def test_settings_validate(tmp_path):
    cfg = load(tmp_path, '''
        [transports.sub]
        kind = "submission"
        host = "relay.example"
        username = "me"
        password_env = "SUB_PW"
        mechanisms = ["CRAM-MD5", "PLAIN"]
    ''')
    s = cfg.transports["sub"].settings
    assert s.mechanisms == ["CRAM-MD5", "PLAIN"] and s.password_env == "SUB_PW"


@pytest.mark.parametrize("extra, message", [
    ('mechanisms = ["LOGIN"]', "unknown authentication mechanism LOGIN"),
    ('mechanisms = ["PLAIN", "PLAIN"]', "duplicate authentication mechanism PLAIN"),
])
def test_bad_mechanisms(tmp_path, extra, message):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, f'[transports.s]\nkind = "submission"\nhost = "h.example"\nusername = "u"\npassword = "p"\n{extra}\n')
    assert message in exc.value.problems[0].message


def test_implicit_tls_rejects_no_starttls(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, '[transports.s]\nkind = "submissions"\nhost = "h.example"\nusername = "u"\npassword = "p"\nno_starttls = true\n')
    assert "cannot have no_starttls with immediate TLS" in exc.value.problems[0].message


def test_password_required(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, '[transports.s]\nkind = "submission"\nhost = "h.example"\nusername = "u"\n')
    assert "exactly one of password" in exc.value.problems[0].message
