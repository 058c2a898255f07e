"""Receiving mail end to end: a real `mox serve`, real clients (smtplib, swaks), real DNS.

Covers incoming SMTP into Maildir with trace and Authentication-Results headers, submission
with every AUTH mechanism, catch-all precedence, separators, case sensitivity, relay attempts,
the From check, limits seen through the whole server, and crashes with SIGKILL.
"""

from __future__ import annotations

import base64
import os
import smtplib
import socket
import ssl
import subprocess
import time

import dkim
import pytest
import scramp

from tests.conftest import program

DOMAINS = """
[domains."example.org"]
localpart_catchall_separators = ["+", "-"]

[domains."catch.example"]

[domains."case.example"]
localpart_case_sensitive = true

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
[accounts.alice.destinations."alice@example.org"]
[accounts.alice.destinations."Alice@case.example"]

[accounts.bob]
[accounts.bob.destinations."bob@catch.example"]
[accounts.bob.destinations."blocked@catch.example"]
smtp_error = "550 not here"

[accounts.catcher]
[accounts.catcher.destinations."@catch.example"]
"""

PASSWORDS = {"alice": "alice-secret", "catcher": "catcher-secret"}


@pytest.fixture
def mox(mox_server_factory, dns_server):
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("liar.example", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    server = mox_server_factory(DOMAINS, nameserver=dns_server.nameserver, passwords=PASSWORDS)
    server.dns = dns_server
    return server


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(frm: str, to: str, subject: str = "test", body: str = "hello\r\n") -> bytes:
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{time.time_ns()}@x>\r\n"
            f"Date: Thu, 26 Nov 2026 12:00:00 +0000\r\n\r\n{body}").encode()


