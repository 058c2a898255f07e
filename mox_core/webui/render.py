"""Templates (Jinja2, autoescaped) and static files of the web UI: the framework's own
(``templates/``, ``static/`` beside this module) under a service's, whose files of the same
name take precedence."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape

from mox_core.webui.static import StaticFiles

__all__ = ["HERE", "Renderer", "human_size", "human_time", "url_query"]

HERE = Path(__file__).resolve().parent


def human_size(n: int | None) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as file managers show them)."""
    if n is None:
        return ""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    return ""  # unreachable


def human_time(value: float | datetime.datetime | None) -> str:
    """A time in the server's time zone: ``2026-03-04 12:34``."""
    if value is None:
        return ""
    if isinstance(value, int | float):
        value = datetime.datetime.fromtimestamp(value).astimezone()
    elif value.tzinfo is not None:
        value = value.astimezone()
    return value.strftime("%Y-%m-%d %H:%M")


def url_query(*parts: str) -> str:
    """A link's query from its already encoded ``name=value`` parts, the empty ones left out:
    ``url_query("mailbox=Lists", "page=2")`` -> ``?mailbox=Lists&page=2``, ``url_query("")`` -> ``""``."""
    given = [p for p in parts if p]
    return "?" + "&".join(given) if given else ""


class Renderer:
    """The Jinja2 environment and the static files of one web application."""

    def __init__(self, templates: Path | None = None, static: Path | None = None) -> None:
        loaders = [FileSystemLoader(str(d)) for d in (templates, HERE / "templates") if d is not None]
        self.env = Environment(loader=ChoiceLoader(loaders), autoescape=select_autoescape(["html"]),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters["size"] = human_size
        self.env.filters["when"] = human_time
        self.env.globals["url_query"] = url_query
        self.static = StaticFiles(HERE / "static", *([static] if static is not None else []))

    def render(self, template: str, context: dict[str, Any]) -> str:
        return self.env.get_template(template).render(context)
