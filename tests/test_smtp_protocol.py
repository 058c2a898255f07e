"""MoxSMTP over real sockets on 127.0.0.1: raw bytes, smtplib, swaks, TLS, AUTH, smuggling.

The server runs in its own event loop in a thread so that blocking clients (sockets, smtplib,
swaks) can talk to it from the test.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import random
import select
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as StockSMTP
from scramp import ScramClient

from mox_core import afterreply
from mox_core.accounts.passwords import StoredCredentials, make_credentials
from mox_core.accounts.sasl import AuthFailureLimiter
from mox_core.smtp import codes
from mox_core.smtpserver import datareader, protocol
from mox_core.smtpserver.protocol import MoxSMTP
from tests.conftest import program

USER, PASSWORD = "alice@example.org", "s3cret-pw"


# ---- fixtures and helpers ---------------------------------------------------------------------


@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    auth: Any


class Recorder:
    """Policy stand-in: accepts everything and records what handle_DATA saw."""

    def __init__(self) -> None:
        self.messages: list[Delivered] = []
        self.fail_next = False

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("disk on fire")
        assert isinstance(envelope.content, bytes) and envelope.content == envelope.original_content
        self.messages.append(Delivered(envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                                       session.auth_data if session.authenticated else None))
        return "250 2.0.0 delivered"


class Store:
    def __init__(self, users: dict[str, StoredCredentials]) -> None:
        self.users = users
        self.lookups = 0

    def lookup(self, username: str) -> StoredCredentials | None:
        self.lookups += 1
        return self.users.get(username)


class ServerThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.AbstractServer] = []

    def start(self, handler: Any, cls: type = MoxSMTP, **kwargs: Any) -> int:
        async def make() -> asyncio.AbstractServer:
            loop = asyncio.get_running_loop()
            return await loop.create_server(lambda: cls(handler, **kwargs), "127.0.0.1", 0)

        server = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        while _OPEN_CLIENTS:
            _OPEN_CLIENTS.pop().close()

        async def close() -> None:
            for s in self.servers:
                s.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


_OPEN_CLIENTS: list[Raw] = []


class Raw:
    """A raw SMTP client: send exact bytes, read whole replies."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        _OPEN_CLIENTS.append(self)
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> str:
        lines = []
        while True:
            line = self.line().decode()
            assert line.endswith("\r\n"), line
            lines.append(line[:-2])
            if line[3:4] == " ":
                return "\n".join(lines)

    def cmd(self, data: bytes | str) -> str:
        self.send(data.encode() + b"\r\n" if isinstance(data, str) else data)
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def nothing_arrives(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return True
        self.buf += data
        return False

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b""
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    st = ServerThread()
    yield st
    st.stop()


@pytest.fixture(scope="module")
def credentials() -> StoredCredentials:
    return make_credentials(PASSWORD)


@pytest.fixture
def store(credentials: StoredCredentials) -> Store:
    return Store({USER: credentials})


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


@pytest.fixture
def server_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


@pytest.fixture
def client_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[0]))


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF message for DATA (RFC 5321 §4.5.2) and add the terminator."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def make_body(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    lines = [b"Subject: test", b"", b".leading dot", b"..two dots", b".", b"...", b" . "]
    total = sum(len(x) + 2 for x in lines)
    while total < size:
        n = rnd.randrange(0, 120)
        line = bytes(rnd.choice(b"abcdefghij .,-:;") for _ in range(n))
        if rnd.random() < 0.1:
            line = b"." + line
        lines.append(line)
        total += n + 2
    return b"\r\n".join(lines) + b"\r\n"


def start_transaction(c: Raw, rcpt: str = "u@local.test") -> None:
    assert c.reply().startswith("220 ")
    assert c.cmd("EHLO client.test").startswith("250-")
    assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"
    assert c.cmd(f"RCPT TO:<{rcpt}>") == "250 OK"
    assert c.cmd("DATA").startswith("354 ")


# ---- delivery, DATA framing -------------------------------------------------------------------


@pytest.mark.parametrize("size", [2 * 1024, 300 * 1024])
def test_delivery_is_byte_exact_with_dot_unstuffing(server: ServerThread, size: int) -> None:
    rec = Recorder()
    port = server.start(rec, hostname="mx.test")
    body = make_body(size, size)
    c = Raw(port)
    start_transaction(c)
    assert c.cmd(stuff(body)) == "250 2.0.0 delivered"
    assert c.cmd("QUIT") == "221 Bye"
    assert len(rec.messages) == 1
    assert rec.messages[0].content == body
    assert rec.messages[0].mail_from == "a@ext.test" and rec.messages[0].rcpt_tos == ["u@local.test"]


@pytest.mark.parametrize("size", [2 * 1024, 300 * 1024])
def test_delivery_via_smtplib(server: ServerThread, size: int) -> None:
    rec = Recorder()
    port = server.start(rec, hostname="mx.test")
    body = make_body(size, size + 1)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@ext.test", ["u@local.test", "v@local.test"], body)
    assert [m.content for m in rec.messages] == [body]
    assert rec.messages[0].rcpt_tos == ["u@local.test", "v@local.test"]


