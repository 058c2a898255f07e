"""A whole SMTP session of a real :class:`~mox_core.smtpserver.protocol.MoxSMTP` over an
in-memory transport, fed the client's bytes in chosen reads: for the property tests
(test_properties.py) and the atheris harness (fuzz_smtp.py)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mox_core.smtpserver.protocol import MoxSMTP


class Transport(asyncio.Transport):
    """Collects what the server writes; a socket that never blocks. As a socket transport:
    writes after close() are dropped, and connection_lost() follows on the next turn."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.protocol = None

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data) -> None:
        if not self.closed:
            self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self._lost)
        self.closed = True

    def _lost(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.connection_lost(None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Policy:
    """Accepts every message and keeps it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(envelope.content)
        return "250 2.0.0 ok"


async def settle(proto: MoxSMTP, task: asyncio.Task, quiet: int = 10) -> None:
    """Let the session work until it waits for input that is not there (``quiet`` turns of the
    loop without anything read or written)."""
    idle = 0
    while not task.done() and idle < quiet:
        before = (len(proto._reader._buffer), len(proto.transport.out) if proto.transport else -1)
        await asyncio.sleep(0)
        after = (len(proto._reader._buffer), len(proto.transport.out) if proto.transport else -1)
        idle = idle + 1 if before == after else 0


async def run_session(proto: MoxSMTP, chunks: list[bytes], quiet: int = 10) -> bytes:
    """Connect ``proto``, wait for its greeting (a client must, RFC 5321 §3.1), feed each
    chunk as one read and let the session settle after each; return what the server wrote."""
    transport = Transport()
    transport.protocol = proto
    proto.connection_made(transport)
    task = proto._handler_coroutine
    await settle(proto, task, quiet)
    for chunk in chunks:
        if transport.closed:
            break
        proto.data_received(chunk)
        await settle(proto, task, quiet)
    await asyncio.wait_for(settle(proto, task, quiet), 5)
    if proto.transport is not None:
        proto.connection_lost(None)
    try:
        await asyncio.wait_for(task, 5)
    except asyncio.CancelledError:
        pass
    return bytes(transport.out)
