"""The account pages of mox's web server: a user logs in and sees their addresses, limits
and use, their Inbox, and changes their password (:func:`account_app`)."""

from mox_core.account.app import account_app

__all__ = ["account_app"]
