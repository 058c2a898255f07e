"""Direct delivery end to end: DirectTransport -> loopback DNS server -> real SMTP peers.

Peers are Postfix's smtp-sink (fault injection, message dumps) and private Postfix MX
instances (STARTTLS, per-recipient outcomes) on 127.0.0.x:25, from the mox_testpeers
fixtures. The transport is built from a loaded config, as the queue will build it.
"""

from __future__ import annotations

import pytest

from mox_core.api import Timeouts
from mox_core.plugins.host import PluginHost
from mox_core.plugins.kinds import DeliveryContext, DeliveryStatus, OutgoingMessage
from mox_core.smtpclient.mx import NULL_MX_TEXT
from mox_core.testing import load
from mox_testpeers import reserve, wait_for
from mox_transport_direct.transport import DirectTransport

DELIVERED, TEMPORARY, PERMANENT = DeliveryStatus.DELIVERED, DeliveryStatus.TEMPORARY, DeliveryStatus.PERMANENT
TESTING = "[testing]\nallow_private_targets = true\n"
BODY = b"From: a@example.org\r\nSubject: direct\r\n\r\nhello\r\n"


@pytest.fixture
def config(tmp_path):
    return load(tmp_path / "cfg", TESTING)


def make_ctx(config, resolver, attempt: int = 0) -> DeliveryContext:
    hostname = config.static.hostname if config is not None else "mail.example.org"
    return DeliveryContext(transport_name="", attempt=attempt, hostname=hostname, config=config, resolver=resolver)


def transport_from(config, name: str = "") -> DirectTransport:
    """Build the transport the way core does: plugin factory with validated settings."""
    host = PluginHost.load()
    kind = host.transports["direct"]
    settings = config.transports[name].settings if name else kind.settings_model()
    t = kind.factory(name, settings)
    assert isinstance(t, DirectTransport)
    return t


async def deliver(transport: DirectTransport, ctx: DeliveryContext, rcpts: list[str], data: bytes = BODY):
    return list(await transport.deliver(OutgoingMessage("a@example.org", rcpts, data), ctx))


async def deliver_later(config, dns_server, dns_resolver, sink) -> list:
    """A delivery to ``sink`` after one that must not have reached it: the absence checks
    look once this one is there (a positive event), not after a fixed sleep."""
    dns_server.add("later.test", "MX", "10 mx.later.test.")
    dns_server.add("mx.later.test", "A", sink.host)
    [r] = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["c@later.test"])
    assert r.status is DELIVERED, r.text
    return sink.wait_for_messages(1)


# ============================================================================ basic delivery


async def test_delivers_to_mx_and_dot_stuffs(config, dns_server, dns_resolver, smtp_sink_factory):
    sink = smtp_sink_factory(host=None, port=25)
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", sink.host)
    data = b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..two\r\nlast\r\n"
    results = await deliver(transport_from(config), make_ctx(config, dns_resolver),
                            ["b@dest.test", "c@Dest.Test"], data)
    assert [(r.recipient, r.status, r.remote_host) for r in results] == [
        ("b@dest.test", DELIVERED, "mx.dest.test"), ("c@Dest.Test", DELIVERED, "mx.dest.test")]
    [msg] = sink.wait_for_messages(1)
    assert msg.helo == "mail.example.org" and msg.mail_from == "a@example.org"
    assert msg.rcpt_to == ["b@dest.test", "c@Dest.Test"]
    # smtp-sink removes the dot-stuffing it receives: the lines arrive intact only if we stuffed
    # them, and a lone "." would have ended the data early
    assert msg.data == b"Subject: dots\n\n.leading dot\n.\n..two\nlast\n"


async def test_bare_cr_or_lf_is_never_sent(config, dns_server, dns_resolver, smtp_sink_factory):
    """SMTP smuggling: no bytes that a next hop could read as end of data."""
    sink = smtp_sink_factory(host=None, port=25)
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", sink.host)
    transport, ctx = transport_from(config), make_ctx(config, dns_resolver)
    for data in [b"Subject: x\r\n\r\nx\r.\r\nMAIL FROM:<ceo@bank.test>\r\n", b"Subject: x\r\n\r\na\n.\nb\r\n",
                 b"Subject: x\r\n\r\na\n.\r\nb\r\n"]:
        [r] = await deliver(transport, ctx, ["b@dest.test"], data)
        assert r.status is PERMANENT and "bare" in r.text
    await deliver(transport, ctx, ["b@dest.test"])  # a clean one afterwards
    [msg] = sink.wait_for_messages(1)
    assert b"\r" not in msg.raw and b"MAIL FROM" not in msg.data
    assert sink.count == 1


