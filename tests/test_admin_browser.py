"""The admin pages in a real browser (Debian's chromium through Playwright) against a real
``mox serve``: an administrator adds an account and an address, sets its password, and the
account reads mail sent to it; a route added in the browser carries the next attempt of a
queued message to a smarthost; a static web handler added in the browser serves the next
request; a lowered limit refuses the next submission; a bad value, a stale save and a form
without its token change nothing; comments survive; ten wrong passwords lock the address out
for the time the page states. Screenshots of the main pages go to tests/artifacts/screenshots/
(see the README)."""

from __future__ import annotations

import re
import smtplib
import time

import pytest

from mox_testpeers import wait_for
from tests.adminweb import ADMIN_PASSWORD, AdminWeb

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture fails and says what to install
    expect = None

GREYLIST = "451 4.7.1 greylisted, please try again later"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    w = AdminWeb(tmp_path_factory.mktemp("admin-browser") / "mox")
    w.mox.set_password("alice", "alice-secret-1")
    yield w
    w.stop()


def login(page, web: AdminWeb, password: str = ADMIN_PASSWORD) -> None:
    page.goto(web.url("/admin/"))
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_an_account_is_added_with_an_address_and_a_password_and_reads_its_mail(web, browser_context, screenshot):
    page = browser_context.new_page()
    login(page, web)
    expect(page.get_by_role("heading", name="mail.example.org")).to_be_visible()
    screenshot(page, "admin-overview")

    page.get_by_role("link", name="Accounts", exact=True).click()
    page.get_by_label("Account name").fill("dave")
    page.get_by_label("First address").fill("dave@example.org")
    page.get_by_role("button", name="Add account").click()
    expect(page).to_have_url(web.url("/admin/accounts/dave?saved=1"))
    expect(page.get_by_role("status")).to_have_text("Saved. The change is in effect.")
    page.get_by_label("Add an address").fill("d.smith@example.org")
    page.get_by_role("button", name="Add", exact=True).click()
    expect(page.locator("#addresses .address", has_text="d.smith@example.org")).to_be_visible()
    page.get_by_label("New password", exact=True).fill("dave-secret-123")
    page.get_by_label("New password again").fill("dave-secret-123")
    page.get_by_role("button", name="Set password").click()
    expect(page.get_by_text("Password set.")).to_be_visible()
    page.get_by_label("Full name").fill("Dave Smith")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("heading", name="Dave Smith")).to_be_visible()
    screenshot(page, "admin-account")

    web.deliver("d.smith@example.org", "Welcome, Dave")
    web.mox.wait_for_messages("dave", 1)
    account = browser_context.new_page()
    account.goto(web.url("/account/"))
    account.get_by_label("Email address or account name").fill("dave@example.org")
    account.get_by_label("Password").fill("dave-secret-123")
    account.get_by_role("button", name="Log in").click()
    account.get_by_role("link", name="Messages", exact=True).click()
    expect(account.locator("table.messages tbody tr").first).to_contain_text("Welcome, Dave")


