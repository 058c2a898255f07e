"""smtp transport end to end: SMTPTransport -> loopback DNS -> a real relay (Postfix, smtp-sink).

The Postfix smarthost of mox_testpeers is configured here to relay for 127.0.0.0/8 without
authentication (``permit_mynetworks``), and to require STARTTLS (``smtpd_tls_security_level =
encrypt``); its certificate (names localhost, smarthost.test, 127.0.0.1) is signed by a
throwaway CA, ``.cafile``. The smarthost's name is resolved through the test DNS server.
"""

from __future__ import annotations

import shutil

import pytest

from mox_core.api import Timeouts
from mox_core.plugins.host import PluginHost
from mox_core.plugins.kinds import DeliveryContext, DeliveryStatus, OutgoingMessage
from mox_core.testing import load
from mox_testpeers import reserve
from mox_transport_smtp.transport import SMTPTransport

DELIVERED, TEMPORARY, PERMANENT = DeliveryStatus.DELIVERED, DeliveryStatus.TEMPORARY, DeliveryStatus.PERMANENT
BODY = b"From: a@example.org\r\nSubject: relayed\r\n\r\nhello smarthost\r\n"
# a broken test should fail in seconds, not after the RFC 5321 five minutes
QUICK = Timeouts(connect=5, command=10, data=10, tls_handshake=10)

RELAY_FOR_LOOPBACK = {
    "mynetworks": "127.0.0.0/8",
    "smtpd_relay_restrictions": "permit_mynetworks, reject",
    "smtpd_recipient_restrictions": "permit_mynetworks, reject",
    "smtpd_tls_received_header": "yes",
}


@pytest.fixture
def relay(postfix_smarthost_factory, dns_server):
    """Postfix relaying for loopback clients without AUTH, STARTTLS required; smarthost.test."""
    sh = postfix_smarthost_factory(main_cf={**RELAY_FOR_LOOPBACK, "smtpd_tls_security_level": "encrypt"})
    dns_server.add("smarthost.test", "A", sh.host)
    return sh


def smtp_config(tmp_path, host: str, port: int, extra: str = "", testing: bool = False):
    """mox.toml with one smtp transport "relay". No [testing] section by default: a smarthost
    on loopback must work without allow_private_targets."""
    static = ("[testing]\nallow_private_targets = true\n" if testing else "") + (
        f'[transports.relay]\nkind = "smtp"\nhost = "{host}"\nport = {port}\n{extra}\n')
    return load(tmp_path / "cfg", static)


def transport_from(config, **options) -> SMTPTransport:
    kind = PluginHost.load().transports["smtp"]
    t = kind.factory("relay", config.transports["relay"].settings)
    assert isinstance(t, SMTPTransport)
    t.options.update({"timeouts": QUICK, **options})
    return t


def ctx_for(config, resolver) -> DeliveryContext:
    return DeliveryContext(transport_name="relay", attempt=0, hostname=config.static.hostname,
                           config=config, resolver=resolver)


async def deliver(t, ctx, rcpts=("b@dest.test",), data: bytes = BODY, **kw):
    return list(await t.deliver(OutgoingMessage("a@example.org", list(rcpts), data, **kw), ctx))


# ============================================================================ verified STARTTLS


async def test_relays_over_verified_starttls(tmp_path, relay, dns_server, dns_resolver):
    cfg = smtp_config(tmp_path, "smarthost.test", relay.port, 'ca_file = "relay-ca.pem"')
    shutil.copy(relay.cafile, cfg.config_dir / "relay-ca.pem")  # relative to mox.toml's directory
    results = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver), ["b@dest.test", "c@other.test"])
    assert [(r.status, r.code, r.remote_host) for r in results] == [(DELIVERED, 250, "smarthost.test")] * 2
    msgs = relay.wait_for_messages(2)
    assert sorted(m.delivered_to for m in msgs) == ["b@dest.test", "c@other.test"]
    m = msgs[0]
    assert m.return_path == "a@example.org" and m.message["Subject"] == "relayed"
    assert "from mail.example.org" in m.text  # EHLO with our host name
    assert "using TLSv1.3" in m.text or "using TLSv1.2" in m.text
    # one transaction for both recipients, no MX lookups: the smarthost takes everything
    assert relay.log_text().count("client=") == 1
    assert not dns_server.queries_for("dest.test") and not dns_server.queries_for("other.test")


async def test_unknown_ca_is_refused_temporarily(tmp_path, relay, dns_resolver):
    cfg = smtp_config(tmp_path, "smarthost.test", relay.port)
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert (r.status, r.code, r.remote_host) == (TEMPORARY, None, "smarthost.test")
    assert "TLS certificate verification failed" in r.text and "issuer" in r.text, r.text
    # then a delivery trusting the CA: once it is there, the refused one would be too
    good = load(tmp_path / "good", f'[transports.relay]\nkind = "smtp"\nhost = "smarthost.test"\n'
                f'port = {relay.port}\nca_file = "{relay.cafile}"\n')
    [ok] = await deliver(transport_from(good), ctx_for(good, dns_resolver), ["later@dest.test"])
    assert ok.status is DELIVERED, ok.text
    [m] = relay.wait_for_messages(1)
    assert m.delivered_to == "later@dest.test"


async def test_certificate_is_checked_against_host(tmp_path, relay, dns_server, dns_resolver):
    """The CA is trusted, but the certificate does not name relay.test: refused."""
    dns_server.add("relay.test", "A", relay.host)
    cfg = smtp_config(tmp_path, "relay.test", relay.port, f'ca_file = "{relay.cafile}"')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and "Hostname mismatch" in r.text, r.text
    assert relay.messages() == []