async def test_no_mx_falls_back_to_a_record(config, dns_server, dns_resolver, smtp_sink_factory):
    sink = smtp_sink_factory(host=None, port=25)
    dns_server.add("plain.test", "A", sink.host)
    dns_server.add("plain.test", "SOA", "ns.plain.test. admin.plain.test. 1 3600 600 86400 60")
    [r] = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["b@plain.test"])
    assert (r.status, r.remote_host) == (DELIVERED, "plain.test")
    assert sink.wait_for_messages(1)[0].rcpt_to == ["b@plain.test"]
    assert [q.rdtype for q in dns_server.queries_for("plain.test")][:2] == ["CNAME", "MX"]


async def test_null_mx_is_permanent_without_connecting(config, dns_server, dns_resolver, smtp_sink_factory):
    sink = smtp_sink_factory(host=None, port=25)
    dns_server.add_null_mx("nomail.test")
    dns_server.add("nomail.test", "A", sink.host)  # must not be used as an implicit MX
    results = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["a@nomail.test", "b@nomail.test"])
    assert [(r.status, r.text) for r in results] == [(PERMANENT, NULL_MX_TEXT)] * 2
    assert results[0].enhanced_code == "5.1.10"
    [later] = await deliver_later(config, dns_server, dns_resolver, sink)
    assert later.rcpt_to == ["c@later.test"] and not dns_server.queries_for("nomail.test", "A")


async def test_cname_and_ip_literal_recipients(config, dns_server, dns_resolver, smtp_sink_factory):
    sink = smtp_sink_factory(host=None, port=25)
    dns_server.add("alias.test", "CNAME", "dest.test.")
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", sink.host)
    transport, ctx = transport_from(config), make_ctx(config, dns_resolver)
    [r] = await deliver(transport, ctx, ["b@alias.test"])
    assert (r.status, r.remote_host) == (DELIVERED, "mx.dest.test")
    [r] = await deliver(transport, ctx, [f"postmaster@[{sink.host}]"])
    assert (r.status, r.remote_host) == (DELIVERED, sink.host)
    msgs = sink.wait_for_messages(2)
    assert sorted(m.rcpt_to[0] for m in msgs) == ["b@alias.test", f"postmaster@[{sink.host}]"]


# ============================================================================ failures and the next MX


@pytest.mark.parametrize("fault", [
    {"reject_4xx": "RCPT"},  # 450 4.3.0 to the only recipient
    {"reject_4xx": "MAIL"},
    {"reply_421": "MAIL"},  # 421 and disconnect while the client pipelines RCPT and DATA
    {"reply_421": "CONNECT"},  # 421 greeting and disconnect
    {"reject_5xx": "CONNECT"},  # 5xx greeting: skip the host (Postfix smtp_skip_5xx_greeting)
    {"drop": "."},  # connection lost after the final dot, no reply
    "refused",  # nothing listens
])
async def test_first_mx_fails_second_succeeds(config, dns_server, dns_resolver, smtp_sink_factory, fault):
    if fault == "refused":
        first = reserve(None, 25)  # a 127.0.0.x:25 where nothing listens, held for this test
        first_host = first.host
    else:
        first = smtp_sink_factory(host=None, port=25, **fault)
        first_host = first.host
    second = smtp_sink_factory(host=None, port=25)
    assert first_host != second.host
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.")
    dns_server.add("dest.test", "MX", "20 mx2.dest.test.")
    dns_server.add("mx1.dest.test", "A", first_host)
    dns_server.add("mx2.dest.test", "A", second.host)
    [r] = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["b@dest.test"])
    if fault == "refused":
        first.release()
    assert (r.status, r.remote_host) == (DELIVERED, "mx2.dest.test"), r
    assert second.wait_for_messages(1)[0].rcpt_to == ["b@dest.test"]


