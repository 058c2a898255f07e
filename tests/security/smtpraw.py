"""A raw SMTP client for the security and fault tests: exact bytes out, whole replies in.

Client libraries clean up what they send (smtplib dot-stuffs, refuses CR/LF in arguments,
waits for replies), so the attack cases talk to the server through a plain socket.
"""

from __future__ import annotations

import socket
import ssl
import time


def client_tls() -> ssl.SSLContext:
    """TLS without verification: the test server has a self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Raw:
    """One SMTP connection. ``source``: the local address to connect from (127.0.0.x), so
    that per-IP counters (failed logins, sessions) of one test do not touch the others."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 15.0, source: str | None = None,
                 greeting: bool = True) -> None:
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.greeting = self.reply() if greeting else ""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        """One whole reply (all its lines, joined by newlines, without CRLF)."""
        lines = []
        while True:
            line = self.line().decode("utf-8", "replace")
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    def code(self) -> int:
        return int(self.reply()[:3])

    def cmd(self, data: bytes | str) -> str:
        self.send(data.encode() + b"\r\n" if isinstance(data, str) else data)
        return self.reply()

    def ehlo(self, name: str = "client.test") -> str:
        reply = self.cmd(f"EHLO {name}")
        assert reply.startswith("250"), reply
        return reply

    def starttls(self) -> None:
        assert self.cmd("STARTTLS").startswith("220"), "STARTTLS refused"
        assert self.buf == b"", self.buf
        self.sock = client_tls().wrap_socket(self.sock, server_hostname="localhost")

    def login(self, user: str, password: str) -> str:
        import base64

        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {token}")

    def closed(self, timeout: float = 10.0) -> bool:
        """True once the server closed the connection (bytes arriving meanwhile are kept)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def transaction(c: Raw, mail: str = "<a@ext.test>", rcpts: tuple[str, ...] = ("<u@local.test>",)) -> None:
    """EHLO (unless done), MAIL, RCPT..., DATA up to the 354."""
    assert c.cmd(f"MAIL FROM:{mail}").startswith("250")
    for r in rcpts:
        reply = c.cmd(f"RCPT TO:{r}")
        assert reply.startswith("250"), reply
    reply = c.cmd("DATA")
    assert reply.startswith("354"), reply


def message(subject: str, frm: str = "a@ext.test", to: str = "u@local.test", body: bytes = b"hello\r\n",
            msgid: str | None = None) -> bytes:
    """A small CRLF message (not dot-stuffed)."""
    msgid = msgid or f"<{time.time_ns()}.{subject.replace(' ', '-')}@test>"
    return (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
            f"Date: Sun, 06 Dec 2026 12:00:00 +0000\r\n\r\n").encode() + body


def stuffed(data: bytes) -> bytes:
    """Dot-stuff a CRLF message and add the terminator (RFC 5321 §4.5.2)."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    out = data.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out + b".\r\n"


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    """Poll until ``predicate()`` is truthy; return its value or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(interval)
