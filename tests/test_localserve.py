"""``mox localserve``, as a developer uses it: a real process on a folder of its own, real
SMTP clients (swaks, smtplib), the account pages, the simulated failures, restarts."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mox_testpeers import free_port, wait_banner, wait_for
from tests.conftest import program, run_mox


def init(directory: Path) -> dict[str, int]:
    """Make the folder (``--init-only``) and move its ports to free ones, so that tests and
    other mox localserve instances do not collide; returns the ports."""
    r = run_mox("localserve", "--dir", str(directory), "--init-only")
    assert r.returncode == 0, r.stderr
    ports = {name: free_port() for name in ("smtp", "submission", "submissions", "http", "https", "metrics")}
    text = (directory / "mox.toml").read_text()
    for name, old in (("smtp", 1025), ("submission", 1587), ("submissions", 1465), ("http", 1080),
                      ("https", 1443), ("metrics", 1081)):
        text = text.replace(f"port = {old}\n", f"port = {ports[name]}\n")
    (directory / "mox.toml").write_text(text)
    sendmail = (directory / "sendmail.toml").read_text().replace("port = 1587", f"port = {ports['submission']}")
    (directory / "sendmail.toml").write_text(sendmail)
    return ports


class LocalServe:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log = open(directory.parent / f"{directory.name}.log", "ab")
        env = {k: v for k, v in os.environ.items() if k != "MOX_CONFIG"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mox_core", "localserve", "--dir", str(directory)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return (self.directory.parent / f"{self.directory.name}.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> float:
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        self.log.close()
        return time.monotonic() - start

    def maildir(self) -> list[Path]:
        new = self.directory / "data" / "accounts" / "mox" / "Maildir" / "new"
        return sorted(new.iterdir()) if new.exists() else []


@pytest.fixture
def localserve(tmp_path):
    started: list[LocalServe] = []

    def start(directory: Path | None = None) -> tuple[LocalServe, dict[str, int]]:
        directory = directory or tmp_path / "ls"
        ports = init(directory) if not (directory / "mox.toml").exists() else None
        ls = LocalServe(directory)
        started.append(ls)
        return ls, ports

    yield start
    for ls in started:
        ls.stop()


def submit(port: int, to: str, subject: str = "hi") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as c:
        c.login("mox@localhost", "moxmoxmox")
        c.sendmail("mox@localhost", [to], f"From: mox@localhost\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nbody\r\n")


def test_first_start_makes_the_folder_and_mail_to_any_address_arrives(localserve):
    ls, ports = localserve()
    wait_banner("127.0.0.1", ports["smtp"], timeout=30, proc=ls.proc)
    wait_for(lambda: "mox localserve is running" in ls.text(), 10, what="the banner")
    banner = ls.text()
    assert f"127.0.0.1:{ports['submission']}" in banner and "moxmoxmox" in banner and "moxadmin" in banner
    for name in ("mox.toml", "domains.toml", "localhost.crt", "localhost.key", "sendmail.toml", "adminpasswd"):
        assert (ls.directory / name).exists(), name
    assert (ls.directory / "localhost.key").stat().st_mode & 0o077 == 0
    # incoming SMTP with swaks to an address of no configured domain: the mox account has it
    out = subprocess.run([program("swaks", "swaks"), "--server", f"127.0.0.1:{ports['smtp']}", "--from", "app@example.net",
                          "--to", "anyone@wherever.example", "--header", "Subject: via swaks"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # a submission to a remote address is queued and comes back through the loopback transport
    submit(ports["submission"], "someone@example.com", "submitted")
    msgs = wait_for(lambda: len(ls.maildir()) >= 2 and ls.maildir(), 20, what="two messages in the Inbox")
    bodies = [p.read_bytes() for p in msgs]
    assert any(b"Subject: via swaks" in m for m in bodies)
    assert any(b"Subject: submitted" in m and b"DKIM-Signature:" in m for m in bodies)  # signed for localhost


def test_mox_sendmail_with_the_folders_config(localserve):
    ls, ports = localserve()
    wait_banner("127.0.0.1", ports["smtp"], timeout=30, proc=ls.proc)
    r = subprocess.run([sys.executable, "-m", "mox_core", "sendmail", "-C", str(ls.directory / "sendmail.toml"),
                        "dev@example.com"], input=b"Subject: from sendmail\n\nhello\n", capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: any(b"Subject: from sendmail" in p.read_bytes() for p in ls.maildir()), 20,
             what="the sendmail message in the Inbox")


def test_simulated_failures_at_the_stage_they_name(localserve):
    ls, ports = localserve()
    wait_banner("127.0.0.1", ports["smtp"], timeout=30, proc=ls.proc)
    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=15) as c:
        c.login("mox@localhost", "moxmoxmox")
        assert c.mail("mailfrom-permerror@localhost")[0] == 550
        c.rset()
        c.mail("mox@localhost")
        code, text = c.rcpt("rcptto-temperror@example.com")
        assert code == 451 and b"simulated" in text
        assert c.rcpt("rcptto-421@example.com")[0] == 421
    # at the end of DATA: on the SMTP listener directly ...
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=15) as c:
        c.ehlo("app.example.net")
        c.mail("app@example.net")
        assert c.rcpt("x-temperror@example.com")[0] == 250
        c.putcmd("data")
        assert c.getreply()[0] == 354
        c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
        assert c.getreply()[0] == 451
    # ... and for a submission, through the queue's delivery: 550 there gives a DSN
    submit(ports["submission"], "x-permerror@example.com", "will bounce")
    dsn = wait_for(lambda: [p for p in ls.maildir() if b"Action: failed" in p.read_bytes()], 30, what="a DSN")
    text = dsn[0].read_bytes()
    assert b"x-permerror@example.com" in text and b"550" in text


def test_a_second_start_keeps_the_folder_and_the_password(localserve, tmp_path):
    ls, ports = localserve()
    wait_banner("127.0.0.1", ports["smtp"], timeout=30, proc=ls.proc)
    before = {n: (ls.directory / n).read_bytes() for n in ("mox.toml", "domains.toml", "localhost.crt", "adminpasswd")}
    took = ls.stop()
    assert ls.proc.returncode is not None and took < 10  # SIGTERM: stopped within seconds
    ls2, _ = localserve(ls.directory)
    wait_banner("127.0.0.1", ports["smtp"], timeout=30, proc=ls2.proc)
    assert {n: (ls.directory / n).read_bytes() for n in before} == before
    submit(ports["submission"], "mox@localhost", "after restart")  # the same password works
    r = run_mox("localserve", "--dir", str(ls.directory), "--ip", "127.0.0.2", "--init-only")
    assert r.returncode == 1 and "--ip only applies when the folder is made" in r.stderr


def test_a_port_in_use_is_a_clear_error(tmp_path):
    directory = tmp_path / "ls"
    ports = init(directory)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", ports["http"]))
        busy.listen(1)
        r = run_mox("localserve", "--dir", str(directory))
    assert r.returncode == 1
    assert f"on 127.0.0.1:{ports['http']}: Address already in use" in r.stderr
    assert "webserver_http" in r.stderr and str(directory / "mox.toml") in r.stderr
    assert "Traceback" not in r.stderr


def test_commands_run_in_the_folder_find_its_config(localserve):
    ls, ports = localserve()
    wait_banner("127.0.0.1", ports["smtp"], timeout=30, proc=ls.proc)
    r = run_mox("queue", "list", cwd=ls.directory)
    assert r.returncode == 0 and r.stdout.startswith("messages:"), r.stderr
    r = run_mox("config", "check", cwd=ls.directory)
    assert r.returncode == 0 and "config OK" in r.stdout
    r = run_mox("config", "check", cwd=ls.directory.parent, env={"XDG_CONFIG_HOME": str(ls.directory.parent / "x")})
    assert r.returncode == 1 and "no mox.toml found (tried config/mox.toml, mox.toml, " in r.stderr


def test_the_account_pages_show_what_arrived(localserve):
    ls, ports = localserve()
    wait_banner("127.0.0.1", ports["smtp"], timeout=30, proc=ls.proc)
    submit(ports["submission"], "mox@localhost", "shown on the account page")
    wait_for(lambda: ls.maildir(), 20, what="the message")
    base = f"http://127.0.0.1:{ports['http']}/account"
    with httpx.Client(base_url=base, timeout=10, trust_env=False) as c:
        page = c.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        r = c.post("/login", data={"username": "mox@localhost", "password": "moxmoxmox", "csrf": token},
                   headers={"origin": f"http://127.0.0.1:{ports['http']}"})
        assert r.status_code in (302, 303), r.text
        assert "shown on the account page" in c.get("/messages").text


def test_a_developer_sees_the_caught_message_in_the_browser(localserve, browser_context, screenshot):
    ls, ports = localserve()
    wait_banner("127.0.0.1", ports["smtp"], timeout=30, proc=ls.proc)
    submit(ports["submission"], "customer@shop.example", "Your order 1234")  # what an app would send
    wait_for(lambda: ls.maildir(), 20, what="the message")
    page = browser_context.new_page()
    page.goto(f"http://127.0.0.1:{ports['http']}/account/")
    page.fill("#username", "mox@localhost")
    page.fill("#password", "moxmoxmox")
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.goto(f"http://127.0.0.1:{ports['http']}/account/messages")
    assert page.get_by_text("Your order 1234").count() >= 1
    screenshot(page, "localserve-messages")
    page.get_by_text("Your order 1234").first.click()
    page.wait_for_load_state()
    assert "customer@shop.example" in page.content()
    screenshot(page, "localserve-message")
