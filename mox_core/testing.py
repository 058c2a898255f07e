"""pytest plugin of mox-core (entry point ``pytest11: mox``) for the tests of mox and of its plugins.

Helpers, imported by tests (``from mox_core.testing import load``):

``write_config(directory, static="", domains="")``
    Writes ``mox.toml`` and ``domains.toml``: the minimal valid config (``MINIMAL_STATIC``,
    ``MINIMAL_DOMAINS``) followed by the given TOML tables; returns the ``mox.toml`` path.
``load(directory, static="", domains="", host=None)``
    The same, then loads it with *host* (default: every installed plugin): a ``Config``.
``listed_plugin(name)``
    The entry of an installed plugin in ``mox plugins list --json``, run as a user would.

Fixtures:

``host``
    :class:`~mox_core.plugins.host.PluginHost` with the built-ins and every installed plugin.
``bare_host``
    Only the core's built-ins; ``bare_host.register(module, "name")`` adds a plugin module
    for this test without installing it.
``fake_dist``
    ``fake_dist(name, entry_points={"ep": "module"}, modules={"module": "source"})`` makes a
    distribution with ``mox.plugins`` entry points visible to ``importlib.metadata`` through
    ``PYTHONPATH`` (no pip needed); returns the directory to put on a subprocess's
    ``PYTHONPATH``.

The fixtures that start real peers (DNS server, smtp-sink, Postfix, SOCKS5 proxies,
``mox serve``) are not part of mox-core: they are the pytest plugin of the separate
distribution mox-testpeers (``testing/mox-testpeers/`` in the repository).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mox_core.config.resolved import Config
    from mox_core.plugins.host import PluginHost

MINIMAL_STATIC = """\
hostname = "mail.example.org"
data_dir = "data"

[postmaster]
account = "admin"
"""

MINIMAL_DOMAINS = """\
[domains."example.org"]

[accounts.admin]
domain = "example.org"

[accounts.admin.destinations."admin@example.org"]
"""


def write_config(directory: Path, static: str = "", domains: str = "", *, base: bool = True) -> Path:
    """Write mox.toml and domains.toml into ``directory``; returns the mox.toml path.

    With ``base`` the minimal valid config comes first and ``static``/``domains`` are appended
    (TOML tables only, since top-level keys must come before the first table).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mox.toml"
    s, d = textwrap.dedent(static), textwrap.dedent(domains)
    path.write_text((MINIMAL_STATIC + "\n" + s) if base else s)
    (directory / "domains.toml").write_text((MINIMAL_DOMAINS + "\n" + d) if base else d)
    return path


def load(directory: Path, static: str = "", domains: str = "", *, host: PluginHost | None = None,
         base: bool = True) -> Config:
    """Write a config and load it with ``host`` (default: all installed plugins)."""
    from mox_core.config.loader import load_config
    from mox_core.plugins.host import PluginHost

    path = write_config(directory, static, domains, base=base)
    return load_config(path, host or PluginHost.load())


def listed_plugin(name: str) -> dict:
    """The entry of plugin ``name`` in ``mox plugins list --json``, run as a user would."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mox_core", "plugins", "list", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return {p["name"]: p for p in json.loads(out)}[name]


@pytest.fixture
def host() -> PluginHost:
    """Built-ins plus installed plugins."""
    from mox_core.plugins.host import PluginHost

    return PluginHost.load()


@pytest.fixture
def bare_host() -> PluginHost:
    """Only core's built-ins: no entry points."""
    from mox_core.plugins.host import PluginHost

    return PluginHost.load(autoload=False)


@pytest.fixture
def fake_dist(tmp_path):
    """Make a distribution visible to importlib.metadata through PYTHONPATH (no pip needed).

    ``fake_dist(name, entry_points={"ep": "module"}, modules={"module": "source"})`` returns
    the directory to put on PYTHONPATH for a subprocess.
    """
    site = tmp_path / "site"
    site.mkdir()

    def make(name: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "1.0") -> Path:
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[mox.plugins]\n{eps}\n")
        for mod, src in modules.items():
            (site / f"{mod}.py").write_text(textwrap.dedent(src))
        return site

    return make