async def test_all_mx_temporary_gives_last_error(config, dns_server, dns_resolver, smtp_sink_factory):
    first = smtp_sink_factory(host=None, port=25, reject_4xx="MAIL")
    second = smtp_sink_factory(host=None, port=25, reject_4xx="RCPT", soft_reply="451 4.7.1 greylisted")
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.")
    dns_server.add("dest.test", "MX", "20 mx2.dest.test.")
    dns_server.add("mx1.dest.test", "A", first.host)
    dns_server.add("mx2.dest.test", "A", second.host)
    [r] = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["b@dest.test"])
    assert (r.status, r.code, r.enhanced_code, r.remote_host) == (TEMPORARY, 451, "4.7.1", "mx2.dest.test")
    assert "greylisted" in r.text


async def test_5xx_is_permanent_and_stops(config, dns_server, dns_resolver, smtp_sink_factory):
    first = smtp_sink_factory(host=None, port=25, reject_5xx="RCPT")
    second = smtp_sink_factory(host=None, port=25)
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.")
    dns_server.add("dest.test", "MX", "20 mx2.dest.test.")
    dns_server.add("mx1.dest.test", "A", first.host)
    dns_server.add("mx2.dest.test", "A", second.host)
    results = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["b@dest.test", "c@dest.test"])
    assert [(r.status, r.code, r.enhanced_code, r.remote_host) for r in results] == [
        (PERMANENT, 500, "5.3.0", "mx1.dest.test")] * 2
    [later] = await deliver_later(config, dns_server, dns_resolver, second)
    assert later.rcpt_to == ["c@later.test"] and first.count == 0


async def test_timeout_is_temporary_and_tries_next(config, dns_server, dns_resolver, smtp_sink_factory):
    # (smtp-sink's -W answers pipelined commands out of order: no PIPELINING here)
    slow = smtp_sink_factory(host=None, port=25, delay={"mail": 2}, pipelining=False)
    ok = smtp_sink_factory(host=None, port=25)
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.")
    dns_server.add("dest.test", "MX", "20 mx2.dest.test.")
    dns_server.add("mx1.dest.test", "A", slow.host)
    dns_server.add("mx2.dest.test", "A", ok.host)
    transport = DirectTransport("", None, timeouts=Timeouts(command=0.5))
    [r] = await deliver(transport, make_ctx(config, dns_resolver), ["b@dest.test"])
    assert (r.status, r.remote_host) == (DELIVERED, "mx2.dest.test")
    assert ok.wait_for_messages(1)


async def test_mixed_per_recipient_results(config, dns_server, dns_resolver, postfix_mx_factory, smtp_sink_factory):
    """One Postfix MX answering 250/550/451 per recipient, plus a second domain elsewhere."""
    mx = postfix_mx_factory("dest.test")
    mx.postconf(virtual_mailbox_maps="inline:{ bob@dest.test=bob/ }",
                smtpd_recipient_restrictions="check_recipient_access inline:{ "
                "{ tempfail@dest.test = 451 4.2.0 try again later } }")
    other = smtp_sink_factory(host=None, port=25)
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", mx.host)
    dns_server.add("other.test", "MX", "10 mx.other.test.")
    dns_server.add("mx.other.test", "A", other.host)
    rcpts = ["bob@dest.test", "x@other.test", "nobody@dest.test", "tempfail@dest.test"]
    results = await deliver(transport_from(config), make_ctx(config, dns_resolver), rcpts)
    assert [(r.recipient, r.status, r.code) for r in results] == [
        ("bob@dest.test", DELIVERED, 250), ("x@other.test", DELIVERED, 250),
        ("nobody@dest.test", PERMANENT, 550), ("tempfail@dest.test", TEMPORARY, 451)]
    assert results[2].enhanced_code == "5.1.1" and results[3].text.endswith("try again later")
    [msg] = mx.wait_for_messages(1, mailbox="bob")
    assert msg.original_to == "bob@dest.test"
    assert other.wait_for_messages(1)[0].rcpt_to == ["x@other.test"]


# ============================================================================ TLS


async def test_opportunistic_starttls_with_postfix(config, dns_server, dns_resolver, postfix_mx_factory):
    mx = postfix_mx_factory("dest.test", main_cf={"smtpd_tls_received_header": "yes"})
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", mx.host)
    [r] = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["bob@dest.test"])
    assert r.status is DELIVERED
    [msg] = mx.wait_for_messages(1)
    assert "using TLSv1.3" in msg.text or "using TLSv1.2" in msg.text


