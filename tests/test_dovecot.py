"""Dovecot reads what mox writes: a private Dovecot IMAP server (Debian's ``dovecot-imapd``) on
the Maildir of a real ``mox serve`` account, read with Python's imaplib.

The set-up is the one of a real installation that lets Dovecot serve mox's Maildirs: Dovecot
reads mail as a mail user (never as root), so the account directory belongs to that user;
mox, running as root, creates the Maildir, its folders and each message file with the owner
of the directory they are created in (mox_core/store/maildir.py). Dovecot is private: its own
config, base_dir, state and log under one directory, IMAP on a free loopback port, one user
in a passwd-file; nothing of the system's Dovecot is read or touched.

What is checked: the bytes IMAP returns are the bytes mox stored (the headers mox added
included), for a small, a large, an 8-bit message, one to a catch-all and one to a +tag
address; ``,S=`` in the file names is the file size and Dovecot's RFC822.SIZE agrees; flags
set over IMAP survive later deliveries; nothing is moved or lost while mox delivers into the
Maildir with the IMAP session open and polling.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import signal
import smtplib
import subprocess
import textwrap
from pathlib import Path

import pytest

from mox_testpeers import MissingToolError, free_port, make_private_dir, require_tool, wait_for
from mox_testpeers.moxserver import MoxServer

MAIL_UID = MAIL_GID = 65534  # nobody:nogroup, the user Dovecot reads the mail as
USER, PASSWORD = "alice", "alice-imap-pw"
DOMAINS = """
[domains."example.org"]
localpart_catchall_separators = ["+"]

[domains."catch.example"]

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
domain = "example.org"
[accounts.alice.destinations."alice@example.org"]
[accounts.alice.destinations."@catch.example"]
"""


def dovecot_conf(t: Path, port: int, maildir: Path) -> str:
    return textwrap.dedent(f"""\
        # private instance: nothing from /etc/dovecot is read
        instance_name = dovecot-mox-test-{port}
        base_dir = {t}/run
        state_dir = {t}/state
        log_path = {t}/dovecot.log
        listen = 127.0.0.1
        protocols = imap
        ssl = no
        disable_plaintext_auth = no
        auth_mechanisms = plain login
        first_valid_uid = {MAIL_UID}
        last_valid_uid = {MAIL_UID}
        first_valid_gid = {MAIL_GID}
        last_valid_gid = {MAIL_GID}
        mail_location = maildir:{maildir}
        passdb {{
          driver = passwd-file
          args = scheme=PLAIN username_format=%u {t}/users
        }}
        userdb {{
          driver = static
          args = uid={MAIL_UID} gid={MAIL_GID} home={t}/home/%u
        }}
        service imap-login {{
          inet_listener imap {{
            address = 127.0.0.1
            port = {port}
          }}
          inet_listener imaps {{
            port = 0
          }}
        }}
        """)


class Dovecot:
    def __init__(self, maildir: Path) -> None:
        try:
            self.binary = require_tool("dovecot", "dovecot-imapd")
        except MissingToolError as exc:
            pytest.fail(str(exc), pytrace=False)
        self.dir = make_private_dir("dc-")  # short: base_dir holds unix sockets (108 bytes)
        for sub in ("run", "state", "home"):
            (self.dir / sub).mkdir()
        os.chown(self.dir / "home", MAIL_UID, MAIL_GID)
        (self.dir / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        os.chmod(self.dir / "users", 0o644)  # read by Dovecot's auth process (user dovecot)
        self.port = free_port()
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(dovecot_conf(self.dir, self.port, maildir))
        self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "stderr", "wb"))
        wait_for(self._greets, 10, what="Dovecot's IMAP greeting")

    def _greets(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"dovecot exited: {self.log()}")
        try:
            with imaplib.IMAP4("127.0.0.1", self.port, timeout=2):
                return True
        except OSError:
            return False

    def log(self) -> str:
        out = ""
        for name in ("dovecot.log", "stderr"):
            if (self.dir / name).exists():
                out += (self.dir / name).read_text(errors="replace")
        return out

    def login(self) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        imap.login(USER, PASSWORD)
        return imap

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def mox_and_dovecot(dns_server):
    dns_server.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    top = make_private_dir("moxdc-")  # traversable by the mail user, unlike pytest's tmp_path
    mox = MoxServer(top / "mox", domains=DOMAINS, nameserver=dns_server.nameserver,
                    static_top="smtp_workers = 1\n")
    # data/ and accounts/ may be passed through by the mail user (0711: not listed); the
    # account's directory is the mail user's; mox (root) creates the Maildir in it as that user's
    (mox.data_dir / "accounts").mkdir(parents=True)
    os.chmod(mox.data_dir, 0o711)
    os.chmod(mox.data_dir / "accounts", 0o711)
    account = mox.data_dir / "accounts" / "alice"
    account.mkdir(mode=0o700)
    os.chown(account, MAIL_UID, MAIL_GID)
    mox.start()
    dovecot = Dovecot(mox.maildir("alice"))
    try:
        yield mox, dovecot
    finally:
        dovecot.stop()
        mox.stop()
        shutil.rmtree(top, ignore_errors=True)


def deliver(mox: MoxServer, rcpt: str, subject: str, body: bytes, *, eightbit: bool = False) -> None:
    msg = (f"From: sender@sender.example\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject.replace(' ', '.')}@sender.example>\r\n").encode()
    if eightbit:
        msg += b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=30) as s:
        s.ehlo("client.sender.example")
        s.sendmail("sender@sender.example", [rcpt], msg + b"\r\n" + body,
                   mail_options=["BODY=8BITMIME"] if eightbit else [])


def stored(mox: MoxServer) -> dict[str, bytes]:
    """Every message file of alice's Inbox (new/ and cur/) by its base name (without ``:2,``)."""
    out = {}
    for sub in ("new", "cur"):
        for p in (mox.maildir("alice") / sub).iterdir():
            out[p.name.split(":2,")[0]] = p.read_bytes()
    return out


