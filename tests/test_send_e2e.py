"""Sending mail end to end: submission -> queue -> direct transport -> a real SMTP peer.

A real `mox serve` (with `[testing] allow_private_targets` so it may deliver to loopback),
MX records from a DNS server the test starts on loopback, and Postfix's smtp-sink as the
receiving MX on 127.0.0.x:25. Retries use short intervals set in `[queue]`, and
`mox queue kick`, so nothing waits minutes.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import ssl
import textwrap
import time

import pytest

DOMAINS = """
[domains."example.org"]

[accounts.admin]
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
[accounts.alice.destinations."alice@example.org"]
"""

STATIC = """
[testing]
allow_private_targets = true

[queue]
retry_intervals = [1.0]
max_attempts = 8
"""


def tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def send(mox, to: list[str], subject: str = "outgoing", frm: str = "alice@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10) as s:
        s.starttls(context=tls())
        s.login("alice@example.org", "pw")
        s.sendmail(frm, to, (f"From: {frm}\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n"
                             f"Message-ID: <{time.time_ns()}@example.org>\r\n\r\nhello\r\n").encode())


def wait(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


@pytest.fixture
def outbound(mox_server_factory, dns_server):
    def start(domains: str = DOMAINS, static: str = STATIC):
        server = mox_server_factory(domains, static_extra=static, nameserver=dns_server.nameserver,
                                    passwords={"alice": "pw"})
        server.dns = dns_server
        return server
    return start


def mx(dns_server, domain: str, *hosts) -> None:
    """MX records for ``domain``: hosts as (preference, name, ip)."""
    for pref, name, ip in hosts:
        dns_server.add(domain, "MX", f"{pref} {name}.")
        dns_server.add(name, "A", ip)


def test_submission_goes_out_through_the_queue_to_the_mx(outbound, smtp_sink_factory):
    sink = smtp_sink_factory()
    mox = outbound()
    mx(mox.dns, "dest.example", (10, "mx.dest.example", sink.host))
    send(mox, ["bob@dest.example", "carol@dest.example"], "two recipients")
    [msg] = sink.wait_for_messages(1, timeout=20)
    assert sorted(msg.rcpt_to) == ["bob@dest.example", "carol@dest.example"]  # one transaction
    assert msg.mail_from == "alice@example.org"
    assert msg.message["Subject"] == "two recipients"
    assert "by mail.example.org (mox) with ESMTPSA" in str(msg.message["Received"])
    wait(lambda: "(none)" in mox.mox("queue", "list").stdout, what="queue empty")


def test_first_mx_failing_then_the_next(outbound, smtp_sink_factory):
    bad = smtp_sink_factory(reply_421="CONNECT")
    good = smtp_sink_factory()
    mox = outbound()
    mx(mox.dns, "dest.example", (10, "mx1.dest.example", bad.host), (20, "mx2.dest.example", good.host))
    send(mox, ["bob@dest.example"])
    [msg] = good.wait_for_messages(1, timeout=20)
    assert msg.rcpt_to == ["bob@dest.example"]
    assert bad.count == 0


def test_4xx_then_success_on_retry(outbound, smtp_sink_factory):
    sink = smtp_sink_factory(reject_4xx="RCPT", soft_reply="451 4.7.1 greylisted, try later")
    mox = outbound()
    mx(mox.dns, "dest.example", (10, "mx.dest.example", sink.host))
    send(mox, ["bob@dest.example"], "greylisted")
    listing = wait(lambda: (out := mox.mox("queue", "list").stdout) and "greylisted" in out and out,
                   what="temporary failure recorded")
    assert "to:bob@dest.example" in listing
    # The sink stops greylisting; the next attempt (1 s later) delivers.
    sink.stop()
    good = smtp_sink_factory(host=sink.host, port=sink.port)
    [msg] = good.wait_for_messages(1, timeout=20)
    assert msg.message["Subject"] == "greylisted"
    wait(lambda: "(none)" in mox.mox("queue", "list").stdout, what="queue empty")
    assert mox.messages("alice") == []  # no DSN for a delivered message


def dsn_of(mox) -> email.message.EmailMessage:
    [raw] = wait(lambda: mox.messages("alice"), what="DSN in alice's Maildir")
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_5xx_fails_with_a_dsn_to_the_sender(outbound, smtp_sink_factory):
    sink = smtp_sink_factory(reject_5xx="RCPT", hard_reply="550 5.1.1 no such user here")
    mox = outbound()
    mx(mox.dns, "dest.example", (10, "mx.dest.example", sink.host))
    send(mox, ["nobody@dest.example"], "will bounce")
    dsn = dsn_of(mox)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    text = dsn.as_string()
    assert "Final-Recipient: rfc822;nobody@dest.example" in text.replace("rfc822; ", "rfc822;")
    assert "Action: failed" in text
    assert "5.1.1" in text and "no such user here" in text
    assert "Subject: will bounce" in text  # the original headers are included
    wait(lambda: "(none)" in mox.mox("queue", "list").stdout, what="queue empty")
    # Delivered-To as in every other delivery: the bare address (as Postfix writes it)
    send(mox, ["alice@example.org"], "local")
    raws = {m.split(b"\r\n", 2)[1] for m in mox.wait_for_messages("alice", 2)}
    assert raws == {b"Delivered-To: alice@example.org"}


def test_unreachable_mx_is_named_in_mail_terms_in_the_queue_and_the_dsn(outbound):
    """Nothing listens on 127.0.0.71:25: the queue and the DSN say "connection refused by
    127.0.0.71 port 25", not Python's "[Errno 111] Connect call failed (...)"."""
    # the second (last) attempt only when kicked: the listing cannot miss the first failure
    mox = outbound(static=STATIC.replace("max_attempts = 8", "max_attempts = 2").replace(
        "retry_intervals = [1.0]", "retry_intervals = [600.0]"))
    mx(mox.dns, "dest.example", (10, "mx.dest.example", "127.0.0.71"))
    send(mox, ["bob@dest.example"], "nobody home")
    wanted = "connection refused by 127.0.0.71 port 25"

    def listing() -> str | None:
        out = mox.mox("queue", "list").stdout
        return out if wanted in out else None

    listed = wait(listing, what="the refusal in mox queue list")
    assert "Errno" not in listed and "Connect call failed" not in listed, listed
    mox.mox("queue", "kick")
    text = dsn_of(mox).as_string()
    assert f"bob@dest.example: dialing mx.dest.example: {wanted}" in text, text
    assert "Errno" not in text and "Connect call failed" not in text, text


