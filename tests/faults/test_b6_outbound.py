"""Cases 42-47: faults of the outside world on the way out. A real ``mox serve`` delivers
through its queue to smtp-sink (with its fault switches), to scripted peers, through DNS
answers the test's DNS server makes fail, and through transports whose far end misbehaves.
Deferred means: still in ``mox queue list`` with the error, no DSN; bounced means a DSN
in the sender's Maildir.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

from mox_testpeers.sink import SmtpSink
from tests.faults.scriptpeer import ScriptPeer
from tests.security.smtpraw import message, wait_for

SLOW_QUEUE = "retry_intervals = [1.0]\nmax_attempts = 100"


def out(site, to: str, subject: str, body: bytes = b"hello\r\n") -> None:
    site.submit("alice@local.test", [to], message(subject, "alice@local.test", to, body))


def queued(site, to: str) -> str:
    """The queue's line for recipient ``to`` ("" when it is not queued)."""
    return next((line for line in site.queue_list().splitlines() if f"to:{to}" in line), "")


def deferred_with(site, to: str, text: str) -> str:
    """Wait until the message to ``to`` had a failed attempt whose error contains ``text``."""
    return wait_for(lambda: text.lower() in queued(site, to).lower() and queued(site, to),
                    what=f"a deferral of {to} with {text!r}")


def dsns(site, marker: str = "") -> list[bytes]:
    """The DSNs in alice's Maildir (about the message whose subject contains ``marker``)."""
    return [m for m in site.mox.messages("alice") if marker.encode() in m]


def failed_once(site, to: str) -> str:
    """Wait until the message to ``to`` had an attempt that failed (its error is set)."""
    return wait_for(lambda: (line := queued(site, to)) and 'error ""' not in line and line,
                    what=f"a failed attempt to {to}")


@pytest.mark.parametrize("faults,text", [
    ({"reject_4xx": "RCPT", "soft_reply": "451 4.7.1 greylisted, come back later"}, "greylisted"),
    ({"reply_421": "MAIL"}, "421"),
], ids=["450-at-RCPT", "421-and-close-at-MAIL"])
def test_b42_remote_temporary_failure_defers_keeps_the_text_then_bounces_at_the_end(own_site, faults, text):
    # the second and last attempt only when kicked: nothing can move on while the test looks
    site = own_site(sink_options=faults, queue="retry_intervals = [600.0]\nmax_attempts = 2")
    out(site, "a@ext.test", "temporary")
    line = deferred_with(site, "a@ext.test", text)
    assert dsns(site) == []  # deferred, not bounced
    assert "next " in line
    site.mox.mox("queue", "kick")
    [dsn] = wait_for(lambda: dsns(site), what="the DSN after the last attempt")
    assert text.encode() in dsn.lower() and b"Action: failed" in dsn
    assert "(none)" in site.queue_list()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One site for the cases that neither kill it nor need a faulty sink: DNS faults, the
    SOCKS proxy that is down, the relays without TLS and with a changed certificate. Each
    case uses its own domains and recipients, and looks only at its own DSNs."""
    from tests.security.conftest import DOMAINS, make_site, stop_all

    tmp = tmp_path_factory.mktemp("b6")
    certs = _ca(tmp / "certs")
    ports = {name: _free_port() for name in ("dead", "sub", "plain", "tls")}
    routes = "".join(f'\n[[routes]]\nto_domain = ["{d}"]\ntransport = "{t}"\n' for d, t in (
        ("proxied.test", "viaproxy"), ("relayed-sub.test", "sub"), ("relayed-plain.test", "plain"),
        ("relayed-tls.test", "tls")))
    site, started = make_site(tmp / "mox", queue=SLOW_QUEUE, domains=DOMAINS + routes, static_extra=f"""
[transports.viaproxy]
kind = "socks"
address = "127.0.0.1:{ports['dead']}"
remote_ips = ["127.0.0.1"]
remote_hostname = "proxy.local.test"

[transports.sub]
kind = "submission"
host = "relay.test"
port = {ports['sub']}
username = "mox"
password = "relay-secret"

[transports.plain]
kind = "submission"
host = "relay.test"
port = {ports['plain']}
username = "mox"
password = "relay-secret"
no_starttls = true

