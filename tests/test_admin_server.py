"""The admin pages through a real ``mox serve`` (its web process, the config writer, the other
processes picking a change up at once), over HTTP: login and its throttle, CSRF, the stale
save, a bad value shown at its field with domains.toml left byte for byte as it was, comments
surviving saves, and the domain and account pages with their actions."""

from __future__ import annotations

import base64
import html as html_lib
import re
import smtplib
import ssl

import httpx
import pytest

from mox_core.outgoing.dkimsign import public_key_of as public_key
from tests.adminweb import ADMIN_PASSWORD, AdminWeb, csrf_of, form_fields


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    w = AdminWeb(tmp_path_factory.mktemp("admin-server") / "mox")
    yield w
    w.stop()


def field_error(html: str, key: str) -> str:
    """The error shown at the field of form key ``key`` ("" when there is none)."""
    fid = "f-" + key.replace(".", "-")
    m = re.search(rf'id="{re.escape(fid)}-error">([^<]*)<', html)
    return html_lib.unescape(m.group(1)) if m else ""


def text_of(html: str) -> str:
    return html_lib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


def smtp_login_works(web: AdminWeb, username: str, password: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", web.mox.submission_port, timeout=20) as s:
        s.starttls(context=ctx)
        try:
            s.login(username, password)
        except smtplib.SMTPAuthenticationError:
            return False
        return True


# --------------------------------------------------------------------------------------------
# login, throttle, CSRF


def test_the_admin_password_logs_in_and_logout_ends_the_session(web):
    with web.client() as c:
        assert c.get(web.url("/admin/")).headers["location"] == "/admin/login"
        login = c.get(web.url("/admin/login"))
        assert 'name="username"' not in login.text and '<label for="password">Password</label>' in login.text
        wrong = web.login(c, "not the password")
        assert wrong.status_code == 403 and "Wrong password." in wrong.text
        r = web.login(c)
        assert r.status_code == 303 and r.headers["location"] == "/admin/"
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("mox_admin_session="))
        assert {"HttpOnly", "SameSite=Strict", "Path=/admin/"} <= {a.strip() for a in cookie.split(";")}
        sid = c.cookies.get("mox_admin_session")
        page = c.get(web.url("/admin/"))
        assert page.status_code == 200 and "mail.example.org" in page.text
        out = c.post(web.url("/admin/logout"), data={"csrf": csrf_of(page.text)}, headers={"origin": web.origin()})
        assert out.headers["location"] == "/admin/login?loggedout=1"
    with web.client() as replay:
        replay.cookies.set("mox_admin_session", sid)
        assert replay.get(web.url("/admin/domains")).headers["location"] == "/admin/login?next=%2Fdomains"


def test_ten_wrong_passwords_lock_the_address_out_for_the_stated_time(web):
    with web.client("127.0.0.3") as c:
        for _ in range(10):
            assert web.login(c, "guessing-wrong").status_code == 403
        r = web.login(c)  # the right password, refused all the same
        assert r.status_code == 429
        m = re.search(r"Too many failed logins from your address; try again in (\d+) seconds\.", r.text)
        assert m is not None and 1 <= int(m.group(1)) <= 60
        assert "mox_admin_session" not in r.headers.get("set-cookie", "")
    with web.client("127.0.0.4") as other:
        assert web.login(other).status_code == 303


def test_a_post_without_the_csrf_token_or_from_elsewhere_is_refused_and_changes_nothing(web):
    before = web.domains_path.read_bytes()
    with web.admin() as c:
        page = c.get(web.url("/admin/accounts/alice"))
        data = form_fields(page.text, "/admin/accounts/alice")
        data["full_name"] = "Mallory"
        without = {k: v for k, v in data.items() if k != "csrf"}
        r = c.post(web.url("/admin/accounts/alice"), data=without, headers={"origin": web.origin()})
        assert r.status_code == 403 and "Nothing was changed" in r.text
        r = c.post(web.url("/admin/accounts/alice"), data={**data, "csrf": "A" * 43}, headers={"origin": web.origin()})
        assert r.status_code == 403
        r = c.post(web.url("/admin/accounts/alice"), data=data, headers={"origin": "http://evil.example"})
        assert r.status_code == 403
        r = c.post(web.url("/admin/domains/add"), data={"csrf": csrf_of(page.text), "name": "evil.example"})
        assert r.status_code == 403  # neither Origin nor Referer
    assert web.domains_path.read_bytes() == before


