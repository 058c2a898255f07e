"""The smtp transport: relay every message to one smarthost, without authentication.

As mox's ``SMTP:`` transport. No MX lookup, no MTA-STS: the smarthost's name is resolved through
our own resolver (``[dns]`` in mox.toml), each of its addresses tried in turn, and one SMTP
session delivers all recipients of the message. The session itself is the shared client's
(:func:`mox_core.smtpclient.deliver_to_host`); this module only turns settings into TLS mode,
CA file and resolver.

TLS: STARTTLS is required and the certificate verified against ``host`` (RFC 3207 §4.1 leaves
the policy to the client; a relay that receives all our mail deserves the strict one), unless
``starttls_insecure_skip_verify`` (STARTTLS still required) or ``no_starttls``. There is no
plaintext fallback: a failed handshake or certificate check is a temporary failure.

Private addresses: the guard against loopback/private targets protects MX-based delivery, where
a stranger's DNS chooses where we connect. A smarthost is the admin's own choice, often on a
private network or on loopback, so it is always allowed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from mox_core.api import (
    DESTINATION_CONCURRENCY,
    DeliveryContext,
    OutgoingMessage,
    RecipientResult,
    ResolverCache,
    Timeouts,
    TLSMode,
    ca_file_problem,
    config_path,
    deliver_to_host,
    local_failure,
    tcp_dial,
)
from mox_transport_smtp.settings import SMTPSettings

__all__ = ["SMTPTransport"]

log = structlog.get_logger(component="transport.smtp")

class SMTPTransport:
    """A configured smtp transport; built once per config by the plugin's factory.

    ``options`` are for tests and embedding: ``timeouts`` (:class:`Timeouts`), ``dial`` (a
    :data:`~mox_core.smtpclient.Dialer`).
    """

    #: parallel deliveries to one recipient domain the queue may run through this smarthost
    destination_concurrency = DESTINATION_CONCURRENCY

    def __init__(self, name: str, settings: SMTPSettings, **options: Any) -> None:
        self.name = name
        self.settings = settings
        self.options = options
        self._resolvers = ResolverCache()
        # sessions kept by the queue are shared only by transports with the very same settings
        self._session_key = ("smtp", name, settings.model_dump_json())

    @property
    def tls_mode(self) -> TLSMode:
        """As mox's ``SMTP:`` transport: STARTTLS required and verified unless configured down."""
        if self.settings.no_starttls:
            return TLSMode.SKIP
        if self.settings.starttls_insecure_skip_verify:
            return TLSMode.REQUIRED_UNVERIFIED
        return TLSMode.REQUIRED_VERIFIED

    async def deliver(
        self, message: OutgoingMessage, ctx: DeliveryContext
    ) -> Sequence[RecipientResult]:
        s = self.settings
        ca_file = config_path(s.ca_file, ctx)
        problem = ca_file_problem(ca_file) if self.tls_mode is TLSMode.REQUIRED_VERIFIED else None
        if problem:
            log.error("transport_misconfigured", transport=self.name, error=problem)
            return local_failure(message, f"transport {self.name}: {problem}")
        results = await deliver_to_host(
            message, host=s.host, port=s.port, ehlo_name=ctx.hostname,
            resolver=self._resolvers.get(ctx), tls_mode=self.tls_mode, ca_file=ca_file,
            timeouts=self.options.get("timeouts", Timeouts()), allow_private=True,
            dial=self.options.get("dial", tcp_dial), sessions=ctx.sessions, session_key=self._session_key)
        log.debug("smarthost_delivery", transport=self.name, host=s.host, port=s.port,
                  statuses=[r.status.value for r in results])
        return results
