"""A real ``mox serve`` with the account pages on plain HTTP and HTTPS, for the end-to-end
tests of the account pages (httpx and the browser)."""

from __future__ import annotations

import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import httpx

from mox_testpeers import free_port
from mox_testpeers.moxserver import MoxServer

DOMAINS = """\
[domains."example.org"]

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
domain = "example.org"
full_name = "Alice Liddell"
[accounts.alice.destinations."alice@example.org"]
[accounts.alice.destinations."support@example.org"]
[accounts.alice.destinations."lists@example.org"]
mailbox = "Lists"
[accounts.alice.destinations."@example.org"]

[accounts.bob]
domain = "example.org"
[accounts.bob.destinations."bob@example.org"]
"""

PASSWORD = "alice-secret-1"
BOB_PASSWORD = "bob-secret-1"


def tls_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class AccountWeb:
    """``mox serve`` with ``account_http`` and ``account_https`` (path ``/account/``) and an
    account ``alice`` with password :data:`PASSWORD`."""

    def __init__(self, directory: Path) -> None:
        self.http_port, self.https_port = free_port(), free_port()
        extra = f"""
[listeners.local.account_http]
enabled = true
port = {self.http_port}
path = "/account/"
[listeners.local.account_https]
enabled = true
port = {self.https_port}
path = "/account/"
"""
        self.mox = MoxServer(directory, static_top="smtp_workers = 1\n", static_extra=extra, domains=DOMAINS)
        self.mox.set_password("alice", PASSWORD)
        self.mox.set_password("admin", "admin-secret-1")
        self.mox.set_password("bob", BOB_PASSWORD)
        self.mox.start()

    def url(self, path: str = "/account/", tls: bool = False) -> str:
        port = self.https_port if tls else self.http_port
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}"

    def origin(self, tls: bool = False) -> str:
        return self.url("", tls)

    def client(self) -> httpx.Client:
        return httpx.Client(verify=False, timeout=20, trust_env=False, follow_redirects=False)

    def login(self, client: httpx.Client, username: str = "alice@example.org", password: str = PASSWORD,
              tls: bool = False) -> httpx.Response:
        """GET the login form, POST it from our own origin; returns the POST's response."""
        page = client.get(self.url("/account/login", tls))
        token = csrf_of(page.text)
        return client.post(self.url("/account/login", tls), data={"csrf": token, "username": username,
                                                                  "password": password},
                           headers={"origin": self.origin(tls)})

    def deliver(self, to: str, subject: str, body: str = "Hello.\n", sender: str = "Carol <carol@sender.example>",
                html: str | None = None) -> None:
        """A message from outside over SMTP (port 25)."""
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=True)
        if html is None or body:
            msg.set_content(body)
        if html is not None:
            if body:
                msg.add_alternative(html, subtype="html")
            else:
                msg.set_content(html, subtype="html")
        with smtplib.SMTP("127.0.0.1", self.mox.smtp_port, timeout=20) as s:
            s.send_message(msg)

    def submit(self, username: str, password: str, to: str, subject: str = "Hi") -> None:
        """A message sent by an account over submission (STARTTLS, AUTH)."""
        msg = EmailMessage()
        msg["From"] = username
        msg["To"] = to
        msg["Subject"] = subject
        msg.set_content("Sent with the account's password.\n")
        with smtplib.SMTP("127.0.0.1", self.mox.submission_port, timeout=20) as s:
            s.starttls(context=tls_client())
            s.login(username, password)
            s.send_message(msg)

    def smtp_auth_works(self, username: str, password: str) -> bool:
        with smtplib.SMTP("127.0.0.1", self.mox.submission_port, timeout=20) as s:
            s.starttls(context=tls_client())
            try:
                s.login(username, password)
            except smtplib.SMTPAuthenticationError:
                return False
            return True

    def stop(self) -> None:
        self.mox.stop()


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m is not None, "no csrf field in the page"
    return m.group(1)


# --------------------------------------------------------------------------------------------
# The account pages as an ASGI app, without a server (httpx's ASGI transport)

ASGI_DOMAINS = """
[accounts.alice]
domain = "example.org"
full_name = "Alice Liddell"
max_outgoing_messages_per_day = 10
[accounts.alice.destinations."alice@example.org"]
[accounts.alice.destinations."@example.org"]

[accounts.bob]
domain = "example.org"
[accounts.bob.destinations."bob@example.org"]
"""


class AccountASGI:
    """:func:`account_app` on a fresh config (accounts ``alice`` with a catch-all, ``bob``),
    with one fake clock for the sessions and the login throttle (``now``)."""

    def __init__(self, directory: Path, domains: str = ASGI_DOMAINS) -> None:
        from mox_core.account import account_app
        from mox_core.accounts.db import AccountCredentials, set_password
        from mox_core.accounts.sasl import AuthFailureLimiter
        from mox_core.config.holder import ConfigHolder
        from mox_core.testing import load
        from mox_core.webui import SessionStore

        self.cfg = load(directory, domains=domains)
        set_password(self.cfg, "alice", PASSWORD)
        set_password(self.cfg, "bob", BOB_PASSWORD)
        self.holder = ConfigHolder(self.cfg)
        self.credentials = AccountCredentials(self.holder)
        self.now = 1_800_000_000.0
        self.sessions = SessionStore.for_data_dir(self.cfg.data_dir, clock=lambda: self.now)
        self.limiter = AuthFailureLimiter(clock=lambda: self.now)
        self.app = account_app(self.holder, self.credentials, self.cfg.data_dir, sessions=self.sessions,
                               limiter=self.limiter)

    def client(self, ip: str = "192.0.2.10", https: bool = False) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, root_path="/account", client=(ip, 40000))
        return httpx.AsyncClient(transport=transport, base_url=self.origin(https))

    @staticmethod
    def origin(https: bool = False) -> str:
        return f"{'https' if https else 'http'}://mail.example.org"

    async def login(self, client: httpx.AsyncClient, username: str = "alice@example.org",
                    password: str = PASSWORD, **extra: str) -> httpx.Response:
        page = await client.get("/account/login")
        return await client.post("/account/login", data={"csrf": csrf_of(page.text), "username": username,
                                                         "password": password, **extra},
                                 headers={"origin": str(client.base_url).rstrip("/")})

    async def post(self, client: httpx.AsyncClient, path: str, data: dict[str, str], *, csrf: bool = True,
                   origin: str | None = "") -> httpx.Response:
        """POST a form of a page: with the session's token (taken from the overview) and our
        origin, unless told otherwise (``origin=None``: no Origin header)."""
        if csrf:
            data = {"csrf": csrf_of((await client.get("/account/")).text), **data}
        headers = {}
        if origin is not None:
            headers["origin"] = origin or str(client.base_url).rstrip("/")
        return await client.post(path, data=data, headers=headers)

    def password_is(self, account: str, password: str) -> bool:
        from mox_core.accounts.passwords import verify_password

        return verify_password(self.credentials.lookup(account), password)
