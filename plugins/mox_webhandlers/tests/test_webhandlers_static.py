"""The ``static`` handler kind: files, directories, listings, conditional and range
requests, declining, and never a byte from outside the root."""

from __future__ import annotations

import os
import re
from email.utils import formatdate

import pytest

from plugins.mox_webhandlers.tests.webhandlers_helpers import DECLINED, build, call, client

SECRET = b"TOPSECRET"


@pytest.fixture
def site(tmp_path):
    """www/ with files, a listing directory and symlinks in and out; secrets outside it."""
    root = tmp_path / "www"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "noindex").mkdir()
    (root / "index.html").write_text("<p>home</p>")
    (root / "a.txt").write_text("hello text")
    (root / "data.bin").write_bytes(bytes(range(256)) * 4)
    (root / "README").write_text("plain words\n")
    (root / "blob").write_bytes(b"\x00\x01\x02binary")
    (root / "sub" / "b.css").write_text("p{}")
    (root / "sub" / "<b>&\"x\" y.txt").write_text("odd name")
    with open(root / "sub" / "small.iso", "wb") as f:
        f.truncate(int(1.5 * 1024 * 1024))
    with open(root / "sub" / "large.iso", "wb") as f:
        f.truncate(int(12.7 * 1024 * 1024))
    os.utime(root / "sub" / "b.css", (1700000000, 1700000000))
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside" / "index.html").write_bytes(SECRET)
    (root / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    (root / "link-out-rel.txt").symlink_to("../secret.txt")
    (root / "dir-out").symlink_to(tmp_path / "outside")
    (root / "link-in.txt").symlink_to("a.txt")
    (root / "dir-in").symlink_to("sub")
    (root / "index-out").mkdir()
    (root / "index-out" / "index.html").symlink_to(tmp_path / "outside" / "index.html")
    return root


def static(tmp_path, root, extra: str = ""):
    return build(tmp_path, f'kind = "static"\ndomain = "example.org"\nroot = "{root}"\n{extra}')


async def test_serves_files_and_index_html(tmp_path, site):
    async with client(static(tmp_path, site)) as c:
        r = await c.get("/")
        assert (r.status_code, r.text) == (200, "<p>home</p>")
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        r = await c.get("/a.txt")
        assert (r.status_code, r.content) == (200, b"hello text")
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert r.headers["content-length"] == "10" and r.headers["accept-ranges"] == "bytes"
        assert r.headers["last-modified"] == formatdate((site / "a.txt").stat().st_mtime, usegmt=True)
        assert re.fullmatch(r'"[0-9a-f]+-a"', r.headers["etag"])
        assert (await c.get("/sub/b.css")).headers["content-type"] == "text/css; charset=utf-8"
        r = await c.head("/a.txt")
        assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "10")


async def test_content_type_is_sniffed_without_an_extension(tmp_path, site):
    async with client(static(tmp_path, site)) as c:
        assert (await c.get("/README")).headers["content-type"] == "text/plain; charset=utf-8"
        assert (await c.get("/blob")).headers["content-type"] == "application/octet-stream"


async def test_only_get_and_head(tmp_path, site):
    async with client(static(tmp_path, site)) as c:
        r = await c.post("/a.txt", content=b"x")
        assert (r.status_code, r.text) == (405, "405 - method not allowed")
    async with client(static(tmp_path, site, "continue_not_found = true")) as c:
        assert (await c.post("/a.txt", content=b"x")).status_code == DECLINED
        assert (await c.delete("/a.txt")).status_code == DECLINED


async def test_not_found_or_declined(tmp_path, site):
    async with client(static(tmp_path, site)) as c:
        r = await c.get("/nope.txt")
        assert (r.status_code, r.text) == (404, "404 - not found")
        assert (await c.get("/a.txt/x")).status_code == 404  # not a directory
        assert (await c.get("/a.txt/")).status_code == 404  # a file asked for as a directory
        assert (await c.get("/" + "n" * 300)).status_code == 404  # name too long
    async with client(static(tmp_path, site, "continue_not_found = true")) as c:
        for path in ("/nope.txt", "/a.txt/x", "/a.txt/", "/noindex/"):
            assert (await c.get(path)).status_code == DECLINED, path
        assert (await c.get("/a.txt")).status_code == 200


async def test_a_fifo_is_not_served(tmp_path, site):
    os.mkfifo(site / "pipe")
    r = await call(static(tmp_path, site), "/pipe")
    assert r.status == 404


