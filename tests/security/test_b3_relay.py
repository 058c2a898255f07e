"""Cases 18-24: relaying, addressing and backscatter, and injection through addresses and
parameters, against a real ``mox serve`` whose remote MXs are all one smtp-sink."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.security.smtpraw import Raw, message, stuffed, transaction, wait_for

ROOT = Path(__file__).resolve().parents[2]

RELAY_SENDERS = ["<>", "<antispam@ext.test>", "<antispam@local.test>", "<antispam@[127.0.0.1]>"]
# The 13 recipient forms of nmap's smtp-open-relay script with ext.test as the target.
RELAY_RECIPIENTS = [
    "<relaytest@ext.test>", "<relaytest%ext.test@[127.0.0.1]>", "<relaytest%ext.test@local.test>",
    '<"relaytest@ext.test">', '<"relaytest%ext.test">', "<relaytest@ext.test@[127.0.0.1]>",
    '<"relaytest@ext.test"@[127.0.0.1]>', "<relaytest@ext.test@local.test>", "<@[127.0.0.1]:relaytest@ext.test>",
    "<@local.test:relaytest@ext.test>", "<ext.test!relaytest>", "<ext.test!relaytest@[127.0.0.1]>",
    "<ext.test!relaytest@local.test>",
]


def test_b18_open_relay_matrix_is_refused_and_nothing_leaves(site):
    before_sent, before_stored = len(site.sent()), site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        for sender in RELAY_SENDERS:
            for rcpt in RELAY_RECIPIENTS:
                assert c.cmd(f"MAIL FROM:{sender}").startswith("250")
                reply = c.cmd(f"RCPT TO:{rcpt}")
                assert reply[:3] in ("550", "501", "553", "554"), (sender, rcpt, reply)
                assert c.cmd("DATA").startswith("503")  # no recipient was taken
                assert c.cmd("RSET").startswith("250")
    assert site.marker_outbound(before_sent) == []
    assert site.marker_inbound(before_stored) == {}


def test_b19_source_route_is_stripped(site):
    before = site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        transaction(c, "<a@ext.test>", ("<@relay.test,@x.test:u@local.test>",))
        assert c.cmd(stuffed(message("source-route"))).startswith("250")
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("250")
        assert c.cmd("RCPT TO:<@relay.test,@x.test:someone@ext.test>").startswith("550")
    [raw] = wait_for(lambda: [d for p, d in site.stored().items() if p not in before and b"source-route" in d],
                     what="the source-routed message")
    assert b"Delivered-To: u@local.test" in raw or b"u@local.test" in raw.split(b"\r\n\r\n")[0]


def test_b20_unknown_local_recipient_is_refused_at_rcpt(site):
    before = site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("250")
        assert c.cmd("RCPT TO:<nosuch@local.test>").startswith("550 5.1.1")
        assert c.cmd("DATA").startswith("503")
    assert site.marker_inbound(before) == {}


def test_b21a_null_sender_is_accepted(site):
    before = site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        transaction(c, "<>", ("<u@local.test>",))
        assert c.cmd(stuffed(message("null-sender"))).startswith("250")
    wait_for(lambda: any(b"null-sender" in d for p, d in site.stored().items() if p not in before),
             what="the bounce-like message")


def test_b21a_null_sender_gets_one_recipient_on_port_25(site):
    with Raw(site.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<>").startswith("250")
        assert c.cmd("RCPT TO:<u@local.test>").startswith("250")
        assert c.cmd("RCPT TO:<alice@local.test>").startswith("452 4.5.3")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(stuffed(message("null-one"))).startswith("250")


def test_b21b_no_dsn_for_the_null_sender_and_b21c_dsn_to_the_source_routed_sender(own_site):
    """Both to an MX that refuses every recipient (5xx). The null sender's message fails
    without a DSN; then a message from ``<@a.test,@b.test:alice@local.test>`` fails and its
    DSN reaches alice. When that DSN is there, the first failure (earlier) had its chance to
    make one too: alice has exactly one."""
    site = own_site(sink_options={"reject_5xx": "RCPT"})
    site.submit("", ["x@ext.test"], message("null-bounce", "alice@local.test", "x@ext.test"))
    wait_for(lambda: "(none)" in site.queue_list(), what="the null sender's message to fail")
    with Raw(site.submission_port) as c:
        c.ehlo()
        c.starttls()
        c.ehlo()
        assert c.login("alice@local.test", "alice-pw").startswith("235")
        transaction(c, "<@a.test,@b.test:alice@local.test>", ("<y@ext.test>",))
        assert c.cmd(stuffed(message("routed-bounce", "alice@local.test", "y@ext.test"))).startswith("250")
    dsns = wait_for(lambda: site.mox.messages("alice"), what="the DSN in alice's Maildir")
    assert len(dsns) == 1
    assert b"routed-bounce" in dsns[0] and b"null-bounce" not in dsns[0]
    assert site.mox.messages("admin") == []


@pytest.mark.parametrize("command", [
    "MAIL FROM:<a@ext.test> AUTH=a+0Ab+0DX-Evil:1",
    "MAIL FROM:<a@ext.test> ENVID=q+0Aw",
])
def test_b22_control_characters_in_mail_parameters_are_refused(site, command):
    with Raw(site.smtp_port) as c:
        c.ehlo()
        assert c.cmd(command)[:3] in ("501", "555")
        assert c.cmd("RCPT TO:<u@local.test>").startswith("503")  # no transaction began


def test_b22_control_characters_in_rcpt_parameters_are_refused(site):
    before = site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("250")
        assert c.cmd("RCPT TO:<u@local.test> ORCPT=rfc822;u+0AX-Rcpt:evil@y NOTIFY=FAILURE")[:3] in ("501", "555")
        assert c.cmd("RCPT TO:<v@local.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(stuffed(message("one-rcpt", to="v@local.test"))).startswith("250")
    new = site.marker_inbound(before)
    assert len(new) == 1  # v only; nothing for the refused recipient, no header from the parameter
    [raw] = new.values()
    assert b"X-Rcpt" not in raw and b"evil" not in raw


def test_b23_shell_metacharacters_in_addresses_are_refused(site, tmp_path):
    pwn = tmp_path / "pwn"
    before = site.stored()
    with Raw(site.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<;sleep 10;>")[:3] in ("501", "553")
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("250")
        assert c.cmd(f'RCPT TO:<"|touch {pwn}"@local.test>').startswith("550")
        assert c.cmd(f'RCPT TO:<"`touch {pwn}`"@local.test>').startswith("550")
    conf = tmp_path / "sendmail.toml"
    conf.write_text(f'host = "127.0.0.1"\nport = {site.submission_port}\nverify_certificate = false\n'
                    f'username = "alice@local.test"\npassword = "alice-pw"\nfailures_dir = "{tmp_path}/failed"\n')
    r = subprocess.run([sys.executable, "-m", "mox_core", "sendmail", "-C", str(conf), "-f", f";touch {pwn}",
                        "--", "u@local.test"], input=b"Subject: x\n\nx\n", capture_output=True, timeout=60)
    assert r.returncode != 0  # the server refuses that sender
    assert site.marker_inbound(before) == {}
    assert not pwn.exists()


def test_b23_no_subprocess_call_uses_a_shell():
    """No product code starts a program through a shell (``shell=True``, ``os.system``,
    ``os.popen``), so no address can become a command."""
    found = []
    for path in list((ROOT / "mox_core").rglob("*.py")) + list((ROOT / "plugins").glob("*/mox_*/**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("os.system", "os.popen") or any(
                        k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                        for k in node.keywords):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert found == []


def test_b24_cr_in_command_arguments_is_refused_and_never_reaches_received(site):
    before = site.stored()
    with Raw(site.smtp_port) as c:
        assert c.cmd(b"EHLO evil.test\rBcc: victim@ext.test\r\n").startswith("501")
        assert c.cmd(b"HELO evil.test\rX-Injected: 1\r\n").startswith("501")
        c.ehlo("fine.test")
        assert c.cmd(b"MAIL FROM:<a@x\rX: y>\r\n").startswith("501")
        assert c.cmd(b"MAIL FROM:<a@ext.test>\r\n").startswith("250")
        assert c.cmd(b"RCPT TO:<u@local.test\rBcc: victim@ext.test>\r\n").startswith("501")
        assert c.cmd(b"RCPT TO:<u@local.test>\r\n").startswith("250")
        assert c.cmd(b"DATA\r\n").startswith("354")
        assert c.cmd(stuffed(message("after-injection"))).startswith("250")
    [raw] = wait_for(lambda: [d for p, d in site.stored().items() if p not in before and b"after-injection" in d],
                     what="the message")
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"fine.test" in head
    assert b"Bcc" not in head and b"X-Injected" not in head and b"evil.test" not in head


def test_b24_sendmail_refuses_a_recipient_with_crlf(site, tmp_path):
    conf = tmp_path / "sendmail.toml"
    conf.write_text(f'host = "127.0.0.1"\nport = {site.submission_port}\nverify_certificate = false\n'
                    f'username = "alice@local.test"\npassword = "alice-pw"\nfailures_dir = "{tmp_path}/failed"\n')
    before = len(site.sent())
    r = subprocess.run([sys.executable, "-m", "mox_core", "sendmail", "-C", str(conf), "-t"],
                       input=b"From: alice@local.test\nTo: \"v@x\r\nRCPT TO:<w@bank.test>\"\nSubject: x\n\nx\n",
                       capture_output=True, timeout=60, env={**os.environ})
    assert r.returncode != 0
    assert site.marker_outbound(before) == []