[transports.tls]
kind = "smtp"
host = "relay.test"
port = {ports['tls']}
ca_file = "{certs / 'ca.pem'}"
""")
    site.dns.add("relay.test", "A", "127.0.0.1")
    site.ports, site.certs = ports, certs
    yield site
    stop_all(started)


def test_b43_partial_failure_bounces_only_the_refused_recipient(shared):
    site = shared
    refuser = SmtpSink(host="127.0.0.2", port=site.sink.port, reject_5xx="RCPT").start()
    try:
        site.dns.set("mx.bank.test", "A", ["127.0.0.2"])
        site.submit("alice@local.test", ["ok@ext.test", "no@bank.test"],
                    message("partial", "alice@local.test", "ok@ext.test, no@bank.test"))
        [dsn] = wait_for(lambda: dsns(site, "partial"), what="the DSN")
        report = dsn.split(b"\r\n--")[1]
        assert b"no@bank.test" in report and b"ok@ext.test" not in report
        [m] = wait_for(lambda: [m for m in site.sent() if "partial" in m.text], what="the delivery to ok@ext.test")
        assert m.rcpt_to == ["ok@ext.test"]
    finally:
        refuser.cleanup()


@pytest.mark.parametrize("drop", [".", "DATA"], ids=["after-the-final-dot", "at-DATA"])
def test_b44_connection_lost_mid_delivery_is_retried_not_lost(own_site, drop):
    # retried only when kicked: with a short interval a loaded machine lets several attempts
    # fail before the sink is replaced, and the fourth brings a "delayed" DSN
    site = own_site(sink_options={"drop": drop}, queue="retry_intervals = [600.0]\nmax_attempts = 100")
    out(site, "a@ext.test", "dropped")
    deferred_with(site, "a@ext.test", "")
    wait_for(lambda: queued(site, "a@ext.test") and 'error ""' not in queued(site, "a@ext.test"),
             what="an attempt that lost the connection")
    reached_peer = len(site.sink.dump_files())  # with a drop after the dot, the peer has the message
    port = site.sink.port
    site.sink.stop()
    good = SmtpSink(host="127.0.0.1", port=port).start()
    try:
        site.mox.mox("queue", "kick")
        [m] = good.wait_for_messages(1, timeout=20)
        assert "dropped" in m.text
        wait_for(lambda: "(none)" in site.queue_list(), what="the queue to empty")
        assert dsns(site) == []
        if drop == ".":
            assert reached_peer >= 1  # the same message went twice: a duplicate, never a loss
    finally:
        good.cleanup()


def test_b44_connection_lost_after_the_dot_logs_the_duplicate_risk(own_site):
    site = own_site(sink_options={"drop": "."}, queue=SLOW_QUEUE)
    out(site, "a@ext.test", "dup-risk")
    wait_for(lambda: queued(site, "a@ext.test") and 'error ""' not in queued(site, "a@ext.test"),
             what="an attempt that lost the connection")
    assert "duplicate" in site.mox.log_text().lower()


def test_b44_a_peer_that_never_answers_holds_one_delivery_and_loses_nothing(own_site):
    """The silent peer ties up its own delivery (RFC 5321's timeouts are minutes long) but not
    the queue: mail to another domain still goes out. A crash while waiting loses nothing:
    after the restart the message is still queued and goes out once the peer works."""
    site = own_site(queue=SLOW_QUEUE)
    silent = ScriptPeer("127.0.0.3", site.sink.port, mode="silent")
    site.dns.add("silent.test", "MX", "10 mx.silent.test.")
    site.dns.add("mx.silent.test", "A", "127.0.0.3")
    try:
        out(site, "a@silent.test", "to-the-silent")
        wait_for(lambda: silent.connections >= 1, what="the connection to the silent peer")
        out(site, "b@ext.test", "meanwhile")
        wait_for(lambda: any("meanwhile" in m.text for m in site.sent()), what="the other delivery")
        assert queued(site, "a@silent.test")
        site.mox.kill()
    finally:
        silent.stop()
    good = SmtpSink(host="127.0.0.3", port=site.sink.port).start()
    try:
        site.mox.start()  # the message is still queued: the restarted queue delivers it
        site.mox.mox("queue", "kick")
        [m] = good.wait_for_messages(1, timeout=20)
        assert "to-the-silent" in m.text
    finally:
        good.cleanup()


@pytest.mark.parametrize("mode", ["SERVFAIL", "TIMEOUT"])
def test_b45_dns_failure_defers_and_the_message_goes_once_dns_answers(shared, mode):
    site, domain = shared, f"flaky-{mode.lower()}.test"
    site.dns.add(domain, "TXT", "v=spf1 -all")  # the domain exists
    site.dns.fail(domain, None, mode)
    out(site, f"a@{domain}", f"dns-{mode}")
    failed_once(site, f"a@{domain}")
    assert dsns(site, f"dns-{mode}") == []  # a DNS failure is temporary
    site.dns.clear_failures(domain)
    site.dns.add(domain, "MX", "10 mx.ext.test.")
    site.mox.mox("queue", "kick")
    wait_for(lambda: any(f"dns-{mode}" in m.text for m in site.sent()), what="the delivery")
    assert dsns(site, f"dns-{mode}") == []


def test_b45_truncated_answer_is_retried_over_tcp(shared):
    site = shared
    site.dns.add("trunc.test", "MX", "10 mx.ext.test.")
    site.dns.fail("trunc.test", "MX", "TRUNCATE")
    out(site, "a@trunc.test", "truncated")
    wait_for(lambda: any("truncated" in m.text for m in site.sent()), what="the delivery")
    assert any(q.proto == "tcp" for q in site.dns.queries_for("trunc.test", "MX"))


def test_b45_invalid_mx_records_are_skipped_for_the_valid_ones(shared):
    site = shared
    site.dns.add("mixed.test", "MX", "5 nowhere.mixed.test.")  # no address
    site.dns.add("mixed.test", "MX", "10 mx.ext.test.")
    out(site, "a@mixed.test", "mixed-mx")
    wait_for(lambda: any("mixed-mx" in m.text for m in site.sent()), what="the delivery")


@pytest.mark.parametrize("domain,statuses", [
    ("nxdomain.test", (b"5.1.2", b"5.4.4")),
    ("nullmx.test", (b"5.1.10", b"5.7.27", b"5.1.2", b"5.4.4")),
])
def test_b45_nxdomain_and_null_mx_bounce_without_retries(shared, domain, statuses):
    site = shared  # 100 attempts a second apart: a bounce within the wait is no give-up
    if domain == "nullmx.test":
        site.dns.add_null_mx(domain)
    out(site, f"a@{domain}", f"no-mail-{domain}")
    [dsn] = wait_for(lambda: dsns(site, f"no-mail-{domain}"), what="the DSN", timeout=4)
    assert any(b"Status: " + s in dsn for s in statuses), dsn[:2000]
    assert not queued(site, f"a@{domain}")


@pytest.mark.parametrize("rdtype,ip", [("A", "127.0.0.2"), ("A", "0.0.0.0"), ("AAAA", "::1")])
def test_b46_mx_on_loopback_or_any_address_is_never_dialed(own_site, rdtype, ip):
    """The MX points where only this machine is. (Private and link-local targets are refused by
    the same rule; tests/test_smtpclient.py::test_refused_target checks them without a packet.)"""
    site = own_site(queue=SLOW_QUEUE, allow_private_targets=False)
    site.dns.add("ssrf.test", "MX", "10 mx.ssrf.test.")
    site.dns.add("mx.ssrf.test", rdtype, ip)
    out(site, "a@ssrf.test", "ssrf")
    [dsn] = wait_for(lambda: dsns(site, "ssrf"), what="the DSN")
    assert b"not connecting to" in dsn
    assert site.sink.dump_files(include_partial=True) == []
    assert "connected" not in site.mox.log_text().replace("not connecting", "")


def test_b46_mx_on_loopback_fails_permanently(own_site):
    site = own_site(queue=SLOW_QUEUE, allow_private_targets=False)
    site.dns.add("ssrf.test", "MX", "10 mx.ssrf.test.")
    site.dns.add("mx.ssrf.test", "A", "127.0.0.1")
    out(site, "a@ssrf.test", "ssrf-permanent")
    [dsn] = wait_for(lambda: dsns(site, "ssrf-permanent"), what="a DSN")
    assert b"Action: failed" in dsn and b"Status: 5.4.4" in dsn and b"not connecting to 127.0.0.1" in dsn
    assert "(none)" in site.queue_list()  # failed at the first attempt, not retried


def test_b47a_socks_proxy_down_defers(shared):
    site = shared
    site.dns.add("proxied.test", "MX", "10 mx.ext.test.")
    out(site, "a@proxied.test", "socks-down")
    failed_once(site, "a@proxied.test")
    out(site, "b@ext.test", "not-via-proxy")
    wait_for(lambda: any("not-via-proxy" in m.text for m in site.sent()), what="the direct delivery")
    assert dsns(site, "socks-down") == [] and queued(site, "a@proxied.test")


@pytest.mark.parametrize("transport", ["sub", "plain"], ids=["starttls-required", "no_starttls"])
def test_b47b_no_credentials_in_the_clear(shared, transport):
    """A submission relay that offers AUTH but no STARTTLS: by default TLS is required and the
    delivery defers; with ``no_starttls`` PLAIN and LOGIN are refused. Either way the password
    never crosses the wire."""
    site = shared
    peer = ScriptPeer("127.0.0.1", site.ports[transport], ehlo=("AUTH PLAIN LOGIN", "PIPELINING"))
    to = f"a-{transport}@relayed-{transport}.test"
    try:
        out(site, to, f"no-plain-auth-{transport}")
        wait_for(lambda: peer.connections >= 1, what="the connection to the relay")
        wait_for(lambda: dsns(site, f"no-plain-auth-{transport}") or failed_once(site, to), what="a failed attempt")
        transcript = peer.transcript()
        assert b"AUTH" not in transcript.upper() and b"relay-secret" not in transcript
        assert b"cmVsYXktc2VjcmV0" not in transcript  # base64 of the password
        assert peer.messages == []
    finally:
        peer.stop()


def _free_port() -> int:
    from mox_testpeers import free_port

    return free_port()


def _ca(directory):
    """A CA, a certificate for relay.test signed by it, and an unrelated self-signed one."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: install the Debian package openssl", pytrace=False)
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=relay.test",
        "-keyout", "relay.key", "-out", "relay.csr")
    (directory / "ext.cnf").write_text("subjectAltName=DNS:relay.test\n")
    run("x509", "-req", "-in", "relay.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "relay.pem")
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=relay.test", "-addext", "subjectAltName=DNS:relay.test", "-keyout", "other.key",
        "-out", "other.pem")
    return directory


