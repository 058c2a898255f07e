"""The direct transport: deliver to each recipient domain's MX hosts over TCP port 25.

All the work is in :func:`mox_core.smtpclient.mx.deliver_via_mx`; this class adds what belongs
to a configured transport: the address-family settings, one MTA-STS cache for its lifetime,
and the IPs dialed per host in earlier attempts (for mox's family alternation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mox_core.api import (
    DeliveryContext,
    MXDeliveryState,
    OutgoingMessage,
    RecipientResult,
    Timeouts,
    deliver_via_mx,
    tcp_dial,
)
from mox_transport_direct.settings import DirectSettings


class DirectTransport:
    """A configured direct transport; built once per config by the plugin's factory.

    ``options`` are for tests and embedding: ``mtasts`` (an :class:`MTASTSCache`, default one
    per transport, persisted in the data directory), ``dial`` (a dialer), ``timeouts``,
    ``tls_ca_file`` (extra CAs for verified TLS).
    """

    # one delivery at a time per recipient domain: the receiving servers are not ours to load
    # (a transport table's destination_concurrency in mox.toml overrides it)
    destination_concurrency = 1

    def __init__(self, name: str, settings: DirectSettings | None = None, **options: Any) -> None:
        self.name = name
        self.settings = settings if settings is not None else DirectSettings()
        self.options = options
        self._state = MXDeliveryState(options.get("mtasts"))

    async def deliver(
        self, message: OutgoingMessage, ctx: DeliveryContext
    ) -> Sequence[RecipientResult]:
        return await deliver_via_mx(
            message,
            ctx,
            dial=self.options.get("dial", tcp_dial),
            ehlo_name=ctx.hostname,
            ipv4=not self.settings.disable_ipv4,
            ipv6=not self.settings.disable_ipv6,
            mtasts=self._state.mtasts(ctx),
            timeouts=self.options.get("timeouts", Timeouts()),
            dialed_ips=self._state.dialed_ips(),
            tls_ca_file=self.options.get("tls_ca_file"),
        )
