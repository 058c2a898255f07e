"""The ``redirect`` handler kind: targets, path rewriting as Go's regexp does, declining a
redirect to itself (http -> https on ^/), and no header injection or open redirect."""

from __future__ import annotations

import re

import pytest

from plugins.mox_webhandlers.tests.webhandlers_helpers import DECLINED, AsCore, build, call, client, raw_request, serve


def redirect(tmp_path, extra: str, path_regexp: str = "^/"):
    return build(tmp_path, f'kind = "redirect"\ndomain = "example.org"\npath_regexp = "{path_regexp}"\n{extra}')


async def location(app, url: str, base: str = "https://example.org", **kwargs) -> tuple[int, str | None]:
    async with client(app, base_url=base) as c:
        r = await c.get(url, follow_redirects=False, **kwargs)
    return r.status_code, r.headers.get("location")


async def test_base_url_with_path_rewrite(tmp_path):
    app = redirect(tmp_path, 'base_url = "https://www.example.org"\norig_path_regexp = "^/old/(.*)$"\n'
                             'replace_path = "/new/$1"')
    assert await location(app, "/old/page?x=1") == (308, "https://www.example.org/new/page?x=1")
    async with client(app) as c:
        r = await c.get("/other", follow_redirects=False)
    assert (r.status_code, r.text) == (404, "404 - not found")  # handled, not declined


async def test_base_url_keeps_the_path(tmp_path):
    app = redirect(tmp_path, 'base_url = "https://www.example.org/"')
    assert await location(app, "/some/path?q=1") == (308, "https://www.example.org/some/path?q=1")
    assert await location(app, "/") == (308, "https://www.example.org/")


async def test_relative_redirect_without_base_url(tmp_path):
    app = redirect(tmp_path, 'orig_path_regexp = "^/old/(.*)$"\nreplace_path = "/new/$1"\nstatus_code = 302')
    assert await location(app, "/old/a/b?x=1&y=2") == (302, "/new/a/b?x=1&y=2")
    app = redirect(tmp_path, 'orig_path_regexp = "^/a/b$"\nreplace_path = "c"')
    assert await location(app, "/a/b") == (308, "/a/c")  # relative to the request's directory, as Go
    app = redirect(tmp_path, 'orig_path_regexp = "^/a/(.*)$"\nreplace_path = "/x/../y/$1"')
    assert await location(app, "/a/z/") == (308, "/y/z/")  # cleaned, trailing slash kept


async def test_query_and_fragment_of_base_url(tmp_path):
    app = redirect(tmp_path, 'base_url = "https://example.com/?utm=1#top"')
    assert await location(app, "/p?a=b") == (308, "https://example.com/p?utm=1&a=b#top")
    assert await location(app, "/p") == (308, "https://example.com/p?utm=1#top")
    app = redirect(tmp_path, 'base_url = "https://example.com"')
    assert await location(app, "/p?a=b") == (308, "https://example.com/p?a=b")
    assert await location(app, "/p") == (308, "https://example.com/p")


async def test_scheme_less_base_url(tmp_path):
    app = redirect(tmp_path, 'base_url = "//other.example"\nstatus_code = 301')
    assert await location(app, "/x?y") == (301, "//other.example/x?y")


@pytest.mark.parametrize("code", [300, 301, 302, 303, 307, 308, 399])
async def test_status_code(tmp_path, code):
    app = redirect(tmp_path, f'base_url = "https://example.com"\nstatus_code = {code}')
    assert (await location(app, "/x"))[0] == code


async def test_http_to_https_on_all_paths_declines_for_https(tmp_path):
    app = redirect(tmp_path, 'base_url = "https://example.org"')
    assert await location(app, "/x?q=1", base="http://example.org") == (308, "https://example.org/x?q=1")
    assert await location(app, "/x?q=1", base="https://example.org") == (DECLINED, None)
    # the host comparison includes the port
    app = redirect(tmp_path, 'base_url = "https://example.org:8443"')
    assert await location(app, "/x", base="https://example.org:8443") == (DECLINED, None)
    assert await location(app, "/x", base="https://example.org") == (308, "https://example.org:8443/x")
    # another host, or another path: no loop, so redirected
    app = redirect(tmp_path, 'base_url = "https://www.example.org"')
    assert await location(app, "/x", base="https://example.org") == (308, "https://www.example.org/x")
    app = redirect(tmp_path, 'base_url = "https://example.org"\norig_path_regexp = "^/a$"\nreplace_path = "/b"')
    assert await location(app, "/a", base="https://example.org") == (308, "https://example.org/b")


async def test_relative_redirect_to_itself_declines(tmp_path):
    app = redirect(tmp_path, 'orig_path_regexp = "^/(.*)$"\nreplace_path = "/$1"')
    assert await location(app, "/same") == (DECLINED, None)


