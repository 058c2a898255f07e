"""submission/submissions end to end against Postfix with Cyrus SASL (users alice/secret-pw).

The smarthost (mox_testpeers ``postfix_smarthost_factory``) offers SCRAM-SHA-256,
SCRAM-SHA-1, CRAM-MD5, PLAIN and LOGIN after STARTTLS, implicit TLS on ``.tls_port``, and logs
``sasl_method=<MECH>, sasl_username=alice@smarthost.test`` for every login: that is how these
tests see which mechanism was used. Its name, smarthost.test, resolves through the test DNS.
"""

from __future__ import annotations

import re

import pytest

from mox_core.api import Timeouts
from mox_core.plugins.host import PluginHost
from mox_core.plugins.kinds import DeliveryContext, DeliveryStatus, OutgoingMessage
from mox_core.queue import FakeClock, Queue
from mox_core.testing import load
from mox_testpeers import wait_for
from mox_transport_submission.transport import SubmissionTransport

DELIVERED, TEMPORARY, PERMANENT = DeliveryStatus.DELIVERED, DeliveryStatus.TEMPORARY, DeliveryStatus.PERMANENT
BODY = b"From: admin@example.org\r\nSubject: submitted\r\n\r\nhello via submission\r\n"
# a broken test should fail in seconds, not after the RFC 5321 five minutes
QUICK = Timeouts(connect=5, command=10, data=10, tls_handshake=10)


def sasl_methods(sh) -> list[str]:
    return re.findall(r"sasl_method=([A-Z0-9-]+)", sh.log_text())


def sessions(sh) -> list[str]:
    """Postfix's command counts per client session ("ehlo=1 auth=1 ..."), without the
    fixture's own readiness probe (a connection that only sent QUIT)."""
    found = re.findall(r"disconnect from \S+ (.*)", sh.log_text())
    return [s for s in found if s != "quit=1 commands=1"]


@pytest.fixture
def smarthost(postfix_smarthost_factory, dns_server):
    sh = postfix_smarthost_factory(main_cf={"smtpd_tls_received_header": "yes"})
    dns_server.add("smarthost.test", "A", sh.host)
    return sh


def sub_config(tmp_path, port: int, extra: str = "", *, kind: str = "submission", password: str | None = "secret-pw",
               username: str = "alice", static: str = "", domains: str = ""):
    pw = f'password = "{password}"\n' if password is not None else ""
    return load(tmp_path / "cfg", static + f'[transports.relay]\nkind = "{kind}"\nhost = "smarthost.test"\n'
                f'port = {port}\nusername = "{username}"\n{pw}{extra}\n', domains)


def transport_from(config, **options) -> SubmissionTransport:
    entry = config.transports["relay"]
    kind = PluginHost.load().transports[entry.kind]
    t = kind.factory("relay", entry.settings)
    assert isinstance(t, SubmissionTransport)
    t.options.update({"timeouts": QUICK, **options})
    return t


def ctx_for(config, resolver) -> DeliveryContext:
    return DeliveryContext(transport_name="relay", attempt=0, hostname=config.static.hostname,
                           config=config, resolver=resolver)


async def deliver(t, ctx, rcpts=("b@dest.test",)):
    return list(await t.deliver(OutgoingMessage("admin@example.org", list(rcpts), BODY), ctx))


# ============================================================================ mechanisms


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN"])
async def test_pinned_mechanism_authenticates(tmp_path, smarthost, dns_resolver, mech):
    cfg = sub_config(tmp_path, smarthost.port, f'mechanisms = ["{mech}"]\nca_file = "{smarthost.cafile}"')
    results = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver), ["b@dest.test", "c@other.test"])
    assert [(r.status, r.remote_host) for r in results] == [(DELIVERED, "smarthost.test")] * 2
    msgs = smarthost.wait_for_messages(2)
    assert sorted(m.delivered_to for m in msgs) == ["b@dest.test", "c@other.test"]
    assert msgs[0].return_path == "admin@example.org"
    assert "using TLS" in msgs[0].text  # STARTTLS happened before AUTH
    assert sasl_methods(smarthost) == [mech]
    assert "sasl_username=alice@smarthost.test" in smarthost.log_text()
    wait_for(lambda: sessions(smarthost), 5, what="session logged")
    assert sessions(smarthost) == ["ehlo=2 starttls=1 auth=1 mail=1 rcpt=2 data=1 quit=1 commands=9"]


