"""Fixtures of the core tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mox_core.plugins.host import PluginHost
from tests.browser import HOST_RULES, SCREENSHOTS, require_chromium

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


# --------------------------------------------------------------------------------------------
# A real browser: Debian's chromium driven by Playwright (sync API); see tests/browser.py


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless chromium for one test module (a session-wide sync Playwright would hold an
    event loop that breaks the asyncio tests after it); each test makes its own context."""
    executable = require_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need playwright: pip install -e '.[test]'", pytrace=False)
    home = tmp_path_factory.mktemp("chromium-home")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": f"{home}/.config", "XDG_CACHE_HOME": f"{home}/.cache"}
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True, env=env,
                               args=["--no-sandbox", f"--host-resolver-rules={HOST_RULES}"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def browser_context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    yield ctx
    ctx.close()


@pytest.fixture
def screenshot():
    """``screenshot(page, name)``: a full-page PNG in tests/artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str, full_page: bool = True) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path

    return shot
