"""Outgoing SMTP: the client session, SASL, MX resolution, dialing and MTA-STS.

Shared by the direct, socks, smtp and submission transports and by ``mox sendmail``:

* :mod:`.client`  -- :class:`SMTPClient` over a connected stream, :class:`SMTPClientError`;
* :mod:`.sasl`    -- SASL client mechanisms and how one is chosen;
* :mod:`.dial`    -- address lookup, the private-address guard, the pluggable :data:`Dialer`;
* :mod:`.mx`      -- MX resolution, :func:`deliver_via_mx` (the direct-delivery loop) and
  :func:`deliver_to_host` (one smarthost);
* :mod:`.mtasts`  -- MTA-STS policies (RFC 8461) and their cache;
* :mod:`.sessions` -- open sessions kept for the next message to the same smarthost.
"""

from mox_core.smtpclient.client import (
    Extensions,
    Reply,
    SMTPClient,
    SMTPClientError,
    SMTPTLSError,
    Timeouts,
    TLSMode,
    make_ssl_context,
    open_client,
    prepare_data,
)
from mox_core.smtpclient.dial import Dialer, dial_host, gather_ips, refused_target, tcp_dial
from mox_core.smtpclient.mtasts import HTTPSPolicyFetcher, MTASTSCache, Policy
from mox_core.smtpclient.mx import (
    Destinations,
    deliver_to_host,
    deliver_via_mx,
    gather_destinations,
    session_deliver,
)
from mox_core.smtpclient.sasl import AuthCredentials
from mox_core.smtpclient.sessions import SessionCache

__all__ = [
    "AuthCredentials",
    "Destinations",
    "Dialer",
    "Extensions",
    "HTTPSPolicyFetcher",
    "MTASTSCache",
    "Policy",
    "Reply",
    "SMTPClient",
    "SMTPClientError",
    "SMTPTLSError",
    "SessionCache",
    "TLSMode",
    "Timeouts",
    "deliver_to_host",
    "deliver_via_mx",
    "dial_host",
    "gather_destinations",
    "gather_ips",
    "make_ssl_context",
    "open_client",
    "prepare_data",
    "refused_target",
    "session_deliver",
    "tcp_dial",
]
