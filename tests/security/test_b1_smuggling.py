"""Cases 1-9: where a message ends. SMTP smuggling (a second message hidden inside the first
behind a line ending that some server takes for the end of data), outbound smuggling, and
pipelining out of turn. Raw bytes to a real ``mox serve``; see README.md for the case list.

Only CRLF "." CRLF ends a message (RFC 5321 §2.3.8, §4.1.1.4). For every other form of the
end-of-data line the server must keep reading up to the real CRLF.CRLF and then answer once,
with a 5xx, so the hidden MAIL/RCPT/DATA is never run and nothing is stored.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.security.smtpraw import Raw, message, stuffed, transaction, wait_for

SMUGGLED = b"MAIL FROM:<admin@local.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n\r\nsmuggled\r\n"


def smuggle(site, eod: bytes) -> None:
    """The frame of cases 1-6: a message whose body contains ``eod`` followed by a whole
    second transaction, then the real end of data. Exactly one 5xx, nothing stored."""
    before = site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        transaction(c)
        reply = c.cmd(b"Subject: t\r\n\r\nbody" + eod + SMUGGLED + b"\r\n.\r\n")
        assert reply.startswith("5"), reply
        # the session goes on in the state after a transaction: the hidden commands never ran
        assert c.cmd("NOOP").startswith("250")
        assert c.cmd("RCPT TO:<u@local.test>").startswith("503")
    assert site.marker_inbound(before) == {}


@pytest.mark.parametrize("eod", [b"\n.\n"], ids=["LF.LF"])
def test_b01_lf_dot_lf_does_not_end_data(site, eod):
    smuggle(site, eod)


@pytest.mark.parametrize("eod", [b"\n.\r\n"], ids=["LF.CRLF"])
def test_b02_lf_dot_crlf_does_not_end_data(site, eod):
    smuggle(site, eod)


@pytest.mark.parametrize("eod", [b"\r\n.\n"], ids=["CRLF.LF"])
def test_b03_crlf_dot_lf_does_not_end_data(site, eod):
    smuggle(site, eod)


@pytest.mark.parametrize("eod", [b"\r.\r", b"\r.\r\n", b"\r.\n", b"\n.\r"], ids=["CR.CR", "CR.CRLF", "CR.LF", "LF.CR"])
def test_b04_bare_cr_forms_do_not_end_data(site, eod):
    smuggle(site, eod)


@pytest.mark.parametrize("eod", [b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"], ids=["CRLF.CRCRLF", "CRCRLF.CRCRLF"])
def test_b05_cr_cr_lf_is_not_condensed_into_an_end_of_data(site, eod):
    smuggle(site, eod)


@pytest.mark.parametrize("eod", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"], ids=["NUL-before-dot", "NUL-after-dot"])
def test_b06_nul_next_to_the_dot_is_not_stripped_into_an_end_of_data(site, eod):
    smuggle(site, eod)


def test_b07_bare_cr_inside_a_line_is_refused(site):
    before = site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        transaction(c)
        assert c.cmd(b"Subject: t\r\n\r\na\rb\r\n.\r\n").startswith("554 5.6.0")
    assert site.marker_inbound(before) == {}


def test_b08_outbound_smuggling_submission_refuses_bare_cr_and_lf(site):
    """A submission carrying a hidden transaction behind bare CR/LF is refused on the way in,
    so it can never reach the next hop."""
    before = len(site.sent())
    for body in (b"x\r.\r\nMAIL FROM:<ceo@bank.test>\r\n", b"x\n.\nMAIL FROM:<ceo@bank.test>\r\n",
                 b"x\n.\r\nMAIL FROM:<ceo@bank.test>\r\n"):
        with Raw(site.submission_port) as c:
            c.ehlo()
            c.starttls()
            c.ehlo()
            assert c.login("alice@local.test", "alice-pw").startswith("235")
            transaction(c, "<alice@local.test>", ("<victim@bank.test>",))
            data = message("smuggle-out", "alice@local.test", "victim@bank.test", body)
            assert c.cmd(data + b"\r\n.\r\n").startswith("554")
    assert site.marker_outbound(before) == []


def test_b08_outbound_dot_lines_arrive_as_one_message(site):
    """Lines that start with a dot, and a line with only a dot, leave dot-stuffed: the next
    hop gets exactly one message with those lines intact."""
    before = len(site.sent())
    body = b".\r\n..\r\n.MAIL FROM:<ceo@bank.test>\r\nlast\r\n"
    site.submit("alice@local.test", ["dots@bank.test"], message("dots", "alice@local.test", "dots@bank.test", body))
    msgs = wait_for(lambda: [m for m in site.sent()[before:] if "dots@bank.test" in m.rcpt_to],
                    what="the dotted message at the sink")
    [m] = msgs
    assert m.data.endswith(b"\n.\n..\n.MAIL FROM:<ceo@bank.test>\nlast\n")
    assert b"\r" not in m.data  # the dump has LF line ends: a CR here was a bare CR on the wire


def test_b08_outbound_sendmail_cli_lf_input_goes_out_as_crlf(site, tmp_path):
    """``mox sendmail`` reads LF lines (as from cron or git); they leave as CRLF lines with
    dots stuffed, one message."""
    conf = tmp_path / "sendmail.toml"
    conf.write_text(f'host = "127.0.0.1"\nport = {site.submission_port}\ntls = "starttls"\n'
                    f'verify_certificate = false\nusername = "alice@local.test"\npassword = "alice-pw"\n'
                    f'from_address = "alice@local.test"\nfailures_dir = "{tmp_path}/failures"\n')
    before = len(site.sent())
    data = b"From: alice@local.test\nTo: cli@bank.test\nSubject: cli\n\nline\n.\n..x\nMAIL FROM:<ceo@bank.test>\nend\n"
    r = subprocess.run([sys.executable, "-m", "mox_core", "sendmail", "-C", str(conf), "-i", "cli@bank.test"],
                       input=data, capture_output=True, timeout=60, env={**os.environ})
    assert r.returncode == 0, r.stderr
    [m] = wait_for(lambda: [m for m in site.sent()[before:] if "cli@bank.test" in m.rcpt_to], what="the CLI message")
    assert b"\nline\n.\n..x\nMAIL FROM:<ceo@bank.test>\nend\n" in m.data
    assert b"\r" not in m.data


def test_b09a_early_talker_is_refused(site):
    """The client's bytes must be there before the server greets: sent right after connect
    they usually are, but a busy machine may run the server's greeting first (then the EHLO
    came after the 220 and is served). Some of a few tries must be caught, each one either
    refused or served correctly."""
    refused = 0
    for _ in range(40):
        with Raw(site.smtp_port, greeting=False) as c:
            c.send(b"EHLO x\r\n")
            first = c.reply()
            if first.startswith("554 5.5.0"):
                assert c.closed()
                refused += 1
                if refused == 3:
                    break
            else:
                assert first.startswith("220") and c.reply().startswith("250")
    assert refused >= 1


def test_b09b_data_pipelined_before_354_is_refused(site):
    before = site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@ext.test>\r\nRCPT TO:<u@local.test>\r\n")
        assert c.reply().startswith("250") and c.reply().startswith("250")
        c.send(b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        assert c.reply().startswith("554 5.5.0")
        assert c.closed()
    assert site.marker_inbound(before) == {}


def test_b09c_pipelined_group_is_answered_in_order(site):
    before = site.stored()
    with Raw(site.smtp_port) as c:
        assert "PIPELINING" in c.ehlo()
        c.send(b"MAIL FROM:<a@ext.test>\r\nRCPT TO:<u@local.test>\r\nRCPT TO:<v@local.test>\r\nDATA\r\n")
        replies = [c.reply()[:3] for _ in range(4)]
        assert replies == ["250", "250", "250", "354"]
        assert c.cmd(stuffed(message("pipelined"))).startswith("250")
    new = wait_for(lambda: [d for p, d in site.stored().items() if p not in before and b"pipelined" in d],
                   what="the pipelined message")
    assert len(new) >= 1
