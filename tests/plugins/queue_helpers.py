"""Shared helpers of the queue tests: a plugin host with scripted transports, a config, mail."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.plugins.host import PluginHost
from mox_core.queue import FakeClock, Queue
from mox_core.testing import load
from tests.plugins import queue_scripted

STATIC = """\
[queue]
concurrency = 10

[transports.relay]
kind = "queue_scripted"
label = "relay"

[transports.backup]
kind = "queue_scripted"
"""

DOMAINS = """\
[accounts.alice]
domain = "example.org"

[accounts.alice.destinations."alice@example.org"]
"""

MSG = (b"From: alice@example.org\r\nTo: bob@remote.example\r\nSubject: hello there\r\n"
       b"Message-ID: <m1@example.org>\r\n\r\nbody line\r\n")


def make_host() -> PluginHost:
    host = PluginHost.load(autoload=False)
    host.register(queue_scripted, "queue_scripted")
    return host


def make_config(directory: Path, static: str = "", domains: str = "") -> Config:
    return load(directory, STATIC + static, DOMAINS + domains, host=make_host())


@asynccontextmanager
async def running(config: Config | ConfigHolder, clock: FakeClock | None = None,
                  **kw: Any) -> AsyncIterator[Queue]:
    q = Queue(config, clock=clock or FakeClock(), **kw)
    queue_scripted.SCRIPT.clock = q.clock
    await q.start()
    try:
        yield q
    finally:
        await q.close()


def count_picks(q: Queue) -> list[int]:
    """Count the scheduler's passes over the database (its calls of ``pick_and_next_due``)
    from now on: the one-element list it returns holds the count."""
    passes = [0]
    pick = q.store.pick_and_next_due

    async def counting_pick(*args, **kw):
        passes[0] += 1
        return await pick(*args, **kw)

    q.store.pick_and_next_due = counting_pick
    return passes


async def scheduler_waiting(q: Queue, timeout: float = 10.0) -> None:
    """Until the scheduler's loop waits for a wake-up with none pending (its pass after the
    last kick is over) and every delivery it launched has reached the scripted transport.
    Whatever that pass was going to start has started then: the positive event a check
    that nothing more started waits for (not a fixed sleep)."""
    s = q.scheduler
    waiters = q.clock._waiters  # FakeClock: the scheduler's wake event while it waits

    def waiting() -> bool:
        return (not s._wake.is_set() and any(ev is s._wake for _, ev in waiters)
                and len(s._inflight) == queue_scripted.SCRIPT.active)

    async with asyncio.timeout(timeout):
        while not waiting():
            await asyncio.sleep(0.002)


def maildir_new(config: Config, account: str, mailbox: str = "") -> list[Path]:
    base = config.data_dir / "accounts" / account / "Maildir"
    if mailbox:
        base = base / ("." + mailbox.replace("/", "."))
    d = base / "new"
    return sorted(d.iterdir()) if d.exists() else []


def read_mail(path: Path) -> email.message.EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def queue_files(config: Config) -> list[str]:
    root = config.data_dir / "queue" / "msg"
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


# Fixtures shared by the queue tests; a test module takes them with
# ``from tests.plugins.queue_helpers import cfg, reset_script`` (with a noqa comment for F401).


@pytest.fixture(autouse=True)
def reset_script():
    """The scripted transport starts and ends every test with no script."""
    queue_scripted.SCRIPT.reset()
    yield
    queue_scripted.SCRIPT.reset()


@pytest.fixture
def cfg(tmp_path):
    """A queue config in ``tmp_path`` with the scripted transport (see :func:`make_config`)."""
    return make_config(tmp_path)