async def test_automatic_choice_is_scram_sha_256(tmp_path, smarthost, dns_resolver):
    """The server offers all five (LOGIN too); with no list the strongest, SCRAM-SHA-256, wins."""
    cfg = sub_config(tmp_path, smarthost.port, f'ca_file = "{smarthost.cafile}"')
    t = transport_from(cfg)
    [r] = await deliver(t, ctx_for(cfg, dns_resolver))
    assert r.status is DELIVERED, r
    assert sasl_methods(smarthost) == ["SCRAM-SHA-256"]
    assert smarthost.wait_for_messages(1)


@pytest.mark.parametrize("offered, configured, used", [
    (("CRAM-MD5", "PLAIN"), "", "CRAM-MD5"),  # automatic: never PLAIN unless listed
    (("SCRAM-SHA-1", "CRAM-MD5", "PLAIN"), "", "SCRAM-SHA-1"),
    (("CRAM-MD5", "PLAIN"), 'mechanisms = ["SCRAM-SHA-256", "PLAIN", "CRAM-MD5"]', "PLAIN"),  # config order
    (("SCRAM-SHA-256", "SCRAM-SHA-1"), 'mechanisms = ["SCRAM-SHA-1", "SCRAM-SHA-256"]', "SCRAM-SHA-1"),
])
async def test_list_is_walked_in_order(tmp_path, postfix_smarthost_factory, dns_server, dns_resolver,
                                       offered, configured, used):
    sh = postfix_smarthost_factory(mechanisms=offered)
    dns_server.add("smarthost.test", "A", sh.host)
    cfg = sub_config(tmp_path, sh.port, f'{configured}\nca_file = "{sh.cafile}"')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is DELIVERED, r
    assert sasl_methods(sh) == [used]


@pytest.mark.parametrize("offered, configured, named", [
    (("PLAIN", "LOGIN"), "", "PLAIN, LOGIN"),  # nothing of the default list offered
    (("CRAM-MD5",), 'mechanisms = ["SCRAM-SHA-256"]', "CRAM-MD5"),  # pinned, not offered: no downgrade
])
async def test_no_matching_mechanism_is_permanent(tmp_path, postfix_smarthost_factory, dns_server, dns_resolver,
                                                  offered, configured, named):
    sh = postfix_smarthost_factory(mechanisms=offered)
    dns_server.add("smarthost.test", "A", sh.host)
    cfg = sub_config(tmp_path, sh.port, f'{configured}\nca_file = "{sh.cafile}"')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert (r.status, r.remote_host) == (PERMANENT, "smarthost.test")
    assert r.text == f"no matching authentication mechanisms, server supports {named}"
    assert sasl_methods(sh) == [] and sh.messages() == []
    # we gave up on the server, and said QUIT rather than dropping the connection
    wait_for(lambda: sessions(sh), 5, what="the session logged")
    assert sessions(sh) == ["ehlo=2 starttls=1 quit=1 commands=4"]


async def test_refused_mail_from_ends_with_quit(tmp_path, postfix_smarthost_factory, dns_server, dns_resolver):
    sh = postfix_smarthost_factory(main_cf={
        "smtpd_delay_reject": "no",  # refuse at MAIL FROM, not at the first RCPT
        "smtpd_sender_restrictions": "check_sender_access inline:{ admin@example.org=REJECT }"})
    dns_server.add("smarthost.test", "A", sh.host)
    cfg = sub_config(tmp_path, sh.port, f'ca_file = "{sh.cafile}"')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert (r.status, r.code, r.remote_host) == (PERMANENT, 554, "smarthost.test"), r
    assert "Sender address rejected" in r.text and sh.messages() == []
    # MAIL, RCPT and DATA went in one group (PIPELINING); then QUIT, not a dropped connection
    wait_for(lambda: sessions(sh), 5, what="the session logged")
    [counts] = sessions(sh)
    assert counts.startswith("ehlo=2 starttls=1 auth=1 mail=0/1 ") and counts.endswith(" quit=1 commands=5/8"), counts


