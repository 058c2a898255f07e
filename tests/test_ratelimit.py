"""Outgoing rate limits (as mox's per-account daily limits) through the real submission listener."""

from __future__ import annotations

import os
import smtplib
import sqlite3
import ssl
import time
from pathlib import Path

DOMAINS = """
[domains."example.org"]

[accounts.admin]
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
max_outgoing_messages_per_day = 4
max_first_time_recipients_per_day = 2
[accounts.alice.destinations."alice@example.org"]
"""


def tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def send(mox, to: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=10) as s:
        s.starttls(context=tls())
        s.login("alice@example.org", "pw")
        s.mail("alice@example.org")
        s.rcpt(to)
        return s.data(f"From: alice@example.org\r\nTo: {to}\r\nSubject: x\r\n\r\nx\r\n".encode())


def old_record(data_dir: Path, account: str, recipient: str, age: float) -> None:
    """A record as versions before the queue kept them (ratelimit/outgoing.db): imported."""
    old_records(data_dir, account, [(recipient, age)])


def old_records(data_dir: Path, account: str, records: list[tuple[str, float]]) -> None:
    """Records (recipient, age in seconds) in the ratelimit/outgoing.db of earlier versions."""
    path = data_dir / "ratelimit" / "outgoing.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE outgoing (account TEXT NOT NULL, recipient TEXT NOT NULL, submitted REAL NOT NULL, "
               "submission TEXT NOT NULL, UNIQUE (submission, recipient))")
    now = time.time()
    db.executemany("INSERT INTO outgoing VALUES (?, ?, ?, ?)",
                   [(account, r, now - age, f"old{i}") for i, (r, age) in enumerate(records)])
    db.commit()
    db.close()


def test_sequence_of_mox_limit_test(mox_server_factory, dns_server):
    mox = mox_server_factory(DOMAINS, nameserver=dns_server.nameserver, passwords={"alice": "pw"}, start=False)
    old_record(mox.data_dir, "alice", "a@other.example", 25 * 3600)
    dns_server.fail("remote.example", mode="SERVFAIL")  # deliveries fail temporarily: they stay queued
    mox.start()
    results = [send(mox, f"{r}@remote.example") for r in "b c d b b b".split()]
    codes = [code for code, _ in results]
    assert codes == [250, 250, 451, 250, 250, 451]
    assert results[2][1] == (b"4.7.1 max number of new/first-time recipients (2) over past 24h reached, "
                             b"try increasing per-account setting max_first_time_recipients_per_day")
    assert results[5][1] == (b"4.7.1 max number of messages (4) over past 24h reached, "
                             b"try increasing per-account setting max_outgoing_messages_per_day")
    # Nothing was queued for the refused submissions: 4 accepted recipients.
    listing = mox.mox("queue", "list").stdout
    assert listing.count("to:b@remote.example") == 3 and "to:d@remote.example" not in listing
    # The counts survive a restart.
    mox.stop()
    mox.start()
    assert send(mox, "b@remote.example")[0] == 451


def test_records_23_hours_old_count_and_25_hours_old_do_not(mox_server_factory, dns_server):
    """The rolling window is 24 hours (86,400 s): of two records, 23 and 25 hours old, only
    the first counts, for both limits."""
    domains = DOMAINS.replace("max_outgoing_messages_per_day = 4", "max_outgoing_messages_per_day = 3")
    mox = mox_server_factory(domains, nameserver=dns_server.nameserver, passwords={"alice": "pw"}, start=False)
    old_records(mox.data_dir, "alice", [("old@remote.example", 25 * 3600), ("recent@remote.example", 23 * 3600)])
    dns_server.fail("remote.example", mode="SERVFAIL")  # deliveries fail temporarily: they stay queued
    mox.start()
    first_time = (b"4.7.1 max number of new/first-time recipients (2) over past 24h reached, "
                  b"try increasing per-account setting max_first_time_recipients_per_day")
    messages = (b"4.7.1 max number of messages (3) over past 24h reached, "
                b"try increasing per-account setting max_outgoing_messages_per_day")
    # new1: 1 record in the window + 1 <= 3; first-time: recent@ and new1@, 2 <= 2
    assert send(mox, "new1@remote.example")[0] == 250
    # new2: first-time recent@, new1@, new2@: 3 > 2
    assert send(mox, "new2@remote.example") == (451, first_time)
    # old@ was first sent to 25 hours ago: not a first-time recipient; 2 + 1 <= 3 records
    assert send(mox, "old@remote.example")[0] == 250
    # 3 records in the window (recent@, new1@, old@) + 1 > 3
    assert send(mox, "new1@remote.example") == (451, messages)


