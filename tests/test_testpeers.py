"""The test peers of mox-testpeers work: DNS server, smtp-sink, Postfix, SOCKS5 proxies.

Everything talks to 127.0.0.0/8 only; DNS comes from the loopback test server.
"""

from __future__ import annotations

import base64
import smtplib
import subprocess
import time

import dns.asyncresolver
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver
import pytest

from mox_testpeers import MissingToolError, PeerError, require_tool, reserve
from mox_testpeers.dnsserver import resolver_for, sync_resolver_for

DKIM_KEY = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 20  # 897 bytes


def send(host: str, port: int, rcpts=("b@example.net",), subject: str = "t", body: str = "body") -> None:
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.sendmail("a@example.org", list(rcpts), f"Subject: {subject}\r\n\r\n{body}\r\n")


# ============================================================================ DNS server


async def test_dns_mx_a_aaaa_cname(dns_server, dns_resolver):
    dns_server.add("example.org", "MX", "10 mx1.example.org.")
    dns_server.add("example.org", "MX", "20 mx2.example.org")  # trailing dot optional
    dns_server.add("mx1.example.org", "A", "127.0.0.2")
    dns_server.add("mx1.example.org", "AAAA", "::1")
    dns_server.add("www.example.org", "CNAME", "mx1.example.org.")
    assert isinstance(dns_resolver, dns.asyncresolver.Resolver)
    assert dns_server.nameserver == f"127.0.0.1:{dns_server.port}"

    mx = await dns_resolver.resolve("example.org", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx1.example.org."), (20, "mx2.example.org.")]
    assert [r.address for r in await dns_resolver.resolve("mx1.example.org", "A")] == ["127.0.0.2"]
    assert [r.address for r in await dns_resolver.resolve("MX1.Example.ORG", "AAAA")] == ["::1"]
    a = await dns_resolver.resolve("www.example.org", "A")
    assert a.canonical_name.to_text() == "mx1.example.org."
    assert [r.address for r in a] == ["127.0.0.2"]
    assert a.response.flags & dns.flags.AA

    # the zone can change while the server runs
    dns_server.set("mx1.example.org", "A", ["127.0.0.3", "127.0.0.4"])
    assert sorted(r.address for r in await dns_resolver.resolve("mx1.example.org", "A")) == [
        "127.0.0.3", "127.0.0.4"]
    assert [q.rdtype for q in dns_server.queries_for("mx1.example.org")] == ["A", "AAAA", "A"]


async def test_dns_long_txt_split_in_255_byte_strings(dns_server, dns_resolver):
    dns_server.add("sel._domainkey.example.org", "TXT", DKIM_KEY)
    dns_server.add("example.org", "TXT", ["v=spf1 ", "-all"])  # explicit character-strings
    ans = await dns_resolver.resolve("sel._domainkey.example.org", "TXT")
    [rdata] = list(ans)
    assert [len(s) for s in rdata.strings] == [255, 255, 255, len(DKIM_KEY) - 765]
    assert b"".join(rdata.strings).decode() == DKIM_KEY
    [spf] = list(await dns_resolver.resolve("example.org", "TXT"))
    assert spf.strings == (b"v=spf1 ", b"-all")


async def test_dns_null_mx(dns_server, dns_resolver):
    dns_server.add_null_mx("nomail.example.org")
    [mx] = list(await dns_resolver.resolve("nomail.example.org", "MX"))
    assert mx.preference == 0 and mx.exchange == dns.name.root


async def test_dns_nxdomain_vs_nodata(dns_server, dns_resolver):
    dns_server.add("example.org", "SOA", "ns.example.org. admin.example.org. 1 3600 600 86400 60")
    dns_server.add("host.sub.example.org", "A", "127.0.0.5")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await dns_resolver.resolve("missing.example.org", "A")
    with pytest.raises(dns.resolver.NoAnswer) as e:  # the name exists, not with MX
        await dns_resolver.resolve("host.sub.example.org", "MX")
    assert e.value.response().authority[0].rdtype == dns.rdatatype.SOA
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal
        await dns_resolver.resolve("sub.example.org", "A")
    # programmed: NXDOMAIN for a name with data, NODATA for a missing one
    dns_server.fail("host.sub.example.org", None, "NXDOMAIN")
    dns_server.fail("missing.example.org", "A", "NODATA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await dns_resolver.resolve("host.sub.example.org", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        await dns_resolver.resolve("missing.example.org", "A")


async def test_dns_servfail_and_recovery(dns_server, dns_resolver):
    dns_server.add("example.org", "MX", "10 mx.example.org.")
    dns_server.fail("example.org", "MX", "SERVFAIL")
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        await dns_resolver.resolve("example.org", "MX")
    dns_server.clear_failures()
    assert len(await dns_resolver.resolve("example.org", "MX")) == 1
    # only the next query fails
    dns_server.fail("example.org", "MX", "REFUSED", times=1)
    with pytest.raises(dns.resolver.NoNameservers, match="REFUSED"):
        await dns_resolver.resolve("example.org", "MX")
    assert len(await dns_resolver.resolve("example.org", "MX")) == 1


async def test_dns_timeout_is_quick(dns_server):
    dns_server.add("slow.example.org", "MX", "10 mx.example.org.")
    dns_server.fail("slow.example.org", "MX", "TIMEOUT")
    resolver = resolver_for(dns_server, timeout=0.2, lifetime=0.4)
    t0 = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolver.resolve("slow.example.org", "MX")
    assert time.monotonic() - t0 < 2
    # other types of that name still answer (NODATA)
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("slow.example.org", "A")


def test_dns_sync_resolver_and_tcp_fallback(dns_server):
    dns_server.add("example.org", "MX", "10 mx.example.org.")
    dns_server.fail("example.org", "MX", "TRUNCATE")
    resolver = sync_resolver_for(dns_server)
    assert isinstance(resolver, dns.resolver.Resolver)
    assert resolver.nameservers[0].address == "127.0.0.1"
    assert len(resolver.resolve("example.org", "MX")) == 1
    assert [q.proto for q in dns_server.queries_for("example.org", "MX")] == ["udp", "tcp"]


# ============================================================================ smtp-sink


def test_smtp_sink_receives_and_dumps(smtp_sink):
    assert smtp_sink.host == "127.0.0.1"
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as s:
        s.ehlo("client.test")
        assert "auth" not in s.esmtp_features  # -a: no AUTH, like an ordinary MX
        s.sendmail("a@example.org", ["b@example.net", "c@example.net"],
                   "Subject: hello\r\n\r\nline one\r\n.leading dot\r\n", mail_options=["BODY=8BITMIME"])
    [msg] = smtp_sink.messages()
    assert smtp_sink.count == 1
    assert msg.helo == "client.test"
    assert msg.mail_from == "a@example.org"
    assert msg.mail_options == ["BODY=8BITMIME"]
    assert msg.rcpt_to == ["b@example.net", "c@example.net"]
    assert msg.data == b"Subject: hello\n\nline one\n.leading dot\n"
    assert msg.message["Subject"] == "hello"
    smtp_sink.clear()
    assert smtp_sink.messages() == []


@pytest.mark.parametrize(
    ("smtp_sink", "error", "code"),
    [
        ({"reject_4xx": "RCPT"}, smtplib.SMTPRecipientsRefused, 450),
        ({"reject_5xx": "RCPT"}, smtplib.SMTPRecipientsRefused, 500),
        ({"reject_4xx": "RCPT", "soft_reply": "451 4.7.1 Greylisted, try later"},
         smtplib.SMTPRecipientsRefused, 451),
        ({"reject_5xx": "RCPT", "hard_reply": "550 5.1.1 No such user"}, smtplib.SMTPRecipientsRefused, 550),
        ({"reject_4xx": "MAIL"}, smtplib.SMTPSenderRefused, 450),
        ({"reply_421": "MAIL"}, smtplib.SMTPSenderRefused, 421),
        ({"reject_5xx": "."}, smtplib.SMTPDataError, 500),
        ({"drop": "."}, smtplib.SMTPServerDisconnected, None),
        ({"drop": "DATA"}, smtplib.SMTPServerDisconnected, None),
        ({"drop": "CONNECT"}, smtplib.SMTPServerDisconnected, None),
    ],
    indirect=["smtp_sink"],
    ids=lambda v: None if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v)[:40],
)
def test_smtp_sink_fault_injection(smtp_sink, error, code):
    with pytest.raises(error) as e:
        send(smtp_sink.host, smtp_sink.port)
    if error is smtplib.SMTPRecipientsRefused:
        [(got, text)] = e.value.recipients.values()
        assert got == code
        if code == 451:
            assert text == b"4.7.1 Greylisted, try later"
    elif code is not None:
        assert e.value.smtp_code == code


@pytest.mark.parametrize("smtp_sink", [{"delay": {"rcpt": 1}}], indirect=True)
def test_smtp_sink_slow_reply(smtp_sink):
    t0 = time.monotonic()
    send(smtp_sink.host, smtp_sink.port)
    assert time.monotonic() - t0 >= 0.9


async def test_smtp_sink_factory_several_mx_first_failing(smtp_sink_factory, dns_server, dns_resolver):
    """The MX pattern: two sinks on port 25 at distinct 127.0.0.x, the preferred one tempfails."""
    first = smtp_sink_factory(reject_4xx="RCPT")  # 127.0.0.2:25 unless taken
    second = smtp_sink_factory()
    assert first.port == second.port == 25
    assert first.host != second.host and first.host.startswith("127.0.0.")
    dns_server.add_mx_host("dest.example", "mx1.dest.example", 10, a=first.host)
    dns_server.add_mx_host("dest.example", "mx2.dest.example", 20, a=second.host)

    errors = []
    mxs = sorted(await dns_resolver.resolve("dest.example", "MX"), key=lambda r: r.preference)
    for mx in mxs:
        [a] = list(await dns_resolver.resolve(mx.exchange, "A"))
        try:
            send(a.address, 25, ["x@dest.example"], subject="via mx")
            break
        except smtplib.SMTPRecipientsRefused as e:
            errors.append(e.recipients["x@dest.example"][0])
    assert errors == [450]
    assert first.count == 0
    [msg] = second.wait_for_messages(1)
    assert msg.rcpt_to == ["x@dest.example"] and msg.message["Subject"] == "via mx"


def test_busy_address_is_refused_not_shared(smtp_sink_factory):
    """smtp-sink and Postfix set SO_REUSEPORT: a second one would silently share the port."""
    sink = smtp_sink_factory(host="127.0.0.1", port=None)
    with pytest.raises(PeerError, match="in use"):
        reserve(sink.host, sink.port)


def test_missing_tool_fails_with_debian_package(monkeypatch):
    import mox_testpeers
    from mox_testpeers import pytest_plugin

    with pytest.raises(MissingToolError, match="'no-such-peer-tool'.*Debian package 'some-package'"):
        require_tool("no-such-peer-tool", "some-package")
    monkeypatch.setattr(mox_testpeers.shutil, "which", lambda name: None)
    monkeypatch.setattr(mox_testpeers, "_SBIN_DIRS", ())
    from mox_testpeers.sink import SmtpSink

    factory = pytest_plugin._Factory("smtp_sink", SmtpSink)
    with pytest.raises(pytest.fail.Exception, match="Debian package 'postfix'"):  # a failure, not a skip
        factory()
    factory.close()
    # a program a test runs itself (swaks, curl, ...): the same
    from tests.conftest import program

    with pytest.raises(pytest.fail.Exception, match="'swaks' not found: install the Debian package 'swaks'"):
        program("swaks", "swaks")


# ============================================================================ Postfix smarthost


def _session(smarthost) -> smtplib.SMTP:
    s = smtplib.SMTP(smarthost.host, smarthost.port, timeout=10)
    s.ehlo("client.test")
    s.starttls(context=smarthost.ssl_context())
    s.ehlo("client.test")
    return s


def _scram_auth(s: smtplib.SMTP, mech: str, user: str, password: str) -> tuple[int, bytes]:
    from scramp import ScramClient

    c = ScramClient([mech], user, password)
    code, resp = s.docmd("AUTH", mech + " " + base64.b64encode(c.get_client_first().encode()).decode())
    assert code == 334, (code, resp)
    c.set_server_first(base64.b64decode(resp).decode())
    code, resp = s.docmd(base64.b64encode(c.get_client_final().encode()).decode())
    if code != 334:
        return code, resp  # refused
    c.set_server_final(base64.b64decode(resp).decode())  # verifies the server signature
    return s.docmd("")  # empty line ends the exchange


def test_postfix_smarthost_auth_every_mechanism(postfix_smarthost):
    sh = postfix_smarthost
    assert sh.users == {"alice": "secret-pw"}
    with smtplib.SMTP(sh.host, sh.port, timeout=10) as s:
        s.ehlo("client.test")
        assert "auth" not in s.esmtp_features  # only after STARTTLS
    mechs = ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"]
    for mech in mechs:
        with _session(sh) as s:
            assert mech in s.esmtp_features["auth"].split()
            if mech.startswith("SCRAM"):
                code, resp = _scram_auth(s, mech, "alice", "secret-pw")
            else:
                s.user, s.password = "alice", "secret-pw"
                code, resp = s.auth(mech, getattr(s, "auth_" + mech.lower().replace("-", "_")))
            assert (code, resp) == (235, b"2.7.0 Authentication successful"), mech
            s.sendmail("sender@example.org", ["rcpt@example.net"], f"Subject: via {mech}\r\n\r\nhello\r\n")
    msgs = sh.wait_for_messages(len(mechs))
    assert sorted(m.message["Subject"] for m in msgs) == sorted(f"via {m}" for m in mechs)
    assert msgs[0].return_path == "sender@example.org" and msgs[0].delivered_to == "rcpt@example.net"
    assert "sasl_method=SCRAM-SHA-256, sasl_username=alice@smarthost.test" in sh.log_text()


def test_postfix_smarthost_wrong_password_and_users(postfix_smarthost):
    sh = postfix_smarthost
    with _session(sh) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("alice", "wrong")
        assert e.value.smtp_code == 535
    with _session(sh) as s:
        assert _scram_auth(s, "SCRAM-SHA-256", "alice", "wrong")[0] == 535
    with _session(sh) as s:  # unauthenticated: no relaying
        s.mail("a@example.org")
        assert s.rcpt("b@example.net")[0] == 554
    sh.add_user("bob", "b0b-pw")  # live, no reload
    with smtplib.SMTP_SSL(sh.host, sh.tls_port, context=sh.ssl_context(), timeout=10) as s:
        assert s.login("bob", "b0b-pw")[0] == 235
    sh.remove_user("bob")
    with _session(sh) as s, pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("bob", "b0b-pw")


def test_postfix_smarthost_swaks(postfix_smarthost):
    swaks = require_tool("swaks", "swaks")
    sh = postfix_smarthost
    base = [swaks, "--server", f"{sh.host}:{sh.port}", "--from", "sender@example.org", "--to",
            "rcpt@example.net", "--tls", "--tls-verify", "--tls-ca-path", sh.cafile, "-S", "1",
            "--auth", "CRAM-MD5", "--auth-user", "alice"]
    ok = subprocess.run(base + ["--auth-password", "secret-pw", "--header", "Subject: swaks"],
                        capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(base + ["--auth-password", "wrong", "--quit-after", "AUTH"],
                         capture_output=True, timeout=30)
    assert bad.returncode == 28  # authentication failed
    [msg] = sh.wait_for_messages(1)
    assert msg.message["Subject"] == "swaks"


# ============================================================================ Postfix MX


def test_postfix_mx_accepts_mail_on_port_25(postfix_mx_factory):
    mx = postfix_mx_factory("dest.test")  # 127.0.0.2:25 unless taken by another test process
    assert mx.port == 25 and mx.host.startswith("127.0.0.")
    with smtplib.SMTP(mx.host, 25, timeout=10) as s:
        assert s.ehlo()[1].startswith(b"mx.dest.test")
        s.starttls(context=mx.ssl_context())
        s.sendmail("a@example.org", ["bob@dest.test"], "Subject: to mx\r\n\r\nhi mx\r\n")
        s.mail("a@example.org")
        assert s.rcpt("x@elsewhere.example")[0] == 554  # relay access denied
    [msg] = mx.wait_for_messages(1)
    assert msg.message["Subject"] == "to mx" and msg.original_to == "bob@dest.test"


def test_postfix_mx_per_recipient_outcomes(postfix_mx_factory):
    mx = postfix_mx_factory("dest.test")
    mx.postconf(virtual_mailbox_maps="inline:{ bob@dest.test=bob/ }",
                smtpd_recipient_restrictions="check_recipient_access inline:{ "
                "{ tempfail@dest.test = 451 4.2.0 try again later } }")
    with smtplib.SMTP(mx.host, mx.port, timeout=10) as s:
        s.mail("a@example.org")
        assert s.rcpt("bob@dest.test")[0] == 250
        assert s.rcpt("nobody@dest.test")[0] == 550
        assert s.rcpt("tempfail@dest.test")[0] == 451
        assert s.data(b"Subject: mixed\r\n\r\nx\r\n")[0] == 250
    [msg] = mx.wait_for_messages(1, mailbox="bob")
    assert msg.delivered_to == "bob@dest.test"


# ============================================================================ SOCKS5


class _SocksSMTP(smtplib.SMTP):
    """smtplib over an already connected socket factory (the SOCKS5 proxy)."""

    def __init__(self, proxy, host, port):
        self._proxy = proxy
        super().__init__(host, port, timeout=10)

    def _get_socket(self, host, port, timeout):
        return self._proxy.connect(host, port, timeout=timeout)


@pytest.fixture(params=["dante", "microsocks"])
def socks_kind(request):
    return request.param


@pytest.mark.parametrize("auth", [None, "auth"])
def test_socks_proxy_forwards_to_smtp_sink(socks_kind, auth, request, smtp_sink):
    factory = request.getfixturevalue(f"socks_{socks_kind}_factory")
    proxy = factory(*(("sockuser", "socks-pw") if auth else (None, None)))
    assert proxy.host == "127.0.0.1" and proxy.url.startswith("socks5://")
    sock = proxy.connect("127.0.0.1", smtp_sink.port)
    try:
        assert sock.recv(200).startswith(b"220 ")
    finally:
        sock.close()
    with _SocksSMTP(proxy, "localhost", smtp_sink.port) as s:  # name resolved by the proxy
        s.sendmail("a@example.org", ["b@example.net"], f"Subject: via {socks_kind}\r\n\r\nx\r\n")
    [msg] = smtp_sink.messages()
    assert msg.message["Subject"] == f"via {socks_kind}"


@pytest.mark.parametrize("socks_dante", ["auth"], indirect=True)
def test_socks_dante_wrong_password_refused(socks_dante, smtp_sink):
    from python_socks import ProxyError

    assert socks_dante.username == "sockuser"
    # pam.username: the RFC 1929 exchange succeeds, then CONNECT gets 0x02 "not allowed by ruleset"
    with pytest.raises(ProxyError) as e:
        socks_dante.connect("127.0.0.1", smtp_sink.port, password="wrong", username="sockuser")
    assert e.value.error_code == 2
    with pytest.raises(ProxyError, match="No acceptable authentication methods"):
        _connect_without_credentials(socks_dante, smtp_sink.port)


@pytest.mark.parametrize("socks_microsocks", [("tuser", "tpass")], indirect=True)
def test_socks_microsocks_wrong_password_refused(socks_microsocks, smtp_sink):
    from python_socks import ProxyError

    assert (socks_microsocks.username, socks_microsocks.password) == ("tuser", "tpass")
    with pytest.raises(ProxyError, match="Username and password authentication failure"):
        socks_microsocks.connect("127.0.0.1", smtp_sink.port, username="tuser", password="wrong")
    with pytest.raises(ProxyError, match="No acceptable authentication methods"):
        _connect_without_credentials(socks_microsocks, smtp_sink.port)


def _connect_without_credentials(proxy, port):
    from python_socks.sync import Proxy

    return Proxy.from_url(f"socks5://{proxy.host}:{proxy.port}").connect("127.0.0.1", port, timeout=5)


def test_socks_destination_refused(socks_microsocks):
    from python_socks import ProxyError

    res = reserve("127.0.0.1", None, hold=True)  # a port nobody listens on
    try:
        with pytest.raises(ProxyError) as e:
            socks_microsocks.connect("127.0.0.1", res.port)
        assert e.value.error_code == 5
    finally:
        res.release()
