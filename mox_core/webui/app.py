"""The web UI framework: a login-protected set of pages as one ASGI application.

A service (the account pages, the admin pages) makes a :class:`WebUI` with its name, its
login check and its templates, registers its pages with :meth:`WebUI.page` (GET, never
changes anything) and its form handlers with :meth:`WebUI.action` (POST), and serves
:meth:`WebUI.app`. The framework adds the login and logout, the sessions, the checks of
every POST and the security headers, so a service cannot forget them:

==========================  ===============================================================
rule                        where
==========================  ===============================================================
security headers            :class:`~mox_core.webui.security.SecurityHeaders`, every response
POST from our own origin    :meth:`WebUI._guard`, before routing and before the body is read
CSRF token of the session   :meth:`WebUI.action`'s wrapper, before the handler runs
logged in                   :meth:`WebUI.page` and :meth:`WebUI.action`'s wrappers
login throttle per IP       :meth:`WebUI._login_post`, before the password is checked
new session id at login     :meth:`WebUI._login_post` (:meth:`SessionStore.create`)
==========================  ===============================================================

The app is mounted the ASGI way: ``root_path`` is its base path without the trailing slash
(``/account``), ``path`` the whole path; its URLs are made with :meth:`Page.url`. Cookies
(``mox_<service>_session``) have ``Path`` = root_path + "/", so two services never see each
other's sessions.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from mox_core.accounts.sasl import AuthFailureLimiter
from mox_core.webui.forms import FormError, read_form
from mox_core.webui.render import Renderer
from mox_core.webui.security import SecurityHeaders, cookie_header, same_origin, token_matches
from mox_core.webui.sessions import Session, SessionStore, new_token

__all__ = ["LoginCheck", "Page", "WebUI"]

# (username, password) -> the principal (account name, "admin"), or None; runs in a thread
LoginCheck = Callable[[str, str], "str | None"]
Handler = Callable[["Page"], Awaitable[Response]]

_SAFE_METHODS = ("GET", "HEAD")
_NEXT = re.compile(r"^/(?![/\\])[^\x00-\x20\\]*$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")


@dataclass
class Page:
    """One request to a page of a logged-in user, handed to the service's handlers."""

    ui: WebUI
    request: Request
    session: Session
    form: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return self.request.scope.get("root_path", "")

    @property
    def principal(self) -> str:
        return self.session.principal

    def url(self, path: str) -> str:
        """The URL of ``path`` (``/messages``) of this app."""
        return self.root + path

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        return self.ui.render(self.request, template, self.session, status, **context)

    def redirect(self, path: str) -> Response:
        """303 to ``path`` of this app (after a POST: the browser GETs it)."""
        return RedirectResponse(self.url(path), status_code=303)


