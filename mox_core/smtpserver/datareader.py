"""DATA: the command, and the reader that takes the message off the socket.

Mixed into :class:`mox_core.smtpserver.protocol.MoxSMTP` (whose ``__init__`` sets the state
these methods use). The message is read in big pieces (``readuntil(CRLF.CRLF)``, at most
``READER_LIMIT`` bytes buffered) instead of line by line as aiosmtpd does, then dot-unstuffed
in one pass (RFC 5321 §4.5.2). Only CRLF.CRLF ends the data. A bare CR or LF anywhere in it
(which covers every SMTP smuggling form: ``\\n.\\n``, ``\\r\\n.\\n``, ``\\r.\\r``, ...) or a NUL
rejects the message, answered after the real end, so one message is never taken for two.

This is on every message's path: bench/RESULTS.md has the measurements behind its shape (the
CRLF-only check in one pass, dots counted only past the size limit, ``rfind`` before
unstuffing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

import structlog
from aiosmtpd.smtp import MISSING, syntax

from mox_core.smtp import codes
from mox_core.smtp.lines import only_crlf

if TYPE_CHECKING:
    from aiosmtpd.smtp import Envelope, Session

__all__ = ["TERMINATOR", "DataCommand"]

log = structlog.get_logger(component="smtpserver")

TERMINATOR = b"\r\n.\r\n"


class _DataCollector:
    """Collects raw DATA pieces; stops storing once the message is certainly too big.

    The unstuffed message is ``size - dots - 3`` bytes, ``dots`` counting CRLF "." in CRLF +
    data (the terminator's dot among them). Below the limit in received bytes nothing needs
    counting; past it, the dots are counted (from then on piece by piece), and when even
    ``size - dots - 2`` exceeds the limit the message is too big and storing stops.
    """

    __slots__ = ("counting", "dots", "limit", "pieces", "size", "tail", "too_big")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit or 0
        self.pieces: list[bytes] = []
        self.size = 0
        self.counting = False  # dots counted so far (only once size passed the limit)
        self.dots = 0
        self.tail = b"\r\n"  # last two bytes of CRLF + data
        self.too_big = False

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if not self.too_big:
            if self.counting:
                self.dots += piece.count(b"\r\n.") + (self.tail + piece[:2]).count(b"\r\n.")
            self.pieces.append(piece)
            if self.limit and self.size - 2 > self.limit:
                if not self.counting:
                    self.counting = True
                    self.dots = (b"\r\n" + b"".join(self.pieces)).count(b"\r\n.")
                if self.size - self.dots - 2 > self.limit:
                    self.too_big = True
                    self.pieces = []
        self.tail = (self.tail + piece[-2:])[-2:]


class DataCommand:
    """``smtp_DATA`` and the reader behind it (``_read_data``, ``_finish_data``)."""

    # Set by MoxSMTP.__init__ and aiosmtpd's connection_made; listed for the reader.
    session: Session
    envelope: Envelope
    loop: asyncio.AbstractEventLoop
    data_size_limit: int | None
    _reader: asyncio.StreamReader
    _in_data: bool
    _data_deadline: float
    _data_timeout: float
    _timeout_duration: float
    _improper_pipelining: Callable[[str], Awaitable[NoReturn]]

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if self._reader._buffer:  # type: ignore[attr-defined]
            # RFC 2920 §3.1: DATA ends a group; the client waits for 354 before the message
            await self._improper_pipelining("DATA")
        if not self.session.host_name:
            await self.push(codes.HELO_FIRST)
            return
        if not self.envelope.rcpt_tos:
            await self.push(codes.NEED_RCPT)
            return
        if arg:
            await self.push(codes.DATA_SYNTAX)
            return
        await self.push(codes.START_DATA)
        self._in_data = True
        self._data_deadline = self.loop.time() + self._data_timeout
        self._reset_timeout(min(self._timeout_duration, self._data_timeout))
        try:
            result = await self._read_data()
        finally:
            self._in_data = False
        try:
            if isinstance(result, str):
                log.info("smtp_data_rejected", peer=self._peer_ip(), reply=result)
                await self.push(result)
                return
            self.envelope.content = self.envelope.original_content = result
            self._reset_timeout()
            status = await self._call_handler_hook("DATA")
            await self.push(codes.DEFAULT_OK if status is MISSING else status)
        finally:
            self._set_post_data_state()

    async def _read_data(self) -> bytes | str:
        """Read message data up to CRLF.CRLF; return the unstuffed message or an error reply.

        Bytes after the terminator stay in the reader for the next command (pipelining).
        """
        reader = self._reader
        collector = _DataCollector(self.data_size_limit)
        # The CRLF ending the DATA line can be the start of the terminator (an empty message
        # is just ".\r\n"), and readuntil() cannot see bytes already consumed. So while the
        # stream so far ends in a prefix of CRLF.CRLF, read single bytes; after that no
        # terminator can straddle what was read and what readuntil() scans.
        recent = b"\r\n"
        while not recent.endswith(TERMINATOR):
            if not recent.endswith((b"\r", b"\r\n", b"\r\n.")):
                break
            byte = await reader.readexactly(1)
            collector.add(byte)
            recent = (recent + byte)[-5:]
        else:
            return self._finish_data(collector)
        while True:
            try:
                piece = await reader.readuntil(TERMINATOR)
            except asyncio.LimitOverrunError as exc:
                # No terminator in the buffered bytes: take all but the last 4 (they may start
                # it) and keep going. Over the size limit the collector discards them.
                collector.add(await reader.readexactly(exc.consumed))
                continue
            collector.add(piece)
            return self._finish_data(collector)

    def _finish_data(self, collector: _DataCollector) -> bytes | str:
        if collector.too_big:
            return codes.MESSAGE_TOO_BIG
        pieces = collector.pieces
        if len(pieces[-1]) >= 3:
            pieces[-1] = pieces[-1][:-3]  # drop ".\r\n"; its CRLF ends the last line
            raw = b"".join(pieces)
        else:
            raw = b"".join(pieces)[:-3]
        if not only_crlf(raw):
            return codes.BAD_LINE_ENDING_IN_DATA
        if b"\x00" in raw:
            return codes.NUL_IN_DATA
        content = raw
        if content.rfind(b"\r\n.") >= 0:  # a stuffed line (rfind: twice as fast as find here)
            content = content.replace(b"\r\n.", b"\r\n")
        if content[:1] == b".":
            content = content[1:]
        if self.data_size_limit and len(content) > self.data_size_limit:
            return codes.MESSAGE_TOO_BIG
        return content