async def test_insecure_skip_verify_still_uses_tls(tmp_path, relay, dns_resolver):
    cfg = smtp_config(tmp_path, "smarthost.test", relay.port, "starttls_insecure_skip_verify = true")
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is DELIVERED, r
    [m] = relay.wait_for_messages(1)
    assert "using TLS" in m.text


async def test_no_starttls_to_a_relay_requiring_it_is_permanent_with_its_reply(tmp_path, relay, dns_resolver):
    cfg = smtp_config(tmp_path, "smarthost.test", relay.port, "no_starttls = true")
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert (r.status, r.code, r.enhanced_code, r.remote_host) == (PERMANENT, 530, "5.7.0", "smarthost.test")
    assert "Must issue a STARTTLS command first" in r.text  # Postfix's words, for the DSN


async def test_no_starttls_sends_in_clear(tmp_path, postfix_smarthost_factory, dns_server, dns_resolver):
    sh = postfix_smarthost_factory(main_cf=RELAY_FOR_LOOPBACK)  # STARTTLS offered, not required
    dns_server.add("smarthost.test", "A", sh.host)
    cfg = smtp_config(tmp_path, "smarthost.test", sh.port, "no_starttls = true")
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is DELIVERED
    [m] = sh.wait_for_messages(1)
    assert "using TLS" not in m.text and "(Postfix) with ESMTP id" in m.text


# ============================================================================ failures


@pytest.mark.parametrize("fault, status, code", [
    ({"reject_4xx": "RCPT", "soft_reply": "451 4.3.2 relay is busy, try later"}, TEMPORARY, 451),
    ({"reject_5xx": "RCPT", "hard_reply": "554 5.7.1 relaying denied for you"}, PERMANENT, 554),
    ({"reject_4xx": ".", "soft_reply": "452 4.3.1 queue full"}, TEMPORARY, 452),
    ({"reject_5xx": "MAIL", "hard_reply": "553 5.7.1 sender rejected"}, PERMANENT, 553),
])
async def test_replies_classified_with_server_text(tmp_path, smtp_sink_factory, dns_server, dns_resolver,
                                                   fault, status, code):
    sink = smtp_sink_factory(host="127.0.0.1", port=None, **fault)
    dns_server.add("smarthost.test", "A", sink.host)
    cfg = smtp_config(tmp_path, "smarthost.test", sink.port, "no_starttls = true")  # smtp-sink has no TLS
    results = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver), ["b@dest.test", "c@dest.test"])
    reply = (fault.get("soft_reply") or fault["hard_reply"]).split(" ", 2)
    for r in results:
        assert (r.status, r.code, r.enhanced_code, r.remote_host) == (status, code, reply[1], "smarthost.test")
        assert reply[2] in r.text, r.text


async def test_requires_8bitmime_for_8bit_data(tmp_path, smtp_sink_factory, dns_server, dns_resolver):
    """As mox: a smarthost must announce 8BITMIME for 8-bit data (direct delivery sends anyway)."""
    sink = smtp_sink_factory(host="127.0.0.1", port=None, eightbitmime=False)
    dns_server.add("smarthost.test", "A", sink.host)
    cfg = smtp_config(tmp_path, "smarthost.test", sink.port, "no_starttls = true")
    data = "Subject: x\r\n\r\nGrüße\r\n".encode()
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver), data=data, has_8bit=True)
    assert r.status is PERMANENT and "8BITMIME" in r.text
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is DELIVERED and sink.wait_for_messages(1)[0].helo == "mail.example.org"


async def test_relay_down_and_dns_failure_are_temporary(tmp_path, dns_server, dns_resolver):
    res = reserve("127.0.0.1", None)  # nobody listens there
    try:
        dns_server.add("smarthost.test", "A", "127.0.0.1")
        cfg = smtp_config(tmp_path, "smarthost.test", res.port)
        [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
        assert (r.status, r.code, r.remote_host) == (TEMPORARY, None, "smarthost.test")
        assert f"dialing smarthost.test: connection refused by 127.0.0.1 port {res.port}" in r.text, r.text
        dns_server.fail("smarthost.test", "A", "SERVFAIL")
        [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
        assert r.status is TEMPORARY and "looking up ip addresses of smarthost.test" in r.text, r.text
    finally:
        res.release()


async def test_missing_ca_file_is_a_temporary_config_problem(tmp_path, relay, dns_server, dns_resolver):
    cfg = smtp_config(tmp_path, "smarthost.test", relay.port, 'ca_file = "/nonexistent/ca.pem"')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert (r.status, r.enhanced_code) == (TEMPORARY, "4.3.5")
    assert r.text == "transport relay: reading ca_file /nonexistent/ca.pem: No such file or directory"
    assert not dns_server.queries_for("smarthost.test")  # not even looked up


async def test_resolver_from_config_when_queue_gives_none(tmp_path, relay, dns_server):
    """The queue passes no resolver; the transport uses [dns] nameservers of mox.toml."""
    cfg = load(tmp_path / "cfg", f'[dns]\nnameservers = ["{dns_server.nameserver}"]\n'
               f'[transports.relay]\nkind = "smtp"\nhost = "smarthost.test"\nport = {relay.port}\n'
               f'ca_file = "{relay.cafile}"\n')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, None))
    assert r.status is DELIVERED, r
    assert dns_server.queries_for("smarthost.test", "A")