def test_b47c_smarthost_whose_certificate_changed_defers(shared):
    site, certs = shared, shared.certs
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certs / "relay.pem", certs / "relay.key")
    peer = ScriptPeer("127.0.0.1", site.ports["tls"], tls=tls, close_after_message=True)
    try:
        out(site, "a@relayed-tls.test", "trusted-cert")
        wait_for(lambda: len(peer.messages) == 1, what="the delivery with the right certificate")
        tls.load_cert_chain(certs / "other.pem", certs / "other.key")  # the relay's certificate changed
        out(site, "b@relayed-tls.test", "changed-cert")
        failed_once(site, "b@relayed-tls.test")
        assert len(peer.messages) == 1 and b"MAIL FROM" not in peer.transcript().split(b"STARTTLS")[-1]
        assert dsns(site, "changed-cert") == []  # deferred, not bounced
    finally:
        peer.stop()


def test_b47d_outgoing_limit_is_a_temporary_refusal_that_survives_a_restart(own_site):
    from tests.security.conftest import DOMAINS

    site = own_site(domains=DOMAINS.replace('[accounts.alice]\n', '[accounts.alice]\nmax_outgoing_messages_per_day = 2\n'))
    for i in range(2):
        out(site, f"r{i}@ext.test", f"limit-{i}")
    with pytest.raises(Exception) as exc:
        out(site, "r2@ext.test", "limit-2")
    assert "451" in str(exc.value) or "452" in str(exc.value), exc.value
    site.mox.kill()
    site.mox.start()
    with pytest.raises(Exception) as exc:
        out(site, "r3@ext.test", "limit-3")
    assert "451" in str(exc.value) or "452" in str(exc.value), exc.value
    wait_for(lambda: len([m for m in site.sent() if "limit-" in m.text]) == 2, what="the two allowed messages")