class WebUI:
    """A login-protected web application of mox.

    :param service: the session namespace and cookie name (``account``, ``admin``).
    :param title: shown in the page header and titles.
    :param check_login: the password check, run in a worker thread.
    :param user_label: the label of the login's user name field; None for a password-only
        login (the admin pages): ``check_login`` then gets "" as user name.
    :param principal_exists: whether a session's principal still exists (an account removed
        from the config ends its sessions at their next request).
    :param nav: the header's links, (label, path).
    """

    def __init__(self, service: str, title: str, check_login: LoginCheck, sessions: SessionStore,
                 limiter: AuthFailureLimiter | None = None, *, templates: Path | None = None,
                 static: Path | None = None, user_label: str | None = "Email address or account name",
                 principal_exists: Callable[[str], bool] = lambda p: True,
                 nav: Sequence[tuple[str, str]] = ()) -> None:
        self.service = service
        self.title = title
        self.check_login = check_login
        self.sessions = sessions
        self.limiter = limiter if limiter is not None else AuthFailureLimiter()
        self.user_label = user_label
        self.principal_exists = principal_exists
        self.nav = list(nav)
        self.cookie = f"mox_{service}_session"
        self.login_cookie = f"mox_{service}_login"
        self.renderer = Renderer(templates, static)
        self._routes: list[Route] = []
        self.action("/logout")(self._logout)

    # -- registering pages -------------------------------------------------------------

    def page(self, path: str) -> Callable[[Handler], Handler]:
        """Register a GET page for logged-in users."""
        def register(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                session = self._session(request)
                if session is None:
                    return self._to_login(request)
                return await handler(Page(self, request, session))
            self._routes.append(Route(path, endpoint, methods=["GET"]))
            return handler
        return register

    def action(self, path: str) -> Callable[[Handler], Handler]:
        """Register a POST form handler for logged-in users; the form must carry the
        session's CSRF token (the origin was checked before)."""
        def register(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                session = self._session(request)
                if session is None:
                    return self._to_login(request)
                try:
                    form = await read_form(request)
                except FormError as exc:
                    return self.error(request, exc.status, str(exc), session)
                if not token_matches(session.csrf, form.get("csrf")):
                    return self._forbidden(request, session)
                return await handler(Page(self, request, session, form))
            self._routes.append(Route(path, endpoint, methods=["POST"]))
            return handler
        return register

    def app(self) -> Callable[..., Awaitable[None]]:
        """The ASGI application."""
        routes = [
            Route("/static/{version}/{name}", self.renderer.static.endpoint, methods=["GET"]),
            Route("/login", self._login_page, methods=["GET"]),
            Route("/login", self._login_post, methods=["POST"]),
            *self._routes,
        ]
        star = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})
        star.router.redirect_slashes = False

        async def guarded(scope: Any, receive: Any, send: Any) -> None:
            await self._guard(star, scope, receive, send)

        return SecurityHeaders(guarded)

    # -- rendering ---------------------------------------------------------------------

    def render(self, request: Request, template: str, session: Session | None, status: int = 200,
               **context: Any) -> Response:
        root = request.scope.get("root_path", "")
        base = {
            "ui": self, "root": root, "session": session, "user": session.principal if session else None,
            "csrf": session.csrf if session else "", "nav": [(label, root + p) for label, p in self.nav],
            "path": request.url.path, "static": lambda name: self.renderer.static.url(root, name),
        }
        return HTMLResponse(self.renderer.render(template, {**base, **context}), status_code=status)

    def error(self, request: Request, status: int, message: str, session: Session | None = None) -> Response:
        return self.render(request, "error.html", session, status, code=status, message=message)

    def _forbidden(self, request: Request, session: Session | None = None) -> Response:
        return self.error(request, 403, "This form was not sent from this site's own page, or it "
                          "has expired. Nothing was changed. Go back, reload the page and try again.", session)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        text = {404: "There is no such page.", 405: "This page does not accept that request."}
        response = self.error(request, status, text.get(status, "The request failed."), self._session(request))
        for k, v in (getattr(exc, "headers", None) or {}).items():
            response.headers[k] = v
        return response

    # -- the checks --------------------------------------------------------------------

    async def _guard(self, app: Starlette, scope: Any, receive: Any, send: Any) -> None:
        """Every request that is not GET or HEAD must come from a page of our own origin."""
        if scope["type"] == "http" and scope.get("method") not in _SAFE_METHODS and not same_origin(scope):
            await self._forbidden(Request(scope))(scope, receive, send)
            return
        await app(scope, receive, send)

    def _session(self, request: Request) -> Session | None:
        session = self.sessions.get(self.service, request.cookies.get(self.cookie))
        if session is not None and not self.principal_exists(session.principal):
            self.sessions.delete(session.id)
            return None
        return session

    def _to_login(self, request: Request) -> Response:
        root = request.scope.get("root_path", "")
        target = request.url.path[len(root):] if request.url.path.startswith(root) else "/"
        if request.url.query:
            target += "?" + request.url.query
        where = f"?next={quote(target, safe='')}" if request.method == "GET" and target not in ("/", "") else ""
        return RedirectResponse(f"{root}/login{where}", status_code=303)

    def _secure(self, request: Request) -> bool:
        return request.scope.get("scheme") == "https"

    def _cookie_path(self, request: Request) -> str:
        return request.scope.get("root_path", "") + "/"

    # -- login and logout --------------------------------------------------------------

    def _login_form(self, request: Request, status: int = 200, error: str = "", notice: str = "",
                    username: str = "") -> Response:
        token = request.cookies.get(self.login_cookie, "")
        if not _TOKEN.match(token):
            token = new_token()
        nxt = request.query_params.get("next", "")
        response = self.render(request, "login.html", None, status, login_token=token, error=error,
                               notice=notice, username=username, next=nxt if _NEXT.match(nxt) else "")
        response.headers.append("set-cookie", cookie_header(self.login_cookie, token, self._cookie_path(request),
                                                            self._secure(request)))
        return response

    async def _login_page(self, request: Request) -> Response:
        if self._session(request) is not None:
            return RedirectResponse(request.scope.get("root_path", "") + "/", status_code=303)
        notice = "You are logged out." if request.query_params.get("loggedout") else ""
        return self._login_form(request, notice=notice)

    async def _login_post(self, request: Request) -> Response:
        try:
            form = await read_form(request)
        except FormError as exc:
            return self.error(request, exc.status, str(exc))
        if not token_matches(request.cookies.get(self.login_cookie, ""), form.get("csrf")):
            return self._forbidden(request)
        username = form.get("username", "").strip() if self.user_label is not None else ""
        ip = request.client.host if request.client else ""
        wait = self.limiter.blocked_for(ip)
        if wait > 0:
            return self._login_form(request, 429, username=username, error=(
                f"Too many failed logins from your address; try again in {math.ceil(wait)} seconds."))
        principal = await asyncio.to_thread(self.check_login, username, form.get("password", ""))
        if principal is None:
            self.limiter.failed(ip)
            what = "email address or password" if self.user_label is not None else "password"
            return self._login_form(request, 403, error=f"Wrong {what}.", username=username)
        self.limiter.succeeded(ip)
        old = request.cookies.get(self.cookie)
        if old:
            self.sessions.delete(old)  # never promoted: the login gets a new id
        session = self.sessions.create(self.service, principal)
        root = request.scope.get("root_path", "")
        nxt = form.get("next", "")
        response = RedirectResponse(root + (nxt if _NEXT.match(nxt) else "/"), status_code=303)
        path, secure = self._cookie_path(request), self._secure(request)
        response.headers.append("set-cookie", cookie_header(self.cookie, session.id, path, secure))
        response.headers.append("set-cookie", cookie_header(self.login_cookie, "", path, secure, max_age=0))
        return response

    async def _logout(self, page: Page) -> Response:
        self.sessions.delete(page.session.id)
        response = RedirectResponse(page.url("/login?loggedout=1"), status_code=303)
        response.headers.append("set-cookie", cookie_header(
            self.cookie, "", self._cookie_path(page.request), self._secure(page.request), max_age=0))
        return response
