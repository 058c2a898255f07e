"""The admin pages: the administrator logs in with the admin password (``mox
setadminpassword``) and manages what lives in ``domains.toml`` (domains with DKIM and
MTA-STS, accounts and their addresses, routes, web handlers), sees the transports and plugins,
and manages the outgoing queue of the running server. See :func:`admin_app`."""

from mox_core.admin.app import admin_app

__all__ = ["admin_app"]
