"""The web UI framework (mox_core.webui) through the account pages as an ASGI app: login and
its throttle, sessions and their cookie, logout, CSRF and the same-origin check, the security
headers and the static files."""

from __future__ import annotations

import re

import httpx
import pytest

from mox_core.webui import SessionStore
from mox_core.webui.security import same_origin
from mox_core.webui.sessions import end_sessions
from tests.accountweb import PASSWORD, AccountASGI, csrf_of


@pytest.fixture
def ui(tmp_path):
    return AccountASGI(tmp_path)


def _cookie(resp: httpx.Response, name: str) -> str | None:
    for header in resp.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return header
    return None


# -- login ---------------------------------------------------------------------------------


@pytest.mark.parametrize("username", ["alice@example.org", "ALICE@example.org", "alice"])
async def test_login_with_an_address_or_the_account_name(ui, username):
    async with ui.client() as c:
        r = await ui.login(c, username)
        assert r.status_code == 303 and r.headers["location"] == "/account/"
        page = await c.get("/account/")
        assert page.status_code == 200
        assert "Alice Liddell" in page.text and "alice@example.org" in page.text


@pytest.mark.parametrize(("username", "password"), [
    ("alice@example.org", "wrong-password"),
    ("nobody@example.org", PASSWORD),  # the catch-all's: not a login
    ("carol", PASSWORD),
    ("", PASSWORD),
])
async def test_a_wrong_login_is_refused_and_gives_no_session(ui, username, password):
    async with ui.client() as c:
        r = await ui.login(c, username, password)
        assert r.status_code == 403
        assert "Wrong email address or password." in r.text
        assert _cookie(r, "mox_account_session") is None
        assert (await c.get("/account/")).status_code == 303


async def test_after_10_failures_the_right_password_is_refused_with_the_time_to_wait(ui):
    async with ui.client(ip="192.0.2.66") as c:
        for _ in range(10):
            assert (await ui.login(c, "alice", "wrong")).status_code == 403
        ui.now += 15
        r = await ui.login(c, "alice", PASSWORD)
        assert r.status_code == 429
        assert "Too many failed logins from your address; try again in 45 seconds." in r.text
        assert _cookie(r, "mox_account_session") is None
        async with ui.client(ip="192.0.2.67") as other:  # another address is not held up
            assert (await ui.login(other)).status_code == 303
        ui.now += 46  # the first failure left the one-minute window
        assert (await ui.login(c)).status_code == 303


async def test_the_password_form_counts_failures_in_the_same_throttle(ui):
    async with ui.client(ip="192.0.2.70") as c:
        await ui.login(c)
        for _ in range(10):
            r = await ui.post(c, "/account/password", {"current": "guess", "new": "newpass-123",
                                                        "repeat": "newpass-123"})
            assert "The current password is not right." in r.text
        r = await ui.post(c, "/account/password", {"current": PASSWORD, "new": "newpass-123", "repeat": "newpass-123"})
        assert "Too many failed logins from your address" in r.text
        assert ui.password_is("alice", PASSWORD)


# -- sessions and cookies ------------------------------------------------------------------


@pytest.mark.parametrize("https", [False, True])
async def test_the_session_cookie_flags(ui, https):
    async with ui.client(https=https) as c:
        r = await ui.login(c)
        cookie = _cookie(r, "mox_account_session")
        assert cookie is not None
        attrs = [a.strip() for a in cookie.split(";")]
        value = attrs[0].split("=", 1)[1]
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", value)  # 256 random bits
        assert "HttpOnly" in attrs and "SameSite=Strict" in attrs and "Path=/account/" in attrs
        assert ("Secure" in attrs) is https


async def test_a_cookie_set_before_the_login_is_never_promoted(ui):
    async with ui.client() as c:
        c.cookies.set("mox_account_session", "planted-by-an-attacker-" + "x" * 20, path="/account/")
        r = await ui.login(c)
        new = _cookie(r, "mox_account_session")
        assert new is not None and "planted-by-an-attacker" not in new
        first = new.split(";")[0].split("=", 1)[1]
        assert ui.sessions.get("account", "planted-by-an-attacker-" + "x" * 20) is None
        # a login over a live session (the login page now redirects: post the form directly)
        # replaces it too
        token = "T" * 43
        c.cookies.set("mox_account_login", token, path="/account/")
        r = await c.post("/account/login", data={"csrf": token, "username": "alice", "password": PASSWORD},
                         headers={"origin": "http://mail.example.org"})
        assert r.status_code == 303
        second = _cookie(r, "mox_account_session").split(";")[0].split("=", 1)[1]
        assert second != first
        assert ui.sessions.get("account", first) is None
        assert ui.sessions.get("account", second) is not None


