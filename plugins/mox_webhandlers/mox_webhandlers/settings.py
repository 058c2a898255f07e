"""Settings of the ``static``, ``redirect``, ``forward`` and ``internal`` web handler kinds.

Keys are the snake_case forms of mox's (``StripPrefix`` is ``strip_prefix``). The field
descriptions are shown by ``mox config describe``. Error messages follow mox's, with its key
names in snake_case.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# RFC 9110 token: what a header name may consist of.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Characters never allowed in a URL or header value from config (would split a header).
_CONTROL = re.compile(r"[\x00-\x20\x7f]")

INTERNAL_SERVICES = ("account", "admin")
# Headers that frame the message; set by the server, never from config.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_headers(kind: str, headers: dict[str, str]) -> dict[str, str]:
    """``headers`` when every name is a trimmed, non-empty token and no value can split a
    header line (mox: "static: bad header")."""
    for name, value in headers.items():
        if name != name.strip() or not name or not _TOKEN.match(name):
            raise ValueError(f"{kind}: bad header {_q(name)}")
        if name.lower() in _FRAMING:
            raise ValueError(f"{kind}: header {_q(name)} is set by the server, not in config")
        if any(c in value for c in "\r\n\x00"):
            raise ValueError(f"{kind}: bad value for header {_q(name)}: must not contain CR, LF or NUL")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"{kind}: bad value for header {_q(name)}: only latin-1 characters allowed")
    return headers


def _q(s: str) -> str:
    """Quoted like Go's %q: in double quotes, with backslash escapes."""
    return '"' + s.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


class StaticSettings(_Base):
    """mox's WebStatic."""

    root: str = Field(
        description="Directory whose files are served; relative to mox's working directory. Files outside it "
        "(also through symlinks) are never served."
    )
    strip_prefix: str = Field(
        "", description="Path prefix removed from the request path before the rest is looked up under root; "
        "must start with /. A request whose path lacks it gets 404 (or goes to the next handler with "
        "continue_not_found). Empty: the whole request path is looked up."
    )
    list_files: bool = Field(
        False, description="For a directory without index.html, show an HTML listing of its files instead of 403."
    )
    continue_not_found: bool = Field(
        False, description="Instead of 404 (not found), 403 (directory without index.html or listing) or 405 "
        "(method other than GET/HEAD), try the next web handler."
    )
    response_headers: dict[str, str] = Field(
        default_factory=dict, description="Headers added to file responses, e.g. Cache-Control; a Content-Type "
        "here replaces the guessed one. Added to listings too, except Content-Type."
    )

    @field_validator("strip_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError(f"static: prefix to strip {v} must start with a slash")
        return v

    @field_validator("response_headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        return check_headers("static", v)


class RedirectSettings(_Base):
    """mox's WebRedirect."""

    base_url: str = Field(
        "", description="Scheme and host (optionally query and fragment) to redirect to, e.g. "
        "https://www.example.org; its path must be empty or /. The request's query is appended to base_url's "
        "(joined with &). Empty: a relative redirect on the same host."
    )
    orig_path_regexp: str = Field(
        "", description="Regular expression (Python syntax) replaced in the request path by replace_path; a request "
        "whose path does not match gets 404. Set together with replace_path, or neither."
    )
    replace_path: str = Field(
        "", description="Replacement of orig_path_regexp's matches: $1 or ${1} for groups, ${name} for named "
        "groups, $$ for a dollar sign."
    )
    status_code: int = Field(308, description="Redirect status code, 300 to 399.")

    @model_validator(mode="after")
    def _check(self) -> RedirectSettings:
        if self.base_url:
            _check_base_url(self.base_url)
        if self.orig_path_regexp and self.replace_path:
            try:
                re.compile(self.orig_path_regexp)
            except re.error as exc:
                raise ValueError(f"redirect: compiling regexp {self.orig_path_regexp}: {exc}")
        elif self.orig_path_regexp or self.replace_path:
            raise ValueError("redirect: must have either both orig_path_regexp and replace_path, or neither")
        elif not self.base_url:
            raise ValueError("redirect: must have at least one of base_url and orig_path_regexp+replace_path")
        if not 300 <= self.status_code <= 399:
            raise ValueError(f"redirect: invalid redirect status code {self.status_code}")
        return self


def _check_base_url(url: str) -> None:
    if _CONTROL.search(url):
        raise ValueError(f"redirect: base_url {_q(url)} must not contain spaces or control characters")
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 (raises for a bad port)
    except ValueError as exc:
        raise ValueError(f"redirect: parsing redirect url {url}: {exc}")
    if u.scheme not in ("", "http", "https") or not u.netloc:
        raise ValueError(f"redirect: base_url {url} must be http://host, https://host or //host")
    if u.path not in ("", "/"):
        raise ValueError("redirect: base_url must have empty path")


class ForwardSettings(_Base):
    """mox's WebForward: a reverse proxy."""

    url: str = Field(
        description="Backend URL, http:// or https://, e.g. http://127.0.0.1:8080/app/. The request path is "
        "appended to its path (one slash between), the request query to its query. Requests always go to this "
        "host, whatever the request says; loopback and private addresses are allowed (the administrator "
        "chose them)."
    )
    strip_path: bool = Field(
        False, description="Remove the part of the path that path_regexp matched before forwarding, e.g. with "
        "path_regexp ^/app/ a request for /app/x is forwarded as /x."
    )
    response_headers: dict[str, str] = Field(
        default_factory=dict, description="Headers added to the backend's responses (also to a websocket's "
        "handshake response)."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if _CONTROL.search(v):
            raise ValueError(f"forward: url {_q(v)} must not contain spaces or control characters")
        try:
            u = urlsplit(v)
            u.port  # noqa: B018 (raises for a bad port)
        except ValueError as exc:
            raise ValueError(f"forward: parsing url {v}: {exc}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"forward: url {v} must be http:// or https:// with a host")
        if u.username is not None or u.password is not None:
            raise ValueError(f"forward: url {v} must not contain a user name or password")
        if u.fragment:
            raise ValueError(f"forward: url {v} must not have a fragment")
        return v

    @field_validator("response_headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        return check_headers("forward", v)


class InternalSettings(_Base):
    """mox's WebInternal: one of mox's own web applications under another path."""

    base_path: str = Field(
        description="Path the service is served under, starting and ending with /, e.g. /admin/. Use a "
        "path_regexp that matches it, e.g. ^/admin/."
    )
    service: str = Field(description=f"Which of mox's web applications: {', '.join(INTERNAL_SERVICES)}.")

    @field_validator("base_path")
    @classmethod
    def _base(cls, v: str) -> str:
        if not v.startswith("/") or not v.endswith("/"):
            raise ValueError(f"internal service: base path {_q(v)} must start and end with /")
        return v

    @field_validator("service")
    @classmethod
    def _service(cls, v: str) -> str:
        if v not in INTERNAL_SERVICES:
            raise ValueError(f"internal service: unknown service {_q(v)} (known: {', '.join(INTERNAL_SERVICES)})")
        return v
