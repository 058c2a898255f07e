"""Fixtures of the fault tests: the security suite's site (mox, DNS, smtp-sink as every remote
MX; see tests/security/conftest.py) started per test, since fault tests change or kill it."""

from __future__ import annotations

import pytest

from tests.security.conftest import make_site, stop_all


@pytest.fixture
def own_site(tmp_path):
    """``own_site(static_extra="", sink_options=None, ...)``: a fresh site for this test."""
    started: list = []

    def make(**kw):
        s, peers = make_site(tmp_path / f"mox{len(started)}", **kw)
        started.extend(peers)
        return s

    yield make
    stop_all(started)
