"""What a real ``mox serve`` says and writes, byte for byte, where it must agree with the RFCs,
Postfix and mox: EHLO and HELP, the trace headers it adds, the headers from outside it drops
(RFC 8601 §5 Authentication-Results, Return-Path), mail loops by Delivered-To, what submission
adds (RFC 6409 §8), and pipelining (RFC 2920) used as allowed and not.

Raw sockets throughout: a client library would hide the bytes these tests are about.
"""

from __future__ import annotations

import json
import re
import socket
import ssl

import pytest

from mox_core.smtp import codes
from mox_testpeers import wait_for

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


# ---- headers from outside: Authentication-Results (RFC 8601 §5), Return-Path -----------------

FORGED = (
    "Return-Path: <forged@evil.example>\r\n"
    f"Authentication-Results: {HOST}; spf=pass smtp.mailfrom=forged1.example\r\n"
    f'Authentication-Results: (a comment) "{HOST.upper()}" ; dkim=pass header.d=forged2.example\r\n'
    f"Authentication-Results:\r\n\t{HOST};\r\n\tdkim=pass header.d=forged3.example\r\n"
    "Authentication-Results: other.example; spf=pass smtp.mailfrom=kept1.example\r\n"
    f"Authentication-Results: {HOST}.evil.example; dkim=pass header.d=kept2.example\r\n"
)


def forged_message(frm: str, to: str, extra: str = "") -> bytes:
    return (FORGED + f"From: {frm}\r\nTo: {to}\r\nSubject: test\r\n{extra}\r\nbody\r\n").encode()


def assert_forgeries_gone(raw: bytes, return_path: str) -> None:
    head = head_of(raw)
    assert "forged" not in head, head
    assert fields(raw, "Return-Path") == [f"<{return_path}>"]
    ar = fields(raw, "Authentication-Results")
    assert "other.example; spf=pass smtp.mailfrom=kept1.example" in ar
    assert f"{HOST}.evil.example; dkim=pass header.d=kept2.example" in ar


@pytest.mark.parametrize("workers", [1, 2], ids=["main-process", "two-workers"])
def test_incoming_forged_authentication_results_and_return_path_are_removed(mox_server_factory, dns_server,
                                                                            workers):
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    mox = mox_server_factory(DOMAINS, nameserver=dns_server.nameserver, static_top=f"smtp_workers = {workers}\n")
    for _ in range(4):  # over several connections: with two workers, both may serve some
        c = Raw(mox.smtp_port)
        c.cmd("EHLO client.sender.example")
        assert send_message(c, "someone@sender.example", ["admin@example.org"],
                            forged_message("someone@sender.example", "admin@example.org")).startswith("250")
        c.close()
    raws = mox.wait_for_messages("admin", 4)
    for raw in raws:
        assert_forgeries_gone(raw, "someone@sender.example")
        ours = [v for v in fields(raw, "Authentication-Results") if v.startswith(f"{HOST};")]
        assert len(ours) == 1 and "spf=pass smtp.mailfrom=sender.example" in ours[0], ours
        # ours comes first, above everything the message brought
        assert head_of(raw).index(f"Authentication-Results: {HOST};") < head_of(raw).index("other.example")
    # the start-up line says what serves SMTP: the main process itself, or the workers running
    # (logged once every listener is up: the workers may greet a little before)
    [started] = wait_for(lambda: [json.loads(line) for line in mox.log_text().splitlines()
                                  if '"mox_started"' in line], 20, what="the start-up line")
    assert (started["smtp_processes"], started["smtp_served_by"]) == (
        (1, "main process") if workers == 1 else (2, "2 worker processes"))
    assert "smtp_workers" not in started  # it said 0 when the main process served SMTP


