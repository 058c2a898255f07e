"""The public API of mox-core for plugins: everything a transport, route criterion, web
handler or rate limiter may import, in one module.

A plugin imports ``hookimpl`` from :mod:`mox_core` and everything else from here::

    from mox_core import hookimpl
    from mox_core.api import DeliveryContext, OutgoingMessage, TransportKind, deliver_to_host

Names here keep their meaning within a major version; the modules they come from are
internal and may move (``tests/test_plugin_api.py`` checks that the shipped plugins import
nothing else). ``docs/writing-plugins.md`` describes each group.
"""

from __future__ import annotations

from mox_core.hookspecs import hookimpl
from mox_core.outgoing.results import DeliveryStatus, RecipientResult
from mox_core.plugins.kinds import (
    ASGIApp,
    DeliveryContext,
    OutgoingMessage,
    RateLimitDecision,
    RateLimiter,
    RateLimiterKind,
    RouteContext,
    RouteMatcherKind,
    ServerConfig,
    Submission,
    Transport,
    TransportKind,
    WebHandlerContext,
    WebHandlerKind,
)
from mox_core.smtp.domain import to_ascii, to_unicode
from mox_core.smtpclient.client import Timeouts
from mox_core.smtpclient.dial import Dialer, tcp_dial
from mox_core.smtpclient.errors import SMTPClientError
from mox_core.smtpclient.mx import MXDeliveryState, deliver_to_host, deliver_via_mx
from mox_core.smtpclient.sasl import AuthCredentials
from mox_core.smtpclient.smarthost import (
    CONFIG_PROBLEM,
    DESTINATION_CONCURRENCY,
    ResolverCache,
    ca_file_problem,
    config_path,
    local_failure,
    smarthost_name,
)
from mox_core.smtpclient.tls import TLSMode, make_ssl_context

__all__ = [
    # registering kinds (hooks return these)
    "hookimpl",
    "TransportKind",
    "RouteMatcherKind",
    "WebHandlerKind",
    "RateLimiterKind",
    # what the registered objects get and give
    "ASGIApp",
    "DeliveryContext",
    "DeliveryStatus",
    "OutgoingMessage",
    "RateLimitDecision",
    "RateLimiter",
    "RecipientResult",
    "RouteContext",
    "ServerConfig",
    "Submission",
    "Transport",
    "WebHandlerContext",
    # delivering over SMTP: directly to the recipient domain's MX hosts, or to one host
    "AuthCredentials",
    "Dialer",
    "MXDeliveryState",
    "SMTPClientError",
    "TLSMode",
    "Timeouts",
    "deliver_to_host",
    "deliver_via_mx",
    "make_ssl_context",
    "tcp_dial",
    # smarthost transports: settings and local failures
    "CONFIG_PROBLEM",
    "DESTINATION_CONCURRENCY",
    "ResolverCache",
    "ca_file_problem",
    "config_path",
    "local_failure",
    "smarthost_name",
    # domain names
    "to_ascii",
    "to_unicode",
]
