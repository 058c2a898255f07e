"""The JSON log lines of ``mox serve`` (``mox_core.logging``): fields, levels, tracebacks."""

from __future__ import annotations

import io
import json
import re
import time
from datetime import datetime

import pytest
import structlog

from mox_core import logging as moxlog


@pytest.fixture
def lines():
    """Log as ``mox serve`` does, into a buffer; returns a function giving the parsed lines.
    structlog's configuration and mox's levels are global: both are put back afterwards."""
    saved = structlog.get_config()
    saved_levels = dict(moxlog._state)
    buf = io.StringIO()
    moxlog.configure(json=True, stream=buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    structlog.configure(**saved)
    moxlog._state.clear()
    moxlog._state.update(saved_levels)
    structlog.contextvars.clear_contextvars()


def test_line_has_event_level_component_and_utc_timestamp(lines):
    structlog.get_logger(component="smtpserver").info("message_accepted", size=2048, mail_from="a@b.test")
    [line] = lines()
    assert {k: line[k] for k in ("event", "level", "component", "size", "mail_from")} == {
        "event": "message_accepted", "level": "info", "component": "smtpserver", "size": 2048,
        "mail_from": "a@b.test"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", line["timestamp"])
    stamped = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
    assert abs(stamped - time.time()) < 5


def test_levels_filter_per_component(lines):
    moxlog.set_levels("info", {"queue": "debug"})
    structlog.get_logger(component="smtpserver").debug("dropped")
    structlog.get_logger(component="queue.delivery").debug("kept")
    structlog.get_logger(component="smtpserver").warning("warned")
    assert [(line["event"], line["level"]) for line in lines()] == [("kept", "debug"), ("warned", "warn")]


def test_context_bound_in_the_process_is_in_every_line(lines):
    structlog.contextvars.bind_contextvars(worker=1)
    structlog.get_logger(component="smtpserver").info("one")
    assert lines()[0]["worker"] == 1


def test_traceback_without_local_variables(lines):
    def check(password: str) -> None:
        raise ValueError("bad login")

    try:
        check("hunter2-secret")
    except ValueError:
        structlog.get_logger(component="sasl").exception("auth_crashed")
    [line] = lines()
    assert line["level"] == "error"
    [exc] = line["exception"]
    assert exc["exc_type"] == "ValueError" and exc["exc_value"] == "bad login"
    assert [f["name"] for f in exc["frames"]][-1] == "check"
    assert "hunter2-secret" not in json.dumps(line)
