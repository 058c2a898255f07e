"""Cases 10-17: STARTTLS and authentication, against a real ``mox serve``.

Failed logins are counted per client address (10 a minute, then 421). Each case that fails
logins connects from its own 127.0.0.x address so that the counts of one case do not block
the logins of another.
"""

from __future__ import annotations

import base64
import statistics
import time

from tests.security.smtpraw import Raw, client_tls, message, stuffed, transaction, wait_for


def submission(site, source: str | None = None) -> Raw:
    c = Raw(site.submission_port, source=source)
    c.ehlo()
    c.starttls()
    c.ehlo()
    return c


def test_b10_commands_pipelined_after_starttls_are_not_run_inside_tls(site):
    with Raw(site.smtp_port) as c:
        c.ehlo()
        c.send(b"STARTTLS\r\nXYZZY\r\n")  # one write: the injected command arrives in plaintext
        assert c.reply().startswith("220")
        assert c.buf == b""
        c.sock = client_tls().wrap_socket(c.sock, server_hostname="localhost")
        # Had XYZZY been run inside TLS, its 500 would be the first reply there.
        assert c.cmd("NOOP").startswith("250")
        assert c.cmd("EHLO after.test").startswith("250")


def test_b12_starttls_resets_the_transaction_and_a_second_one_is_refused(site):
    with Raw(site.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("250")
        c.starttls()
        assert c.cmd("RCPT TO:<u@local.test>").startswith("503")  # HELO and MAIL are forgotten
        c.ehlo()
        assert c.cmd("RCPT TO:<u@local.test>").startswith("503")
        assert c.cmd("STARTTLS").startswith(("503", "554"))


def test_b13_no_auth_in_plaintext(site):
    token = "AGFsaWNlAHNlY3JldA=="  # \0alice\0secret
    with Raw(site.submission_port) as c:
        assert "AUTH" not in c.ehlo()
        reply = c.cmd(f"AUTH PLAIN {token}")
        assert reply.startswith(("530", "538", "503")), reply
    with Raw(site.smtp_port) as c:  # port 25 offers no AUTH at all
        assert "AUTH" not in c.ehlo()
        assert c.cmd(f"AUTH PLAIN {token}").startswith("5")
    assert token not in site.mox.log_text() and "secret" not in site.mox.log_text()


def _fail_login(site, source: str, n: int = 1, c: Raw | None = None) -> tuple[list[str], list[float]]:
    own = c is None
    c = c or submission(site, source)
    replies, times = [], []
    try:
        for i in range(n):
            t0 = time.monotonic()
            try:
                replies.append(c.login("alice@local.test", f"wrong{i}"))
            except EOFError:
                replies.append("EOF")
                break
            times.append(time.monotonic() - t0)
    finally:
        if own:
            c.close()
    return replies, times


def test_b14_brute_force_is_slowed_then_cut_off(site):
    source = "127.0.0.14"
    # one connection: from the 4th failure on, each answer waits (n-3) seconds
    replies, times = _fail_login(site, source, 5)
    assert replies == ["535 5.7.8 bad user/pass"] * 5
    assert times[3] >= 0.9 and times[4] >= 1.9, times
    # new connections: 10 failures a minute, then 421 4.7.0
    for _ in range(5):
        assert _fail_login(site, source)[0] == ["535 5.7.8 bad user/pass"]
    with Raw(site.submission_port, source=source) as c:
        c.ehlo()
        c.starttls()
        c.ehlo()
        reply = c.login("alice@local.test", "wrong")
        assert reply.startswith("421 4.7.0"), reply
        assert c.closed()
    # the right password does not get through either while the address is blocked
    with Raw(site.submission_port, source=source) as c:
        c.ehlo()
        c.starttls()
        c.ehlo()
        assert c.login("alice@local.test", "alice-pw").startswith("421")


def test_b14_a_successful_login_resets_the_count(site):
    source = "127.0.0.24"
    for _ in range(9):
        assert _fail_login(site, source)[0] == ["535 5.7.8 bad user/pass"]
    with submission(site, source) as c:
        assert c.login("alice@local.test", "alice-pw").startswith("235")
    for _ in range(9):  # 18 failures within the minute, none refused: the count started again
        assert _fail_login(site, source)[0] == ["535 5.7.8 bad user/pass"]


def test_b15_unknown_user_and_wrong_password_look_the_same(site):
    source = "127.0.0.15"
    unknown, known = [], []
    for i in range(4):
        for user, out in (("nosuch@local.test", unknown), ("alice@local.test", known)):
            with submission(site, source) as c:
                t0 = time.monotonic()
                reply = c.login(user, f"wrong{i}")
                out.append((reply, time.monotonic() - t0))
    assert {r for r, _ in unknown} == {r for r, _ in known} == {"535 5.7.8 bad user/pass"}
    # the unknown user pays for a password hash too: medians within 150 ms of each other
    gap = abs(statistics.median(t for _, t in unknown) - statistics.median(t for _, t in known))
    assert gap < 0.15, (unknown, known)


def test_b16a_authzid_other_than_the_login_is_refused(site):
    with submission(site, "127.0.0.16") as c:
        token = base64.b64encode(b"bob@local.test\0alice@local.test\0alice-pw").decode()
        assert c.cmd(f"AUTH PLAIN {token}").startswith("535")
        assert c.cmd("MAIL FROM:<alice@local.test>").startswith("530")  # still not logged in


def test_b16b_mail_from_of_another_account_is_refused(site):
    before = len(site.sent())
    with submission(site) as c:
        assert c.login("alice@local.test", "alice-pw").startswith("235")
        assert c.cmd("MAIL FROM:<bob@local.test>").startswith("550 5.7.1")
        assert c.cmd("MAIL FROM:<@relay.test:bob@local.test>").startswith("550 5.7.1")
    assert site.marker_outbound(before) == []


def test_b17_ambiguous_from_header_is_refused(site):
    before = len(site.sent())
    for frm in (b"alice@local.test)<bob@bank.test>", b"alice@local.test, bob@bank.test",
                b"<alice@local.test> <bob@bank.test>", b"\"alice@local.test\" <bob@bank.test>"):
        with submission(site) as c:
            assert c.login("alice@local.test", "alice-pw").startswith("235")
            transaction(c, "<alice@local.test>", ("<x@ext.test>",))
            data = b"From: " + frm + b"\r\nTo: x@ext.test\r\nSubject: ambiguous\r\n\r\nx\r\n"
            reply = c.cmd(stuffed(data))
            assert reply.startswith(("550 5.7.1", "554 5.6.0")), (frm, reply)
    assert site.marker_outbound(before) == []


def test_b17_plain_from_of_the_account_is_accepted(site):
    """The counterpart of the case above: the check does not refuse a normal From."""
    before = len(site.sent())
    site.submit("alice@local.test", ["x@ext.test"], message("plain-from", "alice@local.test", "x@ext.test"))
    wait_for(lambda: any("plain-from" in m.text for m in site.sent()[before:]), what="the message at the sink")