async def test_plain_only_over_tls(tmp_path, postfix_smarthost_factory, dns_server, dns_resolver):
    """no_starttls, and a server that offers AUTH without TLS: PLAIN is skipped (the next listed
    mechanism is used), and PLAIN alone is refused before anything is sent."""
    sh = postfix_smarthost_factory(main_cf={"smtpd_tls_auth_only": "no"})
    dns_server.add("smarthost.test", "A", sh.host)
    cfg = sub_config(tmp_path, sh.port, 'no_starttls = true\nmechanisms = ["PLAIN", "CRAM-MD5"]')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is DELIVERED, r
    assert sasl_methods(sh) == ["CRAM-MD5"]

    cfg = sub_config(tmp_path, sh.port, 'no_starttls = true\nmechanisms = ["PLAIN"]')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY
    assert r.text == "refusing to send AUTH PLAIN credentials over a connection without TLS"
    assert sasl_methods(sh) == ["CRAM-MD5"]
    # Postfix's per-session command counts: EHLO, then we said QUIT; no AUTH was sent at all
    wait_for(lambda: len(sessions(sh)) == 2, 5, what="second session logged")
    assert sessions(sh) == ["ehlo=1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=6", "ehlo=1 quit=1 commands=2"]
    # Postfix said 250; its delivery into the Maildir follows on its own time
    wait_for(lambda: len(sh.messages()) == 1, 10, what="the first message in Postfix's Maildir")


# ============================================================================ failures


async def test_wrong_password_is_permanent(tmp_path, smarthost, dns_resolver):
    cfg = sub_config(tmp_path, smarthost.port, f'ca_file = "{smarthost.cafile}"', password="wrong")
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert (r.status, r.code, r.enhanced_code, r.remote_host) == (PERMANENT, 535, "5.7.8", "smarthost.test")
    assert "authentication with SCRAM-SHA-256 failed" in r.text and "authentication failed" in r.text
    assert smarthost.messages() == []


async def test_wrong_password_through_queue_gives_dsn(tmp_path, smarthost, dns_server):
    """The queue routes to the submission transport, gets a permanent failure and stores a DSN
    with Postfix's reply in the sender's Inbox; the message leaves the queue."""
    cfg = sub_config(
        tmp_path, smarthost.port, f'ca_file = "{smarthost.cafile}"', password="wrong",
        static=f'[dns]\nnameservers = ["{dns_server.nameserver}"]\n',
        domains='[[routes]]\ntransport = "relay"\n')
    q = Queue(cfg, clock=FakeClock())
    await q.start()
    try:
        await q.add(account="admin", mail_from="admin@example.org", recipients=["b@dest.test"],
                    data=b"From: admin@example.org\r\nMessage-ID: <w1@example.org>\r\n"
                         b"Subject: will bounce\r\n\r\nx\r\n")
        await q.scheduler.settle()
        assert await q.list_messages() == []
    finally:
        await q.close()
    new = cfg.data_dir / "accounts" / "admin" / "Maildir" / "new"
    [dsn] = list(new.iterdir())
    text = dsn.read_text(errors="replace")
    assert "b@dest.test" in text and "535" in text and "authentication failed" in text
    assert re.search(r"Action: failed", text) and "Remote-MTA: dns; smarthost.test" in text, text
    assert smarthost.messages() == []


async def test_unverified_certificate_is_temporary(tmp_path, smarthost, dns_resolver):
    cfg = sub_config(tmp_path, smarthost.port)  # the test CA is not trusted
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and "certificate verification failed" in r.text
    assert sasl_methods(smarthost) == []  # no credentials before a verified TLS


# ============================================================================ submissions (implicit TLS)


async def test_submissions_on_implicit_tls_port(tmp_path, smarthost, dns_resolver):
    cfg = sub_config(tmp_path, smarthost.tls_port, f'ca_file = "{smarthost.cafile}"', kind="submissions")
    t = transport_from(cfg)
    assert t.kind == "submissions"
    [r] = await deliver(t, ctx_for(cfg, dns_resolver))
    assert r.status is DELIVERED, r
    [m] = smarthost.wait_for_messages(1)
    assert "using TLS" in m.text
    assert sasl_methods(smarthost) == ["SCRAM-SHA-256"]
    # TLS from the first byte: no STARTTLS command in the session
    wait_for(lambda: sessions(smarthost), 5, what="session logged")
    assert sessions(smarthost) == ["ehlo=1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=6"]