async def test_logout_ends_the_session_on_the_server(ui):
    async with ui.client() as c:
        r = await ui.login(c)
        sid = _cookie(r, "mox_account_session").split(";")[0].split("=", 1)[1]
        r = await ui.post(c, "/account/logout", {})
        assert r.status_code == 303 and r.headers["location"] == "/account/login?loggedout=1"
        assert "Max-Age=0" in _cookie(r, "mox_account_session")
        assert ui.sessions.get("account", sid) is None
    async with ui.client() as replay:  # the old cookie, replayed, opens nothing
        replay.cookies.set("mox_account_session", sid, path="/account/")
        assert (await replay.get("/account/")).status_code == 303


async def test_sessions_end_after_the_idle_and_the_absolute_timeout(ui):
    async with ui.client() as c:
        await ui.login(c)
        for _ in range(7):  # active every 23 hours: the idle timeout never hits ...
            ui.now += 23 * 3600
            assert (await c.get("/account/")).status_code == 200
        ui.now += 23 * 3600  # ... but after 7 days the session ends anyway
        assert (await c.get("/account/")).status_code == 303
    async with ui.client() as c:
        await ui.login(c)
        ui.now += 24 * 3600 + 1
        assert (await c.get("/account/")).status_code == 303


def test_sessions_survive_a_restart_and_the_database_holds_no_session_id(tmp_path):
    store = SessionStore.for_data_dir(tmp_path)
    s = store.create("account", "alice")
    store.close()
    again = SessionStore.for_data_dir(tmp_path)  # as the next web process opens it
    assert again.get("account", s.id).principal == "alice"
    assert again.get("admin", s.id) is None  # a session belongs to one service
    raw = b"".join(p.read_bytes() for p in (tmp_path / "web").iterdir())
    assert s.id.encode() not in raw
    assert ((tmp_path / "web" / "sessions.db").stat().st_mode & 0o777) == 0o600


def test_end_sessions_ends_one_principals_sessions_of_one_service(tmp_path):
    assert end_sessions(tmp_path, "account", "alice") == 0
    assert not (tmp_path / "web").exists()  # no login ever: no sessions file made for nothing
    store = SessionStore.for_data_dir(tmp_path)
    alice = [store.create("account", "alice") for _ in range(2)]
    bob = store.create("account", "bob")
    admin = store.create("admin", "alice")  # another service's principal of the same name
    assert end_sessions(tmp_path, "account", "alice") == 2
    assert [store.get("account", s.id) for s in alice] == [None, None]
    assert store.get("account", bob.id).principal == "bob"
    assert store.get("admin", admin.id).principal == "alice"
    assert end_sessions(tmp_path, "account", "alice") == 0


async def test_a_removed_account_loses_its_sessions(ui, tmp_path):
    async with ui.client() as c:
        await ui.login(c, "bob@example.org", "bob-secret-1")
        assert (await c.get("/account/")).status_code == 200
        text = (tmp_path / "domains.toml").read_text()
        (tmp_path / "domains.toml").write_text(text.split("[accounts.bob]")[0])
        ui.holder.check_now()
        assert ui.cfg.account("bob") is not None and ui.holder.get().account("bob") is None
        assert (await c.get("/account/")).status_code == 303
        assert ui.sessions.count("account", "bob") == 0


async def test_the_login_returns_to_the_page_asked_for_and_only_to_ours(ui):
    async with ui.client() as c:
        r = await c.get("/account/messages?page=2")
        assert r.status_code == 303 and r.headers["location"] == "/account/login?next=%2Fmessages%3Fpage%3D2"
        r = await ui.login(c, next="/messages?page=2")
        assert r.headers["location"] == "/account/messages?page=2"
    for bad in ("//evil.example/", "https://evil.example/", "/\\evil.example", "messages"):
        async with ui.client() as c:
            r = await ui.login(c, next=bad)
            assert r.headers["location"] == "/account/"