async def test_directory_without_slash_redirects_keeping_the_query(tmp_path, site):
    async with client(static(tmp_path, site)) as c:
        r = await c.get("/sub?x=1&y=%20", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/sub/?x=1&y=%20"
        r = await c.get("/dir-in", follow_redirects=False)
        assert r.headers["location"] == "/dir-in/"


async def test_directory_redirect_never_points_at_another_host(tmp_path, site):
    (site / "evil.example").mkdir()
    r = await call(static(tmp_path, site), "//evil.example")
    assert r.status == 307 and r.header("location") == "/evil.example/"


async def test_directory_without_index_is_forbidden_unless_listed(tmp_path, site):
    async with client(static(tmp_path, site)) as c:
        r = await c.get("/noindex/")
        assert (r.status_code, r.text) == (403, "403 - permission denied")


async def test_listing(tmp_path, site):
    app = static(tmp_path, site, 'list_files = true\nresponse_headers = { "Content-Type" = "text/x-no", '
                                 '"Cache-Control" = "max-age=60" }')
    async with client(app) as c:
        r = await c.get("/sub/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8" and r.headers["cache-control"] == "max-age=60"
    names = re.findall(r'href="([^"]*)">([^<]*)</a>', r.text)
    assert names == [  # sorted by name: "." < "<" < "b"
        ("..", ".."), ("%3Cb%3E%26%22x%22%20y.txt", "&lt;b&gt;&amp;&quot;x&quot; y.txt"), ("b.css", "b.css"), ("deeper/", "deeper/"), ("large.iso", "large.iso"),
        ("small.iso", "small.iso"),
    ]
    assert ">2023-11-14 22:13:20<" in r.text  # b.css's time, UTC
    assert '<td title="1572864 bytes" style="text-align: right">1.50</td>' in r.text
    assert '<td title="13316915 bytes" style="text-align: right">12<span' in r.text
    assert "<b>" not in r.text


async def test_listing_of_the_root_has_no_parent_entry_and_head_has_no_body(tmp_path, site):
    (site / "index.html").unlink()
    app = static(tmp_path, site, "list_files = true")
    async with client(app) as c:
        r = await c.get("/")
        assert r.status_code == 200 and 'href=".."' not in r.text and 'href="a.txt"' in r.text
        h = await c.head("/")
        assert h.status_code == 200 and h.content == b"" and h.headers["content-length"] == str(len(r.content))
        empty = await c.get("/sub/deeper/")
        assert "No files." not in empty.text and 'href=".."' in empty.text  # ".." is an entry
    (site / "sub" / "deeper").rmdir()
    (site / "empty").mkdir()
    r = await call(build(tmp_path, f'kind = "static"\ndomain = "example.org"\nroot = "{site / "empty"}"\n'
                                   'list_files = true\n'), "/")
    assert b"No files." in r.body


async def test_strip_prefix(tmp_path, site):
    app = static(tmp_path, site, 'strip_prefix = "/files"\ncontinue_not_found = false')
    async with client(app) as c:
        assert (await c.get("/files/a.txt")).content == b"hello text"
        assert (await c.get("/files/")).text == "<p>home</p>"
        assert (await c.get("/a.txt")).status_code == 404
        r = await c.get("/files/sub", follow_redirects=False)
        assert r.headers["location"] == "/files/sub/"  # the request's path, with the prefix
    app = static(tmp_path, site, 'strip_prefix = "/files"\ncontinue_not_found = true')
    async with client(app) as c:
        assert (await c.get("/a.txt")).status_code == DECLINED


async def test_without_strip_prefix_the_whole_path_is_appended_to_root(tmp_path, site):
    (site / "files").mkdir()
    (site / "files" / "a.txt").write_text("in files/")
    async with client(static(tmp_path, site)) as c:
        assert (await c.get("/files/a.txt")).text == "in files/"


async def test_root_relative_to_the_working_directory(tmp_path, site, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with client(static(tmp_path, "www")) as c:
        assert (await c.get("/a.txt")).text == "hello text"


async def test_root_may_be_a_symlink_that_is_switched(tmp_path, site):
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "a.txt").write_text("version 2")
    (tmp_path / "current").symlink_to(site)
    async with client(static(tmp_path, tmp_path / "current")) as c:
        assert (await c.get("/a.txt")).text == "hello text"
        (tmp_path / "current").unlink()
        (tmp_path / "current").symlink_to(tmp_path / "v2")
        assert (await c.get("/a.txt")).text == "version 2"


async def test_response_headers_and_content_type_from_config(tmp_path, site):
    app = static(tmp_path, site, 'response_headers = { "Cache-Control" = "max-age=3600", '
                                 '"Content-Type" = "application/x-mine" }')
    async with client(app) as c:
        r = await c.get("/a.txt")
        assert r.headers["cache-control"] == "max-age=3600" and r.headers["content-type"] == "application/x-mine"
        assert r.headers.get_list("content-type") == ["application/x-mine"]
        assert (await c.get("/")).headers["content-type"] == "application/x-mine"  # index.html too
        assert "cache-control" not in (await c.get("/nope")).headers


async def test_conditional_requests(tmp_path, site):
    async with client(static(tmp_path, site, 'response_headers = { "Cache-Control" = "no-cache" }')) as c:
        r = await c.get("/a.txt")
        etag, modified = r.headers["etag"], r.headers["last-modified"]
        r = await c.get("/a.txt", headers={"If-None-Match": etag})
        assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", etag)
        assert "content-type" not in r.headers and r.headers["cache-control"] == "no-cache"
        r = await c.get("/a.txt", headers={"If-None-Match": f'"other", W/{etag}'})
        assert r.status_code == 304  # weak comparison
        assert (await c.get("/a.txt", headers={"If-None-Match": '"other"'})).status_code == 200
        assert (await c.get("/a.txt", headers={"If-Modified-Since": modified})).status_code == 304
        old = formatdate(1000000000, usegmt=True)
        assert (await c.get("/a.txt", headers={"If-Modified-Since": old})).status_code == 200
        # If-None-Match wins over If-Modified-Since
        r = await c.get("/a.txt", headers={"If-None-Match": '"other"', "If-Modified-Since": modified})
        assert r.status_code == 200
        assert (await c.get("/a.txt", headers={"If-Match": '"other"'})).status_code == 412
        assert (await c.get("/a.txt", headers={"If-Match": etag})).status_code == 200
        assert (await c.get("/a.txt", headers={"If-Unmodified-Since": old})).status_code == 412
        assert (await c.get("/", headers={"If-None-Match": (await c.get("/")).headers["etag"]})).status_code == 304


async def test_range_requests(tmp_path, site):
    data = (site / "data.bin").read_bytes()
    async with client(static(tmp_path, site)) as c:
        r = await c.get("/data.bin", headers={"Range": "bytes=10-19"})
        assert (r.status_code, r.content) == (206, data[10:20])
        assert r.headers["content-range"] == "bytes 10-19/1024" and r.headers["content-length"] == "10"
        r = await c.get("/data.bin", headers={"Range": "bytes=-4"})
        assert (r.status_code, r.content, r.headers["content-range"]) == (206, data[-4:], "bytes 1020-1023/1024")
        r = await c.get("/data.bin", headers={"Range": "bytes=1000-"})
        assert (r.status_code, r.content) == (206, data[1000:])
        r = await c.get("/data.bin", headers={"Range": "bytes=1000-5000"})
        assert (r.status_code, r.content) == (206, data[1000:])
        r = await c.head("/data.bin", headers={"Range": "bytes=0-9"})
        assert (r.status_code, r.content, r.headers["content-length"]) == (206, b"", "10")
        for bad in ("bytes=2000-", "bytes=1024-1030", "bytes=x-y", "bytes=9-3", "lines=1-2", "bytes=-0"):
            r = await c.get("/data.bin", headers={"Range": bad})
            assert r.status_code == 416, bad
            assert r.text.startswith("416 - requested range not satisfiable")
        assert r.headers["content-range"] == "bytes */1024"
        # more bytes asked for than the file has: the whole file (as Go)
        r = await c.get("/data.bin", headers={"Range": "bytes=0-1023,0-1023"})
        assert (r.status_code, r.content) == (200, data)


async def test_multiple_ranges(tmp_path, site):
    data = (site / "data.bin").read_bytes()
    async with client(static(tmp_path, site)) as c:
        r = await c.get("/data.bin", headers={"Range": "bytes=0-1,10-12"})
    assert r.status_code == 206
    ctype = r.headers["content-type"]
    boundary = ctype.split("boundary=")[1]
    assert ctype.startswith("multipart/byteranges; ")
    assert int(r.headers["content-length"]) == len(r.content)
    expected = (f"--{boundary}\r\nContent-Range: bytes 0-1/1024\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode() + data[0:2] + (f"\r\n--{boundary}\r\nContent-Range: bytes 10-12/1024\r\n"
                                          f"Content-Type: application/octet-stream\r\n\r\n").encode() + data[10:13] + \
        f"\r\n--{boundary}--\r\n".encode()
    assert r.content == expected


async def test_if_range(tmp_path, site):
    async with client(static(tmp_path, site)) as c:
        etag = (await c.get("/data.bin")).headers["etag"]
        r = await c.get("/data.bin", headers={"Range": "bytes=0-1", "If-Range": etag})
        assert r.status_code == 206
        r = await c.get("/data.bin", headers={"Range": "bytes=0-1", "If-Range": '"old"'})
        assert r.status_code == 200 and len(r.content) == 1024


async def test_permission_denied(tmp_path, site, monkeypatch):
    """As root nothing is denied, so the file system's answer is simulated."""
    from mox_webhandlers import static as mod

    real_open, real_list = mod.open_file, mod.list_dir

    def open_file(path):
        if path.endswith("a.txt") or path.endswith("noindex/index.html"):
            raise PermissionError(13, "Permission denied")
        return real_open(path)

    def list_dir(path, root):
        if path.endswith("sub"):
            raise PermissionError(13, "Permission denied")
        return real_list(path, root)

    monkeypatch.setattr(mod, "open_file", open_file)
    monkeypatch.setattr(mod, "list_dir", list_dir)
    (site / "noindex" / "index.html").write_text("x")
    async with client(static(tmp_path, site, "list_files = true")) as c:
        r = await c.get("/a.txt")
        assert (r.status_code, r.text) == (403, "403 - permission denied")
        assert (await c.get("/sub/")).status_code == 403  # listing not readable
        assert (await c.get("/noindex/")).status_code == 403  # index.html not readable
        assert (await c.get("/")).status_code == 200


# ---- never a byte from outside the root -------------------------------------------------

TRAVERSALS = [
    "/../secret.txt",
    "/sub/../../secret.txt",
    "/sub/../../outside/secret.txt",
    "/..",
    "/../",
    "/%2e%2e/secret.txt",  # a literal file name: never decoded again
    "/%252e%252e/secret.txt",
    "/..\\secret.txt",
    "/sub\\..\\..\\secret.txt",
    "/a.txt\x00.png",
    "/\x00",
    "//etc/passwd",
    "/link-out.txt",
    "/link-out-rel.txt",
    "/dir-out/secret.txt",
    "/dir-out/",
    "/dir-out/index.html",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_no_way_out_of_root(tmp_path, site, path):
    for extra in ("", "list_files = true", "continue_not_found = true"):
        r = await call(static(tmp_path, site, extra), path)
        assert SECRET not in r.body and r.status in (404, 400, DECLINED), (path, extra, r.status)
        if not extra.startswith("continue"):
            assert r.status in (404, 400), (path, extra)


async def test_escaping_paths_are_refused_not_passed_on(tmp_path, site):
    app = static(tmp_path, site, "continue_not_found = true")
    for path in ("/../secret.txt", "/link-out.txt", "/dir-out/secret.txt", "/..\\secret.txt"):
        assert (await call(app, path)).status == 404, path


async def test_absolute_path_of_a_file_outside(tmp_path, site):
    r = await call(static(tmp_path, site), str(tmp_path / "secret.txt"))
    assert r.status == 404 and SECRET not in r.body
    r = await call(static(tmp_path, site, 'strip_prefix = "/files"'), "/files" + str(tmp_path / "secret.txt"))
    assert r.status == 404 and SECRET not in r.body


async def test_traversal_through_a_client_library(tmp_path, site):
    """What httpx sends for encoded dots: decoded once by the ASGI layer, then refused."""
    async with client(static(tmp_path, site)) as c:
        for path in ("/%2e%2e/secret.txt", "/%2E%2E/%2e%2e/secret.txt", "/%252e%252e/secret.txt",
                     "/sub/%2e%2e%2f%2e%2e%2fsecret.txt", "/..%5csecret.txt", "/a.txt%00"):
            r = await c.get(path)
            assert r.status_code == 404 and SECRET not in r.content, path


async def test_symlinks_inside_root_are_followed(tmp_path, site):
    async with client(static(tmp_path, site, "list_files = true")) as c:
        assert (await c.get("/link-in.txt")).text == "hello text"
        assert (await c.get("/dir-in/b.css")).text == "p{}"
        r = await c.get("/")
        assert r.status_code == 200


async def test_index_html_symlinked_outside_is_not_served(tmp_path, site):
    r = await call(static(tmp_path, site), "/index-out/")
    assert r.status == 403 and SECRET not in r.body
    r = await call(static(tmp_path, site, "list_files = true"), "/index-out/")
    assert r.status == 200 and SECRET not in r.body and b'href="index.html"' in r.body


async def test_websocket_requests_are_refused_or_declined(tmp_path, site):
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/a.txt", "headers": [], "query_string": b"",
             "extensions": {"websocket.http.response": {}}}
    await static(tmp_path, site).app(scope, None, send)
    assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 405
    sent.clear()
    await static(tmp_path, site, "continue_not_found = true").app(scope, None, send)
    assert sent == []


async def test_a_file_swapped_after_the_check_is_not_served(tmp_path, site, monkeypatch):
    """A directory of the path replaced by a symlink between the path check and the open:
    simulated by opening the outside file; the opened descriptor is checked too."""
    from mox_webhandlers import static as mod

    real_open = mod.open_file
    monkeypatch.setattr(mod, "open_file", lambda path: real_open(str(tmp_path / "secret.txt")))
    r = await call(static(tmp_path, site), "/a.txt")
    assert r.status == 404 and SECRET not in r.body
    with pytest.raises(mod.Outside):
        mod.list_dir(str(tmp_path / "outside"), str(site))
    assert [name for name, _ in mod.list_dir(str(site / "sub" / "deeper"), str(site))] == []