def test_concurrent_submissions_cannot_pass_the_limit_together(mox_server_factory, dns_server):
    from concurrent.futures import ThreadPoolExecutor

    mox = mox_server_factory(DOMAINS.replace("= 2\n", "= 100\n"), nameserver=dns_server.nameserver,
                             passwords={"alice": "pw"})
    with ThreadPoolExecutor(12) as pool:
        codes = [c for c, _ in pool.map(lambda i: send(mox, f"r{i}@remote.example"), range(12))]
    assert codes.count(250) == 4 and codes.count(451) == 8


PLUGIN = '''
import time
from pydantic import BaseModel, ConfigDict
from mox_core import hookimpl
from mox_core.plugins.kinds import RateLimitDecision, RateLimiterKind

class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_per_domain: int

class PerDomainHourly:
    """At most max_per_domain recipients per domain in the last hour; counts in the queue db."""

    def __init__(self, name, settings, state_dir):
        self.settings = settings

    def setup(self, db):
        db.execute("CREATE TABLE IF NOT EXISTS per_domain_sent (account TEXT, domain TEXT, t REAL)")
        db.execute("CREATE INDEX IF NOT EXISTS per_domain_sent_key ON per_domain_sent(account, domain, t)")

    def check(self, db, submission):
        since = (submission.time or time.time()) - 3600
        for r in submission.recipients:
            domain = r.rpartition("@")[2]
            (n,) = db.execute("SELECT COUNT(*) FROM per_domain_sent WHERE account = ? AND domain = ? AND t > ?",
                              (submission.account, domain, since)).fetchone()
            if n >= self.settings.max_per_domain:
                return RateLimitDecision(451, "4.7.1", f"max {self.settings.max_per_domain} messages per hour to {domain}, "
                                         "try increasing rate limiter setting max_per_domain", setting="max_per_domain")
        return None

    def record(self, db, submission):
        db.executemany("INSERT INTO per_domain_sent VALUES (?, ?, ?)",
                       [(submission.account, r.rpartition("@")[2], submission.time or time.time())
                        for r in submission.recipients])

@hookimpl
def mox_register_rate_limiters():
    return [RateLimiterKind("per_domain_hourly", Settings, PerDomainHourly)]
'''


def test_third_party_limiter_and_configured_order(mox_server_factory, dns_server, fake_dist):
    site = fake_dist("mox-ratelimit-domain", {"ratelimit_domain": "mox_ratelimit_domain"},
                     {"mox_ratelimit_domain": PLUGIN})
    domains = DOMAINS.replace("max_first_time_recipients_per_day = 2\n",
                              'max_first_time_recipients_per_day = 1\n'
                              'rate_limiters = ["domain_cap", "messages_per_day"]\n') + \
        '\n[rate_limiters.domain_cap]\nkind = "per_domain_hourly"\nmax_per_domain = 2\n'
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    mox = mox_server_factory(domains, nameserver=dns_server.nameserver, passwords={"alice": "pw"}, env=env)
    # first_time_recipients_per_day (1) is not in the account's list: 2 new recipients pass.
    assert send(mox, "a@x.example")[0] == 250
    assert send(mox, "b@x.example")[0] == 250
    code, text = send(mox, "c@x.example")
    assert (code, text) == (451, b"4.7.1 max 2 messages per hour to x.example, try increasing rate limiter setting max_per_domain")
    assert send(mox, "a@y.example")[0] == 250
    assert send(mox, "b@y.example")[0] == 250
    # messages_per_day (4) still applies, after the plugin's limiter: the 5th recipient.
    code, text = send(mox, "c@z.example")
    assert code == 451 and b"max_outgoing_messages_per_day" in text