# --------------------------------------------------------------------------------------------
# saving: stale, errors at fields, comments


def test_a_stale_save_is_refused_and_writes_nothing(web):
    with web.admin() as first, web.admin() as second:
        one = form_fields(first.get(web.url("/admin/accounts/admin")).text, "/admin/accounts/admin")
        two = form_fields(second.get(web.url("/admin/accounts/admin")).text, "/admin/accounts/admin")
        assert one["version"] == two["version"]
        r = first.post(web.url("/admin/accounts/admin"), data={**one, "description": "First save"},
                       headers={"origin": web.origin()})
        assert r.status_code == 303 and r.headers["location"] == "/admin/accounts/admin?saved=1"
        after_first = web.domains_path.read_bytes()
        r = second.post(web.url("/admin/accounts/admin"), data={**two, "description": "Second save"},
                        headers={"origin": web.origin()})
        assert r.status_code == 409
        assert "domains.toml was changed since you loaded it" in r.text and "Nothing was written" in r.text
        assert 'value="Second save"' in r.text  # what was typed is still there
        assert web.domains_path.read_bytes() == after_first
        assert b'description = "First save"' in after_first


@pytest.mark.parametrize("key, value, message", [
    ("quota_message_size", "-1", "Input should be greater than or equal to 0"),
    ("max_outgoing_messages_per_day", "lots", "'lots' is not a whole number"),
    ("domain", "nowhere.example", "'nowhere.example' is not one of example.net, example.org"),
])
def test_a_bad_value_is_shown_at_its_field_and_leaves_domains_toml_unchanged(web, key, value, message):
    before = web.domains_path.read_bytes()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/accounts/alice", "/accounts/alice", {key: value, "full_name": "Changed too"})
        assert r.status_code == 400
        assert field_error(r.text, key) == message
        assert re.search(rf'id="f-{key}-field" class="field invalid"|class="field invalid" id="f-{key}-field"', r.text)
        summary = text_of(r.text)
        assert "Not saved: 1 problem. Nothing was written." in summary and message in summary
        assert 'value="Changed too"' in r.text
    assert web.domains_path.read_bytes() == before


def test_a_problem_found_by_validating_the_whole_config_goes_to_its_field(web):
    """An MTA-STS policy needs a listener serving it (a check across mox.toml and
    domains.toml): the problem is shown at the policy's fieldset, and nothing is written."""
    before = web.domains_path.read_bytes()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/domains/example.net", "/domains/example.net",
                            {"mta_sts._present": "true", "mta_sts.policy_id": "20260101"})
        assert r.status_code == 400
        assert field_error(r.text, "mta_sts") == ("MTA-STS policy configured but no listener with mta_sts_https "
                                                  "enabled (mox.toml)")
        r = web.submit_form(c, "/admin/domains/example.net", "/domains/example.net",
                            {"mta_sts._present": "true", "mta_sts.policy_id": "not valid!"})
        assert "policy_id must be 1 to 32 letters and digits" in field_error(r.text, "mta_sts.policy_id")
    assert web.domains_path.read_bytes() == before


def test_comments_survive_a_save_and_only_the_changed_line_differs(web):
    before = web.domains_path.read_text()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/domains/example.org", "/domains/example.org",
                            {"description": "The main domain", "localpart_catchall_separators": "+\n-"})
        assert r.status_code == 303
        assert "Saved. The change is in effect." in c.get(web.url(r.headers["location"])).text
    after = web.domains_path.read_text()
    for comment in re.findall(r"#.*", before):
        assert comment in after
    assert 'description = "The main domain"  # a comment after a value' in after
    assert 'localpart_catchall_separators = ["+", "-"]' in after
    removed = set(before.splitlines()) - set(after.splitlines())
    assert removed == {'description = "Main domain"  # a comment after a value'}