def headers_of(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode()


# --------------------------------------------------------------------------------------------
# incoming SMTP


def test_incoming_smtplib_delivers_with_trace_headers_and_spf_pass(mox):
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as s:
        s.ehlo("client.sender.example")
        s.sendmail("someone@sender.example", ["admin@example.org"],
                   message("someone@sender.example", "admin@example.org", "hi"))
    [raw] = mox.wait_for_messages("admin", 1)
    head = headers_of(raw)
    assert head.startswith("Return-Path: <someone@sender.example>\r\nDelivered-To: admin@example.org\r\n")
    assert "spf=pass smtp.mailfrom=sender.example" in head
    assert "Received: from client.sender.example ([127.0.0.1])\r\n\tby mail.example.org (mox) with ESMTP" in head
    assert raw.endswith(b"\r\n\r\nhello\r\n")
    # Standard Maildir layout, readable by Dovecot and mutt.
    assert {p.name for p in mox.maildir("admin").iterdir()} >= {"new", "cur", "tmp"}


def test_incoming_spf_fail_is_recorded(mox):
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as s:
        s.sendmail("x@liar.example", ["admin@example.org"], message("x@liar.example", "admin@example.org"))
    [raw] = mox.wait_for_messages("admin", 1)
    assert "spf=fail smtp.mailfrom=liar.example" in headers_of(raw)


def test_incoming_dkim_pass_and_fail(mox, tmp_path):
    key = tmp_path / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    pub = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    mox.dns.add("sel._domainkey.sender.example", "TXT", "v=DKIM1; k=rsa; p=" + base64.b64encode(pub).decode())
    msg = message("a@sender.example", "admin@example.org", "signed")
    sig = dkim.sign(msg, b"sel", b"sender.example", key.read_bytes(), include_headers=[b"From", b"To", b"Subject"])
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as s:
        s.sendmail("a@sender.example", ["admin@example.org"], sig + msg)
        s.sendmail("a@sender.example", ["admin@example.org"], sig + msg.replace(b"hello", b"HELLO"))
    raws = mox.wait_for_messages("admin", 2)
    results = sorted("dkim=pass header.d=sender.example header.s=sel" in headers_of(r) for r in raws)
    assert results == [False, True]
    assert any("dkim=fail header.d=sender.example" in headers_of(r) for r in raws)


def test_incoming_swaks_delivers(mox):
    r = subprocess.run([program("swaks", "swaks"), "--server", "127.0.0.1", "--port", str(mox.smtp_port),
                        "--from", "x@sender.example", "--to", "alice@example.org",
                        "--header", "Subject: via swaks"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    [raw] = mox.wait_for_messages("alice", 1)
    assert b"Subject: via swaks" in raw


def test_incoming_starttls_then_delivery(mox):
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as s:
        s.starttls(context=client_tls())
        s.sendmail("x@sender.example", ["admin@example.org"], message("x@sender.example", "admin@example.org"))
    [raw] = mox.wait_for_messages("admin", 1)
    assert "with ESMTPS" in headers_of(raw)


def rcpt(mox, address: str, port: int | None = None) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port or mox.smtp_port, timeout=10) as s:
        s.ehlo()
        s.mail("x@sender.example")
        return s.rcpt(address)


@pytest.mark.parametrize("address, account", [
    ("alice@example.org", "alice"),
    ("ALICE@Example.ORG", "alice"),            # case-insensitive domain
    ("alice+news@example.org", "alice"),       # separator +
    ("alice-x+y@example.org", "alice"),        # separators - and +
    ("alice+a+b@example.org", "alice"),        # the same separator twice: cut at the first
    ("alice-a+b-c@example.org", "alice"),
    ("bob@catch.example", "bob"),              # explicit beats catch-all
    ("anything@catch.example", "catcher"),     # catch-all
    ("bob+tag@catch.example", "catcher"),      # no separator configured in catch.example
    ("Alice@case.example", "alice"),           # case-sensitive domain, exact case
    ("postmaster@example.org", "admin"),       # postmaster fallback
    ("postmaster@mail.example.org", "admin"),  # postmaster at our host name
    ("PostMaster@MAIL.Example.ORG", "admin"),  # ... in any letter case
])
def test_recipient_resolution(mox, address, account):
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as s:
        s.sendmail("x@sender.example", [address], message("x@sender.example", address, address))
    [raw] = mox.wait_for_messages(account, 1)
    assert f"Subject: {address}".encode() in raw
    assert f"Delivered-To: {address}".encode() in raw


@pytest.mark.parametrize("address, reply", [
    ("nobody@example.org", (550, b"5.1.1 no such user")),
    ("alice@case.example", (550, b"5.1.1 no such user")),   # wrong case where case matters
    ("blocked@catch.example", (550, b"5.1.1 not here")),    # smtp_error beats the catch-all
])
def test_unknown_and_refused_recipients(mox, address, reply):
    assert rcpt(mox, address) == reply


@pytest.mark.parametrize("address", [
    "relaytest@ext.example",
    "relaytest%ext.example@[127.0.0.1]",
    "relaytest@[127.0.0.1]",
    '"relaytest@ext.example"',
    '"relaytest%ext.example"',
    "@[127.0.0.1]:relaytest@ext.example",
    "@example.org:relaytest@ext.example",
    "ext.example!relaytest",
    "ext.example!relaytest@[127.0.0.1]",
])
def test_no_open_relay(mox, address):
    code, text = rcpt(mox, address)
    assert code in (550, 501, 553), (code, text)


@pytest.mark.parametrize("address", [
    "relaytest%ext.example@example.org",
    "ext.example!relaytest@example.org",
    '"relaytest@ext.example"@example.org',
])
def test_relay_forms_at_local_domain_are_unknown_users(mox, address):
    assert rcpt(mox, address) == (550, b"5.1.1 no such user")
    assert mox.messages("admin") == []


def test_source_route_is_ignored(mox):
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as s:
        s.ehlo()
        s.mail("x@sender.example")
        assert s.rcpt("<@relay.example,@x.example:alice@example.org>")[0] == 250
        assert s.rcpt("<@example.org:someone@ext.example>")[0] == 550


def test_too_many_hops(mox):
    hops = b"".join(b"Received: from h%d by h%d\r\n" % (i, i) for i in range(101))
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as s:
        s.ehlo()
        s.mail("x@sender.example")
        s.rcpt("admin@example.org")
        assert s.data(hops + message("x@sender.example", "admin@example.org")) == (554, b"5.4.6 too many hops")
    assert mox.messages("admin") == []


def test_smuggling_through_the_server_delivers_one_message_or_none(mox):
    smuggled = (b"Subject: t\r\n\r\nbody\n.\r\nMAIL FROM:<admin@example.org>\r\nRCPT TO:<alice@example.org>\r\n"
                b"DATA\r\n\r\nsmuggled\r\n\r\n.\r\n")
    with socket.create_connection(("127.0.0.1", mox.smtp_port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        for cmd in (b"EHLO x\r\n", b"MAIL FROM:<x@sender.example>\r\n", b"RCPT TO:<admin@example.org>\r\n", b"DATA\r\n"):
            s.sendall(cmd)
            while f.readline()[3:4] == b"-":
                pass
        s.sendall(smuggled)
        reply = f.readline()
        assert reply.startswith(b"5"), reply
        # Every reply up to the one to QUIT: whatever the server made of the rest of the
        # bytes (a delivery is in the Maildir before its 250) happened before the 221.
        s.sendall(b"QUIT\r\n")
        replies = [reply]
        while not replies[-1].startswith(b"221"):
            replies.append(f.readline())
            assert replies[-1], replies  # closed without a 221
    # the refusal and the 221: none of the smuggled commands was answered
    assert [r[:4] for r in replies] == [b"554 ", b"221 "], replies
    assert mox.messages("admin") == [] and mox.messages("alice") == []


# --------------------------------------------------------------------------------------------
# submission


def submit(mox, user: str, password: str, frm: str, to: list[str], mechanism: str | None = None,
           implicit: bool = False) -> None:
    if implicit:
        s = smtplib.SMTP_SSL("127.0.0.1", mox.submissions_port, timeout=10, context=client_tls())
    else:
        s = smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10)
        s.starttls(context=client_tls())
    with s:
        s.ehlo()
        if mechanism is None:
            s.login(user, password)
        else:
            s.user, s.password = user, password
            code, resp = s.auth(mechanism, getattr(s, f"auth_{mechanism.lower().replace('-', '_')}"),
                                initial_response_ok=mechanism != "CRAM-MD5")
            assert code == 235, resp
        s.sendmail(frm, to, message(frm, ", ".join(to), f"by {user} {mechanism}"))


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_submission_with_smtplib_mechanisms(mox, mechanism):
    submit(mox, "alice@example.org", "alice-secret", "alice@example.org", ["admin@example.org"], mechanism)
    [raw] = mox.wait_for_messages("admin", 1)
    assert f"by alice@example.org {mechanism}".encode() in raw
    assert "with ESMTPSA" in headers_of(raw)


@pytest.mark.parametrize("mechanism", ["PLAIN", "CRAM-MD5"])
def test_password_changed_while_running_applies_to_the_next_login(mox, mechanism):
    submit(mox, "alice@example.org", "alice-secret", "alice@example.org", ["admin@example.org"], mechanism)
    mox.set_password("alice", "alice-new-secret")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        submit(mox, "alice@example.org", "alice-secret", "alice@example.org", ["admin@example.org"], mechanism)
    submit(mox, "alice@example.org", "alice-new-secret", "alice@example.org", ["admin@example.org"], mechanism)
    assert len(mox.wait_for_messages("admin", 2)) == 2


def test_submissions_implicit_tls(mox):
    submit(mox, "alice@example.org", "alice-secret", "alice@example.org", ["admin@example.org"], implicit=True)
    [raw] = mox.wait_for_messages("admin", 1)
    assert "with ESMTPSA" in headers_of(raw)


def scram_login(sock_file, sock, user: str, password: str, mechanism: str) -> bytes:
    client = scramp.ScramClient([mechanism], user, password)
    first = client.get_client_first()
    sock.sendall(f"AUTH {mechanism} {base64.b64encode(first.encode()).decode()}\r\n".encode())
    line = sock_file.readline()
    assert line.startswith(b"334 "), line
    client.set_server_first(base64.b64decode(line[4:].strip()).decode())
    sock.sendall(base64.b64encode(client.get_client_final().encode()) + b"\r\n")
    line = sock_file.readline()
    if line.startswith(b"334 "):
        client.set_server_final(base64.b64decode(line[4:].strip()).decode())
        sock.sendall(b"\r\n")
        line = sock_file.readline()
    return line


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_submission_with_scram(mox, mechanism):
    raw_sock = socket.create_connection(("127.0.0.1", mox.submissions_port), timeout=10)
    with client_tls().wrap_socket(raw_sock) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO client\r\n")
        while f.readline()[3:4] == b"-":
            pass
        assert scram_login(f, s, "alice@example.org", "alice-secret", mechanism).startswith(b"235")
        for cmd, want in ((b"MAIL FROM:<alice@example.org>\r\n", b"250"), (b"RCPT TO:<admin@example.org>\r\n", b"250"),
                          (b"DATA\r\n", b"354")):
            s.sendall(cmd)
            assert f.readline().startswith(want)
        s.sendall(message("alice@example.org", "admin@example.org", mechanism) + b".\r\n")
        assert f.readline().startswith(b"250")
    [raw] = mox.wait_for_messages("admin", 1)
    assert f"Subject: {mechanism}".encode() in raw


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_submission_with_swaks(mox, mechanism):
    r = subprocess.run([program("swaks", "swaks"), "--server", "127.0.0.1", "--port", str(mox.submission_port), "--tls",
                        "--auth", mechanism, "--auth-user", "alice@example.org", "--auth-password", "alice-secret",
                        "--from", "alice@example.org", "--to", "admin@example.org",
                        "--header", "From: alice@example.org", "--header", f"Subject: swaks {mechanism}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert f"Subject: swaks {mechanism}".encode() in raw


def test_wrong_password_and_unknown_user_get_the_same_reply(mox):
    replies = []
    for user, pw in (("alice@example.org", "wrong"), ("nobody@example.org", "alice-secret")):
        with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10) as s:
            s.starttls(context=client_tls())
            with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
                s.login(user, pw)
            replies.append((exc.value.smtp_code, exc.value.smtp_error))
    assert replies[0] == replies[1] and replies[0][0] == 535


def test_no_auth_before_starttls(mox):
    with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10) as s:
        s.ehlo()
        assert not s.has_extn("auth")
        code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.org\0alice-secret").decode())
        assert code == 538 or code == 530


def test_submission_requires_auth(mox):
    with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10) as s:
        s.starttls(context=client_tls())
        s.ehlo()
        assert s.mail("alice@example.org")[0] == 530


def test_submission_from_must_belong_to_account(mox):
    with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10) as s:
        s.starttls(context=client_tls())
        s.login("alice@example.org", "alice-secret")
        assert s.mail("admin@example.org")[0] == 550          # envelope sender of another account
        assert s.mail("alice+tag@example.org")[0] == 250      # separator form of her own address
        s.rcpt("admin@example.org")
        code, text = s.data(message("admin@example.org", "admin@example.org"))
        assert (code, text[:5]) == (550, b"5.7.1")
        s.rset()
        s.mail("alice@example.org")
        s.rcpt("admin@example.org")
        ambiguous = b"From: alice@example.org)<admin@example.org>\r\nSubject: x\r\n\r\nx\r\n"
        assert s.data(ambiguous)[0] == 550
    assert mox.messages("admin") == []


def test_catchall_owner_may_send_from_any_address_of_the_domain(mox):
    submit(mox, "catcher", "catcher-secret", "whoever@catch.example", ["admin@example.org"])
    [raw] = mox.wait_for_messages("admin", 1)
    assert b"From: whoever@catch.example" in raw


def test_catchall_is_no_login_name(mox):
    with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10) as s:
        s.starttls(context=client_tls())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("someone@catch.example", "catcher-secret")
        s.login("catcher", "catcher-secret")  # the account name works as login


