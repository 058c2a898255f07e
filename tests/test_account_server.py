"""The account pages through a real ``mox serve`` (its web process and request pipeline), over
plain HTTP and HTTPS: login and its throttle, cookies, logout, CSRF, session fixation, a
password change seen by SMTP AUTH, a message delivered over SMTP, names that are not
messages, sessions across a restart; and ``mox setaccountpassword`` / ``mox setadminpassword``
ending the sessions of the password they replace."""

from __future__ import annotations

import json
import re
import socket

import httpx
import pytest

from mox_core.accounts.adminpasswd import check_admin_password
from mox_core.webui import SessionStore
from tests.accountweb import BOB_PASSWORD, PASSWORD, AccountWeb, csrf_of


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    w = AccountWeb(tmp_path_factory.mktemp("account-server"))
    yield w
    w.stop()


def _session_cookie(resp: httpx.Response) -> str:
    for header in resp.headers.get_list("set-cookie"):
        if header.startswith("mox_account_session="):
            return header
    raise AssertionError(f"no session cookie in {resp.headers}")


@pytest.mark.parametrize("tls", [False, True])
def test_login_sets_a_session_cookie_with_secure_only_over_https(web, tls):
    with web.client() as c:
        wrong = web.login(c, password="wrong-password", tls=tls)
        assert wrong.status_code == 403 and "Wrong email address or password." in wrong.text
        r = web.login(c, tls=tls)
        assert r.status_code == 303 and r.headers["location"] == "/account/"
        attrs = [a.strip() for a in _session_cookie(r).split(";")]
        assert {"HttpOnly", "SameSite=Strict", "Path=/account/"} <= set(attrs)
        assert ("Secure" in attrs) is tls
        page = c.get(web.url("/account/", tls))
        assert page.status_code == 200 and "Alice Liddell" in page.text
        assert page.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_the_11th_login_from_an_address_is_refused_even_with_the_right_password(web):
    # from 127.0.0.2, so that the other tests' logins from 127.0.0.1 are not held up
    transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=False)
    with httpx.Client(transport=transport, timeout=20, trust_env=False) as c:
        for _ in range(10):
            assert web.login(c, password="wrong-password").status_code == 403
        r = web.login(c)
        assert r.status_code == 429
        m = re.search(r"Too many failed logins from your address; try again in (\d+) seconds\.", r.text)
        assert m is not None and 50 <= int(m.group(1)) <= 60
        assert "mox_account_session" not in r.headers.get("set-cookie", "")
    with web.client() as other:  # 127.0.0.1 may still log in
        assert web.login(other).status_code == 303


def test_logout_and_the_replayed_cookie(web):
    with web.client() as c:
        web.login(c)
        sid = c.cookies.get("mox_account_session")
        token = csrf_of(c.get(web.url("/account/")).text)
        r = c.post(web.url("/account/logout"), data={"csrf": token}, headers={"origin": web.origin()})
        assert r.status_code == 303 and r.headers["location"] == "/account/login?loggedout=1"
        assert "You are logged out." in c.get(web.url("/account/login?loggedout=1")).text
    with web.client() as replay:
        replay.cookies.set("mox_account_session", sid)
        r = replay.get(web.url("/account/"))
        assert r.status_code == 303 and r.headers["location"] == "/account/login"


def test_a_post_without_token_or_from_another_origin_is_refused_and_changes_nothing(web):
    form = {"current": BOB_PASSWORD, "new": "bob-never-set-9", "repeat": "bob-never-set-9"}
    with web.client() as c:
        web.login(c, "bob@example.org", BOB_PASSWORD)
        token = csrf_of(c.get(web.url("/account/password")).text)
        r = c.post(web.url("/account/password"), data=form, headers={"origin": web.origin()})
        assert r.status_code == 403
        r = c.post(web.url("/account/password"), data={**form, "csrf": token}, headers={"origin": "http://evil.example"})
        assert r.status_code == 403
        r = c.post(web.url("/account/password"), data={**form, "csrf": token})  # neither Origin nor Referer
        assert r.status_code == 403
    assert web.smtp_auth_works("bob@example.org", BOB_PASSWORD)
    assert not web.smtp_auth_works("bob@example.org", "bob-never-set-9")


def test_a_session_cookie_set_before_the_login_is_replaced(web):
    with web.client() as c:
        planted = "A" * 43
        c.cookies.set("mox_account_session", planted, domain="127.0.0.1", path="/account/")
        assert c.get(web.url("/account/")).status_code == 303  # not a session
        r = web.login(c)
        value = _session_cookie(r).split(";")[0].split("=", 1)[1]
        assert value != planted
    with web.client() as attacker:
        attacker.cookies.set("mox_account_session", planted)
        assert attacker.get(web.url("/account/")).status_code == 303


def test_a_message_from_smtp_is_listed_shown_and_downloaded(web):
    web.deliver("alice@example.org", "=?utf-8?q?R=C3=A9sum=C3=A9?= of the week", "Body line.\n")
    msgs = web.mox.wait_for_messages("alice", 1)
    with web.client() as c:
        web.login(c)
        listing = c.get(web.url("/account/messages"))
        assert "Résumé of the week" in listing.text
        link = re.search(r'href="(/account/messages/[^"]+)"', listing.text).group(1)
        page = c.get(web.url(link))
        assert page.status_code == 200 and "Body line." in page.text and "carol@sender.example" in page.text
        raw = c.get(web.url(link.replace("/messages/", "/raw/")))
        assert raw.status_code == 200 and raw.headers["content-disposition"].startswith("attachment;")
        assert raw.content in msgs


