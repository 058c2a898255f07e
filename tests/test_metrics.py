"""The mail metrics on /metrics are the whole server's: counted in the SMTP worker processes,
the main process and the web process, added up at the scrape (prometheus-client's
multiprocess mode), with real values after real SMTP traffic."""

from __future__ import annotations

import re
import smtplib
import time

import httpx
import pytest

from mox_testpeers import free_port, wait_for
from mox_testpeers.moxserver import MoxServer

DOMAINS = """\
[domains."example.org"]

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
domain = "example.org"
[accounts.alice.destinations."alice@example.org"]

# outgoing mail of alice goes back to our own SMTP listener
[[routes]]
transport = "loop"
"""


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition ``text``; 0 when it is not there."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}") + 1]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def server(tmp_path):
    metrics_port = free_port()
    m = MoxServer(tmp_path / "mox", static_top="smtp_workers = 2\n", domains=DOMAINS)
    m.static_extra = f"""
[listeners.local.metrics_http]
enabled = true
port = {metrics_port}

[transports.loop]
kind = "loopback"
port = {m.smtp_port}
"""
    m.write_config()
    m.set_password("alice", "alice-pw")
    m.start()
    m.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield m
    m.stop()


def test_mail_metrics_count_every_process_of_the_server(server):
    m = server
    for i in range(4):  # over several connections: both workers take some
        with smtplib.SMTP("127.0.0.1", m.smtp_port, timeout=10) as c:
            c.ehlo("client.example")
            c.sendmail("someone@remote.example", ["admin@example.org"], f"Subject: {i}\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", m.smtp_port, timeout=10) as c:
        c.ehlo("client.example")
        c.mail("someone@remote.example")
        assert c.rcpt("nobody@example.org")[0] == 550
        assert c.rcpt("victim@elsewhere.example")[0] == 550
    with smtplib.SMTP_SSL("127.0.0.1", m.submissions_port, timeout=10,
                          context=__import__("ssl")._create_unverified_context()) as c:
        c.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError):  # one AUTH command, a wrong password
            c.auth("PLAIN", lambda challenge=None: "\0alice@example.org\0wrong")
        c.login("alice@example.org", "alice-pw")
        c.sendmail("alice@example.org", ["admin@example.org", "bob@remote.example"],
                   "From: alice@example.org\r\nSubject: out\r\n\r\nhi\r\n")
    # the queue delivers bob@remote.example through the loopback transport to our SMTP
    # listener, which refuses it (no relay): a permanent failure, counted by transport
    def scraped() -> str | None:
        text = httpx.get(m.metrics_url, timeout=10, trust_env=False).text
        done = sample(text, "mox_queue_deliveries_total", transport="loop", result="permanent") >= 1
        return text if done else None

    text = wait_for(scraped, 30, what="the delivery counted")
    assert sample(text, "mox_smtpserver_messages_total", listener="local", service="smtp",
                  result="accepted", reason="delivered") == 4
    assert sample(text, "mox_smtpserver_messages_total", listener="local", service="smtp",
                  result="rejected", reason="no_such_user") == 1
    # relay_denied: our client's victim@, and the queue's delivery of bob@ to the listener
    assert sample(text, "mox_smtpserver_messages_total", listener="local", service="smtp",
                  result="rejected", reason="relay_denied") == 2
    assert sample(text, "mox_smtpserver_messages_total", listener="local", service="submissions",
                  result="accepted", reason="queued") == 1
    assert sample(text, "mox_smtpserver_auth_failures_total", listener="local", service="submissions") == 1
    assert "mox_smtpserver_sessions" in text  # the gauge of open sessions, summed over live processes
    assert sample(text, "mox_queue_messages", hold="false") == 0  # delivered or failed, none left


def test_sessions_open_are_counted_while_they_are_open(server):
    m = server
    conns = []
    try:
        for _ in range(3):
            c = smtplib.SMTP("127.0.0.1", m.smtp_port, timeout=10)
            c.ehlo("client.example")
            conns.append(c)

        def three() -> bool:
            text = httpx.get(m.metrics_url, timeout=10, trust_env=False).text
            return sample(text, "mox_smtpserver_sessions", listener="local", service="smtp") == 3

        wait_for(three, 10, what="three sessions open")
    finally:
        for c in conns:
            c.quit()
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(m.metrics_url, timeout=10, trust_env=False).text
        if sample(text, "mox_smtpserver_sessions", listener="local", service="smtp") == 0:
            break
        assert time.monotonic() < deadline, "sessions not counted down"
        time.sleep(0.05)
