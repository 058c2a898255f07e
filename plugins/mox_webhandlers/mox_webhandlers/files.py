"""Serving one open file as Go's http.ServeContent does: conditional requests (If-Match,
If-Unmodified-Since, If-None-Match, If-Modified-Since: 412 or 304), Range requests (206, one
range or multipart/byteranges; 416 when none can be satisfied; If-Range), HEAD, and the
Content-Type guessed from the name or, failing that, from the first bytes.

The file is read from the descriptor opened after the path was checked, so a file swapped
afterwards is not what is sent.
"""

from __future__ import annotations

import mimetypes
import os
import secrets
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

import anyio

from mox_webhandlers.common import Headers, merge_headers, request_header, respond

CHUNK = 64 * 1024
# Bytes Go's DetectContentType counts as binary: their presence means not text.
_BINARY = frozenset(list(range(0x00, 0x09)) + [0x0B] + list(range(0x0E, 0x1B)) + list(range(0x1C, 0x20)))


class RangeError(Exception):
    """The Range header is invalid or no range overlaps the file: 416."""


@dataclass(frozen=True)
class OpenFile:
    fd: int
    st: os.stat_result
    name: str  # for guessing the content type
    # the first CHUNK bytes, read in the same trip to a thread as the lookup: a small file is
    # then served without another one (each trip costs more than reading from the page cache)
    head: bytes = b""


def etag_of(st: os.stat_result) -> str:
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'


def guess_type(name: str, head: bytes) -> str:
    """Content type from the file name's extension, else text/plain for what looks like
    text, else application/octet-stream. Text types get charset=utf-8."""
    ctype, _ = mimetypes.guess_type(name, strict=False)
    if ctype is None:
        if any(b in _BINARY for b in head):
            return "application/octet-stream"
        return "text/plain; charset=utf-8"
    if ctype.startswith("text/"):
        ctype += "; charset=utf-8"
    return ctype


def _etags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _strong_match(header: str, etag: str) -> bool:
    return any(t == "*" or (t == etag and not t.startswith("W/")) for t in _etags(header))


def _weak_match(header: str, etag: str) -> bool:
    return any(t == "*" or t.removeprefix("W/") == etag.removeprefix("W/") for t in _etags(header))


def _date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def precondition(scope: dict[str, Any], etag: str, mtime: int) -> int | None:
    """412, 304 or None (go on), from the conditional request headers (RFC 9110 13.2.2)."""
    get = scope["method"] in ("GET", "HEAD")
    if_match = request_header(scope, b"if-match")
    if if_match is not None:
        if not _strong_match(if_match, etag):
            return 412
    else:
        ius = _date(request_header(scope, b"if-unmodified-since"))
        if ius is not None and mtime > ius:
            return 412
    if_none_match = request_header(scope, b"if-none-match")
    if if_none_match is not None:
        if _weak_match(if_none_match, etag):
            return 304 if get else 412
    elif get:
        ims = _date(request_header(scope, b"if-modified-since"))
        if ims is not None and mtime <= ims:
            return 304
    return None


def if_range_ok(scope: dict[str, Any], etag: str, last_modified: str) -> bool:
    """Whether a Range header applies: no If-Range, or it names the current version."""
    value = request_header(scope, b"if-range")
    if value is None:
        return True
    if value.startswith('"'):
        return value == etag
    return value == last_modified


def parse_range(value: str, size: int) -> list[tuple[int, int]]:
    """(start, length) of each range of a ``bytes=`` Range header, as Go's parseRange; ranges
    starting after the end are skipped, RangeError when none remain or one is malformed."""
    if not value.startswith("bytes="):
        raise RangeError("invalid range")
    out: list[tuple[int, int]] = []
    no_overlap = False
    for spec in value[len("bytes="):].split(","):
        spec = spec.strip(" \t")
        if not spec:
            continue
        start_s, sep, end_s = spec.partition("-")
        start_s, end_s = start_s.strip(" \t"), end_s.strip(" \t")
        if not sep or not (start_s or end_s) or not all(s.isdigit() for s in (start_s, end_s) if s):
            raise RangeError("invalid range")
        if not start_s:  # suffix: the last N bytes
            n = min(int(end_s), size)
            if n == 0:
                no_overlap = True
                continue
            out.append((size - n, n))
            continue
        start = int(start_s)
        if start >= size:
            no_overlap = True
            continue
        end = size - 1 if not end_s else min(int(end_s), size - 1)
        if end_s and int(end_s) < start:
            raise RangeError("invalid range")
        out.append((start, end - start + 1))
    if not out and no_overlap:
        raise RangeError("invalid range: failed to overlap")
    return out


