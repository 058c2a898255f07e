"""``mox sendmail``: the sendmail(1) drop-in, run as a process against real servers.

Peers: a real ``mox serve`` (submission with STARTTLS and implicit TLS, mechanisms chosen
automatically and one by one, the account's From check), the private Postfix smarthost with
Cyrus SASL, and two real callers, ``git send-email`` and bsd-mailx's ``mail``, each using a
``sendmail`` wrapper script. The option parser also gets direct tests.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
import tomlkit
from click.testing import CliRunner

from mox_core.sendmail.command import parse_args, sendmail_command
from mox_core.sendmail.config import SendmailConfig
from tests.conftest import program

DOMAINS = """
[domains."example.org"]

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
[accounts.alice.destinations."alice@example.org"]
[accounts.alice.destinations."alice2@example.org"]

[accounts.bob]
[accounts.bob.destinations."bob@example.org"]

[accounts.carol]
[accounts.carol.destinations."carol@example.org"]
"""

EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 64, 65, 69, 75, 78
BARE_LF = re.compile(rb"(?<!\r)\n")


ACCOUNTS = ("admin", "alice", "bob", "carol")


@pytest.fixture(scope="module")
def module_mox(tmp_path_factory):
    """One ``mox serve`` for the module: starting one takes a second or two, and some 60 tests
    use it (each as if it were new: the ``mox`` fixture)."""
    from mox_testpeers.moxserver import MoxServer

    server = MoxServer(tmp_path_factory.mktemp("sendmail") / "mox", domains=DOMAINS)
    server.set_password("alice", "alice-secret")
    server.start()
    yield server
    server.stop()


class FreshMox:
    """The module's ``mox serve`` as one test sees it: no mail in any account's Inbox when the
    test starts (each test waits for its own deliveries, so none is under way then), and a log
    that starts with the test."""

    def __init__(self, server) -> None:
        self._server = server
        for account in ACCOUNTS:
            for sub in ("new", "cur"):
                folder = server.maildir(account) / sub
                for path in folder.iterdir() if folder.exists() else ():
                    path.unlink()
        self._log_start = len(server.log_text())

    def __getattr__(self, name: str):
        return getattr(self._server, name)

    def log_text(self) -> str:
        return self._server.log_text()[self._log_start:]


@pytest.fixture
def mox(module_mox):
    return FreshMox(module_mox)


def write_config(path: Path, **keys) -> Path:
    path.write_text(tomlkit.dumps({k: v for k, v in keys.items() if v is not None}))
    return path


def mox_config(tmp_path: Path, mox, **overrides) -> Path:
    keys = {"host": "127.0.0.1", "port": mox.submission_port, "tls": "starttls", "ca_file": str(mox.cert),
            "username": "alice@example.org", "password": "alice-secret",
            "failures_dir": str(tmp_path / "failures")}
    keys.update(overrides)
    return write_config(tmp_path / "sendmail.toml", **keys)


# MOX_SENDMAIL_TESTS_IN_PROCESS=1 (set by scripts/mutation for this module): the same calls
# go to main() in this process, with the environment, umask, stdin and output of a process, so
# that mutmut sees which test runs which function (it cannot see into subprocesses).
IN_PROCESS = os.environ.get("MOX_SENDMAIL_TESTS_IN_PROCESS") == "1"


def sendmail(config: Path | None, *args: str, input: bytes = b"Subject: test\n\nhello\n",
             env: dict[str, str] | None = None, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mox_core.sendmail.command [-C config] ARGS`` as a caller would."""
    e = {k: v for k, v in os.environ.items() if k != "MOX_SENDMAIL_CONFIG"}
    e.update(env or {})
    argv = [*(["-C", str(config)] if config else []), *args]
    if IN_PROCESS:
        return _sendmail_in_process(argv, input, e, umask)
    cmd = [sys.executable, "-m", "mox_core.sendmail.command", *argv]
    r = subprocess.run(cmd, input=input, capture_output=True, env=e, timeout=60,
                       preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def _sendmail_in_process(argv: list[str], input: bytes, env: dict[str, str],
                         umask: int | None) -> subprocess.CompletedProcess[str]:
    import io
    from unittest import mock

    from mox_core.sendmail.command import main

    stdin = io.TextIOWrapper(io.BytesIO(input))
    out, err = io.StringIO(), io.StringIO()
    old_umask = os.umask(umask) if umask is not None else None
    try:
        with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(sys, "stdin", stdin), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def mox_auth_mechanisms(mox) -> list[str]:
    out = []
    for line in mox.log_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "auth_success":
            out.append(event["mechanism"])
    return out


def saved_files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# submitting to mox


@pytest.mark.parametrize("mechanism, expected", [
    ("", "SCRAM-SHA-256"),  # automatic: the most secure mox offers
    ("SCRAM-SHA-256", "SCRAM-SHA-256"),
    ("SCRAM-SHA-1", "SCRAM-SHA-1"),
    ("CRAM-MD5", "CRAM-MD5"),
    ("PLAIN", "PLAIN"),
])
def test_mox_submission_with_each_mechanism(tmp_path, mox, mechanism, expected):
    cfg = mox_config(tmp_path, mox, auth_mechanism=mechanism)
    r = sendmail(cfg, "admin@example.org", input=f"Subject: via {expected}\n\nhello\n".encode())
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert f"Subject: via {expected}".encode() in raw
    assert b"with ESMTPSA" in header_block(raw)
    assert mox_auth_mechanisms(mox) == [expected]
    assert saved_files(tmp_path / "failures") == []


def test_mox_submissions_implicit_tls_and_password_env(tmp_path, mox):
    cfg = mox_config(tmp_path, mox, tls="implicit", port=mox.submissions_port, password=None,
                     password_env="ALICE_PW")
    r = sendmail(cfg, "admin@example.org", env={"ALICE_PW": "alice-secret"})
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert b"with ESMTPSA" in header_block(raw)


def test_certificate_is_verified_by_default(tmp_path, mox):
    # mox's certificate is self-signed: without ca_file the TLS handshake must fail
    cfg = mox_config(tmp_path, mox, ca_file=None)
    r = sendmail(cfg, "admin@example.org")
    assert r.returncode == EX_TEMPFAIL, r.stderr
    assert "certificate verify" in r.stderr.lower() or "certificate verification" in r.stderr.lower(), r.stderr
    assert len(saved_files(tmp_path / "failures")) == 1
    assert mox.messages("admin") == []
    # and verify_certificate = false accepts it
    cfg = mox_config(tmp_path, mox, ca_file=None, verify_certificate=False)
    assert sendmail(cfg, "admin@example.org").returncode == 0
    mox.wait_for_messages("admin", 1)


def test_lf_input_arrives_with_crlf_and_dot_lines_intact(tmp_path, mox):
    cfg = mox_config(tmp_path, mox)
    body = b"Subject: dots\n\nfirst\n.leading dot\n..two dots\n.\nlast line\n"
    r = sendmail(cfg, "-i", "admin@example.org", input=body)
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert raw.endswith(b"\r\n\r\nfirst\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n")
    assert BARE_LF.search(raw) is None
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_without_i_a_lone_dot_ends_the_message(tmp_path, mox):
    cfg = mox_config(tmp_path, mox)
    r = sendmail(cfg, "admin@example.org", input=b"Subject: dot\n\nbefore\n.dotted\n.\nafter the end\n")
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert raw.endswith(b"\r\n\r\nbefore\r\n.dotted\r\n")
    assert b"after the end" not in raw


def test_missing_from_date_message_id_are_added(tmp_path, mox):
    cfg = mox_config(tmp_path, mox)
    r = sendmail(cfg, "admin@example.org", input=b"Subject: bare\n\nhello\n")
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Date"].datetime is not None
    assert re.fullmatch(r"<[^<>@\s]+@example\.org>", str(msg["Message-ID"]))
    # no To, Cc or Bcc and no -t: To names the command-line recipients (as mox's sendmail)
    assert [a.addr_spec for a in msg["To"].addresses] == ["admin@example.org"]


@pytest.mark.parametrize("args, header, to", [
    (["admin@example.org", "bob@example.org"], b"", ["admin@example.org", "bob@example.org"]),
    (["admin@example.org"], b"Cc: bob@example.org\n", None),  # Cc: no To is added
    (["admin@example.org"], b"Bcc: bob@example.org\n", None),  # nor with Bcc (removed)
    (["-t"], b"To: admin@example.org\n", ["admin@example.org"]),  # -t: the header is the list
])
def test_to_is_added_only_without_to_cc_bcc_and_without_t(tmp_path, mox, args, header, to):
    cfg = mox_config(tmp_path, mox)
    r = sendmail(cfg, *args, input=header + b"Subject: to\n\nhello\n")
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    msg = parse(raw)
    assert len(msg.get_all("To") or []) == (1 if to else 0)
    if to:
        assert [a.addr_spec for a in msg["To"].addresses] == to


def test_present_headers_are_kept_as_they_are(tmp_path, mox):
    cfg = mox_config(tmp_path, mox)
    head = (b"From: \"Alice A.\" <alice@example.org>\nTo: admin@example.org\nDate: Mon, 2 Nov 2026 10:00:00 +0100\n"
            b"Message-ID: <kept.1@client.example>\nX-Folded: one\n two\nsubject: lower case name\n")
    bcc = b"BCC: bob@example.org\n"  # removed even without -t, and not a recipient then
    r = sendmail(cfg, "admin@example.org", input=head.replace(b"X-Folded", bcc + b"X-Folded") + b"\nbody\n")
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert header_block(raw).endswith(head.replace(b"\n", b"\r\n").rstrip(b"\r\n"))
    assert mox.messages("bob") == []
    assert raw.count(b"\nDate:") == 1 and raw.lower().count(b"\nmessage-id:") == 1


@pytest.mark.parametrize("form", [["-f", "alice2@example.org"], ["-falice2@example.org"], ["-r", "alice2@example.org"]])
def test_f_sets_envelope_sender(tmp_path, mox, form):
    cfg = mox_config(tmp_path, mox, from_address="alice@example.org")
    r = sendmail(cfg, *form, "-i", "admin@example.org", input=b"Subject: envelope\n\nhello\n")
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert raw.startswith(b"Return-Path: <alice2@example.org>\r\n")
    assert parse(raw)["From"].addresses[0].addr_spec == "alice2@example.org"  # the From we add follows -f


@pytest.mark.parametrize("form, name", [
    (["-F", "Alice Example"], "Alice Example"),
    (["-FAlice Example"], "Alice Example"),
    (["-F", "Alïce, the Öne"], "Alïce, the Öne"),
])
def test_F_sets_full_name_of_added_from(tmp_path, mox, form, name):
    cfg = mox_config(tmp_path, mox)
    r = sendmail(cfg, *form, "admin@example.org", input=b"Subject: name\n\nhello\n")
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    [addr] = parse(raw)["From"].addresses
    assert (addr.display_name, addr.addr_spec) == (name, "alice@example.org")
    assert raw.isascii()  # a non-ASCII name is RFC 2047 encoded


def test_t_reads_to_cc_bcc_and_removes_bcc(tmp_path, mox):
    cfg = mox_config(tmp_path, mox)
    # a folded Bcc naming bob twice: one copy; carol as argument is added, as with Postfix
    msg = (b"From: alice@example.org\nTo: Admin <admin@example.org>\nCc: alice2@example.org\n"
           b"Bcc: bob@example.org,\n  Bob Again <bob@example.org>\nSubject: hidden copy\n\nsecret list\n")
    r = sendmail(cfg, "-t", "-i", "carol@example.org", input=msg)
    assert r.returncode == 0, r.stderr
    copies = {a: mox.wait_for_messages(a, 1)[0] for a in ("admin", "alice", "bob", "carol")}
    assert len(mox.messages("bob")) == 1
    for account, raw in copies.items():
        head = header_block(raw)
        assert b"\nbcc:" not in head.lower(), account
        assert b"bob@example.org" not in head.replace(b"Delivered-To: bob@example.org", b""), account
        assert raw.endswith(b"\r\n\r\nsecret list\r\n")


def test_refused_by_server_exits_69_and_saves_message(tmp_path, mox):
    # alice may not send with admin's address in From: mox answers 550 5.7.1 to the data
    cfg = mox_config(tmp_path, mox)
    msg = b"From: admin@example.org\nSubject: not mine\n\nhello\n"
    r = sendmail(cfg, "-f", "alice@example.org", "admin@example.org", input=msg)
    assert r.returncode == EX_UNAVAILABLE, r.stderr
    assert "550" in r.stderr and "5.7.1" in r.stderr
    [saved] = saved_files(tmp_path / "failures")
    assert f"message saved in {saved}" in r.stderr
    assert saved.read_bytes().startswith(b"From: admin@example.org\r\nSubject: not mine\r\n")
    assert mox.messages("admin") == []


def test_one_refused_recipient_fails_the_command(tmp_path, mox):
    # mox refuses the unknown local recipient at RCPT; the other still gets the message
    cfg = mox_config(tmp_path, mox)
    r = sendmail(cfg, "admin@example.org", "nobody@example.org")
    assert r.returncode == EX_UNAVAILABLE, r.stderr
    assert "nobody@example.org: permanent failure: 550" in r.stderr
    assert "accepted for 1 other recipient" in r.stderr
    mox.wait_for_messages("admin", 1)
    assert len(saved_files(tmp_path / "failures")) == 1
    # the failed one only, and with the config file given
    assert f"to retry: sendmail -C {cfg} -i -f alice@example.org -- nobody@example.org <" in r.stderr


def test_server_down_exits_75_and_saves_privately(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    home = tmp_path / "home"
    home.mkdir()
    cfg = write_config(tmp_path / "sendmail.toml", host="127.0.0.1", port=port, tls="starttls",
                       username="alice@example.org", password="x")
    r = sendmail(cfg, "admin@example.org", input=b"Subject: lost?\n\nkeep me\n", env={"HOME": str(home)}, umask=0)
    assert r.returncode == EX_TEMPFAIL, r.stderr
    folder = home / "moxsubmit.failures"
    [saved] = saved_files(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    data = saved.read_bytes()
    assert data.startswith(b"Subject: lost?\r\n") and data.endswith(b"\r\n\r\nkeep me\r\n")
    assert str(saved) in r.stderr


# A real SMTP peer refusing at one step: smtp-sink's -r (4xx) and -f (5xx), and an aiosmtpd
# server answering each recipient as its localpart says. 4xx is temporary (75), 5xx
# permanent (69); one temporary refusal among permanent ones keeps the whole thing
# temporary (sysexits.h, Postfix sendmail(1)).

TEMP_REPLY = "450 4.3.0 Error: command failed"
PERM_REPLY = "500 5.3.0 Error: command failed"


def sink_config(tmp_path: Path, sink) -> Path:
    return write_config(tmp_path / "sendmail.toml", host=sink.host, port=sink.port, tls="none",
                        from_address="cron@client.example", failures_dir=str(tmp_path / "failures"))


@pytest.mark.parametrize("command, code, reply", [
    ("RCPT", EX_TEMPFAIL, TEMP_REPLY),
    ("DATA", EX_TEMPFAIL, TEMP_REPLY),
    (".", EX_TEMPFAIL, TEMP_REPLY),
    ("RCPT", EX_UNAVAILABLE, PERM_REPLY),
    ("DATA", EX_UNAVAILABLE, PERM_REPLY),
    (".", EX_UNAVAILABLE, PERM_REPLY),
])
def test_refusal_at_rcpt_or_data_exit_status(tmp_path, smtp_sink_factory, command, code, reply):
    sink = smtp_sink_factory(host="127.0.0.1", port=None, **{"reject_4xx" if code == EX_TEMPFAIL else "reject_5xx": command})
    cfg = sink_config(tmp_path, sink)
    r = sendmail(cfg, "one@dest.example", "two@dest.example", input=b"Subject: refused\n\nkeep me\n")
    assert r.returncode == code, r.stderr
    kind = "temporary" if code == EX_TEMPFAIL else "permanent"
    for rcpt in ("one@dest.example", "two@dest.example"):
        line = next(line for line in r.stderr.splitlines() if line.startswith(f"sendmail: {rcpt}: "))
        assert line.startswith(f"sendmail: {rcpt}: {kind} failure: {reply[:9]}") and line.endswith(reply), line
    [saved] = saved_files(tmp_path / "failures")
    assert saved.read_bytes().endswith(b"\r\n\r\nkeep me\r\n")
    assert f"to retry: sendmail -C {cfg} -i -f cron@client.example -- one@dest.example two@dest.example <" in r.stderr


@pytest.mark.parametrize("code", [EX_TEMPFAIL, EX_UNAVAILABLE])
def test_refusal_at_mail_exit_status(tmp_path, smtp_sink_factory, code):
    sink = smtp_sink_factory(host="127.0.0.1", port=None, **{"reject_4xx" if code == EX_TEMPFAIL else "reject_5xx": "MAIL"})
    r = sendmail(sink_config(tmp_path, sink), "one@dest.example")
    assert r.returncode == code, r.stderr
    assert (TEMP_REPLY if code == EX_TEMPFAIL else PERM_REPLY).split(" ", 1)[0] in r.stderr


def test_421_greeting_exits_75(tmp_path, smtp_sink_factory):
    sink = smtp_sink_factory(host="127.0.0.1", port=None, reply_421="CONNECT")
    r = sendmail(sink_config(tmp_path, sink), "one@dest.example")
    assert r.returncode == EX_TEMPFAIL, r.stderr
    assert "421" in r.stderr and len(saved_files(tmp_path / "failures")) == 1


class _PerRecipient:
    """aiosmtpd handler: ``temp-*@`` gets 451, ``perm-*@`` 550, the rest 250."""

    def __init__(self) -> None:
        self.received: list[list[str]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("temp-"):
            return "451 4.7.1 try again later"
        if address.startswith("perm-"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.received.append(list(envelope.rcpt_tos))
        return "250 OK queued"


@contextlib.contextmanager
def smtp_server(handler):
    """An aiosmtpd server with ``handler`` on a free loopback port: (handler, port)."""
    from aiosmtpd.controller import Controller

    from mox_testpeers import free_port

    port = free_port("127.0.0.1")
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def per_recipient_server():
    with smtp_server(_PerRecipient()) as server:
        yield server


@pytest.mark.parametrize("recipients, code, accepted", [
    (["temp-a@dest.example", "ok@dest.example"], EX_TEMPFAIL, ["ok@dest.example"]),
    (["perm-a@dest.example", "temp-b@dest.example"], EX_TEMPFAIL, None),
    (["temp-a@dest.example", "perm-b@dest.example", "ok@dest.example"], EX_TEMPFAIL, ["ok@dest.example"]),
    (["perm-a@dest.example", "ok@dest.example"], EX_UNAVAILABLE, ["ok@dest.example"]),
    (["ok@dest.example", "ok2@dest.example"], 0, ["ok@dest.example", "ok2@dest.example"]),
])
def test_exit_status_with_recipients_refused_differently(tmp_path, per_recipient_server, recipients, code, accepted):
    """In process (``run``), as ``mox sendmail`` calls it."""
    import io

    from mox_core.sendmail.command import run

    handler, port = per_recipient_server
    cfg = write_config(tmp_path / "sendmail.toml", host="127.0.0.1", port=port, tls="none",
                       from_address="cron@client.example", failures_dir=str(tmp_path / "failures"))
    out, err = io.StringIO(), io.StringIO()
    status = run(["-C", str(cfg), *recipients], stdin=io.BytesIO(b"Subject: mixed\n\nhello\n"), stdout=out,
                 stderr=err)
    assert status == code, err.getvalue()
    assert handler.received == ([accepted] if accepted else [])
    text = err.getvalue()
    for r in recipients:
        if r.startswith("temp-"):
            assert f"sendmail: {r}: temporary failure: 451 4.7.1 try again later" in text
        elif r.startswith("perm-"):
            assert f"sendmail: {r}: permanent failure: 550 5.1.1 no such user" in text
    failed = [r for r in recipients if not r.startswith("ok")]
    assert len(saved_files(tmp_path / "failures")) == (1 if failed else 0)
    if failed:
        assert f"to retry: sendmail -C {cfg} -i -f cron@client.example -- {' '.join(failed)} <" in text


def test_bare_cr_is_refused_and_saved(tmp_path, mox):
    cfg = mox_config(tmp_path, mox)
    raw = b"Subject: cr\n\nx\r.\r\nMAIL FROM:<evil@example.org>\n"
    r = sendmail(cfg, "-i", "admin@example.org", input=raw)
    assert r.returncode == EX_DATAERR, r.stderr
    assert "bare carriage return" in r.stderr
    [saved] = saved_files(tmp_path / "failures")
    assert saved.read_bytes() == raw  # not composed: kept exactly as given
    assert mox.messages("admin") == []


@pytest.mark.parametrize("args", [
    ["admin@example.org\r\nRCPT TO:<bob@example.org>"],
    ["admin@example.org\nRCPT TO:<bob@example.org>"],
    ["-f", "alice@example.org\r\nRCPT TO:<bob@example.org>", "admin@example.org"],
    ["-F", "Alice\r\nBcc: bob@example.org", "admin@example.org"],
])
def test_header_injection_in_arguments_is_refused(tmp_path, mox, args):
    cfg = mox_config(tmp_path, mox)
    r = sendmail(cfg, *args)
    assert r.returncode == EX_USAGE, r.stderr
    assert "control character" in r.stderr
    assert mox.messages("admin") == [] and mox.messages("bob") == []
    assert mox_auth_mechanisms(mox) == []  # not even connected


def test_header_injection_in_t_header_is_refused(tmp_path, mox):
    cfg = mox_config(tmp_path, mox)
    msg = b"To: admin@example.org\rRCPT TO:<bob@example.org>\nSubject: x\n\nx\n"
    r = sendmail(cfg, "-t", input=msg)
    assert r.returncode == EX_DATAERR, r.stderr
    assert len(saved_files(tmp_path / "failures")) == 1
    assert mox.messages("admin") == [] and mox.messages("bob") == []


def test_common_flags_are_accepted_and_ignored(tmp_path, mox):
    cfg = mox_config(tmp_path, mox)
    flags = ["-odi", "-odb", "-oem", "-oee", "-om", "-o7", "-Am", "-Ac", "-B", "8BITMIME", "-N", "never",
             "-R", "hdrs", "-V", "envid1", "-X", "/dev/null", "-bm", "-G", "-U", "-L", "label", "-O", "a=b",
             "-h", "5", "-n", "-m", "-bh", "-o", "x", "value", "-oi"]
    r = sendmail(cfg, *flags, "admin@example.org", input=b"Subject: flags\n\n.\nend\n")
    assert r.returncode == 0, r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert raw.endswith(b"\r\n\r\n.\r\nend\r\n")  # -oi at the end still counted


def test_default_destination_for_local_names(tmp_path, mox):
    cfg = mox_config(tmp_path, mox, default_destination="admin@example.org")
    r = sendmail(cfg, "root", input=b"Subject: cron\n\noutput\n")
    assert r.returncode == 0, r.stderr
    mox.wait_for_messages("admin", 1)
    r = sendmail(mox_config(tmp_path, mox), "root")
    assert r.returncode == EX_USAGE and "default_destination" in r.stderr


def test_as_click_subcommand_arguments_pass_through(tmp_path, mox):
    # what "mox sendmail" gets once registered in the mox group: click must not eat "--" or -f
    cfg = mox_config(tmp_path, mox)
    group = click.Group("mox")
    group.add_command(sendmail_command)
    result = CliRunner().invoke(group, ["sendmail", "-C", str(cfg), "-falice2@example.org", "-oi", "--",
                                        "admin@example.org"], input=b"Subject: click\n\n.\nx\n")
    assert result.exit_code == 0, result.output
    [raw] = mox.wait_for_messages("admin", 1)
    assert raw.startswith(b"Return-Path: <alice2@example.org>\r\n") and raw.endswith(b"\r\n.\r\nx\r\n")
    result = CliRunner().invoke(group, ["sendmail", "-C", str(cfg), "--", "-odd@example.org"])
    assert result.exit_code == EX_UNAVAILABLE  # "--" kept: a recipient, refused by mox, not an option
    result = CliRunner().invoke(group, ["sendmail", "-C", str(cfg), "-Z"])
    assert result.exit_code == EX_USAGE and "unknown option -Z" in result.output


# --------------------------------------------------------------------------------------------
# submitting to Postfix with Cyrus SASL


def postfix_log_mechanisms(sh) -> list[str]:
    return re.findall(r"sasl_method=([A-Z0-9-]+)", sh.log_text())


@pytest.mark.parametrize("mechanism, expected", [
    ("", "SCRAM-SHA-256"),
    ("SCRAM-SHA-256", "SCRAM-SHA-256"),
    ("SCRAM-SHA-1", "SCRAM-SHA-1"),
    ("CRAM-MD5", "CRAM-MD5"),
    ("PLAIN", "PLAIN"),
])
def test_postfix_smarthost_with_each_mechanism(tmp_path, postfix_smarthost, mechanism, expected):
    sh = postfix_smarthost
    cfg = write_config(tmp_path / "sendmail.toml", host=sh.host, port=sh.port, tls="starttls", ca_file=sh.cafile,
                       username="alice", password="secret-pw", auth_mechanism=mechanism,
                       failures_dir=str(tmp_path / "failures"))
    r = sendmail(cfg, "-f", "sender@example.net", "one@dest.example", "two@dest.example",
                 input=f"Subject: postfix {expected}\n\nhello\n".encode())
    assert r.returncode == 0, r.stderr
    msgs = sh.wait_for_messages(2)
    assert sorted(m.original_to for m in msgs) == ["one@dest.example", "two@dest.example"]
    assert {m.return_path for m in msgs} == {"sender@example.net"}
    assert all(f"Subject: postfix {expected}" in m.text for m in msgs)
    assert postfix_log_mechanisms(sh) == [expected]


def test_postfix_implicit_tls_and_password_file(tmp_path, postfix_smarthost):
    sh = postfix_smarthost
    (tmp_path / "pw").write_text("secret-pw\n")
    cfg = write_config(tmp_path / "sendmail.toml", host=sh.host, port=sh.tls_port, tls="implicit", ca_file=sh.cafile,
                       username="alice", password_file="pw", from_address="sender@example.net")
    r = sendmail(cfg, "one@dest.example")
    assert r.returncode == 0, r.stderr
    [m] = sh.wait_for_messages(1)
    assert m.return_path == "sender@example.net"
    assert m.message["From"] == "sender@example.net"


def test_postfix_wrong_password_is_permanent(tmp_path, postfix_smarthost):
    sh = postfix_smarthost
    cfg = write_config(tmp_path / "sendmail.toml", host=sh.host, port=sh.port, ca_file=sh.cafile, username="alice",
                       password="wrong", from_address="sender@example.net", failures_dir=str(tmp_path / "f"))
    r = sendmail(cfg, "one@dest.example")
    assert r.returncode == EX_UNAVAILABLE, r.stderr
    assert "535" in r.stderr
    assert len(saved_files(tmp_path / "f")) == 1


# --------------------------------------------------------------------------------------------
# real callers


@pytest.fixture
def wrapper(tmp_path) -> Path:
    """An executable named ``sendmail`` running this venv's ``mox_core.sendmail.command``."""
    path = tmp_path / "bin" / "sendmail"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -m mox_core.sendmail.command "$@"\n')
    path.chmod(0o755)
    return path


def test_git_send_email(tmp_path, mox, wrapper):
    cfg = mox_config(tmp_path, mox)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(tmp_path), MOX_SENDMAIL_CONFIG=str(cfg), GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="Alice", GIT_AUTHOR_EMAIL="alice@example.org",
               GIT_COMMITTER_NAME="Alice", GIT_COMMITTER_EMAIL="alice@example.org")
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([program("git", "git"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=60)

    assert git("init", "-q").returncode == 0
    (repo / "notes.txt").write_text("first\n.starts with a dot\n.\n")
    git("add", "notes.txt")
    assert git("commit", "-q", "-m", "Add notes").returncode == 0
    r = git("send-email", "--no-annotate", "--confirm=never", "--suppress-cc=all", f"--sendmail-cmd={wrapper}",
            "--envelope-sender=alice2@example.org", "--from", "Alice <alice@example.org>",
            "--to", "Admin <admin@example.org>", "--bcc", "bob@example.org", "-1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Sendmail: {wrapper} -f alice2@example.org -i admin@example.org bob@example.org" in r.stdout
    for account in ("admin", "bob"):
        [raw] = mox.wait_for_messages(account, 1)
        assert raw.startswith(b"Return-Path: <alice2@example.org>\r\n")
        msg = parse(raw)
        assert msg["Subject"] == "[PATCH] Add notes" and msg["Bcc"] is None
        assert b"\r\n+.starts with a dot\r\n+.\r\n" in raw
        assert BARE_LF.search(raw) is None


def test_bsd_mailx(tmp_path, mox, wrapper):
    cfg = mox_config(tmp_path, mox)
    mailrc = tmp_path / "mailrc"
    mailrc.write_text(f"set sendmail={wrapper}\n")
    env = dict(os.environ, HOME=str(tmp_path), MAILRC=str(mailrc), MOX_SENDMAIL_CONFIG=str(cfg))
    # mailx runs "sendmail -i -t -f alice@example.org" with no recipient arguments
    r = subprocess.run([program("mail", "bsd-mailx"), "-n", "-s", "mailx subject", "-r", "Alice <alice@example.org>",
                        "-c", "carol@example.org", "-b", "bob@example.org", "admin@example.org"],
                       input="body via mailx\n.\nafter a dot\n", env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for account in ("admin", "bob", "carol"):
        [raw] = mox.wait_for_messages(account, 1)
        assert raw.startswith(b"Return-Path: <alice@example.org>\r\n"), account
        msg = parse(raw)
        assert msg["Subject"] == "mailx subject" and msg["Bcc"] is None
        assert str(msg["From"]) == "Alice <alice@example.org>"
        assert msg["Date"] is not None and msg["Message-ID"] is not None  # mailx sets neither
        # mailx reading a pipe keeps the "." line and passes -i: the lone dot must survive
        assert raw.endswith(b"\r\n\r\nbody via mailx\r\n.\r\nafter a dot\r\n")
    assert saved_files(tmp_path / "failures") == []


# --------------------------------------------------------------------------------------------
# config and usage errors (no server)


@pytest.mark.parametrize("text, where", [
    ('host = "h"\nhostname = "x"\n', "sendmail.toml: hostname: unknown key"),
    ('host = "h"\ntls = "yes"\n', "sendmail.toml: tls: "),
    ('host = "h"\nport = 0\n', "sendmail.toml: port: "),
    ('port = 25\n', "sendmail.toml: host: Field required"),
    ('host = "h"\nusername = "u"\npassword = "p"\npassword_file = "/etc/hostname"\n', "sendmail.toml: password: "),
    ('host = "h"\nusername = "u"\n', "sendmail.toml: password: with username, set exactly one"),
    ('host = "h"\nusername = "u"\npassword_file = "nonexistent"\n', "sendmail.toml: password_file: cannot read"),
    ('host = "h"\ntls = "none"\nusername = "u"\npassword = "p"\nauth_mechanism = "plain"\n',
     "sendmail.toml: auth_mechanism: PLAIN would send"),
    ('host = "h"\nauth_mechanism = "LOGIN"\nusername = "u"\npassword = "p"\n',
     "sendmail.toml: auth_mechanism: unknown"),
    ('host = "h"\nfrom_address = "not an address"\n', "sendmail.toml: from_address: "),
    ('host = "h"\nusername = "u"\npassword_env = "MOX_TEST_UNSET_PW"\n',
     "sendmail.toml: password_env: environment variable MOX_TEST_UNSET_PW is not set"),
    ('host = "h"\nca_file = "missing.pem"\n', "sendmail.toml: ca_file: "),
    ('host = \n', "sendmail.toml: invalid TOML"),
])
def test_config_errors_name_file_and_key(tmp_path, text, where):
    cfg = tmp_path / "sendmail.toml"
    cfg.write_text(text)
    r = sendmail(cfg, "admin@example.org")
    assert r.returncode == EX_CONFIG, r.stderr
    assert f"sendmail: {cfg.parent}/{where}" in r.stderr, r.stderr


def test_config_path_from_environment_and_option(tmp_path):
    missing_env, missing_opt = tmp_path / "env.toml", tmp_path / "opt.toml"
    r = sendmail(None, "admin@example.org", env={"MOX_SENDMAIL_CONFIG": str(missing_env)})
    assert r.returncode == EX_CONFIG and f"{missing_env}: file not found" in r.stderr
    r = sendmail(missing_opt, "admin@example.org", env={"MOX_SENDMAIL_CONFIG": str(missing_env)})
    assert r.returncode == EX_CONFIG and f"{missing_opt}: file not found" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["-x", "a@b.example"], "unknown option -x"),
    (["-bp"], "-bp is not supported"),
    (["-bs"], "-bs is not supported"),
    (["-q"], "-q (queue runs) is not supported"),
    (["-q1h"], "-q (queue runs) is not supported"),
    (["-I"], "-I (newaliases) is not supported"),
    (["-f"], "option -f requires a value"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["-B", "BINARYMIME", "a@b.example"], "7BIT or 8BITMIME"),
])
def test_usage_errors_exit_64(tmp_path, args, message):
    r = sendmail(tmp_path / "unused.toml", *args)
    assert r.returncode == EX_USAGE, r.stderr
    assert message in r.stderr and "usage: sendmail" in r.stderr


def test_no_recipients_is_a_usage_error(tmp_path):
    cfg = write_config(tmp_path / "sendmail.toml", host="127.0.0.1")
    r = sendmail(cfg)
    assert r.returncode == EX_USAGE and "no recipients" in r.stderr


def test_option_parsing():
    o = parse_args(["-f", "a@b", "-oi", "-t", "x@y", "-f", "z@w"])
    assert (o.sender, o.dot_ends, o.extract, o.recipients) == ("a@b", False, True, ["x@y", "-f", "z@w"])
    o = parse_args(["-fa@b", "-FName Here", "-ti", "--", "-odd@y"])
    assert (o.sender, o.full_name, o.extract, o.dot_ends, o.recipients) == ("a@b", "Name Here", True, False, ["-odd@y"])
    o = parse_args(["-C", "/x.toml", "-i", "r@s"])
    assert (o.config, o.dot_ends, o.recipients) == ("/x.toml", False, ["r@s"])
    assert parse_args(["r@s"]).dot_ends is True
    assert parse_args(["-o", "i", "r@s"]).dot_ends is False
    assert parse_args(["-o", "x", "value", "r@s"]).recipients == ["r@s"]


def test_docs_describe_every_config_key():
    text = (Path(__file__).resolve().parent.parent / "docs" / "sendmail.md").read_text()
    missing = [name for name in SendmailConfig.model_fields if f"- `{name}`" not in text and f"`{name}` (" not in text]
    assert missing == []


def test_plain_smtp_without_tls_or_auth(tmp_path, mox):
    # tls = "none" and no username: e.g. a server on the same host accepting local mail
    cfg = write_config(tmp_path / "sendmail.toml", host="127.0.0.1", port=mox.smtp_port, tls="none",
                       from_address="cron@client.example")
    r = sendmail(cfg, "-v", "admin@example.org", input=b"Subject: plain\n\nhello\n")
    assert r.returncode == 0, r.stderr
    assert "admin@example.org: accepted: 250" in r.stderr
    [raw] = mox.wait_for_messages("admin", 1)
    assert raw.startswith(b"Return-Path: <cron@client.example>\r\n")
    assert b"(mox) with ESMTP\r\n" in header_block(raw)  # not ESMTPS: no TLS
    assert mox_auth_mechanisms(mox) == []


def test_mox_sendmail_subcommand_exit_status(tmp_path):
    """`mox sendmail` is wired into the mox command and passes sendmail's exit status on."""
    from tests.conftest import run_mox

    r = run_mox("sendmail", "-C", str(tmp_path / "missing.toml"), "a@example.org")
    assert r.returncode == 78 and "missing.toml" in r.stderr
    r = run_mox("sendmail", "-Z")
    assert r.returncode == 64 and "usage: sendmail" in r.stderr