# -- CSRF and origin -----------------------------------------------------------------------


async def test_a_post_without_the_token_is_refused_and_changes_nothing(ui):
    async with ui.client() as c:
        await ui.login(c)
        r = await ui.post(c, "/account/password", {"current": PASSWORD, "new": "changed-123", "repeat": "changed-123"},
                          csrf=False)
        assert r.status_code == 403
        r = await ui.post(c, "/account/password", {"csrf": "A" * 43, "current": PASSWORD, "new": "changed-123",
                                                   "repeat": "changed-123"}, csrf=False)
        assert r.status_code == 403
        assert ui.password_is("alice", PASSWORD) and not ui.password_is("alice", "changed-123")


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://mail.example.org:8080",
                                    "https://mail.example.org", None])
async def test_a_post_from_another_origin_is_refused_and_changes_nothing(ui, origin):
    async with ui.client() as c:
        await ui.login(c)
        r = await ui.post(c, "/account/password", {"current": PASSWORD, "new": "changed-123", "repeat": "changed-123"},
                          origin=origin)
        assert r.status_code == 403
        assert "Nothing was changed" in r.text
        assert ui.password_is("alice", PASSWORD)
        r = await ui.post(c, "/account/logout", {}, origin=origin)
        assert r.status_code == 403
        assert (await c.get("/account/")).status_code == 200  # still logged in


async def test_without_origin_a_referer_of_ours_will_do(ui):
    async with ui.client() as c:
        await ui.login(c)
        token = csrf_of((await c.get("/account/password")).text)
        r = await c.post("/account/password", data={"csrf": token, "current": PASSWORD, "new": "changed-123",
                                                    "repeat": "changed-123"},
                         headers={"referer": "http://mail.example.org/account/password"})
        assert r.status_code == 303
        assert ui.password_is("alice", "changed-123")


async def test_the_login_form_needs_its_token_and_our_origin(ui):
    async with ui.client() as c:
        page = await c.get("/account/login")
        token = csrf_of(page.text)
        form = {"csrf": token, "username": "alice", "password": PASSWORD}
        r = await c.post("/account/login", data=form, headers={"origin": "http://evil.example"})
        assert r.status_code == 403 and _cookie(r, "mox_account_session") is None
        r = await c.post("/account/login", data={**form, "csrf": "B" * 43},
                         headers={"origin": "http://mail.example.org"})
        assert r.status_code == 403 and _cookie(r, "mox_account_session") is None
        assert ui.sessions.count("account", "alice") == 0


async def test_get_changes_nothing(ui):
    async with ui.client() as c:
        await ui.login(c)
        r = await c.get("/account/logout")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert (await c.get("/account/")).status_code == 200
        assert ui.sessions.count("account", "alice") == 1


def test_same_origin_compares_host_and_port():
    def scope(host: str, scheme: str = "http", **headers: str) -> dict:
        return {"scheme": scheme, "headers": [(b"host", host.encode())] + [
            (k.encode(), v.encode()) for k, v in headers.items()]}

    assert same_origin(scope("mail.example.org", origin="http://mail.example.org"))
    assert same_origin(scope("mail.example.org", origin="http://MAIL.example.org:80"))
    assert same_origin(scope("mail.example.org:443", "https", origin="https://mail.example.org"))
    assert same_origin(scope("[::1]:8080", origin="http://[::1]:8080"))
    assert not same_origin(scope("mail.example.org", origin="http://mail.example.org.evil.example"))
    assert not same_origin(scope("mail.example.org", origin="https://mail.example.org"))  # port 443, not 80
    assert not same_origin(scope("mail.example.org"))
    assert not same_origin(scope("mail.example.org", origin="javascript:alert(1)"))


# -- headers and static files --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/account/login", "/account/", "/account/messages", "/account/nothing-here"])
async def test_every_page_has_the_security_headers(ui, path):
    async with ui.client() as c:
        await ui.login(c)
        r = await c.get(path)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"
        assert r.headers["cache-control"] == "no-store"
        assert "<script" not in r.text and " style=" not in r.text  # nothing the policy would block