async def _read(f: OpenFile, offset: int, n: int) -> bytes:
    if offset + n <= len(f.head):
        return f.head[offset:offset + n]
    return await anyio.to_thread.run_sync(os.pread, f.fd, n, offset)


async def _send_span(send: Any, f: OpenFile, start: int, length: int, last: bool) -> None:
    """Send ``length`` bytes from ``start``; with ``last`` the response ends with them."""
    end = start + length
    while start < end:
        chunk = await _read(f, start, min(CHUNK, end - start))
        if not chunk:  # the file shrank: end the response short rather than hang
            break
        start += len(chunk)
        done = last and start >= end
        await send({"type": "http.response.body", "body": chunk, "more_body": not done})
        if done:
            return
    if last:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def serve_file(scope: dict[str, Any], send: Any, f: OpenFile, extra: Headers,
                     content_type: str | None) -> None:
    """Send the file (the caller closes ``f.fd``). ``extra`` headers replace those of the same
    name; ``content_type`` (from config) replaces the guessed one."""
    st = f.st
    etag = etag_of(st)
    last_modified = formatdate(st.st_mtime, usegmt=True)
    status = precondition(scope, etag, int(st.st_mtime))
    if status == 304:
        hdrs = merge_headers([(b"etag", etag.encode())], extra)
        await send({"type": "http.response.start", "status": 304, "headers": hdrs})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if status == 412:
        await respond(scope, send, 412, "412 - precondition failed", extra)
        return
    if content_type is None:
        content_type = guess_type(f.name, await _read(f, 0, min(512, f.st.st_size)))
    base: Headers = [(b"content-type", content_type.encode("latin-1")), (b"last-modified", last_modified.encode()),
                     (b"etag", etag.encode()), (b"accept-ranges", b"bytes")]
    base = merge_headers(base, extra)
    ranges = None
    value = request_header(scope, b"range")
    if value is not None and if_range_ok(scope, etag, last_modified):
        try:
            ranges = parse_range(value, st.st_size)
        except RangeError as exc:
            hdrs = [(b"content-range", f"bytes */{st.st_size}".encode())] + extra
            await respond(scope, send, 416, f"416 - requested range not satisfiable: {exc}", hdrs)
            return
        if sum(n for _, n in ranges) > st.st_size:
            ranges = None  # asking for more than the file: send it whole (as Go does)
    if not ranges:
        await _send_whole(scope, send, f, base)
    elif len(ranges) == 1:
        await _send_range(scope, send, f, base, ranges[0])
    else:
        await _send_multipart(scope, send, f, base, ranges, content_type)


async def _send_whole(scope: dict[str, Any], send: Any, f: OpenFile, base: Headers) -> None:
    hdrs = base + [(b"content-length", str(f.st.st_size).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": hdrs})
    if scope["method"] == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    await _send_span(send, f, 0, f.st.st_size, True)


async def _send_range(scope: dict[str, Any], send: Any, f: OpenFile, base: Headers,
                      span: tuple[int, int]) -> None:
    start, length = span
    hdrs = base + [(b"content-range", f"bytes {start}-{start + length - 1}/{f.st.st_size}".encode()),
                   (b"content-length", str(length).encode())]
    await send({"type": "http.response.start", "status": 206, "headers": hdrs})
    if scope["method"] == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    await _send_span(send, f, start, length, True)


async def _send_multipart(scope: dict[str, Any], send: Any, f: OpenFile, base: Headers,
                          ranges: list[tuple[int, int]], content_type: str) -> None:
    boundary = secrets.token_hex(16)
    heads = []
    for i, (start, length) in enumerate(ranges):
        head = (f"--{boundary}\r\nContent-Range: bytes {start}-{start + length - 1}/{f.st.st_size}\r\n"
                f"Content-Type: {content_type}\r\n\r\n")
        heads.append((head if i == 0 else "\r\n" + head).encode("latin-1"))
    tail = f"\r\n--{boundary}--\r\n".encode()
    total = sum(len(h) for h in heads) + sum(n for _, n in ranges) + len(tail)
    hdrs = [(k, v) for k, v in base if k != b"content-type"]
    hdrs += [(b"content-type", f"multipart/byteranges; boundary={boundary}".encode()),
             (b"content-length", str(total).encode())]
    await send({"type": "http.response.start", "status": 206, "headers": hdrs})
    if scope["method"] == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    for head, (start, length) in zip(heads, ranges, strict=True):
        await send({"type": "http.response.body", "body": head, "more_body": True})
        await _send_span(send, f, start, length, False)
    await send({"type": "http.response.body", "body": tail, "more_body": False})
