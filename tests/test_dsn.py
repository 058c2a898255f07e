"""DSNs (RFC 3464) from the queue: structure, when they are sent, where they go."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.utils import format_datetime

from mox_core.outgoing.dsn import DSNRecipient, compose, status_code
from mox_core.queue import Filter
from tests.plugins.queue_helpers import MSG, cfg, maildir_new, read_mail, reset_script, running  # noqa: F401 (fixtures)
from tests.plugins.queue_scripted import SCRIPT, P, T


def report_parts(msg: email.message.EmailMessage):
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts][0] == "text/plain"
    status = parts[1]
    blocks = status.get_payload()  # per-message block, then one block per recipient
    return parts[0], status, blocks, parts[2]


async def test_5xx_gives_a_failure_dsn_in_the_senders_inbox(cfg):
    SCRIPT.respond("bob@remote.example", (P, 550, "5.1.1", "no such user\nreally", "mx1.remote.example"))
    async with running(cfg) as q:
        t0 = q.clock.now()
        await q.add(account="alice", mail_from="alice@example.org",
                    recipients=["bob@remote.example", "carol@remote.example"], data=MSG)
        await q.scheduler.settle()
        assert len(SCRIPT.calls) == 1  # one transaction for both
        assert await q.list_messages() == []  # failed one removed, the other delivered
    [path] = maildir_new(cfg, "alice")
    raw = path.read_bytes()
    # a DSN's envelope sender is the null reverse-path (RFC 5321 §4.5.5), so no DSN answers it
    assert raw.startswith(b"Return-Path: <>\r\n"
                          b"Delivered-To: alice@example.org\r\n")  # as in every delivery
    msg = read_mail(path)
    assert msg["From"].addresses[0].addr_spec == "postmaster@mail.example.org"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "mail delivery failed"
    assert msg["References"] == "<m1@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, blocks, headers = report_parts(msg)
    assert "bob@remote.example" in human.get_content() and "carol" not in human.get_content()
    assert "failed permanently" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    assert blocks[0]["Reporting-MTA"] == "dns; mail.example.org"
    assert blocks[0]["Arrival-Date"] == format_datetime(datetime.fromtimestamp(t0, UTC))
    assert len(blocks) == 2  # only the failed recipient
    r = blocks[1]
    assert r["Final-Recipient"] == "rfc822; bob@remote.example"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; mx1.remote.example"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user really"
    assert r["Last-Attempt-Date"]
    assert headers.get_content_type() == "text/rfc822-headers"
    original = headers.get_payload()
    assert "Subject: hello there" in original and "Message-ID: <m1@example.org>" in original
    assert "body line" not in original


async def test_delayed_dsn_exactly_after_the_fifth_attempt_then_failure_after_the_eighth(cfg):
    SCRIPT.default = (T, 451, "4.3.0", "mailbox busy")
    intervals = [450, 900, 1800, 3600, 7200, 14400, 28800]
    async with running(cfg) as q:
        await q.add(account="alice", mail_from="alice@example.org",
                    recipients=["bob@remote.example"], data=MSG)
        await q.scheduler.settle()
        counts = [len(maildir_new(cfg, "alice"))]
        for iv in intervals:
            q.clock.advance(iv)
            await q.scheduler.settle()
            counts.append(len(maildir_new(cfg, "alice")))
        # after attempt:  1  2  3  4  5  6  7  8
        assert counts == [0, 0, 0, 0, 1, 1, 1, 2]
    delayed, failed = (read_mail(p) for p in maildir_new(cfg, "alice"))
    if delayed["Subject"] != "mail delivery delayed":
        delayed, failed = failed, delayed
    assert delayed["Subject"] == "mail delivery delayed"
    human, _, blocks, _ = report_parts(delayed)
    assert blocks[1]["Action"] == "delayed" and blocks[1]["Status"] == "4.3.0"
    assert blocks[1]["Will-Retry-Until"]
    assert "in 2 hours, in 6 hours and in 14 hours" in human.get_content()
    assert failed["Subject"] == "mail delivery failed"
    _, _, blocks, _ = report_parts(failed)
    # failed after too many temporary errors: class 5 with the remote detail
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.3.0"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 451 4.3.0 mailbox busy"


async def test_no_dsn_for_the_null_sender_or_a_non_local_sender(cfg):
    SCRIPT.default = (P, 550, "5.7.1", "rejected")
    async with running(cfg) as q:
        await q.add(account="alice", mail_from="", recipients=["a@remote.example"], data=MSG)
        await q.add(account=None, mail_from="someone@elsewhere.example",
                    recipients=["b@remote.example"], data=MSG)
        await q.scheduler.settle()
        assert len(SCRIPT.calls) == 2 and await q.list_messages() == []
    assert maildir_new(cfg, "alice") == [] and maildir_new(cfg, "admin") == []


async def test_dsn_goes_to_postmaster_when_the_sender_account_is_gone(cfg):
    SCRIPT.default = (P, 550, "5.1.1", "no such user")
    async with running(cfg) as q:
        await q.add(account="removed", mail_from="removed@example.org",
                    recipients=["a@remote.example"], data=MSG)
        await q.scheduler.settle()
    [path] = maildir_new(cfg, "admin")
    assert read_mail(path)["To"].addresses[0].addr_spec == "removed@example.org"


async def test_admin_fail_sends_a_failure_dsn(cfg):
    SCRIPT.default = (T, 451, "4.0.0", "later")
    async with running(cfg) as q:
        await q.add(account="alice", mail_from="alice@example.org",
                    recipients=["a@remote.example", "b@remote.example"], data=MSG)
        await q.scheduler.settle()
        assert await q.fail(Filter()) == 2
        assert await q.list_messages() == []
    [path] = maildir_new(cfg, "alice")
    human, _, blocks, _ = report_parts(read_mail(path))
    assert "delivery canceled by admin" in human.get_content()
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; a@remote.example",
                                                         "rfc822; b@remote.example"]
    assert all(b["Status"] == "5.0.0" and b["Diagnostic-Code"] is None for b in blocks[1:])


def test_smtputf8_message_gets_global_delivery_status():
    raw = compose(hostname="mail.example.org", mail_from="alice@example.org", action="failed",
                  recipients=[DSNRecipient("jörg@bücher.example", "5.1.1", 550, None, "nope")],
                  original="Subject: grüße\r\n\r\nx\r\n".encode(), arrival=0, now=0,
                  smtputf8=True)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"]
    assert "Final-Recipient: utf-8; jörg@bücher.example" in raw.decode()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_status_code_class_follows_the_action():
    assert status_code("failed", "5.1.1") == "5.1.1"
    assert status_code("failed", "4.2.2") == "5.2.2"
    assert status_code("delayed", "4.2.2") == "4.2.2"
    assert status_code("failed", None) == "5.0.0"
    assert status_code("delayed", "garbage") == "4.0.0"