def test_null_mx_fails_permanently(outbound):
    mox = outbound()
    mox.dns.add("nomail.example", "MX", "0 .")
    send(mox, ["someone@nomail.example"], "to null mx")
    text = dsn_of(mox).as_string()
    assert "Action: failed" in text and "single dot" in text


def test_no_dsn_for_the_null_sender(outbound, smtp_sink_factory):
    sink = smtp_sink_factory(reject_5xx="RCPT")
    mox = outbound()
    mx(mox.dns, "dest.example", (10, "mx.dest.example", sink.host))
    with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10) as s:
        s.starttls(context=tls())
        s.login("alice@example.org", "pw")
        s.sendmail("", ["x@dest.example"], b"From: alice@example.org\r\nSubject: null\r\n\r\nx\r\n")
    wait(lambda: "(none)" in mox.mox("queue", "list").stdout, what="queue empty")
    # Then a message from alice to the same MX fails too: its DSN comes after anything the
    # first failure produced (a DSN is stored before the failed row goes), so once it is
    # there, it must be the only message.
    send(mox, ["y@dest.example"], "second")
    assert "Subject: second" in dsn_of(mox).as_string()
    wait(lambda: "(none)" in mox.mox("queue", "list").stdout, what="queue empty again")
    assert len(mox.messages("alice")) == 1 and mox.messages("admin") == []


