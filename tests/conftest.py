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

ROOT = Path(__file__).resolve().parent.parent


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