def test_submission_removes_forgeries_and_adds_message_id_and_date_before_signing(
        mox_server_factory, dns_server, smtp_sink_factory, tmp_path):
    import dkim

    from mox_core.checks.authres import _dkim_dnsfunc
    from mox_testpeers.dnsserver import sync_resolver_for
    from tests.conftest import run_mox

    key = tmp_path / "sel.pem"
    out = run_mox("dkim", "gen", "--selector", "sel", "--domain", "example.org", str(key)).stdout
    dns_server.add("sel._domainkey.example.org", "TXT", re.findall(r'"([^"]*)"', out.splitlines()[0]))
    sink = smtp_sink_factory()
    dns_server.add("dest.example", "MX", "10 mx.dest.example.")
    dns_server.add("mx.dest.example", "A", sink.host)
    domains = DOMAINS.replace('["+"]\n', '["+"]\n'
                              '[domains."example.org".dkim]\nsign = ["sel"]\n'
                              f'[domains."example.org".dkim.selectors.sel]\nprivate_key_file = "{key}"\n')
    mox = mox_server_factory(domains, nameserver=dns_server.nameserver, passwords=PASSWORDS,
                             static_extra="[testing]\nallow_private_targets = true\n")
    c = Raw(mox.submission_port)
    c.cmd("EHLO client.example")
    c.starttls()
    c.cmd("EHLO client.example")
    c.auth_plain("alice@example.org", "alice-secret")
    msg = forged_message("alice@example.org", "bob@dest.example")
    assert b"Message-ID" not in msg and b"Date:" not in msg
    assert send_message(c, "alice@example.org", ["bob@dest.example", "alice@example.org"], msg).startswith("250")
    # a message with its own Message-ID and Date keeps them, and gets no second one
    own = forged_message("alice@example.org", "alice@example.org",
                         "Message-ID: <own@client.example>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n")
    assert send_message(c, "alice@example.org", ["alice@example.org"], own).startswith("250")
    c.cmd("QUIT")

    local = sorted(mox.wait_for_messages("alice", 2), key=lambda r: b"<own@" in r)
    for raw in local:
        assert_forgeries_gone(raw, "alice@example.org")
    [mid] = fields(local[0], "Message-ID")
    assert re.fullmatch(rf"<[A-Za-z0-9_-]+@{re.escape(HOST)}>", mid), mid
    assert len(fields(local[0], "Date")) == 1
    assert fields(local[1], "Message-ID") == ["<own@client.example>"]
    assert fields(local[1], "Date") == ["Mon, 1 Jan 2024 00:00:00 +0000"]
    # our Received names the TLS session and the account
    [received] = [v for v in fields(local[0], "Received") if HOST in v]
    assert re.search(r"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+\) \(Authenticated sender: alice\) "
                     rf"by {re.escape(HOST)} \(mox\) with ESMTPSA", received), received

    [out_msg] = sink.wait_for_messages(1, timeout=20)
    raw = out_msg.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    raw = raw[raw.index(b"DKIM-Signature:"):]
    assert fields(raw, "Message-ID") == [mid]
    sig = fields(raw, "DKIM-Signature")[0].replace(" ", "").lower()
    assert "message-id" in re.search(r"h=([^;]*)", sig).group(1) and "date" in sig
    assert dkim.verify(raw, dnsfunc=_dkim_dnsfunc(sync_resolver_for(dns_server)))
    assert "forged" not in head_of(raw)


def test_received_names_tls_version_and_cipher_on_port_25(mox):
    c = Raw(mox.smtp_port)
    c.cmd("EHLO client.sender.example")
    c.starttls()
    c.cmd("EHLO client.sender.example")
    cipher = c.sock.cipher()
    assert send_message(c, "someone@sender.example", ["admin@example.org"],
                        b"From: someone@sender.example\r\nSubject: tls\r\n\r\nx\r\n").startswith("250")
    c.close()
    [raw] = mox.wait_for_messages("admin", 1)
    [received] = fields(raw, "Received")
    assert received.startswith(f"from client.sender.example ([127.0.0.1]) (using {cipher[1]} with cipher "
                               f"{cipher[0]}) by {HOST} (mox) with ESMTPS id "), received
    assert "Authenticated" not in received


# ---- Delivered-To: loops, and the same form everywhere ----------------------------------------


def test_delivered_to_the_same_recipient_is_refused_as_a_loop(mox):
    c = Raw(mox.smtp_port)
    c.cmd("EHLO client.sender.example")
    # another recipient's Delivered-To: an ordinary message (it went through a list, say)
    ok = b"Delivered-To: someone@else.example\r\nFrom: a@sender.example\r\nSubject: fine\r\n\r\nx\r\n"
    assert send_message(c, "a@sender.example", ["admin@example.org"], ok).startswith("250")
    for header in ("Delivered-To: admin@example.org", "DELIVERED-TO:  <Admin@Example.org>",
                   "Delivered-To:\r\n admin@example.org"):
        loop = f"{header}\r\nFrom: a@sender.example\r\nSubject: loop\r\n\r\nx\r\n".encode()
        assert send_message(c, "a@sender.example", ["admin@example.org"], loop) == codes.DELIVERED_TO_LOOP
    # a +tag address is its own recipient: the loop is on what was delivered to
    tagged = b"Delivered-To: admin+tag@example.org\r\nFrom: a@sender.example\r\n\r\nx\r\n"
    assert send_message(c, "a@sender.example", ["admin+tag@example.org"], tagged) == codes.DELIVERED_TO_LOOP
    assert send_message(c, "a@sender.example", ["admin@example.org"], tagged).startswith("250")
    c.cmd("QUIT")
    raws = mox.wait_for_messages("admin", 2)
    assert sorted(fields(r, "Delivered-To")[0] for r in raws) == ["admin@example.org"] * 2
    assert len(mox.messages("admin")) == 2


# ---- pipelining (RFC 2920) --------------------------------------------------------------------

