"""The web UI's own static files (stylesheet, icon), served by the app under
``<root_path>/static/<hash>/<name>``.

The hash is of the file's content, so a URL never changes meaning: the files are sent with
``Cache-Control: public, max-age=31536000, immutable``, and a new version of a file gets a
new URL. A request with another hash (a page of an older version) gets the current file
with ``no-cache``. Files are read once, at start.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

__all__ = ["StaticFiles"]

_TYPES = {".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
          ".ico": "image/x-icon", ".woff2": "font/woff2"}
IMMUTABLE = "public, max-age=31536000, immutable"


class StaticFiles:
    """The files of ``dirs`` (a later directory's file replaces an earlier one's)."""

    def __init__(self, *dirs: Path) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}  # name -> (content, type, hash)
        for d in dirs:
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    body = p.read_bytes()
                    ctype = _TYPES.get(p.suffix) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
                    self.files[p.name] = (body, ctype, hashlib.sha256(body).hexdigest()[:16])

    def url(self, root_path: str, name: str) -> str:
        """The URL of file ``name``, with its content hash."""
        return f"{root_path}/static/{self.files[name][2]}/{name}"

    async def endpoint(self, request: Request) -> Response:
        name = request.path_params["name"]
        entry = self.files.get(name)
        if entry is None:
            return PlainTextResponse("404 - not found", status_code=404)
        body, ctype, digest = entry
        cache = IMMUTABLE if request.path_params["version"] == digest else "no-cache"
        return Response(body, media_type=ctype, headers={"cache-control": cache})
