"""Child processes of ``mox serve`` (the SMTP workers, the web process): started with the
sockets they serve, each tells on its pipe when it is ready, dies with the main process, and
is stopped with SIGTERM (SIGKILL after a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

import structlog

from mox_core.errors import MoxError

__all__ = ["READY_TIMEOUT", "die_with_parent", "spawn_child", "stop_processes"]

log = structlog.get_logger(component="serve")

READY_TIMEOUT = 60.0


async def spawn_child(cmd: Sequence[str], pass_fds: Sequence[int], channel: asyncio.StreamReader,
                      what: str, *, child_ends: Sequence[socket.socket] = (),
                      started: Callable[[asyncio.subprocess.Process], None] | None = None,
                      ) -> asyncio.subprocess.Process:
    """Start ``cmd`` with ``pass_fds`` and wait until it writes ``ready`` on its pipe
    (``channel``, the main process's end); :class:`MoxError` naming ``what`` when it does not.

    ``child_ends`` (the child's ends of its pipes) are closed here as soon as the child has
    them, also when starting fails, so that its death ends the pipe at once; ``started`` is
    called then too, before the wait."""
    try:
        proc = await asyncio.create_subprocess_exec(*cmd, pass_fds=list(pass_fds), stdin=subprocess.DEVNULL)
    finally:
        for sock in child_ends:
            sock.close()
    if started is not None:
        started(proc)
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            line = await channel.readline()
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        code = await proc.wait()
        raise MoxError(f"{what} did not start (exit status {code}); see its log above")
    return proc


async def stop_processes(procs: Sequence[asyncio.subprocess.Process], timeout: float = 10.0) -> None:
    """SIGTERM every process still running (they finish what they are doing), then wait;
    SIGKILL for one that takes longer than ``timeout``."""
    running = [p for p in procs if p.returncode is None]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    for p in running:
        try:
            async with asyncio.timeout(timeout):
                await p.wait()
        except TimeoutError:
            log.error("child_process_kill", pid=p.pid)
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the main process dies (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # died before the prctl
        os._exit(1)
