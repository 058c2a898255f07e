"""The contract between mox-core and its plugins: every hook, typed and documented.

Hooks are synchronous and cheap: they *register* kinds (see :mod:`mox_core.plugins.kinds`), whose
factories build the objects that do I/O later. Core calls hooks only through
:class:`mox_core.plugins.host.PluginHost`. Ordering never comes from install order: routes, web
handlers and rate limiters are ordered by config; hooks only map a kind to its factory.

A plugin is a module with ``@hookimpl`` functions, published in the entry-point group
``mox.plugins``::

    [project.entry-points."mox.plugins"]
    transport_file = "mox_transport_file.plugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from mox_core.plugins.kinds import RateLimiterKind, RouteMatcherKind, TransportKind, WebHandlerKind

__all__ = [
    "PROJECT",
    "hookimpl",
    "mox_add_cli_commands",
    "mox_register_rate_limiters",
    "mox_register_route_matchers",
    "mox_register_transports",
    "mox_register_webhandlers",
]

PROJECT = "mox"

_spec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Outgoing mail


@_spec
def mox_register_transports() -> list[TransportKind]:
    """Called once when plugins are loaded, before any config is validated.

    Return the transport kinds this plugin provides. A kind's name is what a transport in
    ``mox.toml`` names with ``kind = "..."``; its ``settings_model`` validates the rest of
    that table; its factory builds the transport when the config is loaded. Two plugins
    returning the same kind name is a startup error naming both.

    .. versionadded:: 0.1
    """


@_spec
def mox_register_route_matchers() -> list[RouteMatcherKind]:
    """Called once when plugins are loaded, before any config is validated.

    Return the route criteria this plugin provides. Each name becomes a key allowed in a
    route (``[[routes]]`` in ``domains.toml``); a route matches a delivery attempt when all
    its criteria match. Core registers ``from_domain``, ``to_domain`` and
    ``minimum_attempts`` through this same hook.

    .. versionadded:: 0.1
    """


@_spec
def mox_register_rate_limiters() -> list[RateLimiterKind]:
    """Called once when plugins are loaded, before any config is validated.

    Return the rate limiter kinds this plugin provides. Which limiters apply to an account,
    and in which order, is decided by config; each configured limiter is checked for every
    submission before it is queued and told about it once it was queued.

    .. versionadded:: 0.1
    """


# --------------------------------------------------------------------------------------------
# Web


@_spec
def mox_register_webhandlers() -> list[WebHandlerKind]:
    """Called once when plugins are loaded, before any config is validated.

    Return the web handler kinds this plugin provides, usable as ``kind = "..."`` in
    ``[[web_handlers]]`` of ``domains.toml``. The factory returns an ASGI application and is
    called again whenever ``domains.toml`` is reloaded.

    .. versionadded:: 0.1
    """


# --------------------------------------------------------------------------------------------
# Command line


@_spec
def mox_add_cli_commands(cli: click.Group) -> None:
    """Called once at start of the ``mox`` command, before its arguments are parsed.

    Add subcommands to ``cli`` with ``cli.add_command(...)``. A command name that is already
    taken is an error naming the plugin. Returns nothing.

    :param cli: the top-level ``mox`` command group.

    .. versionadded:: 0.1
    """
