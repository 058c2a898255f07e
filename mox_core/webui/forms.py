"""Form posts of the web UI: ``application/x-www-form-urlencoded`` bodies only (the pages
upload no files), small, parsed without a multipart library."""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request

__all__ = ["MAX_FORM", "FormError", "read_form"]

MAX_FORM = 64 * 1024


class FormError(Exception):
    """Not a form this UI accepts: answered with 400 (too large: 413)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


async def read_form(request: Request, limit: int = MAX_FORM) -> dict[str, str]:
    """The fields of the posted form (the first value of each name)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FormError(400, "400 - bad request: expected a form")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FormError(413, "413 - request entity too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise FormError(400, "400 - bad request: malformed form")
    out: dict[str, str] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out