def test_auth_failures_are_throttled(mox):
    codes = []
    for _ in range(12):
        try:
            with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=30) as s:
                s.starttls(context=client_tls())
                s.ehlo()
                s.user, s.password = "alice@example.org", "wrong"
                try:  # one mechanism per connection: smtplib's login() would try three
                    s.auth("PLAIN", s.auth_plain)
                except smtplib.SMTPAuthenticationError as exc:
                    codes.append(exc.smtp_code)
                except smtplib.SMTPResponseException as exc:
                    codes.append(exc.smtp_code)
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, smtplib.SMTPResponseException) as exc:
            codes.append(getattr(exc, "smtp_code", 421))
    assert codes[:10] == [535] * 10
    assert all(c == 421 for c in codes[10:]), codes


def test_setaccountpassword_stores_no_plaintext(mox):
    db = (mox.data_dir / "accounts.db").read_bytes()
    assert b"alice-secret" not in db and b"catcher-secret" not in db


# --------------------------------------------------------------------------------------------
# crashes


def test_sigkill_after_250_loses_nothing(mox):
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as s:
        s.sendmail("x@sender.example", ["admin@example.org"], message("x@sender.example", "admin@example.org", "durable"))
        mox.kill()  # right after the 250, before QUIT
    new = mox.maildir("admin") / "new"
    [path] = list(new.iterdir())
    assert b"Subject: durable" in path.read_bytes()
    mox.start()
    assert len(mox.messages("admin")) == 1


