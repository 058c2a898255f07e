"""The ``static`` handler kind (mox's WebStatic): files from a directory.

Where a file is looked up: ``root`` joined with the request path (without ``strip_prefix``).
The path is never decoded again (``%2e%2e`` is a file name, not ``..``); segments ``..`` or
with a backslash are refused; the real path (symlinks resolved) must be under the real root,
else 404. The root itself is resolved per request, so it may be a symlink that is switched.
"""

from __future__ import annotations

import errno
import html
import os
import stat
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio

from mox_core.api import WebHandlerContext
from mox_webhandlers.common import (
    Headers,
    escape_path,
    escape_query,
    header_list,
    merge_headers,
    respond,
    single_slash,
)
from mox_webhandlers.files import CHUNK, OpenFile, serve_file
from mox_webhandlers.settings import StaticSettings

# errno values that mean "no such file here": not found, or with continue_not_found the next handler.
MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL})
DENIED = frozenset({errno.EACCES, errno.EPERM})
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_file(path: str) -> int:
    """Open for reading (a seam for tests that need a permission error as root)."""
    return os.open(path, _OPEN_FLAGS)


def list_dir(path: str, root: str) -> list[tuple[str, os.stat_result]]:
    """Name and lstat of the entries of directory ``path``, read from a descriptor that is
    checked to be under ``root`` (the real root) after opening."""
    fd = os.open(path, _OPEN_FLAGS | getattr(os, "O_DIRECTORY", 0))
    try:
        check_opened(fd, root)
        with os.scandir(fd) as it:
            return [(e.name, e.stat(follow_symlinks=False)) for e in it]
    finally:
        os.close(fd)


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_opened(fd: int, root: str) -> None:
    """Raise Outside when what ``fd`` refers to is not under ``root``: a directory of the path
    may have been replaced by a symlink between the check of the path and the open. (Where
    /proc is missing, the check of the path is all there is.)"""
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return
    if not under(opened, root):
        raise Outside(opened)


class Outside(Exception):
    """The path leaves the root."""


@dataclass
class Found:
    """What a request path names: ``kind`` is file, dir, missing, outside, denied or error."""

    kind: str
    path: str = ""
    file: OpenFile | None = None
    error: str = ""
    root: str = ""  # the real root


def resolve(root: str, rel: str) -> tuple[str, str]:
    """The real root and the real path ``rel`` names under it; Outside when that is not under
    the real root, FileNotFoundError for a NUL byte."""
    if "\x00" in rel:
        raise FileNotFoundError(errno.ENOENT, "NUL in path")
    parts = []
    for seg in rel.split("/"):
        if seg in ("", "."):
            continue
        if seg == ".." or "\\" in seg:
            raise Outside(rel)
        parts.append(seg)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if not under(real, real_root):
        raise Outside(rel)
    return real_root, real


def _classify(exc: OSError | ValueError) -> Found:
    if isinstance(exc, ValueError) or exc.errno in MISSING:
        return Found("missing")
    if exc.errno in DENIED:
        return Found("denied")
    return Found("error", error=str(exc))


def lookup(root: str, rel: str) -> Found:
    """Find ``rel`` under ``root``: a directory, or a regular file opened for reading."""
    try:
        real_root, path = resolve(root, rel)
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return Found("dir", path, root=real_root)
        if not stat.S_ISREG(st.st_mode):
            return Found("missing")
        fd = open_file(path)
    except Outside:
        return Found("outside")
    except (OSError, ValueError) as exc:
        return _classify(exc)
    try:
        check_opened(fd, real_root)
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            os.close(fd)
            return Found("missing")
    except Outside:
        os.close(fd)
        return Found("outside")
    except OSError as exc:
        os.close(fd)
        return _classify(exc)
    try:
        head = os.pread(fd, CHUNK, 0)
    except OSError as exc:
        os.close(fd)
        return _classify(exc)
    return Found("file", path, OpenFile(fd, fst, os.path.basename(path), head), root=real_root)


def _size(st: os.stat_result) -> tuple[str, bool]:
    mb = st.st_size / (1024 * 1024)
    return (str(int(mb)), True) if mb >= 10 else (f"{mb:.2f}", False)


def listing(path: str, root: str, at_root: bool) -> bytes:
    """The HTML listing of directory ``path``, as mox's: ``..`` (unless at /), the entries
    sorted by name, directories with a trailing slash, size in MB and modification time in
    UTC. Symlinks are shown as themselves (not followed)."""
    rows = [] if at_root else [("..", "", False, "", "0 bytes")]
    for name, st in list_dir(path, root):
        is_dir = stat.S_ISDIR(st.st_mode)
        size, pad = ("", False) if is_dir else _size(st)
        modified = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(st.st_mtime))
        rows.append((name + ("/" if is_dir else ""), size, pad, modified, f"{st.st_size} bytes"))
    rows.sort(key=lambda r: os.fsencode(r[0]))
    out = [_LIST_HEAD]
    if not rows:
        out.append('<tr><td colspan="3">No files.</td></tr>\n')
    for name, size, pad, modified, title in rows:
        shown = html.escape(os.fsencode(name).decode("utf-8", "replace"))
        href = html.escape(quote(os.fsencode(name), safe="/"))
        spacer = '<span style="visibility:hidden">.  </span>' if pad else ""
        out.append(f'<tr><td title="{title}" style="text-align: right">{size}{spacer}</td><td>{modified}</td>'
                   f'<td><a style="display: block" href="{href}">{shown}</a></td></tr>\n')
    out.append(_LIST_TAIL)
    return "".join(out).encode()


