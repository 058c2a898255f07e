"""The account pages in a real browser (Debian's chromium through Playwright) against a real
``mox serve``: log in, the overview, a message sent over SMTP in the list and opened, the
password change, log out, a mailbox other than the Inbox, and a phone-sized window. Screenshots of the main pages go to
tests/artifacts/screenshots/ (see the README)."""

from __future__ import annotations

import re

import pytest

from mox_testpeers import wait_for
from tests.accountweb import BOB_PASSWORD, PASSWORD, AccountWeb
from tests.browser import CHROMIUM, require_chromium

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture fails and says what to install
    expect = None


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    w = AccountWeb(tmp_path_factory.mktemp("account-browser"))
    w.deliver("alice@example.org", "Quarterly report", "The numbers are in.\n\nSee you on Monday,\nCarol\n")
    w.deliver("support@example.org", "Invoice 2026-031", "Your invoice is attached.\n",
              sender="Billing <billing@shop.example>")
    w.deliver("nobody@example.org", "Caught by the catch-all", "Sent to an address nobody has.\n",
              sender="dev@app.example")
    w.deliver("alice@example.org", "Newsletter: March", "", sender="News <news@letters.example>",
              html="<html><head><style>p{color:red}</style></head><body><h1>March news</h1>"
                   "<p>Read <a href=\"https://letters.example/march\">online</a>.</p>"
                   "<script>alert(1)</script></body></html>")
    w.deliver("lists@example.org", "[dev] Release 1.4 is out", "Changelog attached.\n",
              sender="Dev list <dev@lists.example>")
    w.mox.wait_for_messages("alice", 4)
    lists_new = w.mox.data_dir / "accounts" / "alice" / "Maildir" / ".Lists" / "new"
    wait_for(lambda: lists_new.is_dir() and any(lists_new.iterdir()), 10, what="the message in alice's Lists")
    w.submit("alice@example.org", PASSWORD, "admin@example.org", "Lunch?")
    yield w
    w.stop()


def _login(page, web, username: str = "alice@example.org", password: str = PASSWORD) -> None:
    page.goto(web.url("/account/"))
    page.get_by_label("Email address or account name").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_a_user_logs_in_reads_a_message_from_smtp_and_logs_out(web, browser_context, screenshot):
    page = browser_context.new_page()
    page.goto(web.url("/account/"))
    expect(page).to_have_url(re.compile(r"/account/login$"))
    _login(page, web, password="not-the-password")
    expect(page.get_by_role("alert")).to_have_text("Wrong email address or password.")
    expect(page.get_by_label("Email address or account name")).to_have_value("alice@example.org")
    screenshot(page, "login-error")

    _login(page, web)
    expect(page).to_have_url(web.url("/account/"))
    expect(page.get_by_role("heading", name="Alice Liddell")).to_be_visible()
    expect(page.locator(".address", has_text="support@example.org")).to_be_visible()
    expect(page.locator(".tag", has_text="catch-all")).to_be_visible()
    expect(page.locator(".usage", has_text="Messages sent")).to_contain_text("1 of 1000")
    screenshot(page, "overview")

    web.deliver("alice@example.org", "Grüße aus Köln", "Schöne Grüße!\n", sender="Jörg <joerg@sender.example>")
    web.mox.wait_for_messages("alice", 5)
    page.get_by_role("link", name="Messages", exact=True).click()
    rows = page.locator("table.messages tbody tr")
    expect(rows).to_have_count(5)
    expect(rows.first).to_contain_text("Grüße aus Köln")  # RFC 2047 subject decoded, newest first
    expect(rows.first).to_contain_text("Jörg")
    screenshot(page, "messages")

    page.get_by_role("link", name="Grüße aus Köln").click()
    expect(page.get_by_role("heading", name="Grüße aus Köln")).to_be_visible()
    expect(page.locator("pre.body")).to_have_text("Schöne Grüße!")
    screenshot(page, "message")

    page.get_by_role("link", name="Messages", exact=True).click()
    page.get_by_role("link", name="Newsletter: March").click()
    expect(page.locator("pre.body")).to_contain_text("March news")
    expect(page.locator("pre.body")).not_to_contain_text("alert(1)")
    assert page.locator("h1", has_text="March news").count() == 0  # the HTML is never rendered
    screenshot(page, "message-html")

    with page.expect_download() as download:
        page.get_by_role("link", name="Download (.eml)").click()
    raw = open(download.value.path(), "rb").read()
    assert b"Subject: Newsletter: March" in raw

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("status")).to_have_text("You are logged out.")
    page.goto(web.url("/account/messages"))
    expect(page).to_have_url(re.compile(r"/account/login\?next="))


