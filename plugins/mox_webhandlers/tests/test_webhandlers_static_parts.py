"""The ``static`` handler's parts one by one: the root check, the path resolution, what a
lookup returns, the listing's rows as written, and the answers to errors (I/O, permission,
a file or directory swapped between the check and the open)."""

from __future__ import annotations

import errno
import os

import pytest

from mox_webhandlers import static as mod
from plugins.mox_webhandlers.tests.webhandlers_helpers import DECLINED, build, call

MiB = 1024 * 1024


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<p>home</p>")
    (root / "a.txt").write_text("hello text")
    (root / "sub" / "b.txt").write_text("bee")
    (root / "dir-in").symlink_to("sub")
    (tmp_path / "secret.txt").write_text("SECRET")
    return root


def static(tmp_path, root, extra: str = ""):
    return build(tmp_path, f'kind = "static"\ndomain = "example.org"\nroot = "{root}"\n{extra}')


def test_under_a_root_of_slash_and_a_root_ending_in_a_space():
    assert mod.under("/etc/passwd", "/")
    assert mod.under("/srv/www /a.txt", "/srv/www ")  # only a trailing separator is ignored
    assert not mod.under("/srv/www/a.txt", "/srv/www ")
    assert not mod.under("/srv/wwwx/a.txt", "/srv/www")
    assert mod.under("/srv/www", "/srv/www")


def test_resolve_refuses_dot_dot_even_when_it_stays_inside(www):
    with pytest.raises(mod.Outside):
        mod.resolve(str(www), "/sub/../a.txt")
    with pytest.raises(mod.Outside):
        mod.resolve(str(www), "/sub\\x")


def test_resolve_takes_a_nul_byte_for_a_missing_file(www):
    with pytest.raises(FileNotFoundError) as exc:
        mod.resolve(str(www), "/a.txt\x00.png")
    assert exc.value.errno == errno.ENOENT


async def test_a_dot_dot_inside_the_root_is_refused_not_passed_on(tmp_path, www):
    for extra in ("", "continue_not_found = true"):
        r = await call(static(tmp_path, www, extra), "/sub/../a.txt")
        assert (r.status, r.body) == (404, b"404 - not found"), extra


def test_lookup_names_the_real_path_and_root(tmp_path, www):
    (tmp_path / "current").symlink_to(www)
    real = os.path.realpath(www)
    assert mod.lookup(str(tmp_path / "current"), "/dir-in") == mod.Found("dir", f"{real}/sub", root=real)
    found = mod.lookup(str(tmp_path / "current"), "/sub/b.txt")
    try:
        assert (found.kind, found.path, found.root, found.file.name) == ("file", f"{real}/sub/b.txt", real, "b.txt")
        assert os.read(found.file.fd, 10) == b"bee"
        assert found.file.head == b"bee"  # read with the lookup: a small file needs no second trip
    finally:
        os.close(found.file.fd)


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


async def test_a_file_replaced_by_a_directory_before_the_open_is_not_served(tmp_path, www, monkeypatch):
    opened = []

    def open_file(path):
        opened.append(os.open(www / "sub", os.O_RDONLY))
        return opened[-1]

    monkeypatch.setattr(mod, "open_file", open_file)
    r = await call(static(tmp_path, www), "/a.txt")
    assert (r.status, r.body) == (404, b"404 - not found")
    assert (await call(static(tmp_path, www, "continue_not_found = true"), "/a.txt")).status == DECLINED
    assert len(opened) == 2 and all(closed(fd) for fd in opened)


@pytest.mark.parametrize("error, status, text", [
    (errno.EIO, 500, b"500 - internal server error"),
    (errno.EACCES, 403, b"403 - permission denied"),
])
@pytest.mark.parametrize("step", ["check", "first-read"])
async def test_an_error_after_the_open_is_answered_and_the_file_closed(tmp_path, www, monkeypatch, error, status,
                                                                        text, step):
    opened = []
    real_open = mod.open_file

    def open_file(path):
        opened.append(real_open(path))
        return opened[-1]

    def failing(*args):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(mod, "open_file", open_file)
    if step == "check":
        monkeypatch.setattr(mod, "check_opened", failing)
    else:
        monkeypatch.setattr(mod.os, "pread", failing)
    r = await call(static(tmp_path, www), "/a.txt")
    assert (r.status, r.body) == (status, text)
    assert len(opened) == 1 and closed(opened[0])


async def test_an_io_error_is_a_500_for_a_file_an_index_and_a_listing(tmp_path, www, monkeypatch):
    def open_file(path):
        raise OSError(errno.EIO, "Input/output error")

    def list_dir(path, root):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(mod, "open_file", open_file)
    for path in ("/a.txt", "/"):
        r = await call(static(tmp_path, www), path)
        assert (r.status, r.body) == (500, b"500 - internal server error"), path
    (www / "index.html").unlink()
    monkeypatch.setattr(mod, "list_dir", list_dir)
    r = await call(static(tmp_path, www, "list_files = true"), "/")
    assert (r.status, r.body) == (500, b"500 - internal server error")


