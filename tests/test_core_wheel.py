"""What ``pip install .`` of mox-core installs: the server, not the test peers.

The peers (Postfix, smtp-sink, SOCKS5, DNS and ``mox serve`` drivers, their shell scripts and
fixtures) are the separate distribution mox-testpeers (``testing/mox-testpeers/``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_core_wheel_holds_no_test_peer(tmp_path):
    # build from a copy, so that the build's egg-info and build/ do not touch the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "results"))
    out = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    [wheel] = out.glob("mox_core-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mox_core/__init__.py" in names and "mox_core/testing.py" in names
    assert [n for n in names if "testpeers" in n or n.endswith(".sh")] == []
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mox = mox_core.testing" in text and "mox_testpeers" not in text


def test_core_pytest_plugin_does_not_import_the_peers():
    code = ("import sys, mox_core.testing; "
            "print(sorted(m for m in sys.modules if m.startswith('mox_testpeers')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.strip() == "[]"