def test_a_form_sent_back_unchanged_writes_nothing(web):
    before = web.domains_path.read_bytes()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/accounts/alice", "/accounts/alice")
        assert r.headers["location"] == "/admin/accounts/alice?saved=0"
        assert "Nothing to save: no value was changed." in c.get(web.url(r.headers["location"])).text
    assert web.domains_path.read_bytes() == before


# --------------------------------------------------------------------------------------------
# pages


@pytest.mark.parametrize("path, heading", [
    ("/admin/", "mail.example.org"), ("/admin/domains", "Domains"), ("/admin/domains/example.org", "example.org"),
    ("/admin/accounts", "Accounts"), ("/admin/accounts/alice", "Alice Liddell"), ("/admin/routes", "Global routes"),
    ("/admin/domains/example.org/routes", "Routes of domain example.org"),
    ("/admin/accounts/alice/routes", "Routes of account alice"), ("/admin/routes/1", "Route 1"),
    ("/admin/web", "Web handlers"), ("/admin/web/add?kind=static", "New web handler"),
    ("/admin/transports", "Transports"), ("/admin/plugins", "Plugins"), ("/admin/queue", "Queue"),
    ("/admin/accounts/alice/addresses/alice@example.org", "alice@example.org"),
])
def test_every_page_is_served_to_the_admin(web, path, heading):
    with web.admin() as c:
        r = c.get(web.url(path))
        assert r.status_code == 200
        assert re.search(r"<h1[^>]*>\s*" + re.escape(heading), r.text), r.text[:2000]
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    with web.client() as anonymous:
        assert anonymous.get(web.url(path)).status_code == 303


@pytest.mark.parametrize("path", ["/admin/domains/nowhere.example", "/admin/accounts/nobody",
                                  "/admin/routes/99", "/admin/web/5", "/admin/accounts/nobody/routes"])
def test_what_is_not_in_the_config_is_not_found(web, path):
    with web.admin() as c:
        assert c.get(web.url(path)).status_code == 404


# --------------------------------------------------------------------------------------------
# domains and DKIM