async def test_static_files_have_a_content_hash_in_the_url_and_are_cached_long(ui):
    async with ui.client() as c:
        page = (await c.get("/account/login")).text
        css = re.search(r'href="(/account/static/([0-9a-f]{16})/mox\.css)"', page)
        assert css is not None
        r = await c.get(css.group(1))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert ":focus-visible" in r.text
        old = await c.get("/account/static/0000000000000000/mox.css")
        assert old.status_code == 200 and old.headers["cache-control"] == "no-cache"
        assert (await c.get(f"/account/static/{css.group(2)}/nothing.css")).status_code == 404
        assert (await c.get(f"/account/static/{css.group(2)}/..%2F__init__.py")).status_code == 404


# -- the pipeline mounts the pages ----------------------------------------------------------


@pytest.mark.parametrize("forwarded", [False, True])
async def test_the_pipeline_mounts_the_account_pages_with_the_client_as_the_proxy_saw_it(tmp_path, forwarded):
    from mox_core.config.holder import ConfigHolder
    from mox_core.testing import load
    from mox_core.web.pipeline import WebApp
    from mox_core.web.ports import web_ports

    cfg = load(tmp_path, f"""
[listeners.local]
ips = ["127.0.0.1"]
[listeners.local.account_http]
enabled = true
port = 8080
path = "/account/"
forwarded = {str(forwarded).lower()}
""")
    seen: list[dict] = []

    async def account(scope, receive, send):
        seen.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = WebApp(ConfigHolder(cfg), web_ports(cfg.static), {"account": account})
    scope = {"type": "http", "method": "GET", "path": "/account/messages", "raw_path": b"/account/messages",
             "root_path": "", "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 8080),
             "client": ("10.0.0.5", 5555), "http_version": "1.1",
             "headers": [(b"host", b"127.0.0.1:8080"), (b"x-forwarded-for", b"198.51.100.7, 10.0.0.5"),
                         (b"x-forwarded-proto", b"https")]}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 204
    (sub,) = seen
    assert sub["root_path"] == "/account" and sub["path"] == "/account/messages"
    if forwarded:
        assert sub["client"][0] == "198.51.100.7" and sub["scheme"] == "https"
    else:
        assert sub["client"][0] == "10.0.0.5" and sub["scheme"] == "http"


# -- a second app on the framework ---------------------------------------------------------


async def test_a_second_app_with_a_password_only_login_keeps_its_own_sessions(ui, tmp_path):
    from starlette.responses import HTMLResponse

    from mox_core.accounts.adminpasswd import check_admin_password, set_admin_password
    from mox_core.webui import WebUI

    set_admin_password(tmp_path, "admin-pages-pw")
    admin = WebUI("admin", "Admin", lambda _user, pw: "admin" if check_admin_password(tmp_path, pw) else None,
                  ui.sessions, ui.limiter, user_label=None, nav=[("Home", "/")])

    @admin.page("/")
    async def home(page):
        return HTMLResponse(f"<p>admin home of {page.principal}</p>")

    admin_app = admin.app()

    async def both(scope, receive, send):  # mounted as the pipeline mounts them
        if scope["type"] == "http" and scope["path"].startswith("/admin/"):
            await admin_app({**scope, "root_path": "/admin"}, receive, send)
        else:
            await ui.app({**scope, "root_path": "/account"}, receive, send)

    transport = httpx.ASGITransport(app=both, client=("192.0.2.20", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://mail.example.org") as c:
        await ui.login(c)
        account_sid = c.cookies.get("mox_account_session")
        r = await c.get("/admin/")
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"
        c.cookies.set("mox_admin_session", account_sid, path="/admin/")  # an account session is no admin one
        assert (await c.get("/admin/")).status_code == 303
        c.cookies.delete("mox_admin_session")
        login = await c.get("/admin/login")
        assert 'name="username"' not in login.text and 'name="password"' in login.text
        token = csrf_of(login.text)
        r = await c.post("/admin/login", data={"csrf": token, "password": PASSWORD},
                         headers={"origin": "http://mail.example.org"})
        assert r.status_code == 403 and "Wrong password." in r.text
        r = await c.post("/admin/login", data={"csrf": token, "password": "admin-pages-pw"},
                         headers={"origin": "http://mail.example.org"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/"
        assert "Path=/admin/" in r.headers["set-cookie"]
        assert (await c.get("/admin/")).text == "<p>admin home of admin</p>"
        assert (await c.get("/account/")).status_code == 200  # both logged in, each on its own
