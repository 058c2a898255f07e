"""Helpers for tests of core and plugins: write a small valid config and load it."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mox_core.config.loader import load_config
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
