"""A real ``mox serve`` with the admin pages (and the account pages and the web handlers) on
one plain HTTP port, for the end-to-end tests of the admin pages (httpx and the browser), and
a small reader of the pages' forms, so a test sends a form as a browser would."""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path

import httpx

from mox_testpeers import free_port
from mox_testpeers.moxserver import MoxServer

ADMIN_PASSWORD = "admin-pages-secret-1"

DOMAINS = """\
# The domains we receive mail for. This comment must survive every save.
[domains."example.org"]
description = "Main domain"  # a comment after a value

[domains."example.net"]

# People, one table each.
[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
domain = "example.org"
full_name = "Alice Liddell"
[accounts.alice.destinations."alice@example.org"]

# Global routes, checked last.

[[routes]]
to_domain = ["relay.example"]
transport = "sink"
"""

STATIC = """
[transports.sink]
kind = "smtp"
host = "sink.test"
port = {sink_port}
no_starttls = true
"""


class AdminWeb:
    """``mox serve`` with ``admin_http``, ``account_http`` and ``webserver_http`` on one port
    (``/admin/``, ``/account/``, web handlers by host name) and the admin password set."""

    def __init__(self, directory: Path, *, domains: str = DOMAINS, static: str = "", sink_port: int = 2,
                 nameserver: str | None = None, env: dict[str, str] | None = None, top: str = "") -> None:
        self.port = free_port()
        extra = f"""
[listeners.local.admin_http]
enabled = true
port = {self.port}
[listeners.local.account_http]
enabled = true
port = {self.port}
[listeners.local.webserver_http]
enabled = true
port = {self.port}
""" + STATIC.format(sink_port=sink_port) + static
        self.mox = MoxServer(directory, static_top="smtp_workers = 1\n" + top, static_extra=extra, domains=domains,
                             nameserver=nameserver, env=env or {})
        self.mox.mox("setadminpassword", input=ADMIN_PASSWORD + "\n")
        self.mox.start()

    @property
    def domains_path(self) -> Path:
        return self.mox.directory / "domains.toml"

    def url(self, path: str = "/admin/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def origin(self) -> str:
        return self.url("")

    def client(self, ip: str = "127.0.0.1") -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=ip)
        return httpx.Client(transport=transport, timeout=30, trust_env=False, follow_redirects=False)

    def login(self, client: httpx.Client, password: str = ADMIN_PASSWORD) -> httpx.Response:
        page = client.get(self.url("/admin/login"))
        return client.post(self.url("/admin/login"), data={"csrf": csrf_of(page.text), "password": password},
                           headers={"origin": self.origin()})

    @contextmanager
    def admin(self) -> Iterator[httpx.Client]:
        """A client logged in to the admin pages."""
        with self.client() as c:
            assert self.login(c).status_code == 303
            yield c

    def submit_form(self, client: httpx.Client, page_path: str, action: str, changes: dict[str, str] | None = None,
                    drop: tuple[str, ...] = ()) -> httpx.Response:
        """GET ``page_path``, fill in the form whose action is ``action`` (a path under
        /admin) as the page has it, with ``changes``, and POST it from our origin."""
        page = client.get(self.url(page_path))
        assert page.status_code == 200, page.text
        data = form_fields(page.text, "/admin" + action)
        data.update(changes or {})
        for k in drop:
            data.pop(k, None)
        return client.post(self.url("/admin" + action), data=data, headers={"origin": self.origin()})

    def deliver(self, to: str, subject: str, body: str = "Hello.\n") -> None:
        """A message from outside over SMTP (port 25)."""
        msg = EmailMessage()
        msg["From"] = "Carol <carol@sender.example>"
        msg["To"] = to
        msg["Subject"] = subject
        msg.set_content(body)
        with smtplib.SMTP("127.0.0.1", self.mox.smtp_port, timeout=20) as s:
            s.send_message(msg)

    def submit(self, username: str, password: str, to: str, subject: str = "Hi") -> None:
        """A message sent by an account over submission (STARTTLS, AUTH)."""
        msg = EmailMessage()
        msg["From"] = username
        msg["To"] = to
        msg["Subject"] = subject
        msg.set_content("Sent by an account.\n")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", self.mox.submission_port, timeout=20) as s:
            s.starttls(context=ctx)
            s.login(username, password)
            s.send_message(msg)

    def stop(self) -> None:
        self.mox.stop()


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m is not None, "no csrf field in the page"
    return m.group(1)


class _Forms(HTMLParser):
    """The fields of one form of a page, as a browser would send them (the first value of a
    name is the one the server reads)."""

    def __init__(self, action: str) -> None:
        super().__init__(convert_charrefs=True)
        self.action = action
        self.inside = False
        self.pairs: list[tuple[str, str]] = []
        self._select: str | None = None
        self._select_value: str | None = None
        self._textarea: str | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.inside = a.get("action") == self.action and a.get("method", "get").lower() == "post"
            return
        if not self.inside or "name" not in a:
            if tag == "option" and self._select is not None and ("selected" in a or self._select_value is None):
                self._select_value = a.get("value", "")
            return
        if tag == "input":
            kind = a.get("type", "text")
            if kind in ("checkbox", "radio") and "checked" not in a:
                return
            if kind not in ("submit", "button") and "disabled" not in a:
                self.pairs.append((a["name"], a.get("value", "")))
        elif tag == "select":
            self._select, self._select_value = a["name"], None
        elif tag == "textarea":
            self._textarea, self._text = a["name"], ""

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag == "select" and self._select is not None:
            self.pairs.append((self._select, self._select_value or ""))
            self._select = None
        elif tag == "textarea" and self._textarea is not None:
            self.pairs.append((self._textarea, self._text.removeprefix("\n")))
            self._textarea = None


def form_fields(html: str, action: str) -> dict[str, str]:
    """The fields of the POST form with ``action`` in ``html``: name -> first value."""
    p = _Forms(action)
    p.feed(html)
    assert p.pairs, f"no form with action {action} in the page"
    out: dict[str, str] = {}
    for k, v in p.pairs:
        out.setdefault(k, v)
    return out