TX = (b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<admin@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
BODY = b"From: a@sender.example\r\nSubject: pipelined\r\n\r\nbody\r\n.\r\n"


def improper_pipelining_logged(mox, after: str) -> bool:
    return any('"smtp_improper_pipelining"' in line and f'"after": "{after}"' in line
               for line in mox.log_text().splitlines())


def test_pipelining_after_ehlo_keeps_working(mox):
    c = Raw(mox.smtp_port)
    c.cmd("EHLO client.sender.example")
    c.send(TX)  # the whole transaction up to DATA in one write, as RFC 2920 allows
    assert [c.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    c.send(BODY + b"QUIT\r\n")  # the message, its end and QUIT in one write
    assert c.reply().startswith("250 2.0.0") and c.reply().startswith("221")
    assert c.closed()
    assert len(mox.wait_for_messages("admin", 1)) == 1 and len(mox.wait_for_messages("alice", 1)) == 1
    assert not improper_pipelining_logged(mox, "DATA")


def test_commands_after_data_in_the_same_group_are_refused(mox):
    c = Raw(mox.smtp_port)
    c.cmd("EHLO client.sender.example")
    c.send(TX + BODY)  # the message without waiting for 354
    assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "250"]
    assert c.reply() == codes.IMPROPER_PIPELINING
    assert c.closed()
    assert improper_pipelining_logged(mox, "DATA")
    # what was sent ahead never ran: the connection is gone and nothing was delivered
    assert mox.messages("admin") == [] and mox.messages("alice") == []


@pytest.mark.parametrize("hello", ["HELO", "EHLO"])
def test_commands_sent_ahead_of_the_hello_reply_or_after_helo_are_refused(mox, hello):
    c = Raw(mox.smtp_port)
    if hello == "HELO":
        assert c.cmd("HELO client.sender.example").startswith("250")
        c.send(TX)  # HELO offers no PIPELINING
        after = "MAIL"
    else:
        c.send(b"EHLO client.sender.example\r\n" + TX)  # EHLO ends a group (RFC 2920 §3.1)
        after = "EHLO"
    assert c.reply() == codes.IMPROPER_PIPELINING
    assert c.closed()
    assert improper_pipelining_logged(mox, after)

    # one command at a time after HELO is fine
    c = Raw(mox.smtp_port)
    c.cmd("HELO client.sender.example")
    assert send_message(c, "a@sender.example", ["admin@example.org"], BODY[:-3]).startswith("250")
    assert c.cmd("QUIT").startswith("221")
    mox.wait_for_messages("admin", 1)


def test_bytes_before_the_greeting_are_refused(mox):
    import os
    import signal

    # the server is stopped while the client connects and talks: the kernel completes the
    # handshake and holds the bytes, so they are there before any greeting could be
    os.kill(mox.proc.pid, signal.SIGSTOP)
    try:
        c = Raw(mox.smtp_port, greeting=False)
        c.send(b"EHLO client.sender.example\r\n")
    finally:
        os.kill(mox.proc.pid, signal.SIGCONT)
    assert c.reply() == codes.IMPROPER_PIPELINING  # instead of the 220 (RFC 5321 §3.1)
    assert c.closed()
    assert improper_pipelining_logged(mox, "CONNECT")
    c = Raw(mox.smtp_port)  # a client that waits gets its greeting
    assert c.greeting.startswith(f"220 {HOST} ")


def test_postfix_relaying_to_mox_pipelines_and_delivers(mox, postfix_mx_factory):
    relay = postfix_mx_factory(
        domain="relay.test",
        main_cf={"relay_domains": "example.org", "smtp_tls_security_level": "none",
                 "transport_maps": f"inline:{{ example.org=smtp:[127.0.0.1]:{mox.smtp_port} }}",
                 "smtpd_relay_restrictions": "permit_auth_destination, reject",
                 "smtp_helo_name": "relay.sender.example"},
        master_cf_extra=["smtp unix - - n - - smtp"])
    for i in range(3):
        c = Raw(relay.port, host=relay.host)
        c.cmd("EHLO client.sender.example")
        assert send_message(c, f"a{i}@sender.example", ["admin@example.org", "alice@example.org"],
                            f"From: a@sender.example\r\nSubject: via postfix {i}\r\n\r\nhi\r\n".encode()
                            ).startswith("250")
        c.cmd("QUIT")
    assert len(mox.wait_for_messages("admin", 3, timeout=30)) == 3
    assert len(mox.wait_for_messages("alice", 3, timeout=30)) == 3
    sent = re.compile(r"to=<[^>]+>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+.*status=sent")
    wait_for(lambda: len(sent.findall(relay.log_text())) == 6, 20, what="Postfix's six status=sent")
    assert "smtp_improper_pipelining" not in mox.log_text()