async def test_submissions_without_trusted_ca_and_on_a_starttls_port(tmp_path, smarthost, dns_resolver):
    cfg = sub_config(tmp_path, smarthost.tls_port, kind="submissions")
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and "certificate verification failed" in r.text
    # implicit TLS to the plain port: the handshake meets a 220 greeting
    cfg = sub_config(tmp_path, smarthost.port, f'ca_file = "{smarthost.cafile}"', kind="submissions")
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and "TLS handshake failed" in r.text, r.text
    assert smarthost.messages() == []


def test_default_ports(tmp_path):
    cfg = load(tmp_path, '[transports.a]\nkind = "submission"\nhost = "h.example"\nusername = "u"\npassword = "p"\n'
                         '[transports.b]\nkind = "submissions"\nhost = "h.example"\nusername = "u"\npassword = "p"\n')
    host = PluginHost.load()
    a = host.transports["submission"].factory("a", cfg.transports["a"].settings)
    b = host.transports["submissions"].factory("b", cfg.transports["b"].settings)
    from mox_core.api import TLSMode

    assert (a.port, a.tls_mode, b.port, b.tls_mode) == (587, TLSMode.REQUIRED_VERIFIED, 465, TLSMode.IMMEDIATE)


# ============================================================================ password sources


async def test_password_env_read_at_delivery(tmp_path, smarthost, dns_server, dns_resolver, monkeypatch):
    monkeypatch.delenv("MOX_TEST_SUB_PW", raising=False)
    cfg = sub_config(tmp_path, smarthost.port, f'password_env = "MOX_TEST_SUB_PW"\nca_file = "{smarthost.cafile}"',
                     password=None)
    t = transport_from(cfg)
    [r] = await deliver(t, ctx_for(cfg, dns_resolver))
    assert (r.status, r.enhanced_code, r.code) == (TEMPORARY, "4.3.5", None)
    assert r.text == "transport relay: environment variable MOX_TEST_SUB_PW (password_env) is not set"
    assert not dns_server.queries_for("smarthost.test")  # nothing was tried
    monkeypatch.setenv("MOX_TEST_SUB_PW", "")
    [r] = await deliver(t, ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and "is empty" in r.text
    monkeypatch.setenv("MOX_TEST_SUB_PW", "secret-pw")
    [r] = await deliver(t, ctx_for(cfg, dns_resolver))
    assert r.status is DELIVERED, r


async def test_password_file_rotation_is_picked_up(tmp_path, smarthost, dns_resolver):
    cfg = sub_config(tmp_path, smarthost.port, f'password_file = "relay.pw"\nca_file = "{smarthost.cafile}"',
                     password=None)
    pwfile = cfg.config_dir / "relay.pw"  # relative to mox.toml's directory
    t = transport_from(cfg)  # one transport object for all three attempts, as in the server
    ctx = ctx_for(cfg, dns_resolver)

    [r] = await deliver(t, ctx)
    assert (r.status, r.enhanced_code) == (TEMPORARY, "4.3.5")
    assert r.text == f"transport relay: reading password_file {pwfile}: No such file or directory"

    pwfile.write_text("old-password\n")
    [r] = await deliver(t, ctx)
    assert (r.status, r.code) == (PERMANENT, 535)

    pwfile.write_text("secret-pw\r\nsecond line is ignored\n")  # rotated: first line, CRLF stripped
    [r] = await deliver(t, ctx)
    assert r.status is DELIVERED, r
    assert smarthost.wait_for_messages(1)

    pwfile.write_text("")
    [r] = await deliver(t, ctx)
    assert r.status is TEMPORARY and "is empty" in r.text


async def test_missing_ca_file_is_temporary(tmp_path, smarthost, dns_resolver):
    cfg = sub_config(tmp_path, smarthost.port, 'ca_file = "missing-ca.pem"')
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert (r.status, r.enhanced_code) == (TEMPORARY, "4.3.5")
    assert r.text.startswith("transport relay: reading ca_file ") and r.text.endswith("No such file or directory")
