"""The admin pages' routes (global, per domain, per account, with the "which route" box),
web handlers and domain redirects, through a real ``mox serve`` over HTTP: every action
changes domains.toml keeping its comments, and the next request or the next explanation
uses the change."""

from __future__ import annotations

import html
import re

import pytest

from tests.adminweb import AdminWeb, form_fields


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    w = AdminWeb(tmp_path_factory.mktemp("admin-routes") / "mox")
    yield w
    w.stop()


def page_text(body: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


def explanation(body: str) -> list[str]:
    """The lines of the "which route" box."""
    m = re.search(r'<ol class="lines">(.*?)</ol>', body, re.S)
    assert m is not None, "no explanation on the page"
    return [html.unescape(x.strip()) for x in re.findall(r"<li[^>]*>(.*?)</li>", m.group(1), re.S)]


def routes_in_file(web: AdminWeb) -> list[str]:
    return re.findall(r'transport = "([^"]+)"', web.domains_path.read_text().split("# Global routes")[1])


# --------------------------------------------------------------------------------------------
# routes


def test_the_explain_box_shows_what_mox_routes_explain_prints(web):
    with web.admin() as c:
        for attempt in ("1", "3"):
            r = c.get(web.url(f"/admin/routes?from=alice%40example.org&to=bob%40relay.example&attempt={attempt}"))
            cli = web.mox.mox("routes", "explain", "--from", "alice@example.org", "--to", "bob@relay.example",
                              "--attempt", attempt).stdout.splitlines()
            assert explanation(r.text) == cli
        assert cli[-1] == "transport: sink (kind smtp), from global route #1"
        r = c.get(web.url("/admin/routes?from=&to=nobody&attempt=0"))
        assert "Give a recipient address and an attempt of 1 or more." in r.text


def test_a_route_is_added_and_the_next_explanation_uses_it(web):
    before = web.domains_path.read_text()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/routes", "/routes/add",
                            {"transport": "sink", "to_domain": "b.example\n.c.example", "minimum_attempts": "2"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/routes?saved=1"
        text = web.domains_path.read_text()
        assert text == before + ('\n[[routes]]\ntransport = "sink"\nminimum_attempts = 2\n'
                                 'to_domain = ["b.example", ".c.example"]\n')  # appended, the rest as it was
        lines = explanation(c.get(web.url("/admin/routes?from=alice%40example.org&to=x%40sub.c.example&attempt=2")).text)
        assert lines[2].startswith("global route #2") and "minimum_attempts = 2, but 1 attempt(s) made" in lines[2]
        assert lines[-1] == "transport: direct delivery (default, no route matched)"
        lines = explanation(c.get(web.url("/admin/routes?from=alice%40example.org&to=x%40sub.c.example&attempt=3")).text)
        assert lines[2].endswith(": MATCHES") and lines[-1] == "transport: sink (kind smtp), from global route #2"
        # the route's own page: the criteria it does not use are empty
        page = c.get(web.url("/admin/routes/2")).text
        assert form_fields(page, "/admin/routes/2")["from_domain"] == ""
        r = web.submit_form(c, "/admin/routes/2", "/routes/2", {"minimum_attempts": ""})
        assert r.status_code == 303
        assert "minimum_attempts" not in web.domains_path.read_text()
        r = web.submit_form(c, "/admin/routes", "/routes/2/remove")
        assert r.status_code == 303
    assert web.domains_path.read_text() == before


def test_routes_are_moved_with_the_comments_above_them(web):
    with web.admin() as c:
        web.submit_form(c, "/admin/routes", "/routes/add", {"transport": "sink", "to_domain": "second.example"})
        assert routes_in_file(web) == ["sink", "sink"]
        text = web.domains_path.read_text()
        assert text.index('"relay.example"') < text.index('"second.example"')
        r = web.submit_form(c, "/admin/routes", "/routes/2/move", {"to": "up"})
        assert r.status_code == 303
        text = web.domains_path.read_text()
        assert text.index('"second.example"') < text.index('"relay.example"')
        assert "# Global routes, checked last.\n\n[[routes]]" in text
        page = page_text(c.get(web.url("/admin/routes")).text)
        assert page.index("second.example") < page.index("relay.example")
        web.submit_form(c, "/admin/routes", "/routes/1/move", {"to": "down"})
        web.submit_form(c, "/admin/routes", "/routes/2/remove")
        assert "second.example" not in web.domains_path.read_text()


@pytest.mark.parametrize("changes, key, message", [
    ({"minimum_attempts": "-1"}, "minimum_attempts", "must be 0 or more"),
    ({"minimum_attempts": "two"}, "minimum_attempts", "'two' is not a whole number"),
    ({"transport": "nowhere"}, "transport", "'nowhere' is not one of sink"),
    ({"to_domain": "not a domain!"}, "to_domain", ""),
])
def test_a_bad_route_is_shown_at_its_field_and_nothing_is_written(web, changes, key, message):
    before = web.domains_path.read_bytes()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/routes", "/routes/add", {"transport": "sink", **changes})
        assert r.status_code == 400
        m = re.search(rf'id="f-{key}-error">([^<]*)<', r.text)
        assert m is not None and message in html.unescape(m.group(1))
    assert web.domains_path.read_bytes() == before


def test_routes_of_an_account_and_of_a_domain_come_first(web):
    with web.admin() as c:
        r = web.submit_form(c, "/admin/accounts/alice/routes", "/accounts/alice/routes/add",
                            {"transport": "sink", "to_domain": ".example.com"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/accounts/alice/routes?saved=1"
        r = web.submit_form(c, "/admin/domains/example.org/routes", "/domains/example.org/routes/add",
                            {"transport": "sink", "from_domain": "example.org"})
        assert r.status_code == 303
        text = web.domains_path.read_text()
        assert '[[accounts.alice.routes]]\ntransport = "sink"\nto_domain = [".example.com"]' in text
        assert '[[domains."example.org".routes]]\ntransport = "sink"\nfrom_domain = ["example.org"]' in text
        lines = explanation(c.get(web.url(
            "/admin/accounts/alice/routes?from=alice%40example.org&to=x%40www.example.com&attempt=1")).text)
        assert lines[1] == ("account alice route #1 (to_domain=('.example.com',)) -> transport 'sink': MATCHES")
        assert lines[2].startswith("domain example.org route #1") and "not considered" in lines[2]
        lines = explanation(c.get(web.url(
            "/admin/domains/example.org/routes?from=admin%40example.org&to=x%40other.example&attempt=1")).text)
        assert lines[1].startswith("domain example.org route #1") and lines[1].endswith("MATCHES")
        web.submit_form(c, "/admin/accounts/alice/routes", "/accounts/alice/routes/1/remove")
        web.submit_form(c, "/admin/domains/example.org/routes", "/domains/example.org/routes/1/remove")
        text = web.domains_path.read_text()
        assert "accounts.alice.routes" not in text and 'domains."example.org".routes' not in text


# --------------------------------------------------------------------------------------------
# web handlers and redirects


def test_a_static_handler_is_added_and_serves_the_next_request(web, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from the admin test\n")
    with web.admin() as c:
        page = c.get(web.url("/admin/web/add?kind=static")).text
        assert "Settings of kind static (plugin webhandlers)" in page and "Directory whose files are served" in page
        r = web.submit_form(c, "/admin/web/add?kind=static", "/web/add", {
            "domain": "www.example.org", "path_regexp": "^/files/", "dont_redirect_plaintext": "true",
            "root": str(tmp_path), "strip_prefix": "/files", "response_headers": "X-Served-By = the admin test"})
        assert r.status_code == 303
        text = web.domains_path.read_text()
        assert ('[[web_handlers]]\nkind = "static"\ndomain = "www.example.org"\npath_regexp = "^/files/"\n'
                'dont_redirect_plaintext = true\n') in text
        assert "compress" not in text and "list_files" not in text  # defaults are not written
        got = web.client().get(web.url("/files/hello.txt"), headers={"host": "www.example.org"})
        assert got.status_code == 200 and got.text == "hello from the admin test\n"
        assert got.headers["x-served-by"] == "the admin test"
        r = web.submit_form(c, "/admin/web/1", "/web/1", {"response_headers": "X-Served-By = edited"})
        assert r.status_code == 303
        got = web.client().get(web.url("/files/hello.txt"), headers={"host": "www.example.org"})
        assert got.headers["x-served-by"] == "edited"


def test_handlers_are_reordered_and_removed(web, tmp_path):
    with web.admin() as c:
        for domain in ("one.example.org", "two.example.org"):
            r = web.submit_form(c, "/admin/web/add?kind=redirect", "/web/add", {
                "domain": domain, "dont_redirect_plaintext": "true", "base_url": "https://example.org"})
            assert r.status_code == 303
        order = re.findall(r'domain = "(\w+)\.example\.org"', web.domains_path.read_text())
        n = len(order)
        assert order[-2:] == ["one", "two"]
        web.submit_form(c, "/admin/web", f"/web/{n}/move", {"to": "up"})
        assert re.findall(r'domain = "(\w+)\.example\.org"', web.domains_path.read_text())[-2:] == ["two", "one"]
        got = web.client().get(web.url("/x"), headers={"host": "two.example.org"})
        assert got.status_code == 308 and got.headers["location"] == "https://example.org/x"
        web.submit_form(c, "/admin/web", f"/web/{n}/remove")
        web.submit_form(c, "/admin/web", f"/web/{n - 1}/remove")
        assert "one.example.org" not in web.domains_path.read_text()
        assert web.client().get(web.url("/x"), headers={"host": "two.example.org"}).status_code == 404


@pytest.mark.parametrize("changes, key, message", [
    ({"path_regexp": "files/"}, "path_regexp", "path regexp must start with a ^"),
    ({"strip_prefix": "files"}, "strip_prefix", "must start with a slash"),
    ({"response_headers": "Bad Name = x"}, "response_headers", 'static: bad header "Bad Name"'),
    ({"root": ""}, "root", "a value is required"),
])
def test_a_bad_handler_is_shown_at_its_field_and_nothing_is_written(web, changes, key, message):
    before = web.domains_path.read_bytes()
    with web.admin() as c:
        r = web.submit_form(c, "/admin/web/add?kind=static", "/web/add",
                            {"domain": "bad.example.org", "root": "/srv", **changes})
        assert r.status_code == 400
        m = re.search(rf'id="f-{key}-error">([^<]*)<', r.text)
        assert m is not None and message in html.unescape(m.group(1)), r.text
    assert web.domains_path.read_bytes() == before


def test_an_unknown_handler_kind_has_no_form(web):
    with web.admin() as c:
        assert c.get(web.url("/admin/web/add?kind=nosuchkind")).status_code == 404


def test_a_domain_redirect_is_added_and_removed(web):
    with web.admin() as c:
        r = web.submit_form(c, "/admin/web", "/web/redirects/add", {"from": "old.example.org", "to": "example.org"})
        assert r.status_code == 303
        assert '[web_domain_redirects]\n"old.example.org" = "example.org"' in web.domains_path.read_text()
        got = web.client().get(web.url("/page?q=1"), headers={"host": "old.example.org"})
        assert got.status_code in (301, 308) and got.headers["location"] == "https://example.org/page?q=1"
        r = web.submit_form(c, "/admin/web", "/web/redirects/add", {"from": "old.example.org", "to": "example.org"})
        assert r.status_code == 400 and "old.example.org is redirected already" in r.text
        r = web.submit_form(c, "/admin/web", "/web/redirects/remove")
        assert r.status_code == 303 and "web_domain_redirects" not in web.domains_path.read_text()
        assert web.client().get(web.url("/page"), headers={"host": "old.example.org"}).status_code == 404
