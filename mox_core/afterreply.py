"""Work that can wait until the SMTP reply it belongs to has been written.

A client sending one message per connection waits for every reply before its next command, so
whatever runs between "the message is durable" and the write of the 250 is latency it sees.
A log line costs 70-130 us there (cold caches, bench/RESULTS.md), waking the queue's
scheduler a write to a worker's pipe; neither changes what the reply says. So the SMTP
session's task collects such work (:func:`collect`) and runs it right after its next reply is
written, before waiting for the client; a session that ends first runs what is left.

Outside a session (ctl commands, DSNs, tests) :func:`later` calls at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import structlog

log = structlog.get_logger(component="smtpserver")


class Pending(list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]):
    """The calls collected by one session's task (only that task adds to it: a task it
    started inherits the context variable, and must not leave work for a reply it never
    sends)."""

    def __init__(self, owner: asyncio.Task[Any] | None):
        super().__init__()
        self.owner = owner


_pending: ContextVar[Pending | None] = ContextVar("mox_after_reply", default=None)


def later(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
    """Call ``fn(*args, **kwargs)`` after the current SMTP session's next reply, or now."""
    pending = _pending.get()
    if pending is not None and pending.owner is not None and pending.owner is _current_task():
        pending.append((fn, args, kwargs))
    else:
        fn(*args, **kwargs)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # a thread without an event loop
        return None


def collect() -> Pending:
    """Collect :func:`later` calls of the current task in the returned list, for :func:`run`."""
    pending = Pending(_current_task())
    _pending.set(pending)
    return pending


def run(pending: Pending) -> None:
    """Call what was collected, in order; one failing call does not stop the others."""
    while pending:
        fn, args, kwargs = pending.pop(0)
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("after_reply_failed", call=getattr(fn, "__qualname__", repr(fn)))