async def test_refusals_say_why(tmp_path, www, monkeypatch):
    (www / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    r = await call(static(tmp_path, www), "/link-out.txt")
    assert (r.status, r.body) == (404, b"404 - not found")

    real_open = mod.open_file

    def open_file(path):
        if path.endswith("index.html"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path)

    monkeypatch.setattr(mod, "open_file", open_file)
    r = await call(static(tmp_path, www), "/")
    assert (r.status, r.body) == (403, b"403 - permission denied")  # index.html not readable
    monkeypatch.setattr(mod, "open_file", real_open)

    def list_dir(path, root):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(mod, "list_dir", list_dir)
    r = await call(static(tmp_path, www, "list_files = true"), "/sub/")
    assert (r.status, r.body) == (403, b"403 - permission denied")

    def swapped(path, root):
        raise mod.Outside(path)

    monkeypatch.setattr(mod, "list_dir", swapped)
    for extra in ("list_files = true", "list_files = true\ncontinue_not_found = true"):
        r = await call(static(tmp_path, www, extra), "/sub/")
        assert (r.status, r.body) == (404, b"404 - not found"), extra


def test_list_dir_opens_only_directories_and_no_symlink(tmp_path, www):
    with pytest.raises(NotADirectoryError):  # refused at the open, before the root is checked
        mod.list_dir(str(tmp_path / "secret.txt"), str(www))
    with pytest.raises(OSError) as exc:  # a directory swapped for a symlink is not followed
        mod.list_dir(str(www / "dir-in"), str(www))
    assert exc.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert [name for name, _ in mod.list_dir(str(www / "sub"), str(www))] == ["b.txt"]


def row(title: str, size: str, modified: str, href: str, shown: str, pad: bool = False) -> str:
    spacer = '<span style="visibility:hidden">.  </span>' if pad else ""
    return (f'<tr><td title="{title}" style="text-align: right">{size}{spacer}</td><td>{modified}</td>'
            f'<td><a style="display: block" href="{href}">{shown}</a></td></tr>\n')


def test_listing_rows_as_written(tmp_path, www):
    d = tmp_path / "list"
    (d / "dir").mkdir(parents=True)
    (d / "link").symlink_to("dir")
    with open(d / "ten.iso", "wb") as f:
        f.truncate(10 * MiB)  # exactly 10 MB: whole megabytes from here on
    (d / "\ue000").write_text("x")
    (d / os.fsdecode(b"\xff")).write_text("y")  # not UTF-8: shown replaced, sorted as bytes
    for p in d.iterdir():
        os.utime(p, (1700000000, 1700000000), follow_symlinks=False)
    dir_size = (d / "dir").lstat().st_size
    body = mod.listing(str(d), str(tmp_path), at_root=False).decode()
    rows = body.split("<tbody>\n", 1)[1].split("</tbody>", 1)[0]
    t = "2023-11-14 22:13:20"
    assert rows == (
        row("0 bytes", "", "", "..", "..")
        + row(f"{dir_size} bytes", "", t, "dir/", "dir/")
        + row("3 bytes", "0.00", t, "link", "link")  # the symlink itself, not its directory
        + row("10485760 bytes", "10", t, "ten.iso", "ten.iso", pad=True)
        + row("1 bytes", "0.00", t, "%EE%80%80", "\ue000")
        + row("1 bytes", "0.00", t, "%FF", "\ufffd")
    )


def test_a_listing_just_under_ten_megabytes_has_two_decimals(tmp_path):
    d = tmp_path / "list"
    d.mkdir()
    with open(d / "almost.iso", "wb") as f:
        f.truncate(10 * MiB - 10 * 1024)
    body = mod.listing(str(d), str(tmp_path), at_root=True).decode()
    assert '<td title="10475520 bytes" style="text-align: right">9.99</td>' in body


def test_the_listing_of_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    body = mod.listing(str(tmp_path / "empty"), str(tmp_path), at_root=True).decode()
    assert body.startswith("<!doctype html>\n<html>\n<head>\n")
    assert body.endswith('<tbody>\n<tr><td colspan="3">No files.</td></tr>\n</tbody>\n</table>\n</body>\n</html>\n')


async def test_head_of_a_listing_has_its_headers_and_no_body(tmp_path, www):
    app = static(tmp_path, www, "list_files = true")
    get = await call(app, "/sub/")
    head = await call(app, "/sub/", method="HEAD")
    assert get.status == head.status == 200 and b'href="b.txt"' in get.body and head.body == b""
    assert head.headers == [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(get.body)).encode())]
    assert [m.get("more_body", False) for m in head.messages if m["type"] == "http.response.body"] == [False]


async def test_the_directory_redirect_as_sent(tmp_path, www):
    r = await call(static(tmp_path, www), "/sub")
    assert (r.status, r.body) == (307, b"")
    assert r.headers == [(b"content-length", b"0"), (b"location", b"/sub/")]


async def test_an_index_in_a_directory_whose_name_ends_in_x(tmp_path, www):
    (www / "inboX").mkdir()
    (www / "inboX" / "index.html").write_text("box")
    r = await call(static(tmp_path, www), "/inboX/")
    assert (r.status, r.body) == (200, b"box")


async def test_the_configured_content_type_in_the_parts_of_a_multipart_range(tmp_path, www):
    app = static(tmp_path, www, 'response_headers = { "content-TYPE" = "application/x-mine" }')
    for path in ("/a.txt", "/"):
        r = await call(app, path, headers=[("host", "example.org"), ("range", "bytes=0-1,3-4")])
        assert r.status == 206, path
        assert r.body.count(b"\r\nContent-Type: application/x-mine\r\n") == 2, (path, r.body)
    r = await call(static(tmp_path, www), "/", headers=[("host", "example.org"), ("range", "bytes=0-1,3-4")])
    assert r.body.count(b"\r\nContent-Type: text/html; charset=utf-8\r\n") == 2