def test_sigkill_during_data_delivers_nothing(mox):
    with socket.create_connection(("127.0.0.1", mox.smtp_port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        for cmd in (b"EHLO x\r\n", b"MAIL FROM:<x@sender.example>\r\n", b"RCPT TO:<admin@example.org>\r\n", b"DATA\r\n"):
            s.sendall(cmd)
            while f.readline()[3:4] == b"-":
                pass
        s.sendall(b"Subject: half\r\n\r\n" + b"x" * 200000)
        time.sleep(0.3)
        mox.kill()
    md = mox.maildir("admin")
    assert not (md / "new").exists() or list((md / "new").iterdir()) == []
    assert not (md / "tmp").exists() or list((md / "tmp").iterdir()) == []
    mox.start()
    # A message sent after the restart arrives; the half one, had the restart made anything of
    # it, would have been delivered before (the start-up clean-up runs before the listeners).
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=10) as c:
        c.sendmail("x@sender.example", ["admin@example.org"], message("x@sender.example", "admin@example.org", "after"))
    [raw] = mox.wait_for_messages("admin", 1)
    assert b"Subject: after\r\n" in raw and b"Subject: half" not in raw
    assert len(mox.messages("admin")) == 1


def test_start_removes_stale_maildir_tmp_files(mox):
    tmp = mox.maildir("admin") / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    stale, fresh = tmp / "1700000000.M1P1Q1.host", tmp / "1795000000.M1P1Q2.host"
    stale.write_bytes(b"half a message")
    fresh.write_bytes(b"being written")
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    mox.stop()
    mox.start()
    assert not stale.exists() and fresh.exists()