async def test_tls_handshake_failure_then_plaintext_retry(config, dns_server, dns_resolver, postfix_mx_factory):
    """Postfix offers STARTTLS but speaks only TLS 1.0/1.1, below our minimum of 1.2: the
    handshake fails, and delivery is retried once without TLS (as mox's direct delivery)."""
    mx = postfix_mx_factory("dest.test", main_cf={
        "smtpd_tls_protocols": "!SSLv2, !SSLv3, !TLSv1.2, !TLSv1.3",
        "smtpd_tls_received_header": "yes", "smtpd_tls_loglevel": "1"})
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", mx.host)
    [r] = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["bob@dest.test"])
    assert r.status is DELIVERED, r
    [msg] = mx.wait_for_messages(1)
    assert "using TLS" not in msg.text and "ESMTP id" in msg.text
    wait_for(lambda: "SSL_accept error" in mx.log_text() or "TLS handshake failed" in mx.log_text(), 10,
             what="Postfix logging the failed handshake")
    assert mx.log_text().count("connect from") >= 2


# ============================================================================ guards and settings


async def test_private_target_refused_without_test_setting(tmp_path, dns_server, dns_resolver, smtp_sink_factory):
    sink = smtp_sink_factory(host=None, port=25)
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", sink.host)
    strict = load(tmp_path / "strict")  # no [testing] section
    for cfg in (strict, None):
        [r] = await deliver(transport_from(strict), make_ctx(cfg, dns_resolver), ["b@dest.test"])
        assert r.status is PERMANENT and r.enhanced_code == "5.4.4"  # never dialed, and never retried
        assert f"not connecting to {sink.host}: loopback address" in r.text and r.remote_host == "mx.dest.test"
    permissive = load(tmp_path / "permissive", TESTING)
    [later] = await deliver_later(permissive, dns_server, dns_resolver, sink)
    assert later.rcpt_to == ["c@later.test"] and len(sink.dump_files(include_partial=True)) == 1


async def test_direct_smtp_port_from_config(tmp_path, dns_server, dns_resolver, smtp_sink_factory):
    sink = smtp_sink_factory(host="127.0.0.1", port=None)  # a free high port
    cfg = load(tmp_path / "port", TESTING + f"direct_smtp_port = {sink.port}\n")
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", "127.0.0.1")
    [r] = await deliver(transport_from(cfg), make_ctx(cfg, dns_resolver), ["b@dest.test"])
    assert r.status is DELIVERED
    assert sink.wait_for_messages(1)


async def test_disable_ipv4_and_ipv6(tmp_path, dns_server, dns_resolver, smtp_sink_factory):
    sink = smtp_sink_factory(host=None, port=25)
    cfg = load(tmp_path / "fam", TESTING + '[transports.v4]\nkind = "direct"\ndisable_ipv6 = true\n'
               '[transports.v6]\nkind = "direct"\ndisable_ipv4 = true\n')
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", sink.host)
    dns_server.add("mx.dest.test", "AAAA", "::1")  # nothing listens on [::1]:25 for this test
    ctx = make_ctx(cfg, dns_resolver)

    [r] = await deliver(transport_from(cfg, "v4"), ctx, ["b@dest.test"])
    assert r.status is DELIVERED
    assert not dns_server.queries_for("mx.dest.test", "AAAA")

    dns_server.remove("mx.dest.test", "AAAA")
    [r] = await deliver(transport_from(cfg, "v6"), ctx, ["b@dest.test"])
    assert r.status is TEMPORARY and "has no AAAA records" in r.text
    assert len(dns_server.queries_for("mx.dest.test", "A")) == 1  # only from the v4 delivery
    assert sink.wait_for_messages(1) and sink.count == 1


async def test_dns_failure_is_temporary(config, dns_server, dns_resolver):
    dns_server.fail("dest.test", "MX", "SERVFAIL")
    [r] = await deliver(transport_from(config), make_ctx(config, dns_resolver), ["b@dest.test"])
    assert r.status is TEMPORARY and "mx lookup" in r.text and r.code is None