@pytest.mark.parametrize("path", [
    "/account/messages/..%2F..%2F..%2Fmox.toml", "/account/raw/..%2F..%2F..%2Fmox.toml",
    "/account/raw/%2Fetc%2Fpasswd", "/account/messages/%2Fetc%2Fpasswd", "/account/raw/..%2F..%2Fbob%2FMaildir",
])
def test_traversal_to_other_files_is_not_found(web, path):
    with web.client() as c:
        web.login(c)
        r = c.get(web.url(path))
        assert r.status_code == 404
        assert b"data_dir" not in r.content and b"root:" not in r.content


def test_a_raw_request_with_dot_segments_reaches_no_file(web):
    with web.client() as c:
        web.login(c)
        cookie = c.cookies.get("mox_account_session")
    with socket.create_connection(("127.0.0.1", web.http_port), timeout=10) as s:
        s.sendall(f"GET /account/raw/../../../../mox.toml HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Cookie: mox_account_session={cookie}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404") and b"hostname" not in answer


def test_a_password_change_applies_to_smtp_auth(web):
    with web.client() as c:
        web.login(c, "admin@example.org", "admin-secret-1")
        token = csrf_of(c.get(web.url("/account/password")).text)
        r = c.post(web.url("/account/password"), headers={"origin": web.origin()},
                   data={"csrf": token, "current": "admin-secret-1", "new": "admin-secret-2", "repeat": "admin-secret-2"})
        assert r.status_code == 303
        assert c.get(web.url("/account/")).status_code == 200  # this session goes on
    assert web.smtp_auth_works("admin@example.org", "admin-secret-2")
    assert not web.smtp_auth_works("admin@example.org", "admin-secret-1")


def test_sessions_survive_a_restart_of_the_server(web):
    with web.client() as c:
        web.login(c)
        assert c.get(web.url("/account/")).status_code == 200
        web.mox.stop()
        web.mox.start()
        assert c.get(web.url("/account/")).status_code == 200


def test_setaccountpassword_logs_out_that_accounts_web_sessions_at_once(web):
    web.mox.mox("setaccountpassword", "admin", input="admin-by-cli-1\n")  # whatever another test set
    with web.client() as first, web.client() as second, web.client() as alice:
        for c, user, password in ((first, "admin@example.org", "admin-by-cli-1"),
                                  (second, "admin@example.org", "admin-by-cli-1"),
                                  (alice, "alice@example.org", PASSWORD)):
            assert web.login(c, user, password).status_code == 303
            assert c.get(web.url("/account/")).status_code == 200
        out = web.mox.mox("setaccountpassword", "admin", input="admin-by-cli-2\n")
        assert "password for account admin set; 2 web sessions ended" in out.stdout
        for c in (first, second):  # the running server, no restart
            r = c.get(web.url("/account/"))
            assert r.status_code == 303 and r.headers["location"] == "/account/login"
        assert alice.get(web.url("/account/")).status_code == 200  # another account's session stays
        assert web.login(first, "admin@example.org", "admin-by-cli-1").status_code == 403
        assert web.login(first, "admin@example.org", "admin-by-cli-2").status_code == 303
        assert first.get(web.url("/account/")).status_code == 200


def test_setadminpassword_ends_the_admin_pages_sessions(web):
    store = SessionStore.for_data_dir(web.mox.data_dir)  # as the admin pages' login makes them
    try:
        admin = store.create("admin", "admin")
        account = store.create("account", "alice")
        out = web.mox.mox("setadminpassword", input="admin pages secret\n")
        assert out.stdout.rstrip().endswith("; 1 web session ended")
        assert store.get("admin", admin.id) is None
        assert store.get("account", account.id).principal == "alice"
    finally:
        store.close()


def test_setadminpassword_stores_only_a_salted_hash(web):
    out = web.mox.mox("setadminpassword", input="admin pages secret\n")
    assert "admin password set" in out.stdout
    path = web.mox.directory / "adminpasswd"
    assert (path.stat().st_mode & 0o777) == 0o600
    stored = json.loads(path.read_text())
    assert stored["scheme"] == "scrypt" and "admin pages secret" not in path.read_text()
    assert check_admin_password(web.mox.directory, "admin pages secret")
    assert not check_admin_password(web.mox.directory, "admin pages secreT")
    web.mox.mox("setadminpassword", input="another one\n")
    assert json.loads(path.read_text())["salt"] != stored["salt"]
    assert check_admin_password(web.mox.directory, "another one")
    assert not check_admin_password(web.mox.directory / "nowhere", "another one")
    assert web.mox.mox("setadminpassword", input="\n", check=False).returncode != 0


def test_the_login_page_is_served_for_the_account_path_only(web):
    with web.client() as c:
        assert c.get(web.url("/account")).status_code == 303  # the pipeline adds the slash
        r = c.get(web.url("/account/login"))
        assert r.status_code == 200 and 'name="password"' in r.text
        assert 'autocomplete="current-password"' in r.text and '<label for="password">' in r.text
        assert c.get(web.url("/other/")).status_code == 404
