"""The built-in outgoing rate limiters (``mox_core.builtin.rate_limiters``) on their own
database: the rolling 24-hour window, first-time recipients, the limits and their texts.

Every duration and expected count is written out here: the window is 86,400 seconds, not
the module's constant, so that a wrong constant cannot move the expectations with it. The
same limits through the real submission listener are in tests/test_ratelimit.py.
"""

from __future__ import annotations

import sqlite3

import pytest

from mox_core.builtin.rate_limiters import (
    FirstTimeRecipientsPerDay,
    LimitSettings,
    MessagesPerDay,
    OutgoingLog,
    mox_register_rate_limiters,
)
from mox_core.config.models import Account
from mox_core.plugins.kinds import RateLimitDecision, Submission

HOUR = 3600.0
WINDOW = 86_400.0  # 24 hours
NOW = 1_800_000_000.0  # on a minute boundary: 1_800_000_000 / 60 = 30_000_000
MESSAGES_TEXT = ("max number of messages ({}) over past 24h reached, try increasing per-account setting "
                 "max_outgoing_messages_per_day")
FIRST_TEXT = ("max number of new/first-time recipients ({}) over past 24h reached, try increasing "
              "per-account setting max_first_time_recipients_per_day")


@pytest.fixture
def db(tmp_path):
    conn = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    OutgoingLog().setup(conn)
    yield conn
    conn.close()


def record(db, when: float, *recipients: str, account: str = "a", sid: str | None = None) -> None:
    db.execute("BEGIN")
    OutgoingLog.record(db, Submission(account, f"{account}@example.org", list(recipients),
                                      id=sid or f"s{when}-{recipients}", time=when))
    db.execute("COMMIT")


def sub(*recipients: str, account: str = "a", when: float = NOW, config: Account | None = None) -> Submission:
    return Submission(account, f"{account}@example.org", list(recipients), id="new", time=when,
                      account_config=config)


def rows(db, table: str) -> list[tuple]:
    return sorted(db.execute(f"SELECT * FROM {table}").fetchall())


# --------------------------------------------------------------------------------------------
# the window


def test_a_record_23_hours_old_counts_and_one_25_hours_old_does_not(db):
    record(db, NOW - 25 * HOUR, "old@x.example")
    record(db, NOW - 23 * HOUR, "recent@x.example")
    assert OutgoingLog.in_window(db, "a", NOW) == 1
    assert OutgoingLog.in_window(db, "a", NOW - 2 * HOUR) == 2  # then both are younger than 24 h
    assert OutgoingLog.in_window(db, "a", NOW + HOUR + 1) == 0  # then both are older
    assert OutgoingLog.in_window(db, "b", NOW) == 0  # per account


def test_the_window_is_strictly_newer_than_86400_seconds(db):
    record(db, NOW - 86_400, "edge@x.example")       # exactly 24 h old: outside
    record(db, NOW - 86_399.5, "inside@x.example")   # half a second younger: inside
    record(db, NOW - 86_340, "minute@x.example")     # in the next minute's bucket
    record(db, NOW - 86_460, "before@x.example")     # a minute before: outside
    record(db, NOW - 1, "now@x.example")
    assert OutgoingLog.in_window(db, "a", NOW) == 3
    # a "now" in the middle of a minute: the edge minute is counted record by record
    assert OutgoingLog.in_window(db, "a", NOW + 30) == 2  # -86_399.5 is then 86_429.5 s old
    assert OutgoingLog.in_window(db, "a", NOW - 30) == 4  # -86_400 is then 86_370 s old


def test_records_in_the_future_count(db):
    """A record newer than now (the clock went back) is inside the window."""
    record(db, NOW + 90, "later@x.example")
    assert OutgoingLog.in_window(db, "a", NOW) == 1