def flagged_files(mox: MoxServer) -> list[str]:
    """Files in cur/ whose Maildir info says flagged and seen (``:2,FS`` and keywords)."""
    return [n for n in os.listdir(mox.maildir("alice") / "cur")
            if {"F", "S"} <= set(n.rpartition(":2,")[2])]


def subject_of(raw: bytes) -> str:
    return re.search(rb"^Subject: (.*?)\r$", raw, re.M).group(1).decode()


def fetch_all(imap: imaplib.IMAP4) -> dict[str, tuple[bytes, int, str]]:
    """Subject -> (BODY[], RFC822.SIZE, FLAGS) of every message in the selected mailbox."""
    typ, data = imap.fetch("1:*", "(RFC822.SIZE FLAGS BODY.PEEK[])")
    assert typ == "OK", data
    out = {}
    for i, item in enumerate(data):
        if not isinstance(item, tuple):
            continue
        after = data[i + 1] if i + 1 < len(data) and isinstance(data[i + 1], bytes) else b""
        meta, raw = (item[0] + after).decode(), item[1]  # items after the literal follow it
        size = int(re.search(r"RFC822\.SIZE (\d+)", meta).group(1))
        flags = re.search(r"FLAGS \(([^)]*)\)", meta)
        out[subject_of(raw)] = (raw, size, flags.group(1) if flags else "")
    return out


def test_dovecot_reads_what_mox_delivers(mox_and_dovecot):
    mox, dovecot = mox_and_dovecot
    large = b"".join(b"line %07d of a large message, to be read back byte for byte\r\n" % i
                     for i in range(80_000))  # about 5.5 MB
    eightbit = "Grüße aus Köln, 東京からこんにちは, ½ € ✓\r\n".encode() * 50
    deliver(mox, "alice@example.org", "small", b"hello\r\n")
    deliver(mox, "alice@example.org", "large", large)
    deliver(mox, "alice@example.org", "eightbit", eightbit, eightbit=True)
    deliver(mox, "whoever@catch.example", "catchall", b"to the catch-all\r\n")
    deliver(mox, "alice+tag@example.org", "tagged", b"to a +tag address\r\n")
    mox.wait_for_messages("alice", 5, timeout=30)
    files = stored(mox)
    for name, raw in files.items():  # ,S= is the exact size on disk, as Dovecot trusts it blindly
        assert int(re.search(r",S=(\d+)", name).group(1)) == len(raw), name
        st = (mox.maildir("alice") / "new" / name).stat()
        assert (st.st_uid, st.st_gid) == (MAIL_UID, MAIL_GID), name
    by_subject = {subject_of(raw): raw for raw in files.values()}
    assert len(by_subject["large"]) > 5_000_000

    imap = dovecot.login()
    typ, data = imap.select("INBOX")
    assert (typ, data) == ("OK", [b"5"]), (typ, data, dovecot.log())
    fetched = fetch_all(imap)
    assert sorted(fetched) == sorted(by_subject)
    for subject, (raw, size, _flags) in fetched.items():
        assert raw == by_subject[subject], subject  # the same bytes, mox's headers included
        assert size == len(raw), subject
    assert fetched["tagged"][0].startswith(b"Return-Path: <sender@sender.example>\r\n"
                                           b"Delivered-To: alice+tag@example.org\r\n")
    assert b"Delivered-To: whoever@catch.example\r\n" in fetched["catchall"][0]
    assert eightbit in fetched["eightbit"][0] and fetched["large"][0].endswith(large)

    # flags set over IMAP, then mox keeps delivering while the session is open
    assert imap.store("1:*", "+FLAGS", r"(\Seen)")[0] == "OK"
    seq = {subject: n for n, subject in enumerate(fetched, start=1)}
    assert imap.store(str(seq["small"]), "+FLAGS", r"(\Flagged $Label1)")[0] == "OK"
    flagged = wait_for(lambda: flagged_files(mox), 10, what="the flags in the file name")
    assert len(flagged) == 1
    seen = [5]

    def exists(n: int) -> bool:
        imap.noop()  # a poll: Dovecot reports what appeared in new/ as EXISTS
        seen.extend(int(v) for v in imap.response("EXISTS")[1] if v)
        return max(seen) >= n

    for i in range(6):
        deliver(mox, "alice@example.org", f"later {i}", f"delivered during the session {i}\r\n".encode())
        wait_for(lambda n=6 + i: exists(n), 20, what=f"message {6 + i} seen over IMAP")
    fetched = fetch_all(imap)
    files = stored(mox)
    assert len(fetched) == len(files) == 11  # nothing lost, nothing added
    by_subject = {subject_of(raw): raw for raw in files.values()}
    for subject, (raw, size, flags) in fetched.items():
        assert raw == by_subject[subject] and size == len(raw), subject
        assert ("\\Seen" in flags) == (not subject.startswith("later")), (subject, flags)
    assert set(fetched["small"][2].split()) >= {"\\Seen", "\\Flagged", "$Label1"}
    assert flagged_files(mox) == flagged
    imap.logout()
    log = dovecot.log()
    assert not re.search(r"Error|Panic|Fatal|corrupt", log), log
    # everything mox wrote is the mail user's, so Dovecot could move, flag and index it
    for p in mox.maildir("alice").rglob("*"):
        assert (p.stat().st_uid, p.stat().st_gid) == (MAIL_UID, MAIL_GID), p