@pytest.mark.parametrize("body", [b"", b"\r\n", b".\r\n", b"..\r\n", b"x\r\n", b".x\r\n.\r\n", b"\r\n\r\n.\r\n"])
def test_short_and_dotty_messages(server: ServerThread, body: bytes) -> None:
    rec = Recorder()
    c = Raw(server.start(rec))
    start_transaction(c)
    assert c.cmd(stuff(body) if body else b".\r\n") == "250 2.0.0 delivered"
    assert [m.content for m in rec.messages] == [body]


def test_pipelined_commands_after_terminator_are_kept(server: ServerThread) -> None:
    rec = Recorder()
    c = Raw(server.start(rec))
    assert c.reply().startswith("220")
    ehlo = c.cmd("EHLO client.test")
    assert "250-PIPELINING" in ehlo.split("\n")
    c.send(b"MAIL FROM:<a@ext.test>\r\nRCPT TO:<u@l.test>\r\nRCPT TO:<v@l.test>\r\nDATA\r\n")
    assert [c.reply() for _ in range(4)] == ["250 OK", "250 OK", "250 OK",
                                             "354 End data with <CR><LF>.<CR><LF>"]
    c.send(b"first\r\n.\r\nMAIL FROM:<b@ext.test>\r\nRCPT TO:<w@l.test>\r\nDATA\r\n")
    assert [c.reply() for _ in range(4)] == [
        "250 2.0.0 delivered", "250 OK", "250 OK", "354 End data with <CR><LF>.<CR><LF>"]
    # DATA ends a group (RFC 2920 §3.1): the message follows its 354 (else 554, see
    # tests/test_smtp_conformance.py), and what follows the final dot is kept
    c.send(b"second\r\n.\r\nNOOP\r\n")
    assert [c.reply() for _ in range(2)] == ["250 2.0.0 delivered", "250 OK"]
    assert [(m.mail_from, m.rcpt_tos, m.content) for m in rec.messages] == [
        ("a@ext.test", ["u@l.test", "v@l.test"], b"first\r\n"),
        ("b@ext.test", ["w@l.test"], b"second\r\n")]


SMUGGLE_EODS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r.\n", b"\n.\r",
                b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"]


@pytest.mark.parametrize("eod", SMUGGLE_EODS, ids=repr)
def test_smuggling_is_rejected_as_one_message(server: ServerThread, eod: bytes) -> None:
    rec = Recorder()
    c = Raw(server.start(rec))
    start_transaction(c)
    frame = (b"Subject: t\r\n\r\nbody" + eod
             + b"MAIL FROM:<admin@local.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n\r\nsmuggled\r\n"
             + b"\r\n.\r\n")
    c.send(frame)
    assert c.reply() == codes.BAD_LINE_ENDING_IN_DATA
    # Exactly one reply: the next one is NOOP's, not one for a smuggled command.
    assert c.cmd("NOOP") == "250 OK"
    assert rec.messages == []
    # The connection is still usable for a proper message.
    assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"
    assert c.cmd("RCPT TO:<u@local.test>") == "250 OK"
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(b"clean\r\n.\r\n") == "250 2.0.0 delivered"
    assert [m.content for m in rec.messages] == [b"clean\r\n"]


@pytest.mark.parametrize("frame,reply", [
    (b"a\rb\r\n.\r\n", codes.BAD_LINE_ENDING_IN_DATA),
    (b"a\nb\r\n.\r\n", codes.BAD_LINE_ENDING_IN_DATA),
    (b"x\r\n\x00.\r\nMAIL FROM:<e@x>\r\n.\r\n", codes.NUL_IN_DATA),
    (b"x\r\n.\x00\r\nMAIL FROM:<e@x>\r\n.\r\n", codes.NUL_IN_DATA),
], ids=repr)
def test_bare_cr_lf_and_nul_anywhere(server: ServerThread, frame: bytes, reply: str) -> None:
    rec = Recorder()
    c = Raw(server.start(rec))
    start_transaction(c)
    assert c.cmd(frame) == reply
    assert c.cmd("NOOP") == "250 OK"
    assert rec.messages == []


def test_terminator_split_across_one_byte_writes(server: ServerThread) -> None:
    rec = Recorder()
    c = Raw(server.start(rec))
    bodies = [b"", b"\r\n", b"line one\r\n.dot\r\nend\r\n"]
    assert c.reply().startswith("220")
    assert c.cmd("EHLO client.test").startswith("250")
    for body in bodies:
        assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"
        assert c.cmd("RCPT TO:<u@local.test>") == "250 OK"
        assert c.cmd("DATA").startswith("354")
        for byte in stuff(body) if body else b".\r\n":
            c.send(bytes([byte]))
            time.sleep(0.002)
        assert c.reply() == "250 2.0.0 delivered"
    assert [m.content for m in rec.messages] == bodies


