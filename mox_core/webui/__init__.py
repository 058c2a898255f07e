"""The shared framework of mox's web pages (the account pages, the admin pages).

- :mod:`mox_core.webui.app`: :class:`WebUI`, a login-protected application: login and
  logout, pages (GET) and form actions (POST), error pages;
- :mod:`mox_core.webui.sessions`: server-side sessions in ``<data_dir>/web/sessions.db``;
- :mod:`mox_core.webui.security`: security headers, the same-origin check of POSTs, CSRF
  tokens, cookie attributes;
- :mod:`mox_core.webui.render`: Jinja2 templates and the static files shipped in this
  package (``templates/base.html`` is the layout a service's templates extend,
  ``static/mox.css`` the stylesheet), served under ``<root_path>/static/<hash>/``;
- :mod:`mox_core.webui.forms`: URL-encoded form bodies.

The pages need no JavaScript and ship none.
"""

from mox_core.webui.app import LoginCheck, Page, WebUI
from mox_core.webui.sessions import Session, SessionStore

__all__ = ["LoginCheck", "Page", "Session", "SessionStore", "WebUI"]