def test_first_time_recipients_in_the_window(db):
    record(db, NOW - 25 * HOUR, "old@x.example")       # first sent to before the window
    record(db, NOW - 23 * HOUR, "recent@x.example")    # first sent to inside it
    record(db, NOW - 30 * HOUR, "again@x.example")
    record(db, NOW - 2 * HOUR, "again@x.example")      # inside, but not for the first time
    # recent@ counts (its first record is in the window); old@ and again@ do not
    assert OutgoingLog.first_time_count(db, "a", [], NOW) == 1
    assert OutgoingLog.first_time_count(db, "a", ["old@x.example", "again@x.example"], NOW) == 1
    assert OutgoingLog.first_time_count(db, "a", ["new@x.example"], NOW) == 2
    assert OutgoingLog.first_time_count(db, "a", ["new@x.example", "new@x.example", "n2@x.example"], NOW) == 3
    # 2 hours earlier, old@'s first record was 23 h old: in the window too
    assert OutgoingLog.first_time_count(db, "a", [], NOW - 2 * HOUR) == 2
    assert OutgoingLog.first_time_count(db, "b", ["old@x.example"], NOW) == 1


def test_first_time_window_edge_is_strict(db):
    record(db, NOW - 86_400, "edge@x.example")
    record(db, NOW - 86_399.5, "inside@x.example")
    record(db, NOW - 86_460, "before@x.example")
    assert OutgoingLog.first_time_count(db, "a", [], NOW) == 1
    assert OutgoingLog.first_time_count(db, "a", [], NOW + 30) == 0


# --------------------------------------------------------------------------------------------
# the records


def test_record_keeps_a_row_per_recipient_and_the_first_time_and_minute_counts(db):
    record(db, NOW + 10, "x@r.example", "y@r.example", "x@r.example", sid="s1")
    record(db, NOW + 20, "x@r.example", sid="s2")
    record(db, NOW + 20, "x@r.example", sid="s2")  # the same submission again: nothing new
    record(db, NOW + 70, "z@r.example", account="b", sid="s3")
    assert rows(db, "outgoing") == [("a", "x@r.example", NOW + 10, "s1"), ("a", "x@r.example", NOW + 20, "s2"),
                                    ("a", "y@r.example", NOW + 10, "s1"), ("b", "z@r.example", NOW + 70, "s3")]
    assert rows(db, "outgoing_first") == [("a", "x@r.example", NOW + 10), ("a", "y@r.example", NOW + 10),
                                          ("b", "z@r.example", NOW + 70)]
    assert rows(db, "outgoing_minute") == [("a", 30_000_000, 3, 2), ("b", 30_000_001, 1, 1)]


def test_an_older_record_becomes_the_first(db):
    """A record older than the first known one (the clock moved back) moves the first time
    and its count to the older minute."""
    record(db, NOW + 130, "x@r.example", sid="late")
    record(db, NOW + 10, "x@r.example", sid="early")
    assert rows(db, "outgoing_first") == [("a", "x@r.example", NOW + 10)]
    assert rows(db, "outgoing_minute") == [("a", 30_000_000, 1, 1), ("a", 30_000_002, 1, 0)]
    before = rows(db, "outgoing_minute")
    db.execute("BEGIN")
    OutgoingLog.rebuild(db)
    db.execute("COMMIT")
    assert rows(db, "outgoing_minute") == before


def test_rebuild_recomputes_the_counts_from_the_records(db):
    db.executemany("INSERT INTO outgoing VALUES (?, ?, ?, ?)", [
        ("a", "x@r.example", NOW + 5, "s1"), ("a", "x@r.example", NOW + 65, "s2"),
        ("a", "y@r.example", NOW + 66, "s2"), ("b", "x@r.example", NOW + 1, "s3")])
    db.execute("BEGIN")
    OutgoingLog.rebuild(db)
    db.execute("COMMIT")
    assert rows(db, "outgoing_first") == [("a", "x@r.example", NOW + 5), ("a", "y@r.example", NOW + 66),
                                          ("b", "x@r.example", NOW + 1)]
    assert rows(db, "outgoing_minute") == [("a", 30_000_000, 1, 1), ("a", 30_000_001, 2, 1),
                                           ("b", 30_000_000, 1, 1)]


# --------------------------------------------------------------------------------------------
# the limiters