def test_a_static_handler_added_in_the_browser_serves_the_next_request(web, browser_context, screenshot, tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><title>Site</title><h1>Served by the new handler</h1>\n")
    page = browser_context.new_page()
    login(page, web)
    page.get_by_role("link", name="Web", exact=True).click()
    page.get_by_label("static").check()
    page.get_by_role("button", name="Continue").click()
    expect(page.get_by_role("heading", name="New web handler")).to_be_visible()
    page.get_by_label("Domain", exact=True).fill("localhost")
    page.get_by_label("Path regexp").fill("^/site/")
    page.get_by_label("Don't redirect plaintext").check()
    page.get_by_label("Root", exact=True).fill(str(tmp_path))
    page.get_by_label("Strip prefix").fill("/site")
    page.get_by_role("button", name="Add web handler").click()
    expect(page.get_by_role("status")).to_have_text("Saved. The change is in effect.")
    expect(page.locator(".route", has_text="localhost")).to_contain_text("static")
    screenshot(page, "admin-web")

    site = browser_context.new_page()
    site.goto(f"http://localhost:{web.port}/site/")
    expect(site.get_by_role("heading", name="Served by the new handler")).to_be_visible()


def test_a_lower_limit_refuses_the_next_submission_naming_the_setting(web, browser_context):
    web.submit("alice@example.org", "alice-secret-1", "admin@example.org", "before the limit")
    page = browser_context.new_page()
    login(page, web)
    page.goto(web.url("/admin/accounts/alice"))
    expect(page.locator(".usage", has_text="Messages sent")).to_contain_text("1 of 1000")
    page.get_by_label("Max outgoing messages per day").fill("1")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Saved. The change is in effect.")
    expect(page.locator(".usage", has_text="Messages sent")).to_contain_text("1 of 1")
    with pytest.raises(smtplib.SMTPException, match="max_outgoing_messages_per_day"):
        web.submit("alice@example.org", "alice-secret-1", "admin@example.org", "over the limit")
    page.get_by_label("Max outgoing messages per day").fill("1000")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Saved. The change is in effect.")
    web.submit("alice@example.org", "alice-secret-1", "admin@example.org", "after the limit")


def test_a_bad_value_shows_its_error_and_leaves_domains_toml_unchanged(web, browser_context, screenshot):
    before = web.domains_path.read_bytes()
    page = browser_context.new_page()
    login(page, web)
    page.goto(web.url("/admin/accounts/alice"))
    page.get_by_label("Quota message size").fill("-5")
    page.get_by_label("Description").fill("not saved either")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("Not saved: 1 problem. Nothing was written.")
    expect(page.locator("#f-quota_message_size-error")).to_have_text("Input should be greater than or equal to 0")
    expect(page.get_by_label("Quota message size")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Quota message size")).to_have_value("-5")
    expect(page.get_by_label("Description")).to_have_value("not saved either")
    page.locator("#f-quota_message_size-field").scroll_into_view_if_needed()
    screenshot(page, "admin-form-errors")
    assert web.domains_path.read_bytes() == before


def test_comments_survive_a_save_in_the_browser(web, browser_context):
    comments = re.findall(r"#.*", web.domains_path.read_text())
    assert len(comments) >= 4
    page = browser_context.new_page()
    login(page, web)
    page.goto(web.url("/admin/domains/example.org"))
    page.get_by_label("Description").fill("Our main domain")
    page.get_by_label("Localpart catchall separators").fill("+")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Saved. The change is in effect.")
    text = web.domains_path.read_text()
    assert re.findall(r"#.*", text) == comments
    assert 'description = "Our main domain"  # a comment after a value' in text


def test_a_stale_second_save_is_refused(web, browser, screenshot):
    first, second = browser.new_context(), browser.new_context()
    try:
        a, b = first.new_page(), second.new_page()
        for p in (a, b):
            login(p, web)
            p.goto(web.url("/admin/accounts/admin"))
        a.get_by_label("Full name").fill("Postmaster One")
        a.get_by_role("button", name="Save", exact=True).click()
        expect(a.get_by_role("status")).to_have_text("Saved. The change is in effect.")
        saved = web.domains_path.read_bytes()
        b.get_by_label("Full name").fill("Postmaster Two")
        b.get_by_role("button", name="Save", exact=True).click()
        expect(b.get_by_role("alert")).to_contain_text("Not saved: domains.toml was changed since you loaded it.")
        expect(b.get_by_label("Full name")).to_have_value("Postmaster Two")
        assert web.domains_path.read_bytes() == saved and b'full_name = "Postmaster One"' in saved
        b.get_by_role("link", name="Reload the page").click()
        expect(b.get_by_label("Full name")).to_have_value("Postmaster One")
    finally:
        first.close()
        second.close()


def test_a_form_without_its_token_is_refused(web, browser_context):
    before = web.domains_path.read_bytes()
    page = browser_context.new_page()
    login(page, web)
    page.goto(web.url("/admin/accounts/alice"))
    page.get_by_label("Full name").fill("Mallory")
    page.evaluate("document.querySelector('form[action$=\"/accounts/alice\"] input[name=csrf]').remove()")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    expect(page.get_by_text("Nothing was changed")).to_be_visible()
    assert web.domains_path.read_bytes() == before


@pytest.mark.parametrize("path, name", [("/admin/", "overview"), ("/admin/accounts/alice", "account"),
                                        ("/admin/routes", "routes"), ("/admin/web", "web"), ("/admin/queue", "queue"),
                                        ("/admin/domains/example.org", "domain")])
def test_the_pages_fit_a_phone_screen(web, browser, screenshot, path, name):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    try:
        page = ctx.new_page()
        login(page, web)
        page.goto(web.url(path))
        expect(page.locator("main h1")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        expect(page.get_by_role("link", name="Queue", exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Log out")).to_be_visible()
        screenshot(page, f"admin-narrow-{name}")
    finally:
        ctx.close()


def test_ten_wrong_passwords_lock_the_address_out_for_the_stated_time(tmp_path, browser_context):
    web = AdminWeb(tmp_path / "mox")  # its own server: the lockout would hold up the other tests
    try:
        page = browser_context.new_page()
        for _ in range(10):
            login(page, web, "a wrong guess")
            expect(page.get_by_role("alert")).to_have_text("Wrong password.")
        login(page, web)
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("Too many failed logins from your address; try again in")
        stated = int(re.search(r"try again in (\d+) seconds", alert.inner_text()).group(1))
        locked_at = time.monotonic()
        assert 1 <= stated <= 60

        def logged_in() -> bool:
            login(page, web)
            return page.url == web.url("/admin/")

        wait_for(logged_in, stated + 15, what="the lockout to end")
        elapsed = time.monotonic() - locked_at
        assert stated - 3 <= elapsed <= stated + 15
        expect(page.get_by_role("heading", name="mail.example.org")).to_be_visible()
    finally:
        web.stop()


def test_a_route_added_in_the_browser_carries_the_next_attempt_of_a_queued_message(
        tmp_path, browser_context, screenshot, dns_server, smtp_sink, smtp_sink_factory):
    mx = smtp_sink_factory(host="127.0.0.1", port=None, reject_4xx="RCPT", soft_reply=GREYLIST)
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.0.0.1")
    dns_server.add("sink.test", "A", "127.0.0.1")
    web = AdminWeb(tmp_path / "mox", nameserver=dns_server.nameserver, sink_port=smtp_sink.port,
                   static=f"\n[testing]\nallow_private_targets = true\ndirect_smtp_port = {mx.port}\n")
    try:
        web.mox.set_password("alice", "alice-secret-1")
        web.submit("alice@example.org", "alice-secret-1", "bob@remote.test", "Routed later")
        wait_for(lambda: "greylisted" in web.mox.mox("queue", "list").stdout, 20, what="the first attempt")
        page = browser_context.new_page()
        login(page, web)
        page.get_by_role("link", name="Queue", exact=True).click()
        row = page.locator("table.queue tbody tr", has_text="bob@remote.test")
        expect(row).to_contain_text("greylisted, please try again later")
        screenshot(page, "admin-queue")

        page.get_by_role("link", name="Routes", exact=True).click()
        page.get_by_label("Transport", exact=True).select_option("sink")
        page.get_by_label("To domain").fill("remote.test")
        page.get_by_role("button", name="Add route").click()
        expect(page.get_by_role("status")).to_have_text("Saved. The change is in effect.")
        page.get_by_label("From (envelope sender)").fill("alice@example.org")
        page.get_by_label("To (recipient)").fill("bob@remote.test")
        page.get_by_label("Delivery attempt").fill("2")
        page.get_by_role("button", name="Explain").click()
        explanation = page.get_by_role("status", name="Explanation")
        expect(explanation).to_contain_text("global route #2 (to_domain=('remote.test',)) -> transport 'sink': MATCHES")
        expect(explanation.locator(".verdict")).to_have_text("Transport sink")
        screenshot(page, "admin-routes-explain")

        page.get_by_role("link", name="Queue", exact=True).click()
        row.get_by_role("checkbox").check()
        page.get_by_role("button", name="Retry now", exact=True).click()
        expect(page.get_by_role("status")).to_have_text("1 message scheduled for delivery now.")
        [got] = smtp_sink.wait_for_messages(1, timeout=20)
        assert got.rcpt_to == ["bob@remote.test"] and got.mail_from == "alice@example.org"
        assert mx.count == 0
        page.get_by_role("link", name="Refresh").click()
        wait_for(lambda: "(none)" in web.mox.mox("queue", "list").stdout, 20, what="the queue to be empty")
        page.reload()
        expect(page.get_by_text("The queue is empty.")).to_be_visible()
    finally:
        web.stop()
