"""The browser of the web pages' tests: Debian's chromium, driven by Playwright's sync API
(the fixtures ``browser``, ``browser_context`` and ``screenshot`` in tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/lib/chromium/chromium"  # the binary; /usr/bin/chromium is a shell wrapper
# Every host name but localhost goes to an unused loopback address: no DNS query ever leaves
# the machine (not "~NOTFOUND": Chromium's error pages then probe DNS on the internet).
HOST_RULES = "MAP * 127.0.0.99, EXCLUDE localhost, EXCLUDE 127.0.0.1"
SCREENSHOTS = Path(__file__).resolve().parent / "artifacts" / "screenshots"


def require_chromium(path: str = CHROMIUM) -> str:
    """``path`` if it is an executable, else fail the test (never skip) with what to install."""
    if not os.access(path, os.X_OK):
        pytest.fail(f"the browser tests need Debian's chromium at {path}: apt-get install chromium "
                    "(scripts/install does)", pytrace=False)
    return path
