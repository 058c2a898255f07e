"""Fixtures of the core tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mox_core.plugins.host import PluginHost

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def host() -> PluginHost:
    """Built-ins plus installed plugins (all five shipped ones in this repo's venv)."""
    return PluginHost.load()


@pytest.fixture
def bare_host() -> PluginHost:
    """Only core's built-ins: no entry points."""
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


def run_mox(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``mox`` command of this venv as a user would."""
    e = dict(os.environ)
    e.pop("MOX_CONFIG", None)
    if pythonpath is not None:
        e["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{e.get('PYTHONPATH', '')}"
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mox_core", *args], capture_output=True, text=True, env=e,
        cwd=cwd, timeout=60,
    )
