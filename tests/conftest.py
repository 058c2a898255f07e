"""Helpers of the core tests.

The fixtures ``host``, ``bare_host`` and ``fake_dist`` come from mox-core's pytest plugin
(:mod:`mox_core.testing`), the peers (``dns_server``, ``smtp_sink``, ``postfix_smarthost``,
``mox_server_factory``, ...) from mox-testpeers' (:mod:`mox_testpeers.pytest_plugin`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import HOST_RULES, SCREENSHOTS, require_chromium

ROOT = Path(__file__).resolve().parent.parent


def program(name: str, package: str) -> str:
    """The path of the program ``name`` a test runs as a peer (swaks, curl, mail, ...). A
    missing one fails the test with the Debian package to install; it never skips, since
    scripts/install installs every one of them."""
    from mox_testpeers import MissingToolError, require_tool

    try:
        return require_tool(name, package)
    except MissingToolError as exc:
        pytest.fail(f"{exc}; scripts/install installs it", pytrace=False)


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