async def test_read_data_at_every_split_point() -> None:
    """Feed _read_data through a StreamReader in two or three pieces at every position, with a
    tiny reader limit so the LimitOverrunError path runs too; leftover bytes must remain."""
    cases = [(b".\r\n", b""), (b"\r\n.\r\n", b"\r\n"), (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
             (b"..\r\n\r\n.\r\n", b".\r\n\r\n"), (b"x" * 40 + b"\r\n.\r\n", b"x" * 40 + b"\r\n"),
             (b"a\r\n.\r\r\n.\r\n", None), (b"a\n.\r\nb\r\n.\r\n", None)]
    tail = b"NOOP\r\n"
    proto = MoxSMTP(Recorder(), hostname="mx.test", max_message_size=None)
    for limit in (8, 65536):
        for wire, expected in cases:
            data = wire + tail
            splits = [(i,) for i in range(1, len(data))]
            if len(data) < 20:
                splits += [(i, j) for i in range(1, len(data)) for j in range(i + 1, len(data))]
            for cut in splits:
                reader = asyncio.StreamReader(limit=limit)
                proto._reader = reader
                bounds = [0, *cut, len(data)]
                task = asyncio.ensure_future(proto._read_data())
                for a, b in zip(bounds, bounds[1:], strict=False):
                    await asyncio.sleep(0)
                    reader.feed_data(data[a:b])
                result = await asyncio.wait_for(task, 2)
                if expected is None:
                    assert result == codes.BAD_LINE_ENDING_IN_DATA, (wire, cut)
                else:
                    assert result == expected, (wire, cut, limit)
                assert await reader.readexactly(len(tail)) == tail, (wire, cut)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_size_limit_counts_stuffed_dots_only_past_the_limit(chunk: int) -> None:
    """The collector counts stuffed dots once the received bytes pass the limit (from then on
    piece by piece): a message within the limit after unstuffing is never cut short, one far
    over it stops being stored (memory stays bounded)."""
    body = b".2345678\r\n" * 300 + b"plain\r\n" * 100  # 3,700 bytes; 300 stuffed dots
    wire = stuff(body)  # with the terminator
    assert len(wire) == len(body) + 300 + 3
    for limit, too_big in ((len(body), False), (len(body) - 1, None), (len(body) // 3, True)):
        collector = datareader._DataCollector(limit)
        for i in range(0, len(wire), chunk):
            collector.add(wire[i:i + chunk])
        if too_big is not None:
            assert collector.too_big is too_big, limit
        if collector.too_big:
            assert collector.pieces == []
        else:
            assert b"".join(collector.pieces) == wire
            assert collector.dots in (0, 301)  # counted exactly, if at all (the terminator's too)


def test_message_size_limit(server: ServerThread) -> None:
    rec = Recorder()
    c = Raw(server.start(rec, max_message_size=10_000))
    assert c.reply().startswith("220")
    assert "250-SIZE 10000" in c.cmd("EHLO client.test").split("\n")
    assert c.cmd("MAIL FROM:<a@ext.test> SIZE=10001") == codes.SIZE_TOO_BIG
    assert c.cmd("MAIL FROM:<a@ext.test> SIZE=10000") == "250 OK"
    assert c.cmd("RCPT TO:<u@local.test>") == "250 OK"
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(stuff(b"x" * 9999 + b"\r\n")) == codes.MESSAGE_TOO_BIG  # 10001 bytes
    for big in (200_000, 3_000_000):  # over the limit by far: read to the end, then 552
        assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"
        assert c.cmd("RCPT TO:<u@local.test>") == "250 OK"
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(stuff((b"y" * 78 + b"\r\n") * (big // 80))) == codes.MESSAGE_TOO_BIG
    assert rec.messages == []
    # Exactly at the limit after unstuffing, 11000 bytes on the wire with the stuffed dots.
    body = b".2345678\r\n" * 1000
    assert len(body) == 10_000
    assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"
    assert c.cmd("RCPT TO:<u@local.test>") == "250 OK"
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(stuff(body)) == "250 2.0.0 delivered"
    assert [m.content for m in rec.messages] == [body]


@pytest.mark.parametrize("value", ["abc", "-1", "", "1 SIZE=2"])
def test_malformed_or_duplicate_size(server: ServerThread, value: str) -> None:
    c = Raw(server.start(Recorder()))
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    r = c.cmd(f"MAIL FROM:<a@ext.test> SIZE={value}")
    assert r.startswith("501 "), r
    assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"


def test_1001_recipients(server: ServerThread) -> None:
    rec = Recorder()
    c = Raw(server.start(rec))
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"
    c.send(b"".join(b"RCPT TO:<u%d@local.test>\r\n" % i for i in range(1001)))
    replies = [c.reply() for _ in range(1001)]
    assert replies[:1000] == ["250 OK"] * 1000
    assert replies[1000] == codes.TOO_MANY_RECIPIENTS
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(b"hi\r\n.\r\n") == "250 2.0.0 delivered"
    assert rec.messages[0].rcpt_tos == [f"u{i}@local.test" for i in range(1000)]


def test_recipient_limit_is_configurable(server: ServerThread) -> None:
    c = Raw(server.start(Recorder(), max_recipients=2))
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@ext.test>")
    assert [c.cmd(f"RCPT TO:<u{i}@l.test>") for i in range(3)] == ["250 OK", "250 OK", codes.TOO_MANY_RECIPIENTS]


# ---- command line limits, junk, timeouts ------------------------------------------------------


def test_long_command_lines(server: ServerThread) -> None:
    c = Raw(server.start(Recorder()))
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<" + "a" * 600 + "@x.test>") == codes.LINE_TOO_LONG
    assert c.cmd(b"NOOP " + b"x" * 4096 + b"\r\n") == codes.LINE_TOO_LONG
    assert c.cmd("NOOP " + "x" * 400) == "250 OK"
    assert c.cmd("RSET") == "250 OK"
    # 100 KiB without a line end (over the 64 KiB buffer): answered and closed.
    c.send(b"A" * (100 * 1024))
    assert c.reply() == codes.LINE_TOO_LONG
    assert c.closed()


def test_megabyte_without_line_end_is_cut_off(server: ServerThread) -> None:
    c = Raw(server.start(Recorder()))
    assert c.reply().startswith("220")
    try:
        c.send(b"A" * (1024 * 1024))  # the server closes long before it could buffer this
        reply = c.reply()
    except (BrokenPipeError, ConnectionResetError):
        reply = "reset"
    assert reply in (codes.LINE_TOO_LONG, "reset")
    assert c.closed()


@pytest.mark.parametrize("line,reply", [
    (b"EHLO evil.test\rBcc: victim@ext.test\r\n", codes.COMMAND_CONTROL_CHARS),
    (b"MAIL FROM:<a@x\rX: y>\r\n", codes.COMMAND_CONTROL_CHARS),
    (b"RCPT TO:<a\x00b@local.test>\r\n", codes.COMMAND_CONTROL_CHARS),
    (b"MAIL FROM:<\xff\xfe@x.test>\r\n", codes.BAD_UTF8),
])
def test_control_characters_and_bad_utf8(server: ServerThread, line: bytes, reply: str) -> None:
    c = Raw(server.start(Recorder()))
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    assert c.cmd(line) == reply
    assert c.cmd("NOOP") == "250 OK"


def test_idle_timeout_sends_421_and_closes(server: ServerThread) -> None:
    c = Raw(server.start(Recorder(), idle_timeout=0.5))
    assert c.reply().startswith("220")
    assert c.cmd("EHLO client.test").startswith("250")
    t0 = time.monotonic()
    assert c.reply() == codes.IDLE_TIMEOUT
    assert 0.3 < time.monotonic() - t0 < 3
    assert c.closed()


def test_idle_timeout_counts_progress_during_data(server: ServerThread) -> None:
    rec = Recorder()
    c = Raw(server.start(rec, idle_timeout=1.0))
    start_transaction(c)
    for _ in range(10):  # 2 s in total, never 1 s without bytes
        c.send(b"line\r\n")
        time.sleep(0.2)
    assert c.cmd(b".\r\n") == "250 2.0.0 delivered"


def test_data_deadline(server: ServerThread) -> None:
    """A client trickling DATA forever is cut off after data_timeout despite the activity."""
    c = Raw(server.start(Recorder(), idle_timeout=5, data_timeout=0.6))
    start_transaction(c)
    t0 = time.monotonic()
    got = b""
    try:
        while time.monotonic() - t0 < 5:
            c.send(b"line\r\n")
            if select.select([c.sock], [], [], 0.1)[0]:
                chunk = c.sock.recv(4096)
                got += chunk
                if not chunk or b"\n" in got:
                    break
    except (BrokenPipeError, ConnectionResetError):
        pass
    elapsed = time.monotonic() - t0
    assert 0.5 < elapsed < 2.5
    assert got in (b"", (codes.IDLE_TIMEOUT + "\r\n").encode())


def test_handler_exception_gives_451_and_resets_transaction(server: ServerThread) -> None:
    rec = Recorder()
    rec.fail_next = True
    c = Raw(server.start(rec))
    start_transaction(c)
    assert c.cmd(b"x\r\n.\r\n") == codes.INTERNAL_ERROR
    assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"


class LeavesWorkForAfterTheReply(Recorder):
    """Leaves work for after its 250 (afterreply.later, as the log line of an accepted message)
    that waits, at most 5 s, until the client says it has the reply."""

    def __init__(self, client_has_reply: threading.Event) -> None:
        super().__init__()
        self.client_has_reply = client_has_reply
        self.ran: list[bool] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        status = await super().handle_DATA(server, session, envelope)
        afterreply.later(lambda: self.ran.append(self.client_has_reply.wait(5)))
        return status


def test_work_left_for_after_the_reply_runs_once_the_client_has_it(server: ServerThread) -> None:
    got_250 = threading.Event()
    rec = LeavesWorkForAfterTheReply(got_250)
    c = Raw(server.start(rec))
    start_transaction(c)
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.reply() == "250 2.0.0 delivered"
    got_250.set()
    assert c.cmd("QUIT") == "221 Bye"
    assert rec.ran == [True]  # [False]: it ran before the 250 was written, the client waited


def test_work_left_by_a_session_that_ends_without_a_reply_still_runs(server: ServerThread) -> None:
    ran = threading.Event()

    class LeavesWorkThenLosesTheClient(Recorder):
        async def handle_DATA(self, server_: Any, session: Any, envelope: Any) -> str:
            await super().handle_DATA(server_, session, envelope)
            afterreply.later(ran.set)
            raise ConnectionResetError("client gone")  # the session ends without a reply

    rec = LeavesWorkThenLosesTheClient()
    c = Raw(server.start(rec))
    start_transaction(c)
    c.send(b"x\r\n.\r\n")
    assert c.closed()
    assert len(rec.messages) == 1
    assert ran.wait(5)


async def test_later_defers_only_in_the_task_that_collects() -> None:
    calls: list[str] = []
    afterreply.later(calls.append, "no session: now")
    assert calls == ["no session: now"]

    async def session() -> None:
        pending = afterreply.collect()
        afterreply.later(calls.append, "first")
        afterreply.later(lambda: 1 / 0)
        afterreply.later(calls.append, "third")

        async def started_by_the_session() -> None:
            # inherits the context variable, but sends no reply: must not leave work behind
            afterreply.later(calls.append, "child: now")

        await asyncio.create_task(started_by_the_session())
        assert calls == ["no session: now", "child: now"]
        afterreply.run(pending)
        assert pending == []

    await session()
    assert calls == ["no session: now", "child: now", "first", "third"]


def test_replies_match_stock_aiosmtpd(server: ServerThread) -> None:
    """For valid (and common invalid) input the lean paths answer byte for byte like aiosmtpd."""
    transcript = [
        b"HELO client.test", b"MAIL FROM:<a@b.example>", b"MAIL FROM:<a@b.example>",
        b"RCPT TO:<c@d.example>", b'RCPT TO:<"q s"@d.example>', b"RCPT TO:<@r.example:e@d.example>",
        b"RCPT TO:<x@[192.0.2.1]>", b"RCPT TO: <f@d.example>", b"RCPT TO:<g@d.example> X=1",
        b"RCPT TO:", b"RSET", b"RCPT TO:<c@d.example>", b"NOOP", b"VRFY <a@b.example>", b"VRFY",
        b"EHLO client.test", b"MAIL FROM:<> BODY=8BITMIME SIZE=100", b"RCPT TO:<h@d.example> ",
        b"RCPT TO:<i@d.example> (comment)", b"RCPT TO:<j.k@d.example>", b"DATA",
        b"a\r\n..b\r\n.", b"MAIL FROM:<a@b.example> BODY=BINARY", b"MAIL FROM:<a@b.example> FOO=bar",
        b"MAIL FROM:a@b.example", b"MAIL FROM:<a@b.example", b"MAIL TO:<a@b.example>", b"DATA",
        b"HELP", b"HELP MAIL", b"EXPN staff", b"QUIT",
    ]

    def run(port: int) -> list[str]:
        c = Raw(port)
        out = [c.reply()]
        for line in transcript:
            out.append(c.cmd(line + b"\r\n"))
        c.close()
        return out

    rec_a, rec_b = Recorder(), Recorder()
    ours = run(server.start(rec_a, hostname="mx.test", ident="x"))
    stock = run(server.start(rec_b, cls=StockSMTP, hostname="mx.test", ident="x", enable_SMTPUTF8=True))
    ehlo = transcript.index(b"EHLO client.test") + 1
    assert ours[ehlo] != stock[ehlo]  # we add PIPELINING and ENHANCEDSTATUSCODES
    help_ = transcript.index(b"HELP") + 1
    # HELP lists only what is offered: no AUTH on a listener without AUTH (aiosmtpd lists it)
    assert stock[help_].replace("AUTH ", "") == ours[help_] != stock[help_]
    del ours[help_], stock[help_], ours[ehlo], stock[ehlo]
    assert ours == stock
    assert [m.content for m in rec_a.messages] == [m.content for m in rec_b.messages] == [b"a\r\n.b\r\n"]


def test_address_parser_matches_aiosmtpd() -> None:
    rnd = random.Random(5321)
    alphabet = "ab.@<>\"() \t:,[]\\!#x1-_+=/?{}~'%"
    samples = ["<a@b>", "<a@b> SIZE=1", "<>", "<> SIZE=1", "<>x", "< a@b >", "<a@b>  (c) SIZE=1",
               "a@b", '<"a b"@c>', "<@r,@s:u@d>", "<a@[1.2.3.4]>", "<a..b@c>", "<a@b>x", "<a@b",
               "<a.b@c.d> \t BODY=8BITMIME", "<a@b>\tX", "<", "<a@b>(c)", "<user+tag@example.org>",
               "<\u00fc@example.org>", "<a@b.>", "<.a@b>", "<a@b> \u2003SIZE=1"]
    samples += ["".join(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 14))) for _ in range(8000)]
    # Shaped like real paths, so most take the fast path, with odd characters sprinkled in.
    part = "abcXYZ09.!#$%&'*+/=?^_`{|}~-\"\\ ()[]\u00e9"
    tails = ["", " SIZE=1", "x", " (c) SIZE=2", "\t", "  BODY=8BITMIME ", " \u00a0X", ">", " <b@c>"]
    for _ in range(12000):
        local = "".join(rnd.choice(part) for _ in range(rnd.randrange(0, 8)))
        domain = "".join(rnd.choice(part) for _ in range(rnd.randrange(0, 8)))
        samples.append(f"<{local}@{domain}>{rnd.choice(tails)}")
    fake = MoxSMTP.__new__(MoxSMTP)
    for s in samples:
        try:
            expected = StockSMTP._getaddr(fake, s)
        except Exception:
            expected = (None, None)
        assert MoxSMTP._getaddr(fake, s) == expected, s


def test_introspection_runs_once_per_class(monkeypatch: pytest.MonkeyPatch) -> None:
    class Handler:
        async def handle_RCPT(self, *args: Any) -> str:
            return "250 OK"

    async def build() -> list[MoxSMTP]:
        return [MoxSMTP(Handler(), hostname="mx.test") for _ in range(3)]

    calls: list[Any] = []
    real_dir = dir

    def counting_dir(obj: Any) -> list[str]:
        calls.append(obj)
        return real_dir(obj)

    monkeypatch.setattr(protocol, "dir", counting_dir, raising=False)
    protos = asyncio.run(build())
    protos += asyncio.run(build())
    # Once for the new handler class, at most once for MoxSMTP itself (if no earlier test
    # built one), never per connection.
    assert calls.count(Handler) == 1
    assert len(calls) <= 2
    assert all("RCPT" in p._handle_hooks for p in protos)

    h = Handler()

    async def instance_hook(*args: Any) -> str:
        return "250 OK"

    h.handle_DATA = instance_hook  # type: ignore[attr-defined]

    async def build_one() -> MoxSMTP:
        return MoxSMTP(h, hostname="mx.test")

    assert asyncio.run(build_one())._handle_hooks["DATA"] is instance_hook


def test_no_log_formatting_when_trace_is_off(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(line: bytes) -> bytes:
        raise AssertionError("sanitize called with tracing off")

    monkeypatch.setattr(protocol, "sanitize", boom)
    rec = Recorder()
    c = Raw(server.start(rec))
    start_transaction(c)
    assert c.cmd(b"x\r\n.\r\n") == "250 2.0.0 delivered"


# ---- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_plaintext_injection_is_discarded(server: ServerThread, server_tls: ssl.SSLContext,
                                                   client_tls: ssl.SSLContext) -> None:
    c = Raw(server.start(Recorder(), tls_context=server_tls, hostname="mx.test"))
    assert c.reply().startswith("220")
    assert "250-STARTTLS" in c.cmd("EHLO client.test").split("\n")
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@ext.test>\r\n")
    assert c.reply().startswith("220 ")
    c.starttls(client_tls)
    assert c.nothing_arrives(1.5)  # no 250 for the injected RSET/MAIL
    ehlo = c.cmd("EHLO client.test").split("\n")
    assert "250-STARTTLS" not in ehlo
    # State was reset by STARTTLS (RFC 3207 §4.2): no MAIL carried over.
    assert c.cmd("RCPT TO:<u@local.test>") == "503 Error: need MAIL command"
    assert c.cmd("STARTTLS") == codes.TLS_ALREADY_ACTIVE


def test_starttls_injection_after_220_never_executes(server: ServerThread, server_tls: ssl.SSLContext,
                                                     client_tls: ssl.SSLContext) -> None:
    c = Raw(server.start(Recorder(), tls_context=server_tls, hostname="mx.test"))
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    c.send(b"STARTTLS\r\n")
    c.send(b"NOOP\r\n")  # may land in the reader buffer (cleared) or the handshake (fails)
    assert c.reply().startswith("220 ")
    try:
        c.starttls(client_tls)
    except (ssl.SSLError, ConnectionError):
        return
    assert c.nothing_arrives(1.0)


def test_require_starttls(server: ServerThread, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    c = Raw(server.start(Recorder(), tls_context=server_tls, require_starttls=True))
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@ext.test>") == codes.MUST_STARTTLS
    assert c.cmd("STARTTLS").startswith("220")
    c.starttls(client_tls)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@ext.test>") == "250 OK"


# ---- AUTH -------------------------------------------------------------------------------------


def auth_server(server: ServerThread, store: Store, tls: ssl.SSLContext | None, **kw: Any) -> tuple[int, Recorder]:
    rec = Recorder()
    kw.setdefault("auth_limiter", AuthFailureLimiter())
    kw.setdefault("auth_failure_delay", 0)
    port = server.start(rec, tls_context=tls, credential_store=store, hostname="mx.test", **kw)
    return port, rec


def tls_session(port: int, client_tls: ssl.SSLContext) -> tuple[Raw, str]:
    c = Raw(port)
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS").startswith("220")
    c.starttls(client_tls)
    return c, c.cmd("EHLO client.test")


def test_auth_refused_before_tls(server: ServerThread, store: Store, server_tls: ssl.SSLContext,
                                 client_tls: ssl.SSLContext) -> None:
    port, _ = auth_server(server, store, server_tls)
    c = Raw(port)
    assert c.reply().startswith("220")
    ehlo = c.cmd("EHLO client.test")
    assert not any(line.startswith("250-AUTH") for line in ehlo.split("\n"))
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert c.cmd(f"AUTH PLAIN {plain}") == codes.AUTH_ENCRYPTION_REQUIRED
    assert store.lookups == 0
    c2, ehlo2 = tls_session(port, client_tls)
    assert "250-AUTH SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN" in ehlo2.split("\n")
    assert c2.cmd(f"AUTH PLAIN {plain}") == codes.AUTH_SUCCESS


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_auth_with_smtplib(server: ServerThread, store: Store, server_tls: ssl.SSLContext,
                           client_tls: ssl.SSLContext, mech: str) -> None:
    # smtplib verifies the certificate against "127.0.0.1" (an IP SAN in the test cert).
    port, rec = auth_server(server, store, server_tls)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=client_tls)
        s.ehlo("client.test")
        assert "auth" in s.esmtp_features
        s.user, s.password = USER, PASSWORD
        code, _ = s.auth(mech, getattr(s, "auth_" + mech.lower().replace("-", "_")))
        assert code == 235
        s.sendmail(USER, ["bob@example.net"], b"Subject: hi\r\n\r\nhello\r\n")
    assert [(m.auth, m.content) for m in rec.messages] == [(USER, b"Subject: hi\r\n\r\nhello\r\n")]
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=client_tls)
        s.ehlo("client.test")
        s.user, s.password = USER, "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.auth(mech, getattr(s, "auth_" + mech.lower().replace("-", "_")))
        assert exc.value.smtp_code == 535


def scram_login(c: Raw, mech: str, user: str, pw: str, *, initial: bool = True) -> str:
    client = ScramClient([mech], user, pw)
    first = base64.b64encode(client.get_client_first().encode()).decode()
    if initial:
        r = c.cmd(f"AUTH {mech} {first}")
    else:
        assert c.cmd(f"AUTH {mech}") == "334 "
        r = c.cmd(first)
    assert r.startswith("334 "), r
    client.set_server_first(base64.b64decode(r[4:]).decode())
    r = c.cmd(base64.b64encode(client.get_client_final().encode()).decode())
    if not r.startswith("334 "):
        return r
    client.set_server_final(base64.b64decode(r[4:]).decode())  # verifies the server signature
    return c.cmd("")


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
@pytest.mark.parametrize("initial", [True, False])
def test_auth_scram_over_raw_socket(server: ServerThread, store: Store, server_tls: ssl.SSLContext,
                                    client_tls: ssl.SSLContext, mech: str, initial: bool) -> None:
    port, rec = auth_server(server, store, server_tls)
    c, _ = tls_session(port, client_tls)
    assert scram_login(c, mech, USER, PASSWORD, initial=initial) == codes.AUTH_SUCCESS
    assert c.cmd("AUTH PLAIN =") == codes.AUTH_ALREADY_DONE
    assert c.cmd("MAIL FROM:<alice@example.org>") == "250 OK"
    assert c.cmd("RCPT TO:<bob@example.net>") == "250 OK"
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(b"x\r\n.\r\n") == "250 2.0.0 delivered"
    assert rec.messages[0].auth == USER
    c2, _ = tls_session(port, client_tls)
    assert scram_login(c2, mech, USER, "wrong") == codes.AUTH_BAD_CREDENTIALS


def test_wrong_password_and_unknown_user_get_identical_replies(
        server: ServerThread, store: Store, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    port, _ = auth_server(server, store, server_tls)
    c, _ = tls_session(port, client_tls)
    replies = {}
    for user, pw in ((USER, "wrong"), ("nobody@example.org", PASSWORD)):
        plain = base64.b64encode(f"\0{user}\0{pw}".encode()).decode()
        r = [c.cmd(f"AUTH PLAIN {plain}")]
        assert c.cmd("AUTH LOGIN").startswith("334 ")
        c.cmd(base64.b64encode(user.encode()).decode())
        r.append(c.cmd(base64.b64encode(pw.encode()).decode()))
        ch = base64.b64decode(c.cmd("AUTH CRAM-MD5")[4:])
        resp = f"{user} {hmac.new(pw.encode(), ch, 'md5').hexdigest()}"
        r.append(c.cmd(base64.b64encode(resp.encode()).decode()))
        for mech in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
            r.append(scram_login(c, mech, user, pw))
        replies[user] = r
    assert replies[USER] == replies["nobody@example.org"] == [codes.AUTH_BAD_CREDENTIALS] * 5


def test_auth_cancel_and_bad_base64(server: ServerThread, store: Store, server_tls: ssl.SSLContext,
                                    client_tls: ssl.SSLContext) -> None:
    port, _ = auth_server(server, store, server_tls)
    c, _ = tls_session(port, client_tls)
    assert c.cmd("AUTH LOGIN") == "334 " + base64.b64encode(b"Username:").decode()
    assert c.cmd("*") == codes.AUTH_ABORTED
    assert c.cmd("AUTH PLAIN") == "334 "
    assert c.cmd("not base64!") == codes.AUTH_BAD_BASE64
    assert c.cmd("AUTH PLAIN %%%") == codes.AUTH_BAD_BASE64
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"no nuls").decode()) == codes.AUTH_BAD_BASE64
    assert c.cmd("AUTH DIGEST-MD5") == codes.AUTH_UNKNOWN_MECHANISM
    assert c.cmd("AUTH") == codes.AUTH_SYNTAX
    assert c.cmd("MAIL FROM:<a@x.test>") == "250 OK"
    assert c.cmd("AUTH PLAIN =") == codes.AUTH_DURING_MAIL
    assert c.cmd("RSET") == "250 OK"
    plain = base64.b64encode(f"bob@example.org\0{USER}\0{PASSWORD}".encode()).decode()
    assert c.cmd(f"AUTH PLAIN {plain}") == codes.AUTH_BAD_CREDENTIALS  # other authzid
    plain = base64.b64encode(f"{USER}\0{USER}\0{PASSWORD}".encode()).decode()
    assert c.cmd(f"AUTH plain {plain}") == codes.AUTH_SUCCESS


def test_auth_without_tls_when_allowed(server: ServerThread, store: Store) -> None:
    port, _ = auth_server(server, store, None, auth_require_tls=False, auth_mechanisms=["PLAIN"])
    c = Raw(port)
    assert c.reply().startswith("220")
    assert "250-AUTH PLAIN" in c.cmd("EHLO client.test").split("\n")
    assert c.cmd("AUTH LOGIN") == codes.AUTH_UNKNOWN_MECHANISM
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert c.cmd(f"AUTH PLAIN {plain}") == codes.AUTH_SUCCESS


def test_no_auth_without_credential_store(server: ServerThread, server_tls: ssl.SSLContext,
                                          client_tls: ssl.SSLContext) -> None:
    port = server.start(Recorder(), tls_context=server_tls)
    c, ehlo = tls_session(port, client_tls)
    assert not any(line.startswith("250-AUTH") for line in ehlo.split("\n"))
    assert c.cmd("AUTH PLAIN =") == codes.AUTH_NOT_ENABLED


def test_failed_logins_are_throttled_per_ip(server: ServerThread, store: Store) -> None:
    limiter = AuthFailureLimiter()
    port, _ = auth_server(server, store, None, auth_require_tls=False, auth_limiter=limiter)
    bad = base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
    good = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()

    def attempt(cred: str, keep: bool = False) -> tuple[str, Raw]:
        c = Raw(port)
        assert c.reply().startswith("220")
        c.cmd("EHLO client.test")
        reply = c.cmd(f"AUTH PLAIN {cred}")
        if not keep:
            c.close()
        return reply, c

    for _ in range(9):
        assert attempt(bad)[0] == codes.AUTH_BAD_CREDENTIALS
    assert attempt(good)[0] == codes.AUTH_SUCCESS  # success clears the IP's failures
    for _ in range(10):
        assert attempt(bad)[0] == codes.AUTH_BAD_CREDENTIALS
    reply, c = attempt(good, keep=True)  # 11th attempt in a minute: refused, even a good one
    assert reply == codes.AUTH_THROTTLED
    assert c.closed()
    lookups = store.lookups
    assert attempt(bad)[0] == codes.AUTH_THROTTLED
    assert store.lookups == lookups  # no credential check while throttled


def test_failures_on_one_connection_slow_down(server: ServerThread, store: Store) -> None:
    port, _ = auth_server(server, store, None, auth_require_tls=False, auth_failure_delay=1.5)
    c = Raw(port)
    assert c.reply().startswith("220")
    c.cmd("EHLO client.test")
    bad = base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        assert c.cmd(f"AUTH PLAIN {bad}") == codes.AUTH_BAD_CREDENTIALS
        times.append(time.monotonic() - t0)
    # Failures 4 and 5 wait 1 and 2 steps of 1.5 s (mox: (n-3) s); the first three do not. A
    # wait is never shorter than asked; the step is long enough that an undelayed reply on a
    # loaded machine stays below it.
    assert times[3] >= 1.5 and times[4] >= 3.0
    assert max(times[:3]) < 1.5, times


# ---- swaks ------------------------------------------------------------------------------------

def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """swaks as a client; not installed: the test fails naming the package (never skips)."""
    return subprocess.run(
        [program("swaks", "swaks"), "--server", "127.0.0.1", "--port", str(port), "--from", USER, "--to", "bob@example.net",
         "--ehlo", "client.test", "--timeout", "15", "--body", "hello from swaks", *args],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_auth(server: ServerThread, store: Store, server_tls: ssl.SSLContext, mech: str) -> None:
    port, rec = auth_server(server, store, server_tls)
    ok = swaks(port, "--tls", "--auth", mech, "--auth-user", USER, "--auth-password", PASSWORD)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "235 2.7.0" in ok.stdout
    assert len(rec.messages) == 1 and rec.messages[0].auth == USER
    assert b"hello from swaks" in rec.messages[0].content
    bad = swaks(port, "--tls", "--auth", mech, "--auth-user", USER, "--auth-password", "wrong")
    assert bad.returncode != 0
    assert codes.AUTH_BAD_CREDENTIALS in bad.stdout
    assert len(rec.messages) == 1


def test_swaks_plain_refused_without_tls(server: ServerThread, store: Store, server_tls: ssl.SSLContext) -> None:
    port, rec = auth_server(server, store, server_tls)
    r = swaks(port, "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD)
    assert r.returncode != 0
    assert rec.messages == [] and store.lookups == 0
