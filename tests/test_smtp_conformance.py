"""What a real ``mox serve`` says and writes, byte for byte, where it must agree with the RFCs,
Postfix and mox: EHLO and HELP, the trace headers it adds, the headers from outside it drops
(RFC 8601 §5 Authentication-Results, Return-Path), mail loops by Delivered-To, what submission
adds (RFC 6409 §8), and pipelining (RFC 2920) used as allowed and not.

Raw sockets throughout: a client library would hide the bytes these tests are about.
"""

from __future__ import annotations

import re
import socket
import ssl

import pytest

DOMAINS = """
[domains."example.org"]
localpart_catchall_separators = ["+"]

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
[accounts.alice.destinations."alice@example.org"]
"""
PASSWORDS = {"alice": "alice-secret"}
HOST = "mail.example.org"  # MoxServer's hostname: our authserv-id


class Raw:
    """An SMTP client that sends exactly the bytes it is given and reads whole replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", greeting: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""
        self.greeting = self.reply() if greeting else ""

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; unread: {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> str:
        lines = []
        while True:
            line = self._line().decode()
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 10) -> bool:
        """Whether the server closes the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def starttls(self) -> None:
        assert self.cmd("STARTTLS").startswith("220")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def auth_plain(self, user: str, password: str) -> None:
        import base64
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        assert self.cmd(f"AUTH PLAIN {token}").startswith("235")

    def close(self) -> None:
        self.sock.close()


def send_message(c: Raw, mail_from: str, rcpts: list[str], message: bytes) -> str:
    """One transaction, command by command; the reply to the final dot."""
    assert c.cmd(f"MAIL FROM:<{mail_from}>").startswith("250"), mail_from
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>").startswith("250"), r
    assert c.cmd("DATA").startswith("354")
    c.send(message + b".\r\n")
    return c.reply()


def head_of(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace") + "\r\n"


def fields(raw: bytes, name: str) -> list[str]:
    """The unfolded values of every header field ``name`` in the message's header section."""
    head = re.sub(r"\r\n[ \t]+", " ", head_of(raw))
    return [m.group(1) for m in re.finditer(rf"(?im)^{name}:[ \t]*(.*?)\r$", head)]


@pytest.fixture
def mox(mox_server_factory, dns_server):
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    return mox_server_factory(DOMAINS, nameserver=dns_server.nameserver, passwords=PASSWORDS,
                              static_top="smtp_workers = 1\n")


# ---- EHLO and HELP (RFC 2034, RFC 5321 §4.1.1.8) ------------------------------------------------


def test_ehlo_offers_enhancedstatuscodes_and_help_lists_what_the_listener_offers(mox):
    c = Raw(mox.smtp_port)
    ehlo = c.cmd("EHLO client.example").split("\n")
    assert "250-ENHANCEDSTATUSCODES" in ehlo
    assert not any("AUTH" in line for line in ehlo)
    help_ = c.cmd("HELP")
    assert help_.startswith("250 ") and "STARTTLS" in help_.split() and "MAIL" in help_.split()
    assert "AUTH" not in help_.split()  # no AUTH on port 25
    c.close()

    c = Raw(mox.submission_port)
    c.cmd("EHLO client.example")
    assert "AUTH" not in c.cmd("HELP").split()  # AUTH only inside TLS
    c.starttls()
    ehlo = c.cmd("EHLO client.example").split("\n")
    assert "250-ENHANCEDSTATUSCODES" in ehlo and any(line.startswith("250-AUTH ") for line in ehlo)
    words = c.cmd("HELP").split()
    assert "AUTH" in words and "STARTTLS" not in words  # TLS is on: no second STARTTLS
    c.close()
