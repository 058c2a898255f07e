"""``mox sendmail``'s command (mox_core/sendmail/command.py) in process, against a small SMTP
server on 127.0.0.1 (aiosmtpd): the failures folder, help, interruptions, the envelope sender
chosen, the From header added, what is said on the way, and each way a submission fails."""

from __future__ import annotations

import io
import os
import re
import socket
import stat
from pathlib import Path

import pytest
import tomlkit

from mox_core.sendmail import command
from mox_core.sendmail.config import SendmailConfig

EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL = 64, 69, 75


class _Recorder:
    """aiosmtpd handler: records each transaction; ``perm-*@`` recipients get 550."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes, list[str]]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("perm-"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                              list(envelope.mail_options)))
        return "250 2.0.0 queued as 1"


@pytest.fixture
def server():
    from tests.test_sendmail import smtp_server

    with smtp_server(_Recorder()) as server:
        yield server


def config(tmp_path: Path, port: int, **keys) -> Path:
    values = {"host": "127.0.0.1", "port": port, "tls": "none", "failures_dir": str(tmp_path / "failures"), **keys}
    path = tmp_path / "sendmail.toml"
    path.write_text(tomlkit.dumps({k: v for k, v in values.items() if v is not None}))
    return path


def run(cfg: Path | None, *args: str, data: bytes = b"Subject: hi\n\nhello\n", stdin=None):
    out, err = io.StringIO(), io.StringIO()
    argv = [*(["-C", str(cfg)] if cfg else []), *args]
    code = command.run(argv, stdin=stdin if stdin is not None else io.BytesIO(data), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def saved(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "failures"
    return sorted(folder.iterdir()) if folder.exists() else []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failure_is_saved_in_a_private_folder_made_with_its_parents(tmp_path):
    old = os.umask(0)  # nothing taken away: the modes are the code's
    try:
        folder = tmp_path / "a" / "b" / "failures"
        path = command.save_failure(SendmailConfig(host="h", failures_dir=folder), b"the message")
    finally:
        os.umask(old)
    assert path.parent == folder and path.read_bytes() == b"the message"
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}\.eml", path.name), path.name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_saved_message_is_private_from_its_creation_not_only_after_the_chmod(tmp_path, monkeypatch):
    """Another user who opened the file or folder in the moment between its creation and the
    chmod could read the message written later: both are created private already."""
    seen = []
    monkeypatch.setattr(os, "chmod", lambda path, mode: seen.append(("chmod", mode)))
    monkeypatch.setattr(os, "fchmod", lambda fd, mode: seen.append(("fchmod", mode)))
    old = os.umask(0)
    try:
        folder = tmp_path / "failures"
        path = command.save_failure(SendmailConfig(host="h", failures_dir=folder), b"the message")
    finally:
        os.umask(old)
    assert seen == [("chmod", 0o700), ("fchmod", 0o600)]  # still done, for what the umask took
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_message_that_cannot_be_saved_keeps_the_exit_status(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    cfg = config(tmp_path, closed_port(), failures_dir=str(tmp_path / "a-file" / "failures"),
                 from_address="cron@client.example")
    code, _, err = run(cfg, "a@dest.example")
    assert code == EX_TEMPFAIL
    assert "sendmail: could not save the message: " in err and "to retry" not in err


def test_help_goes_to_stdout(tmp_path):
    code, out, err = run(None, "--help")
    assert (code, err) == (0, "") and out.startswith("usage: sendmail")


def test_interrupted_while_reading_nothing_is_sent_or_saved(tmp_path):
    class Interrupted(io.BytesIO):
        def read(self, *args):
            raise KeyboardInterrupt

    code, _, err = run(config(tmp_path, closed_port()), "-i", "a@dest.example", stdin=Interrupted())
    assert code == EX_TEMPFAIL and err == "sendmail: interrupted while reading the message; nothing sent\n"
    assert saved(tmp_path) == []


def test_interrupted_while_sending_the_message_is_saved(tmp_path, monkeypatch):
    async def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "submit", interrupted)
    code, _, err = run(config(tmp_path, closed_port(), from_address="cron@client.example"), "a@dest.example")
    assert code == EX_TEMPFAIL and err.startswith("sendmail: interrupted\nsendmail: message saved in ")
    assert len(saved(tmp_path)) == 1


def test_a_timeout_says_after_how_long(tmp_path, monkeypatch):
    async def slow(*args, **kw):
        raise TimeoutError

    monkeypatch.setattr(command, "submit", slow)
    port = closed_port()
    code, _, err = run(config(tmp_path, port, timeout=2.5, from_address="cron@client.example"), "a@dest.example")
    assert code == EX_TEMPFAIL
    assert err.startswith(f"sendmail: submission to 127.0.0.1 port {port} timed out after 2.5s\n")


def test_a_refused_connection_says_where_it_went(tmp_path):
    port = closed_port()
    code, _, err = run(config(tmp_path, port, from_address="cron@client.example"), "a@dest.example")
    assert code == EX_TEMPFAIL
    assert err.startswith(f"sendmail: submission to 127.0.0.1 port {port} failed: ")


def test_a_host_that_does_not_resolve_is_temporary(tmp_path, monkeypatch):
    import asyncio

    async def getaddrinfo(self, host, port, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    code, _, err = run(config(tmp_path, 587, from_address="cron@client.example", host="mail.client.example"),
                       "a@dest.example")
    assert code == EX_TEMPFAIL
    assert "failed: looking up mail.client.example: Name or service not known" in err


def test_verbose_says_where_it_connected_and_what_was_accepted(tmp_path, server):
    handler, port = server
    code, _, err = run(config(tmp_path, port, from_address="cron@client.example"), "-v", "a@dest.example")
    assert code == 0
    assert err.splitlines() == [f"connected to 127.0.0.1 (127.0.0.1) port {port}, tls none",
                                "a@dest.example: accepted: 250 2.0.0 queued as 1"]


def test_an_8bit_message_is_sent_as_8bitmime(tmp_path, server):
    handler, port = server
    code, _, err = run(config(tmp_path, port, from_address="cron@client.example"), "a@dest.example",
                       data="Subject: grüße\n\nÄ\n".encode())
    assert code == 0, err
    [(_, _, data, options)] = handler.received
    assert "BODY=8BITMIME" in options and "grüße".encode() in data


def test_the_single_from_address_of_the_message_is_the_envelope_sender(tmp_path, server):
    handler, port = server
    code, _, err = run(config(tmp_path, port), "a@dest.example",
                       data=b"From: Writer <writer@client.example>\nSubject: hi\n\nhello\n")
    assert code == 0, err
    assert handler.received[0][0] == "writer@client.example"


def test_the_configured_from_address_beats_the_messages(tmp_path, server):
    handler, port = server
    code, _, err = run(config(tmp_path, port, from_address="cron@client.example"), "a@dest.example",
                       data=b"From: Writer <writer@client.example>\nSubject: hi\n\nhello\n")
    assert code == 0, err
    assert handler.received[0][0] == "cron@client.example"


def test_without_a_sender_address_it_is_a_usage_error(tmp_path, server):
    handler, port = server
    code, _, err = run(config(tmp_path, port), "a@dest.example",
                       data=b"From: a@client.example, b@client.example\nSubject: hi\n\nhello\n")
    assert code == EX_USAGE and handler.received == []
    assert "sendmail: no sender address: use -f ADDRESS, or set from_address in the config\n" in err


def test_the_added_from_has_the_name_from_the_environment_without_control_characters(tmp_path, server,
                                                                                     monkeypatch):
    handler, port = server
    monkeypatch.setenv("NAME", "Ann\x07 Smith")
    code, _, err = run(config(tmp_path, port, from_address="cron@client.example"), "a@dest.example")
    assert code == 0, err
    assert handler.received[0][2].startswith(b"Subject: hi\r\nFrom: Ann Smith <cron@client.example>\r\n")


def test_a_refusal_of_the_null_sender_says_how_to_retry(tmp_path, server):
    handler, port = server
    cfg = config(tmp_path, port)
    code, _, err = run(cfg, "-f", "<>", "perm-a@dest.example", "b@dest.example")
    assert code == EX_UNAVAILABLE
    [path] = saved(tmp_path)
    assert "sendmail: perm-a@dest.example: permanent failure: 550 5.1.1 no such user\n" in err
    assert "sendmail: the message was accepted for 1 other recipient(s)\n" in err
    assert err.endswith(f"sendmail: to retry: sendmail -C {cfg} -i -f '<>' -- perm-a@dest.example < {path}\n")
    assert handler.received[0][:2] == ("<>", ["b@dest.example"])