@pytest.mark.parametrize(("regexp", "replace", "path", "expected"), [
    ("^/(a)(b)$", "/$2$1", "/ab", "/ba"),
    ("^/(a)(b)$", "/${2}x${1}", "/ab", "/bxa"),
    ("^/(?P<first>a)b$", "/${first}!", "/ab", "/a%21"),  # escaped as Go's EscapedPath
    ("^/(a)b$", "/$1x", "/ab", "/"),  # $1x is the group named "1x": none, so empty
    ("^/(a)b$", "/$$1", "/ab", "/$1"),
    ("^/(a)b$", "/$9", "/ab", "/"),  # no such group
    ("^/(a)b$", "/$", "/ab", "/$"),
    ("^/(a)?b$", "/<$1>", "/b", "/%3C%3E"),  # unmatched group
    ("a", "b", "/banana", "/bbnbnb"),  # every match
    ("x*", "-", "/abxd", "/-/-a-b-d-"),  # empty matches as Go: none right after a match
])
async def test_replacement_as_go(tmp_path, regexp, replace, path, expected):
    app = redirect(tmp_path, f'base_url = "https://x.example"\norig_path_regexp = "{regexp}"\n'
                             f'replace_path = "{replace}"')
    status, loc = await location(app, path)
    assert (status, loc) == (308, "https://x.example" + expected)


async def test_path_is_percent_encoded(tmp_path):
    app = redirect(tmp_path, 'base_url = "https://x.example"')
    assert await location(app, "/a b/é?q=%C3%A9") == (308, "https://x.example/a%20b/%C3%A9?q=%C3%A9")
    r = await call(app, "/a?b#c")
    assert r.header("location") == "https://x.example/a%3Fb%23c"


async def test_body_for_get_not_head(tmp_path):
    app = redirect(tmp_path, 'base_url = "https://x.example"')
    async with client(app) as c:
        r = await c.get("/a", follow_redirects=False)
        assert r.text == '<a href="https://x.example/a">Permanent Redirect</a>.\n'
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        r = await c.head("/a", follow_redirects=False)
        assert r.content == b"" and r.headers["location"] == "https://x.example/a"
        r = await c.post("/a", follow_redirects=False)
        assert r.status_code == 308 and r.content == b""


# ---- no header injection, no open redirect ------------------------------------------------

INJECTED = ["/x\r\nSet-Cookie: a=1", "/x\nSet-Cookie: a=1", "/x\rSet-Cookie: a=1", "/x\x00y", "/x\x7fy"]


@pytest.mark.parametrize("path", INJECTED)
@pytest.mark.parametrize("extra", [
    'base_url = "https://x.example"',
    'orig_path_regexp = "(?s)^/(.*)$"\nreplace_path = "/new/$1"',
    'base_url = "https://x.example"\norig_path_regexp = "(?s)^/x(.*)$"\nreplace_path = "/y$1"',
])
async def test_no_control_characters_in_location(tmp_path, path, extra):
    r = await call(redirect(tmp_path, extra), path, query=b"a=\r\nSet-Cookie: b=2")
    [loc] = r.all("location")
    assert r.status == 308 and not re.search(r"[\x00-\x20\x7f]", loc), loc
    assert r.header("set-cookie") is None
    assert "%0D%0A" in loc or "%0A" in loc or "%0D" in loc or "%00" in loc or "%7F" in loc


async def test_encoded_crlf_through_a_real_server(tmp_path):
    app = redirect(tmp_path, 'orig_path_regexp = "(?s)^/(.*)$"\nreplace_path = "/new/$1"')
    async with serve(app) as hostport:
        raw = await raw_request(hostport, b"GET /x%0d%0aSet-Cookie:%20evil=1?q=%0d%0aX:%20y HTTP/1.1\r\n"
                                          b"Host: example.org\r\nConnection: close\r\n\r\n")
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 308 ")
    assert b"\r\nset-cookie" not in head and b"\r\nx: y" not in head
    assert b"\r\nlocation: /new/x%0d%0aset-cookie:%20evil=1?q=%0d%0ax:%20y\r\n" in head


@pytest.mark.parametrize("path", ["//evil.example/x", "///evil.example/x", "/\\evil.example"])
async def test_no_redirect_to_another_host(tmp_path, path):
    app = redirect(tmp_path, 'orig_path_regexp = "^/(.*)$"\nreplace_path = "/$1/"')
    r = await call(app, path)
    loc = r.header("location")
    assert loc.startswith("/") and not loc.startswith("//") and not loc.startswith("/\\"), loc
    app = redirect(tmp_path, 'orig_path_regexp = "^/r/(.*)$"\nreplace_path = "/$1"')
    r = await call(app, "/r//evil.example/x")
    assert r.header("location") == "/evil.example/x"


async def test_websocket_gets_the_redirect_as_http_response(tmp_path):
    app = redirect(tmp_path, 'base_url = "https://x.example"')
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "scheme": "ws", "headers": [(b"host", b"example.org")],
             "query_string": b"", "extensions": {"websocket.http.response": {}}}
    await AsCore(app.app)(scope, None, send)
    assert sent[0]["status"] == 308 and (b"location", b"https://x.example/ws") in sent[0]["headers"]