def test_route_change_in_domains_toml_applies_at_the_next_attempt(outbound, smtp_sink_factory):
    greylist = smtp_sink_factory(reject_4xx="RCPT")
    relay = smtp_sink_factory()
    static = STATIC.replace("retry_intervals = [1.0]", "retry_intervals = [3.0]") + textwrap.dedent(f"""
        [transports.relay]
        kind = "smtp"
        host = "relay.example"
        port = {relay.port}
        no_starttls = true
        """)
    mox = outbound(static=static)
    mox.dns.add("relay.example", "A", relay.host)
    mx(mox.dns, "dest.example", (10, "mx.dest.example", greylist.host))
    send(mox, ["bob@dest.example"], "rerouted")
    wait(lambda: "error" in mox.mox("queue", "list").stdout, what="first attempt failed")
    assert relay.count == 0
    domains = mox.directory / "domains.toml"
    domains.write_text(DOMAINS + '\n[[routes]]\nto_domain = ["dest.example"]\ntransport = "relay"\n')
    [msg] = relay.wait_for_messages(1, timeout=20)
    assert msg.message["Subject"] == "rerouted"
    r = mox.mox("routes", "explain", "--from", "alice@example.org", "--to", "bob@dest.example", "--attempt", "2")
    assert "relay" in r.stdout


def test_sigkill_with_deliveries_in_flight_loses_nothing(outbound, smtp_sink_factory):
    slow = smtp_sink_factory(delay={"rcpt": 3})
    mox = outbound()
    mx(mox.dns, "dest.example", (10, "mx.dest.example", slow.host))
    for i in range(5):
        send(mox, [f"r{i}@dest.example"], f"crash {i}")
    time.sleep(1.0)  # the deliveries are now waiting for the slow RCPT replies
    mox.kill()
    slow.stop()
    fast = smtp_sink_factory(host=slow.host)
    mox.start()
    mox.mox("queue", "kick")
    wait(lambda: fast.count + slow.count >= 5, timeout=30, what="all delivered after restart")
    subjects = {m.message["Subject"] for m in fast.messages()} | {m.message["Subject"] for m in slow.messages()}
    assert subjects == {f"crash {i}" for i in range(5)}
    wait(lambda: "(none)" in mox.mox("queue", "list").stdout, what="queue empty")


def test_outgoing_mail_is_dkim_signed(outbound, smtp_sink_factory, tmp_path):
    import re

    import dkim

    from mox_core.checks.authres import _dkim_dnsfunc
    from mox_testpeers.dnsserver import sync_resolver_for
    from tests.conftest import run_mox

    key = tmp_path / "sel.pem"
    out = run_mox("dkim", "gen", "--selector", "sel", "--domain", "example.org", str(key)).stdout
    sink = smtp_sink_factory()
    mox = outbound(DOMAINS.replace('[domains."example.org"]\n', '[domains."example.org"]\n'
                                   f'[domains."example.org".dkim]\nsign = ["sel"]\n'
                                   f'[domains."example.org".dkim.selectors.sel]\nprivate_key_file = "{key}"\n'))
    mox.dns.add("sel._domainkey.example.org", "TXT", re.findall(r'"([^"]*)"', out.splitlines()[0]))
    mx(mox.dns, "dest.example", (10, "mx.dest.example", sink.host))
    send(mox, ["bob@dest.example"], "signed")
    [msg] = sink.wait_for_messages(1, timeout=20)
    raw = msg.raw if isinstance(msg.raw, bytes) else msg.raw.encode()
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    body = raw[raw.index(b"DKIM-Signature:"):]
    assert dkim.verify(body, dnsfunc=_dkim_dnsfunc(sync_resolver_for(mox.dns)))
