"""The account pages as an ASGI app: the overview's addresses, limits and 24-hour use, the
Inbox and the other mailboxes (list, one message, download, names that are not messages or
not mailboxes of the account), and the password change."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from mox_core.account.htmltext import html_to_text
from mox_core.account.mail import Mailbox, mailboxes, open_mailbox, valid_id
from mox_core.builtin.rate_limiters import OutgoingLog
from mox_core.plugins.kinds import Submission
from mox_core.store import mailbox_dir
from tests.accountweb import BOB_PASSWORD, PASSWORD, AccountASGI


@pytest.fixture
def ui(tmp_path):
    return AccountASGI(tmp_path)


def _maildir(ui: AccountASGI, account: str = "alice") -> Path:
    root = ui.cfg.data_dir / "accounts" / account / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def _put(root: Path, name: str, message: bytes, mtime: float, sub: str = "new") -> Path:
    path = root / sub / name
    path.write_bytes(message)
    os.utime(path, (mtime, mtime))
    return path


def _msg(subject: str, body: str = "Hello.\r\n", sender: str = "Carol <carol@sender.example>",
         extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
            f"Date: Tue, 03 Mar 2026 10:15:00 +0100\r\nMessage-ID: <{abs(hash(subject))}@sender.example>\r\n"
            f"{extra}\r\n{body}").encode()


# -- overview ------------------------------------------------------------------------------


async def test_the_overview_shows_addresses_catchall_limits_and_the_use_of_24_hours(ui):
    (ui.cfg.data_dir / "queue").mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(ui.cfg.data_dir / "queue" / "index.db")
    OutgoingLog().setup(db)
    now = time.time()
    for i, (when, rcpts) in enumerate([(now - 2 * 86400, ["old@x.example"]),  # outside the window
                                       (now - 3600, ["a@x.example", "old@x.example"]),
                                       (now - 60, ["b@x.example"])]):
        OutgoingLog.record(db, Submission("alice", "alice@example.org", rcpts, id=f"s{i}", time=when))
    OutgoingLog.record(db, Submission("bob", "bob@example.org", ["c@x.example"], id="s9", time=now - 60))
    db.commit()
    db.close()
    async with ui.client() as c:
        await ui.login(c)
        page = (await c.get("/account/")).text
    assert "alice@example.org" in page
    assert "anything@example.org" in page and "catch-all" in page
    assert "3 of 10" in page  # recipients in 24 hours, of the account's max_outgoing_messages_per_day
    assert "2 of 200" in page  # first-time recipients: a@ and b@ (old@ was first sent to 2 days ago)
    assert "bob@" not in page


async def test_the_overview_without_any_sending_yet(ui):
    async with ui.client() as c:
        await ui.login(c, "bob", BOB_PASSWORD)
        page = (await c.get("/account/")).text
    assert "0 of 1000" in page and "0 of 200" in page


async def test_the_overview_shows_a_configured_limiter_s_own_limit(tmp_path):
    domains = """
[rate_limiters.strict]
kind = "messages_per_day"
limit = 5

