"""Outgoing SMTP: the client session, SASL, MX resolution, dialing and MTA-STS.

Shared by the direct, socks, smtp and submission transports and by ``mox sendmail``:

* :mod:`.client`  -- :class:`SMTPClient` over a connected stream;
* :mod:`.wire`    -- replies, EHLO extensions and the DATA payload;
* :mod:`.errors`  -- :class:`SMTPClientError`, permanent or temporary;
* :mod:`.sasl`    -- SASL client mechanisms and how one is chosen;
* :mod:`.dial`    -- address lookup, the private-address guard, the pluggable :data:`Dialer`;
* :mod:`.mx`      -- MX resolution, :func:`deliver_via_mx` (the direct-delivery loop) and
  :func:`deliver_to_host` (one smarthost);
* :mod:`.mtasts`  -- MTA-STS policies (RFC 8461) and their cache;
* :mod:`.sessions` -- open sessions kept for the next message to the same smarthost;
* :mod:`.smarthost` -- what every smarthost transport needs (settings, local failures).

Plugins use these through :mod:`mox_core.api`.
"""