def messages_limiter(tmp_path, limit: int | None) -> MessagesPerDay:
    return MessagesPerDay("messages_per_day", LimitSettings(limit=limit), tmp_path / "ratelimit" / "m")


def first_limiter(tmp_path, limit: int | None) -> FirstTimeRecipientsPerDay:
    return FirstTimeRecipientsPerDay("first_time_recipients_per_day", LimitSettings(limit=limit),
                                     tmp_path / "ratelimit" / "f")


def test_messages_per_day_counts_the_last_24_hours(db, tmp_path):
    limiter = messages_limiter(tmp_path, 2)
    record(db, NOW - 25 * HOUR, "a1@x.example", "a2@x.example", "a3@x.example")
    record(db, NOW - 23 * HOUR, "b@x.example")
    assert limiter.check(db, sub("c@x.example")) is None  # 1 + 1 <= 2
    assert limiter.check(db, sub("c@x.example", "d@x.example")) == RateLimitDecision(
        451, "4.7.1", MESSAGES_TEXT.format(2), setting="max_outgoing_messages_per_day")
    # an hour and a second later the 23-hour record is out of the window too
    assert limiter.check(db, sub("c@x.example", "d@x.example", when=NOW + HOUR + 1)) is None


def test_messages_limit_from_the_settings_the_account_or_the_default(db, tmp_path):
    record(db, NOW - HOUR, *[f"r{i}@x.example" for i in range(999)])
    own = Account(max_outgoing_messages_per_day=1000)
    assert messages_limiter(tmp_path, None).limit(sub(config=Account(max_outgoing_messages_per_day=7))) == 7
    assert messages_limiter(tmp_path, 3).limit(sub(config=Account(max_outgoing_messages_per_day=7))) == 3
    assert messages_limiter(tmp_path, None).limit(sub()) == 1000
    assert messages_limiter(tmp_path, None).limit(sub(config=Account(max_outgoing_messages_per_day=0))) == 1000
    assert messages_limiter(tmp_path, None).check(db, sub("n@x.example", config=own)) is None  # 999 + 1
    assert messages_limiter(tmp_path, None).check(db, sub("n@x.example", "m@x.example")).code == 451
    assert messages_limiter(tmp_path, 0).check(db, sub("n@x.example")).text == MESSAGES_TEXT.format(0)


def test_first_time_recipients_per_day(db, tmp_path):
    limiter = first_limiter(tmp_path, 2)
    record(db, NOW - 25 * HOUR, "old@x.example")
    record(db, NOW - 23 * HOUR, "recent@x.example")
    # 1 record + 1 recipient reaches 2: counted: recent@ + new@ = 2, not more than 2
    assert limiter.check(db, sub("new@x.example")) is None
    assert limiter.check(db, sub("old@x.example", "recent@x.example")) is None  # 1 first-time
    refused = limiter.check(db, sub("new@x.example", "n2@x.example"))
    assert refused == RateLimitDecision(451, "4.7.1", FIRST_TEXT.format(2),
                                        setting="max_first_time_recipients_per_day")
    # an hour and a second later recent@ is no longer a first-time recipient of the window
    assert limiter.check(db, sub("new@x.example", "n2@x.example", when=NOW + HOUR + 1)) is None


def test_first_time_limit_from_the_settings_the_account_or_the_default(tmp_path):
    cfg7 = Account(max_first_time_recipients_per_day=7)
    assert first_limiter(tmp_path, None).limit(sub(config=cfg7)) == 7
    assert first_limiter(tmp_path, 4).limit(sub(config=cfg7)) == 4
    assert first_limiter(tmp_path, None).limit(sub()) == 200


def test_many_known_recipients_pass_the_first_time_limit(db, tmp_path):
    """Reaching the limit in records is not enough: the first-time recipients decide."""
    limiter = first_limiter(tmp_path, 2)
    record(db, NOW - 30 * HOUR, *[f"k{i}@x.example" for i in range(5)])
    record(db, NOW - HOUR, *[f"k{i}@x.example" for i in range(5)])
    assert limiter.check(db, sub("k1@x.example", "k2@x.example")) is None
    assert limiter.check(db, sub("k1@x.example", "n1@x.example", "n2@x.example")) is None
    assert limiter.check(db, sub("n1@x.example", "n2@x.example", "n3@x.example")).code == 451


