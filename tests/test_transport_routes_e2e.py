"""A typical setup end to end: a route with ``minimum_attempts = 3`` to a submission relay.

Real peers on loopback, the real queue (time moved by a FakeClock), the installed transport
plugins, DNS from the test DNS server via ``[dns] nameservers`` (the queue passes no resolver,
as in the server):

* attempts 1-3: no route matches yet, so direct delivery to the MX of dest.test, an smtp-sink
  that greylists every recipient (451);
* attempt 4: the route matches; the submission transport logs in to the Postfix smarthost
  (SCRAM-SHA-256, password from a file) and the message lands in its Maildir.
"""

from __future__ import annotations

import re

from mox_core.queue import FakeClock, Queue
from mox_core.testing import load
from mox_testpeers import wait_for

MSG = (b"From: admin@example.org\r\nTo: bob@dest.test\r\nSubject: try direct, then relay\r\n"
       b"Message-ID: <e2e-1@example.org>\r\n\r\nthree strikes and it goes via the smarthost\r\n")
GREYLIST = "451 4.7.1 greylisted, please try again later"


def config_for(tmp_path, dns_server, smarthost):
    static = f"""
[dns]
nameservers = ["{dns_server.nameserver}"]

[testing]
allow_private_targets = true

[transports.relay]
kind = "submission"
host = "smarthost.test"
port = {smarthost.port}
username = "alice"
password_file = "relay-password"
ca_file = "{smarthost.cafile}"
"""
    domains = """
[[routes]]
minimum_attempts = 3
transport = "relay"
"""
    cfg = load(tmp_path / "cfg", static, domains)
    (cfg.config_dir / "relay-password").write_text("secret-pw\n")
    return cfg


async def test_three_direct_attempts_then_the_submission_relay(tmp_path, dns_server, smtp_sink_factory,
                                                              postfix_smarthost):
    mx = smtp_sink_factory(host=None, port=25, reject_4xx="RCPT", soft_reply=GREYLIST)
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", mx.host)
    dns_server.add("smarthost.test", "A", postfix_smarthost.host)
    cfg = config_for(tmp_path, dns_server, postfix_smarthost)

    q = Queue(cfg, clock=FakeClock())
    await q.start()
    try:
        [msg_id] = await q.add(account="admin", mail_from="admin@example.org", recipients=["bob@dest.test"],
                               data=MSG)
        await q.scheduler.settle()
        for n, interval in enumerate((450, 900), start=2):
            q.clock.advance(interval)
            await q.scheduler.settle()
            [m] = await q.list_messages()
            assert m.attempts == n

        # three attempts made, all direct, all greylisted by the MX, with the MX's own words
        [m] = await q.list_messages()
        assert (m.id, m.attempts, m.transport) == (msg_id, 3, None)
        assert [(r["transport"], r["remote_host"], r["code"], r["enhanced_code"], r["permanent"])
                for r in m.results] == [("", "mx.dest.test", 451, "4.7.1", False)] * 3
        assert m.last_error == "greylisted, please try again later"  # what `mox queue list` shows
        assert postfix_smarthost.messages() == [] and "sasl_method" not in postfix_smarthost.log_text()
        assert dns_server.queries_for("dest.test", "MX")

        # the fourth attempt: minimum_attempts = 3 is met, the route sends it to the relay
        q.clock.advance(1800)
        await q.scheduler.settle()
        assert await q.list_messages() == []
    finally:
        await q.close()

    [delivered] = postfix_smarthost.wait_for_messages(1)
    assert delivered.return_path == "admin@example.org" and delivered.delivered_to == "bob@dest.test"
    assert delivered.message["Message-ID"] == "<e2e-1@example.org>"
    session = "ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 data=1 quit=1"  # Postfix's counts: AUTH inside TLS
    wait_for(lambda: session in postfix_smarthost.log_text(), 5, what="the relay session in Postfix's log")
    assert re.findall(r"sasl_method=([A-Z0-9-]+)", postfix_smarthost.log_text()) == ["SCRAM-SHA-256"]
    assert mx.count == 0  # the MX never accepted it
    # delivered: no DSN for the sender
    inbox = cfg.data_dir / "accounts" / "admin" / "Maildir" / "new"
    assert not inbox.exists() or list(inbox.iterdir()) == []


async def test_relay_failure_on_the_fourth_attempt_reaches_the_dsn(tmp_path, dns_server, smtp_sink_factory,
                                                                  postfix_smarthost):
    """Same route; the relay password is wrong: attempt 4 fails permanently, and the DSN in the
    sender's Inbox carries the smarthost's reply, not the MX's greylisting."""
    mx = smtp_sink_factory(host=None, port=25, reject_4xx="RCPT", soft_reply=GREYLIST)
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", mx.host)
    dns_server.add("smarthost.test", "A", postfix_smarthost.host)
    cfg = config_for(tmp_path, dns_server, postfix_smarthost)
    (cfg.config_dir / "relay-password").write_text("not-the-password\n")

    q = Queue(cfg, clock=FakeClock())
    await q.start()
    try:
        await q.add(account="admin", mail_from="admin@example.org", recipients=["bob@dest.test"], data=MSG)
        await q.scheduler.settle()
        for interval in (450, 900, 1800):
            q.clock.advance(interval)
            await q.scheduler.settle()
        assert await q.list_messages() == []
    finally:
        await q.close()
    [dsn] = list((cfg.data_dir / "accounts" / "admin" / "Maildir" / "new").iterdir())
    text = dsn.read_text(errors="replace")
    assert "Action: failed" in text and "Remote-MTA: dns; smarthost.test" in text, text
    assert "535" in text and "authentication failed" in text and "greylisted" not in text
    assert postfix_smarthost.messages() == []
