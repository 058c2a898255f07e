"""`pip install mox-transport-<x>` works: a third-party plugin in a fresh virtual environment.

The plugin (tests/data/mox-transport-file) is a separate distribution that core knows
nothing about; once installed next to mox-core it is listed, its settings validate, a route
can name its transport, and it delivers.
"""

from __future__ import annotations

import json
import subprocess
import venv

import pytest

from mox_core.testing import write_config
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    d = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(d)
    py = d / "bin" / "python"
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         str(ROOT), str(ROOT / "tests" / "data" / "mox-transport-file")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return d


def test_third_party_transport_installs_and_is_usable(fresh_venv, tmp_path):
    mox = fresh_venv / "bin" / "mox"
    out = subprocess.run([str(mox), "plugins", "list", "--json"], capture_output=True, text=True, check=True)
    listed = {p["name"]: p for p in json.loads(out.stdout)}
    assert listed["transport_file"] == {
        "name": "transport_file", "distribution": "mox-transport-file", "version": "1.0.0",
        "module": "mox_transport_file.plugin", "builtin": False,
        "hooks": ["mox_register_transports"], "kinds": ["transport:file"],
        "status": "ok", "error": None,
    }
    # Only core and this plugin are installed: none of the shipped plugins.
    assert "transport_smtp" not in listed

    outbox = tmp_path / "outbox"
    path = write_config(tmp_path / "cfg", f'[transports.archive]\nkind = "file"\ndirectory = "{outbox}"\n',
                        '[[routes]]\nto_domain = [".example.net"]\ntransport = "archive"\n')
    check = subprocess.run([str(mox), "--config", str(path), "config", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    bad = write_config(tmp_path / "bad", '[transports.archive]\nkind = "file"\ndirectory = 3\nextra = 1\n')
    check = subprocess.run([str(mox), "--config", str(bad), "config", "check"], capture_output=True, text=True)
    assert check.returncode == 1
    assert "transports.archive.directory: Input is not a valid path" in check.stderr
    assert "transports.archive.extra: unknown key" in check.stderr

    # The route selects the plugin's transport, which delivers.
    script = f"""
import asyncio
from mox_core.config.loader import load_config
from mox_core.plugins.host import PluginHost
from mox_core.outgoing.routing import route_matches, routes_for
from mox_core.plugins.kinds import OutgoingMessage, RouteContext
cfg = load_config({str(path)!r}, PluginHost.load())
ctx = RouteContext("example.org", "sub.example.net", 0)
[route] = [r for r in routes_for(cfg, "admin", "example.org") if route_matches(cfg, r, ctx)]
entry = cfg.transports[route.transport]
t = cfg.plugins.transports[entry.kind].factory(route.transport, entry.settings)
res = asyncio.run(t.deliver(OutgoingMessage("admin@example.org", ["x@sub.example.net"], b"Subject: hi\\r\\n\\r\\nbody\\r\\n"), None))
print(res[0].status.value)
"""
    r = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", script], capture_output=True, text=True)
    assert r.stdout.strip() == "delivered", r.stderr
    [f] = outbox.glob("*.eml")
    assert b"X-Envelope-To: x@sub.example.net" in f.read_bytes()