def test_the_limiters_are_registered_with_their_names():
    kinds = {k.name: k for k in mox_register_rate_limiters()}
    assert list(kinds) == ["messages_per_day", "first_time_recipients_per_day"]
    assert kinds["messages_per_day"].settings_model is LimitSettings
    assert kinds["messages_per_day"].factory is MessagesPerDay
    assert kinds["first_time_recipients_per_day"].factory is FirstTimeRecipientsPerDay


def test_a_recipient_first_sent_to_exactly_now_is_not_new(db):
    record(db, NOW, "x@r.example")
    assert OutgoingLog.first_time_count(db, "a", ["x@r.example"], NOW) == 1  # in the window, not new too


def test_first_time_records_in_the_minute_after_the_edge_count_once(db):
    record(db, NOW - 86_340, "next@x.example")  # the minute after the window's first minute
    record(db, NOW - 86_330, "next2@x.example")
    assert OutgoingLog.first_time_count(db, "a", [], NOW) == 2
    assert OutgoingLog.in_window(db, "a", NOW) == 2


def test_a_submission_recorded_again_adds_its_new_recipients(db):
    record(db, NOW, "x@r.example", sid="s1")
    record(db, NOW, "x@r.example", "y@r.example", "z@r.example", sid="s1")
    assert [r[1] for r in rows(db, "outgoing")] == ["x@r.example", "y@r.example", "z@r.example"]
    assert rows(db, "outgoing_minute") == [("a", 30_000_000, 3, 3)]


def test_first_time_limit_looks_at_the_account_records_even_for_one_recipient(db, tmp_path):
    """Records in the window count towards reaching the limit: with 2 first-time recipients
    already, a third (one recipient, below the limit on its own) is refused."""
    record(db, NOW - HOUR, "p@x.example")
    record(db, NOW - HOUR, "q@x.example")
    assert first_limiter(tmp_path, 2).check(db, sub("r1@x.example")).code == 451
    assert first_limiter(tmp_path, None).check(db, sub("r1@x.example", config=Account(
        max_first_time_recipients_per_day=2))).text == FIRST_TEXT.format(2)
    assert first_limiter(tmp_path, None).check(db, sub("r1@x.example", config=Account(
        max_first_time_recipients_per_day=3))) is None


def test_a_limiter_imports_the_records_of_earlier_versions(tmp_path):
    """ratelimit/outgoing.db (beside the limiter's state directory) is imported by setup."""
    legacy = tmp_path / "ratelimit" / "outgoing.db"
    legacy.parent.mkdir()
    old = sqlite3.connect(legacy)
    old.execute("CREATE TABLE outgoing (account TEXT NOT NULL, recipient TEXT NOT NULL, submitted REAL NOT NULL, "
                "submission TEXT NOT NULL, UNIQUE (submission, recipient))")
    old.execute("INSERT INTO outgoing VALUES ('a', 'x@r.example', ?, 's1')", (NOW - HOUR,))
    old.commit()
    old.close()
    db = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    messages_limiter(tmp_path, 5).setup(db)
    assert OutgoingLog.in_window(db, "a", NOW) == 1
    assert not legacy.exists() and (tmp_path / "ratelimit" / "outgoing.db.imported").exists()
    db.close()


def test_a_failing_import_is_rolled_back_and_kept(tmp_path):
    legacy = tmp_path / "outgoing.db"
    old = sqlite3.connect(legacy)
    old.execute("CREATE TABLE outgoing (account TEXT, recipient TEXT, submitted REAL)")  # no submission
    old.commit()
    old.close()
    db = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="no such column: submission"):
        OutgoingLog(legacy).setup(db)
    assert not db.in_transaction
    assert [r[1] for r in db.execute("PRAGMA database_list")] == ["main"]  # detached again
    assert legacy.exists()  # not renamed: tried again at the next start
    db.close()