def test_a_user_reads_a_mailbox_other_than_the_inbox(web, browser_context, screenshot):
    page = browser_context.new_page()
    _login(page, web)
    page.get_by_role("link", name="Messages", exact=True).click()
    mailboxes = page.get_by_role("navigation", name="Mailboxes")
    expect(mailboxes.get_by_role("link")).to_have_text(["Inbox", "Lists"])
    expect(page.locator("table.messages")).not_to_contain_text("Release 1.4")
    mailboxes.get_by_role("link", name="Lists").click()
    expect(page).to_have_url(web.url("/account/messages?mailbox=Lists"))
    rows = page.locator("table.messages tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Dev list")
    expect(mailboxes.locator('[aria-current="page"]')).to_have_text("Lists")
    screenshot(page, "mailbox-lists")
    page.get_by_role("link", name="[dev] Release 1.4 is out").click()
    expect(page.locator("pre.body")).to_have_text("Changelog attached.")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download (.eml)").click()
    assert b"Subject: [dev] Release 1.4 is out" in open(download.value.path(), "rb").read()
    page.get_by_role("link", name="← Lists").click()
    expect(page).to_have_url(web.url("/account/messages?mailbox=Lists"))


def test_a_user_changes_the_password_in_the_browser(web, browser_context, screenshot):
    page = browser_context.new_page()
    _login(page, web, "bob@example.org", BOB_PASSWORD)
    page.get_by_role("link", name="Password").click()
    page.get_by_label("Current password").fill("wrong-password")
    page.get_by_label("New password", exact=True).fill("bob-new-secret-2")
    page.get_by_label("New password again").fill("bob-new-secret-2")
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_role("alert")).to_have_text("The current password is not right.")
    screenshot(page, "password-error")
    page.get_by_label("Current password").fill(BOB_PASSWORD)
    page.get_by_label("New password", exact=True).fill("bob-new-secret-2")
    page.get_by_label("New password again").fill("bob-new-secret-2")
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_role("status")).to_contain_text("Your password was changed.")
    screenshot(page, "password")
    assert web.smtp_auth_works("bob@example.org", "bob-new-secret-2")
    assert not web.smtp_auth_works("bob@example.org", BOB_PASSWORD)

    page.get_by_role("button", name="Log out").click()
    _login(page, web, "bob", BOB_PASSWORD)
    expect(page.get_by_role("alert")).to_have_text("Wrong email address or password.")
    _login(page, web, "bob", "bob-new-secret-2")
    expect(page).to_have_url(web.url("/account/"))


@pytest.mark.parametrize("path", ["/account/", "/account/messages", "/account/password"])
def test_the_pages_fit_a_phone_screen(web, browser, screenshot, path):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    try:
        page = ctx.new_page()
        _login(page, web)
        page.goto(web.url(path))
        expect(page.locator("main")).to_be_visible()
        # nothing sticks out sideways: the page never needs scrolling to the right
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for link in ("Overview", "Messages", "Password"):
            expect(page.get_by_role("link", name=link, exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Log out")).to_be_visible()
        name = path.strip("/").replace("/", "-")
        screenshot(page, f"narrow-{name}")
        if path == "/account/messages":
            page.locator("table.messages tbody tr").first.get_by_role("link").click()
            expect(page.locator("pre.body")).to_be_visible()
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            screenshot(page, "narrow-message")
    finally:
        ctx.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_stylesheet_and_icon_load_under_the_content_security_policy(web, browser, screenshot, scheme):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, color_scheme=scheme)
    try:
        page = ctx.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        _login(page, web)
        expect(page.get_by_role("heading", name="Alice Liddell")).to_be_visible()
        # the stylesheet applied: the header bar is laid out as a row by mox.css, and the
        # page's colours follow the system's choice
        assert page.evaluate("getComputedStyle(document.querySelector('.bar')).display") == "flex"
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == ("rgb(18, 21, 27)" if scheme == "dark" else "rgb(244, 246, 249)")
        assert page.evaluate("document.querySelector('.brand img').naturalWidth") > 0  # the icon loaded
        assert problems == []
        if scheme == "dark":
            page.get_by_role("link", name="Messages", exact=True).click()
            screenshot(page, "messages-dark")
    finally:
        ctx.close()


def test_a_missing_chromium_fails_the_browser_tests_and_says_what_to_install(tmp_path):
    assert require_chromium() == CHROMIUM
    with pytest.raises(pytest.fail.Exception, match=r"need Debian's chromium .*apt-get install chromium"):
        require_chromium(str(tmp_path / "no-chromium"))