def test_a_domain_is_added_edited_and_removed(web):
    with web.admin() as c:
        r = web.submit_form(c, "/admin/domains", "/domains/add", {"name": "Shop.Example", "description": "The shop"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/domains/shop.example?saved=1"
        assert '[domains."shop.example"]\ndescription = "The shop"' in web.domains_path.read_text()
        r = web.submit_form(c, "/admin/domains/shop.example", "/domains/shop.example",
                            {"disabled": "true", "localpart_case_sensitive": "true"})
        assert r.status_code == 303
        text = web.domains_path.read_text()
        assert "disabled = true" in text and "localpart_case_sensitive = true" in text
        listing = c.get(web.url("/admin/domains")).text
        assert "shop.example" in listing and "disabled" in listing
        r = web.submit_form(c, "/admin/domains", "/domains/add", {"name": "shop.example"})
        assert r.status_code == 400 and "domain shop.example already exists" in r.text
        r = web.submit_form(c, "/admin/domains/shop.example", "/domains/shop.example/remove")
        assert r.status_code == 303 and r.headers["location"] == "/admin/domains?removed=shop.example"
        assert "shop.example" not in web.domains_path.read_text()


def test_a_domain_in_use_is_not_removed(web):
    before = web.domains_path.read_bytes()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/domains/example.org", "/domains/example.org/remove")
        assert r.status_code == 400
        assert "domain example.org is still used by: account admin (its default domain)" in text_of(r.text)
    assert web.domains_path.read_bytes() == before


@pytest.mark.parametrize("algorithm, selector", [("rsa", "2026a"), ("ed25519", "2026e")])
def test_a_dkim_key_is_generated_into_the_config_dir_with_its_dns_record(web, algorithm, selector):
    with web.admin() as c:
        r = web.submit_form(c, "/admin/domains/example.org", "/domains/example.org/dkim/generate",
                            {"selector": selector, "algorithm": algorithm, "sign": "true"})
        assert r.status_code == 303
        key = web.mox.directory / "dkim" / f"{selector}.example.org.pem"
        assert key.exists() and key.stat().st_mode & 0o777 == 0o600
        text = web.domains_path.read_text()
        assert f'[domains."example.org".dkim.selectors.{selector}]\nprivate_key_file = "dkim/{selector}.example.org.pem"' in text
        assert re.search(rf"sign = \[[^\]]*\"{selector}\"", text)
        page = c.get(web.url("/admin/domains/example.org")).text
        algo, public = public_key(key)
        assert algo == algorithm
        record = base64.b64encode(public).decode()
        assert f"{selector}._domainkey.example.org. TXT &#34;v=DKIM1; k={algorithm}; p={record[:200]}" in page


def test_dkim_signing_is_switched_per_selector_and_a_selector_removed(web):
    with web.admin() as c:
        web.submit_form(c, "/admin/domains/example.net", "/domains/example.net/dkim/generate",
                        {"selector": "one", "algorithm": "ed25519", "sign": "true"})
        web.submit_form(c, "/admin/domains/example.net", "/domains/example.net/dkim/generate",
                        {"selector": "two", "algorithm": "ed25519", "sign": "false"})
        assert 'sign = ["one"]' in web.domains_path.read_text()
        r = web.submit_form(c, "/admin/domains/example.net", "/domains/example.net/dkim/sign",
                            {"sign.one": "", "sign.two": "true"})
        assert r.status_code == 303 and 'sign = ["two"]' in web.domains_path.read_text()
        r = web.submit_form(c, "/admin/domains/example.net/dkim/two", "/domains/example.net/dkim/two",
                            {"canonicalization": "simple/simple"})
        assert r.status_code == 303 and 'canonicalization = "simple/simple"' in web.domains_path.read_text()
        r = web.submit_form(c, "/admin/domains/example.net", "/domains/example.net/dkim/two/remove")
        text = web.domains_path.read_text()
        assert r.status_code == 303 and "selectors.two" not in text and "sign = []" in text
        r = web.submit_form(c, "/admin/domains/example.net", "/domains/example.net/dkim/generate",
                            {"selector": "one", "algorithm": "rsa"})
        assert r.status_code == 400 and "exists already" in r.text


def test_a_bad_selector_name_makes_no_key(web):
    with web.admin() as c:
        r = web.submit_form(c, "/admin/domains/example.org", "/domains/example.org/dkim/generate",
                            {"selector": "../evil", "algorithm": "rsa"})
        assert r.status_code == 400 and "a selector is letters, digits and hyphens" in r.text
    dkim_dir = web.mox.directory / "dkim"
    assert not dkim_dir.exists() or not [p for p in dkim_dir.iterdir() if "evil" in p.name]


# --------------------------------------------------------------------------------------------
# accounts


def test_an_account_is_added_with_its_first_address_and_gets_a_password(web):
    with web.admin() as c:
        r = web.submit_form(c, "/admin/accounts", "/accounts/add", {"name": "bob", "address": "bob@example.org"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/accounts/bob?saved=1"
        text = web.domains_path.read_text()
        assert '[accounts.bob]\ndomain = "example.org"' in text and '[accounts.bob.destinations."bob@example.org"]' in text
        assert "No password set" in c.get(web.url("/admin/accounts/bob")).text
        r = web.submit_form(c, "/admin/accounts/bob", "/accounts/bob/password",
                            {"password": "bob-secret-22", "repeat": "bob-secret-22"})
        assert r.status_code == 303
        assert "Password set." in c.get(web.url(r.headers["location"])).text
    assert smtp_login_works(web, "bob@example.org", "bob-secret-22")
    with web.admin() as c:
        r = web.submit_form(c, "/admin/accounts/bob", "/accounts/bob/password", {"password": "short", "repeat": "short"})
        assert r.status_code == 400 and "at least 8 characters" in r.text


@pytest.mark.parametrize("name, address, message", [
    ("../etc", "x@example.org", "an account name is 1 to 64 letters"),
    ("alice", "other@example.org", "account alice already exists"),
    ("carol", "alice@example.org", "address alice@example.org already belongs to account alice"),
    ("carol", "carol@unknown.example", "unknown domain for address"),
])
def test_an_account_that_cannot_be_added_is_refused(web, name, address, message):
    before = web.domains_path.read_bytes()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/accounts", "/accounts/add", {"name": name, "address": address})
        assert r.status_code == 400 and message in text_of(r.text)
    assert web.domains_path.read_bytes() == before


def test_addresses_are_added_and_removed_and_each_has_its_settings(web):
    with web.admin() as c:
        for address in ("info@example.org", "@example.net"):
            r = web.submit_form(c, "/admin/accounts/alice", "/accounts/alice/addresses/add", {"address": address})
            assert r.status_code == 303
        page = c.get(web.url("/admin/accounts/alice")).text
        assert "info@example.org" in page and "catch-all" in page
        r = web.submit_form(c, "/admin/accounts/alice/addresses/info@example.org",
                            "/accounts/alice/addresses/info@example.org", {"mailbox": "Info", "smtp_error": ""})
        assert r.status_code == 303
        assert '[accounts.alice.destinations."info@example.org"]\nmailbox = "Info"' in web.domains_path.read_text()
        r = web.submit_form(c, "/admin/accounts/alice/addresses/info@example.org",
                            "/accounts/alice/addresses/info@example.org", {"smtp_error": "hello"})
        assert r.status_code == 400 and field_error(r.text, "smtp_error") == "smtp_error must start with 550 or 421"
    web.deliver("anyone@example.net", "For the catch-all")
    assert web.mox.wait_for_messages("alice", 1)
    with web.admin() as c:
        r = web.submit_form(c, "/admin/accounts/alice", "/accounts/alice/addresses/@example.net/remove")
        assert r.status_code == 303 and '"@example.net"' not in web.domains_path.read_text()
        data = form_fields(c.get(web.url("/admin/accounts/alice")).text,
                           "/admin/accounts/alice/addresses/info@example.org/remove")
        r = c.post(web.url("/admin/accounts/alice/addresses/admin@example.org/remove"), data=data,
                   headers={"origin": web.origin()})  # another account's address
        assert r.status_code == 400 and "not an address of account alice" in r.text
        assert '[accounts.admin.destinations."admin@example.org"]' in web.domains_path.read_text()


def test_an_account_is_removed_only_when_confirmed(web):
    with web.admin() as c:
        web.submit_form(c, "/admin/accounts", "/accounts/add", {"name": "temp", "address": "temp@example.net"})
        r = web.submit_form(c, "/admin/accounts/temp", "/accounts/temp/remove")
        assert r.status_code == 400 and "Tick the box" in r.text
        assert "[accounts.temp]" in web.domains_path.read_text()
        r = web.submit_form(c, "/admin/accounts/temp", "/accounts/temp/remove", {"confirm": "true"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/accounts?removed=temp"
        assert "[accounts.temp]" not in web.domains_path.read_text()
        r = web.submit_form(c, "/admin/accounts/admin", "/accounts/admin/remove", {"confirm": "true"})
        assert r.status_code == 400 and "postmaster account 'admin' (from mox.toml) is not defined" in text_of(r.text)


def test_a_changed_limit_applies_to_the_next_submission(web):
    with web.admin() as c:
        web.submit_form(c, "/admin/accounts/alice", "/accounts/alice/password",
                        {"password": "alice-secret-1", "repeat": "alice-secret-1"})
        r = web.submit_form(c, "/admin/accounts/alice", "/accounts/alice", {"max_outgoing_messages_per_day": "1"})
        assert r.status_code == 303
    web.submit("alice@example.org", "alice-secret-1", "admin@example.org", "first")
    with pytest.raises(smtplib.SMTPException, match="max_outgoing_messages_per_day"):
        web.submit("alice@example.org", "alice-secret-1", "admin@example.org", "second")
    with web.admin() as c:
        page = c.get(web.url("/admin/accounts/alice")).text
        assert "1 of 1" in page
        web.submit_form(c, "/admin/accounts/alice", "/accounts/alice", {"max_outgoing_messages_per_day": "1000"})
    web.submit("alice@example.org", "alice-secret-1", "admin@example.org", "third")


def test_a_login_without_the_login_forms_token_is_refused(web):
    with httpx.Client(trust_env=False) as c:
        r = c.post(web.url("/admin/login"), data={"csrf": "x", "password": ADMIN_PASSWORD},
                   headers={"origin": web.origin()})
        assert r.status_code == 403