[accounts.alice]
rate_limiters = ["strict", "first_time_recipients_per_day"]
[accounts.alice.destinations."alice@example.org"]
[accounts.bob]
[accounts.bob.destinations."bob@example.org"]
"""
    ui = AccountASGI(tmp_path, domains)
    async with ui.client() as c:
        await ui.login(c)
        page = (await c.get("/account/")).text
    assert "0 of 5" in page and "0 of 200" in page


# -- messages ------------------------------------------------------------------------------


async def test_the_inbox_lists_new_and_cur_newest_first_with_decoded_headers(ui):
    root = _maildir(ui)
    now = time.time()
    _put(root, "1000.M1P1Q1.host,S=10", _msg("First"), now - 300)
    _put(root, "1001.M1P1Q2.host,S=10:2,S", _msg("=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=",
                                                  sender="=?iso-8859-1?q?J=F6rg?= <joerg@sender.example>"),
         now - 100, sub="cur")
    _put(root, "1002.M1P1Q3.host,S=10", _msg("Third <b>bold</b>"), now - 10)
    (root / "tmp" / "1003.M1P1Q4.host").write_bytes(_msg("Not delivered yet"))
    async with ui.client() as c:
        await ui.login(c)
        page = (await c.get("/account/messages")).text
    order = [page.index(s) for s in ("Third", "Grüße aus Köln", "First")]
    assert order == sorted(order)
    assert "Jörg" in page
    assert "Not delivered yet" not in page
    assert "Third &lt;b&gt;bold&lt;/b&gt;" in page  # escaped, as everything from a message
    assert 'href="/account/messages/1001.M1P1Q2.host%2CS%3D10"' in page  # without the :2, info


async def test_the_inbox_is_paged(ui):
    root = _maildir(ui)
    now = time.time()
    for i in range(53):
        _put(root, f"{2000 + i}.M1P1Q{i}.host", _msg(f"Message number {i:02d}"), now - 1000 + i)
    async with ui.client() as c:
        await ui.login(c)
        first = (await c.get("/account/messages")).text
        second = (await c.get("/account/messages?page=2")).text
        beyond = (await c.get("/account/messages?page=9")).text
    assert "Message number 52" in first and "Message number 03" in first and "Message number 02" not in first
    assert "1–50 of 53" in first and 'href="/account/messages?page=2"' in first
    assert "Message number 02" in second and "Message number 00" in second and "51–53 of 53" in second
    assert "There are no messages on this page." in beyond


async def test_a_message_shows_its_headers_and_text_and_is_downloaded_raw(ui):
    root = _maildir(ui)
    raw = _msg("=?utf-8?b?w4RwZmVs?=", "Line one\r\nLine <two>\r\n", extra="X-Custom: yes\r\n")
    _put(root, "3000.M1P1Q1.host,S=99:2,S", raw, time.time(), sub="cur")
    async with ui.client() as c:
        await ui.login(c)
        page = await c.get("/account/messages/3000.M1P1Q1.host,S=99")
        assert page.status_code == 200
        assert "<h1 id=\"msg-title\">Äpfel</h1>" in page.text
        assert "X-Custom: yes" in page.text and "carol@sender.example" in page.text
        assert "Line one\r\nLine &lt;two&gt;" in page.text or "Line one\nLine &lt;two&gt;" in page.text
        dl = await c.get("/account/raw/3000.M1P1Q1.host,S=99")
    assert dl.status_code == 200 and dl.content == raw
    assert dl.headers["content-disposition"].startswith("attachment;")
    assert dl.headers["content-type"].startswith("message/rfc822")
    assert dl.headers["cache-control"] == "no-store"


async def test_html_is_shown_as_text_and_as_escaped_source_never_as_html(ui):
    root = _maildir(ui)
    html = ('<html><head><style>p{color:red}</style><script>steal()</script></head><body>'
            '<h1>Big news</h1><p>Click <a href="https://x.example/a">here</a> &amp; more.</p>'
            '<img src="https://tracker.example/p.gif" onerror="alert(1)"></body></html>')
    raw = _msg("HTML only", html, extra="MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n")
    _put(root, "4000.M1P1Q1.host", raw, time.time())
    async with ui.client() as c:
        await ui.login(c)
        page = (await c.get("/account/messages/4000.M1P1Q1.host")).text
    assert "Big news" in page and "Click here &lt;https://x.example/a&gt; &amp;amp; more." not in page
    assert "Click here &lt;https://x.example/a&gt; &amp; more." in page
    assert "<script>" not in page and "<img src=\"https://tracker" not in page and "<h1>Big news" not in page
    assert "tracker.example" not in page.split("HTML source")[0]
    assert "&lt;script&gt;steal()&lt;/script&gt;" in page  # the escaped source
    assert "steal()" not in page.split("HTML source")[0]


@pytest.mark.parametrize("name", [
    "..%2F..%2F..%2Fmox.toml", "..%2Fcur%2F5000.M1P1Q1.host", "%2Fetc%2Fpasswd", "",
    "5000.M1P1Q1.host%00", "tmp%2F5001.M1P1Q1.host", "5001.M1P1Q1.host", "6000.M1P1Q1.host",
    "link.M1P1Q1.host", ".hidden",
])
async def test_names_that_are_not_maildir_messages_of_the_account_are_not_found(ui, name):
    root = _maildir(ui)
    _put(root, "5000.M1P1Q1.host", _msg("Real one"), time.time())
    (root / "tmp" / "5001.M1P1Q1.host").write_bytes(_msg("In tmp"))
    (root / "new" / ".hidden").write_bytes(_msg("Hidden"))
    _put(_maildir(ui, "bob"), "6000.M1P1Q1.host", _msg("Bob's"), time.time())
    (root / "new" / "link.M1P1Q1.host").symlink_to(ui.cfg.config_dir / "mox.toml")
    async with ui.client() as c:
        await ui.login(c)
        assert (await c.get("/account/messages/5000.M1P1Q1.host")).status_code == 200
        for prefix in ("/account/messages/", "/account/raw/"):
            r = await c.get(prefix + name)
            assert r.status_code in (404, 405) if name == "" else r.status_code == 404, (prefix, name)
            assert b"hostname" not in r.content and b"Bob's" not in r.content and b"In tmp" not in r.content


def _folder(root: Path, name: str) -> Path:
    """The Maildir++ folder ``name`` ("Archive/2024" -> ``.Archive.2024``) as the store makes it."""
    folder = root / ("." + name.replace("/", "."))
    for sub in ("new", "cur", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return folder


async def test_the_other_mailboxes_are_listed_and_their_messages_shown(ui):
    root = _maildir(ui)
    now = time.time()
    _put(root, "8000.M1P1Q1.host", _msg("In the Inbox"), now)
    lists = _folder(root, "Lists")
    for i in range(52):
        _put(lists, f"{8100 + i}.M1P1Q{i}.host", _msg(f"List post {i:02d}"), now - 100 + i)
    _put(_folder(root, "Archive/2024"), "8200.M1P1Q1.host,S=9:2,S", _msg("Archived"), now, sub="cur")
    (root / ".NotAFolder").mkdir()  # no cur/ or new/: not a mailbox
    async with ui.client() as c:
        await ui.login(c)
        inbox = (await c.get("/account/messages")).text
        box = (await c.get("/account/messages?mailbox=Lists")).text
        second = (await c.get("/account/messages?mailbox=Lists&page=2")).text
        one = await c.get("/account/messages/8100.M1P1Q0.host?mailbox=Lists")
        raw = await c.get("/account/raw/8100.M1P1Q0.host?mailbox=Lists")
        archived = await c.get("/account/messages/8200.M1P1Q1.host,S=9?mailbox=Archive%2F2024")
        not_in_the_inbox = await c.get("/account/messages/8100.M1P1Q0.host")
        inbox_by_any_case = (await c.get("/account/messages?mailbox=INBOX")).text
    nav = inbox.split('aria-label="Mailboxes"')[1].split("</nav>")[0]
    assert [line.split(">")[1].split("<")[0] for line in nav.split("<a ")[1:]] == ["Inbox", "Archive/2024", "Lists"]
    assert 'href="/account/messages?mailbox=Archive/2024"' in nav and 'aria-current="page">Inbox<' in nav
    assert "In the Inbox" in inbox and "List post" not in inbox
    assert "List post 51" in box and "List post 02" in box and "List post 01" not in box and "In the Inbox" not in box
    assert "Lists · 52 messages" in box and 'aria-current="page">Lists<' in box
    assert 'href="/account/messages/8151.M1P1Q51.host?mailbox=Lists"' in box
    assert 'href="/account/messages?mailbox=Lists&amp;page=2"' in box
    assert "List post 01" in second and "List post 00" in second and "51–52 of 52" in second
    assert one.status_code == 200 and "List post 00" in one.text
    assert 'href="/account/messages?mailbox=Lists">← Lists<' in one.text
    assert 'href="/account/raw/8100.M1P1Q0.host?mailbox=Lists"' in one.text
    assert raw.status_code == 200 and raw.content == (lists / "new" / "8100.M1P1Q0.host").read_bytes()
    assert archived.status_code == 200 and "Archived" in archived.text
    assert not_in_the_inbox.status_code == 404 and "List post" not in not_in_the_inbox.text
    assert "In the Inbox" in inbox_by_any_case


async def test_the_mailbox_list_is_not_shown_with_only_the_inbox(ui):
    _put(_maildir(ui), "8300.M1P1Q1.host", _msg("Only here"), time.time())
    async with ui.client() as c:
        await ui.login(c)
        page = (await c.get("/account/messages")).text
    assert "Only here" in page and 'aria-label="Mailboxes"' not in page


@pytest.mark.parametrize("mailbox", [
    "..", ".", "../bob", "..%2Fbob%2FMaildir", "Lists%2F..%2F..", "%2Fetc", "Elsewhere", "NotAFolder",
    "Nope", "Lists%00", ".Lists", "lists", "new", "cur",
])
async def test_names_that_are_not_mailboxes_of_the_account_are_not_found(ui, mailbox):
    root = _maildir(ui)
    _put(_folder(root, "Lists"), "8400.M1P1Q1.host", _msg("Alice's list post"), time.time())
    _put(root, "8401.M1P1Q1.host", _msg("Alice's own"), time.time())
    bob = _maildir(ui, "bob")
    _put(bob, "8402.M1P1Q1.host", _msg("Bob's"), time.time())
    (root / ".Elsewhere").symlink_to(bob)  # a folder that is a link is not one of alice's
    (root / ".NotAFolder").mkdir()
    async with ui.client() as c:
        await ui.login(c)
        assert (await c.get("/account/messages?mailbox=Lists")).status_code == 200
        for path in ("/account/messages", "/account/messages/8402.M1P1Q1.host", "/account/raw/8402.M1P1Q1.host",
                     "/account/messages/8400.M1P1Q1.host", "/account/messages/8401.M1P1Q1.host"):
            r = await c.get(f"{path}?mailbox={mailbox}")
            assert r.status_code == 404, (path, mailbox)
            assert b"Bob's" not in r.content and b"Alice's" not in r.content


def test_mailboxes_are_the_inbox_and_the_maildir_plus_plus_folders(tmp_path):
    root = tmp_path / "Maildir"
    assert mailboxes(root) == ["Inbox"]  # not delivered to yet
    for name in ("Lists", "archive", "Archive/2024", "Zed"):
        _folder(root, name)
    (root / ".Trash").mkdir()
    (root / ".Trash" / "cur").mkdir()  # a reader's folder with cur/ only
    (root / ".Empty").mkdir()
    (root / "..Bad").mkdir()
    (root / "..Bad" / "new").mkdir()
    (root / ".file").write_text("not a folder")
    assert mailboxes(root) == ["Inbox", "archive", "Archive/2024", "Lists", "Trash", "Zed"]
    for name in mailboxes(root):  # where the store delivers into each of them
        assert open_mailbox(root, name).root == mailbox_dir(root, name)
    assert open_mailbox(root, "inbox").root == root
    assert open_mailbox(root, "Archive/2024").root == root / ".Archive.2024"
    for bad in ("Empty", "Bad", ".Bad", "", "/", "Archive", "2024", "../Maildir", "file"):
        assert open_mailbox(root, bad) is None, bad


def test_message_ids_are_single_unhidden_path_components():
    assert valid_id("1700000000.M1P2Q3.mail.example.org,S=123")
    for bad in ("", ".", "..", "../x", "/etc/passwd", "a/b", ".hidden", "a\x00b", "a:2,S", "x" * 300):
        assert not valid_id(bad)
    assert Mailbox(Path("/nonexistent")).page(1, 50) == ([], 0)


def test_the_inbox_finds_only_its_own_files(tmp_path):
    root = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True)
    (root / "cur" / "7000.M1P1Q1.host:2,S").write_bytes(b"Subject: x\r\n\r\n")
    (root / "tmp" / "7001.M1P1Q1.host").write_bytes(b"Subject: y\r\n\r\n")
    inbox = Mailbox(root)
    assert inbox.find("7000.M1P1Q1.host") == root / "cur" / "7000.M1P1Q1.host:2,S"
    for bad in ("7001.M1P1Q1.host", "..", ".", "../cur/7000.M1P1Q1.host", str(root / "cur" / "7000.M1P1Q1.host"),
                "new", "cur", "7000.M1P1Q1.host:2,S"):
        assert inbox.find(bad) is None, bad
        assert inbox.view(bad) is None


def test_html_to_text():
    text = html_to_text("<p>One<br>two</p><ul><li>a</li><li>b</li></ul><script>x()</script>"
                        "<a href='mailto:m@x.example'>mail</a> &lt;ok&gt;")
    assert text == "One\ntwo\n\n• a\n\n• b\n\nmail <mailto:m@x.example> <ok>"


# -- password ------------------------------------------------------------------------------


@pytest.mark.parametrize(("form", "error"), [
    ({"current": "wrong-one", "new": "newpass-123", "repeat": "newpass-123"}, "The current password is not right."),
    ({"current": PASSWORD, "new": "short", "repeat": "short"}, "at least 8 characters"),
    ({"current": PASSWORD, "new": "newpass-123", "repeat": "newpass-124"}, "differ"),
])
async def test_a_refused_password_change_changes_nothing(ui, form, error):
    async with ui.client() as c:
        await ui.login(c)
        r = await ui.post(c, "/account/password", form)
        assert r.status_code == 400 and error in r.text
    assert ui.password_is("alice", PASSWORD) and not ui.password_is("alice", form["new"])


async def test_a_password_change_keeps_this_session_and_ends_the_others(ui):
    async with ui.client() as other, ui.client() as bobs, ui.client() as c:
        await ui.login(other)
        await ui.login(bobs, "bob", BOB_PASSWORD)
        await ui.login(c)
        assert ui.sessions.count("account", "alice") == 2
        r = await ui.post(c, "/account/password", {"current": PASSWORD, "new": "newpass-123", "repeat": "newpass-123"})
        assert r.status_code == 303 and r.headers["location"] == "/account/password?changed=1"
        assert "Your password was changed." in (await c.get("/account/password?changed=1")).text
        assert (await c.get("/account/")).status_code == 200
        assert (await other.get("/account/")).status_code == 303
        assert (await bobs.get("/account/")).status_code == 200
    assert ui.password_is("alice", "newpass-123") and not ui.password_is("alice", PASSWORD)
    creds = ui.credentials.lookup("alice")
    assert creds.scram_sha256 is not None and creds.cram_md5 is not None  # recomputed with the hash
