"""Settings of the ``static``, ``redirect`` and ``reverse_proxy`` web handler kinds."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _headers(v: dict[str, str]) -> dict[str, str]:
    for k in v:
        if not k.strip() or k != k.strip():
            raise ValueError(f"static: bad header {k!r}")
    return v


class StaticSettings(_Base):
    root: str = Field(description="Directory to serve, relative to mox's working directory.")
    strip_prefix: str = Field("", description="Path prefix removed before looking up the file.")
    list_files: bool = Field(False, description="List a directory without index.html.")
    continue_not_found: bool = Field(False, description="On 404, try the next handler.")
    response_headers: dict[str, str] = Field(default_factory=dict, description="Headers added to responses.")

    _hdr = field_validator("response_headers")(classmethod(lambda cls, v: _headers(v)))

    @field_validator("strip_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError("strip_prefix must start with /")
        return v


class RedirectSettings(_Base):
    base_url: str = Field("", description="Scheme and host to redirect to, e.g. https://example.org.")
    orig_path_regexp: str = Field("", description="Regular expression on the path, with replace_path.")
    replace_path: str = Field("", description="Replacement path; $1 refers to groups.")
    status_code: int = Field(308, ge=300, le=399, description="Redirect status code.")

    @model_validator(mode="after")
    def _need(self) -> RedirectSettings:
        if bool(self.orig_path_regexp) != bool(self.replace_path):
            raise ValueError("orig_path_regexp and replace_path must be set together")
        if not self.base_url and not self.orig_path_regexp:
            raise ValueError("need base_url and/or orig_path_regexp with replace_path")
        if self.base_url and urlsplit(self.base_url).path not in ("", "/"):
            raise ValueError("base_url must not have a path")
        if self.orig_path_regexp:
            re.compile(self.orig_path_regexp)
        return self


class ReverseProxySettings(_Base):
    url: str = Field(description="Backend URL, http or https.")
    strip_path: bool = Field(False, description="Remove the path_regexp match before forwarding.")
    response_headers: dict[str, str] = Field(default_factory=dict, description="Headers added to responses.")

    _hdr = field_validator("response_headers")(classmethod(lambda cls, v: _headers(v)))

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError("url must be http:// or https:// with a host")
        return v