_LIST_HEAD = """<!doctype html>
<html>
<head>
<meta charset="utf-8" />
<meta name="viewport" content="width=device-width, initial-scale=1" />
<title>ls</title>
<style>
body, html { padding: 1em; font-size: 16px; }
* { font-size: inherit; font-family: ubuntu, lato, sans-serif; margin: 0; padding: 0; box-sizing: border-box; }
h1 { margin-bottom: 1ex; font-size: 1.2rem; }
table td, table th { padding: .2em .5em; }
table > tbody > tr:nth-child(odd) { background-color: #f8f8f8; }
[title] { text-decoration: underline; text-decoration-style: dotted; }
</style>
</head>
<body>
<h1>ls</h1>
<table>
<thead><tr><th>Size in MB</th><th>Modified (UTC)</th><th>Name</th></tr></thead>
<tbody>
"""
_LIST_TAIL = "</tbody>\n</table>\n</body>\n</html>\n"
_HTML = "text/html; charset=utf-8"


def static_app(settings: StaticSettings, ctx: WebHandlerContext):
    """The ASGI app of a ``static`` handler; see the module docstring and the README."""
    return _Static(settings)


class _Static:
    def __init__(self, settings: StaticSettings) -> None:
        self.settings = settings
        self.root = os.path.abspath(settings.root)
        self.extra = header_list(settings.response_headers)
        self.listing_extra = header_list(settings.response_headers, skip={"content-type"})
        self.content_type = next((v for k, v in settings.response_headers.items() if k.lower() == "content-type"),
                                 None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        s = self.settings
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            if not s.continue_not_found:
                await respond(scope, send, 405, "405 - method not allowed")
            return
        path: str = scope["path"]
        if s.strip_prefix and not path.startswith(s.strip_prefix):
            await self.not_found(scope, send)
            return
        rel = path[len(s.strip_prefix):]
        found = await anyio.to_thread.run_sync(lookup, self.root, rel)
        try:
            await self.answer(scope, send, path, rel, found)
        finally:
            if found.file is not None:
                os.close(found.file.fd)

    async def not_found(self, scope: dict[str, Any], send: Any) -> None:
        if not self.settings.continue_not_found:
            await respond(scope, send, 404, "404 - not found")

    async def answer(self, scope: dict[str, Any], send: Any, path: str, rel: str, found: Found) -> None:
        if found.kind == "outside":
            await respond(scope, send, 404, "404 - not found")  # refused, never passed on
        elif found.kind == "missing":
            await self.not_found(scope, send)
        elif found.kind == "denied":
            await respond(scope, send, 403, "403 - permission denied")
        elif found.kind == "error":
            await respond(scope, send, 500, "500 - internal server error")
        elif found.kind == "dir":
            if not path.endswith("/"):
                await self.redirect_dir(scope, send, path)
            else:
                await self.directory(scope, send, path, rel, found)
        elif path.endswith("/"):
            await self.not_found(scope, send)  # a file asked for as a directory
        else:
            await serve_file(scope, send, found.file, self.extra, self.content_type)

    async def redirect_dir(self, scope: dict[str, Any], send: Any, path: str) -> None:
        location = single_slash(escape_path(path + "/"))
        if scope.get("query_string"):
            location += "?" + escape_query(scope["query_string"])
        await respond(scope, send, 307, "", [(b"location", location.encode())])

    async def directory(self, scope: dict[str, Any], send: Any, path: str, rel: str, found: Found) -> None:
        # looked up from the root again: an index.html symlink must stay under the root too
        index = await anyio.to_thread.run_sync(lookup, self.root, rel.rstrip("/") + "/index.html")
        try:
            if index.kind == "file":
                await serve_file(scope, send, index.file, self.extra, self.content_type or _HTML)
            elif index.kind == "denied":
                await respond(scope, send, 403, "403 - permission denied")
            elif index.kind not in ("missing", "outside"):
                await respond(scope, send, 500, "500 - internal server error")
            elif not self.settings.list_files:
                if not self.settings.continue_not_found:
                    await respond(scope, send, 403, "403 - permission denied")
            else:
                await self.send_listing(scope, send, path, found.path, found.root)
        finally:
            if index.file is not None:
                os.close(index.file.fd)

    async def send_listing(self, scope: dict[str, Any], send: Any, path: str, dirpath: str, root: str) -> None:
        try:
            body = await anyio.to_thread.run_sync(listing, dirpath, root, path == "/")
        except Outside:
            await respond(scope, send, 404, "404 - not found")
            return
        except OSError as exc:
            found = _classify(exc)
            status, text = (403, "403 - permission denied") if found.kind == "denied" else \
                (500, "500 - internal server error")
            await respond(scope, send, status, text)
            return
        hdrs: Headers = [(b"content-type", _HTML.encode()), (b"content-length", str(len(body)).encode())]
        hdrs = merge_headers(hdrs, self.listing_extra)
        await send({"type": "http.response.start", "status": 200, "headers": hdrs})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body,
                    "more_body": False})
