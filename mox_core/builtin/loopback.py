"""Core's ``loopback`` transport: every message to an SMTP listener on this machine, without
DNS. ``mox localserve`` routes all outgoing mail through it to its own SMTP listener, so
nothing ever leaves the machine and every message ends in a local Maildir.

Only loopback addresses are accepted (a config error otherwise): it is not a smarthost
transport (those are the ``smtp`` and ``submission`` plugins). TLS is opportunistic, the
certificate not checked: the peer is this machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mox_core import hookimpl
from mox_core.outgoing.results import RecipientResult
from mox_core.plugins.kinds import DeliveryContext, OutgoingMessage, TransportKind
from mox_core.smtpclient.errors import SMTPClientError
from mox_core.smtpclient.mx import session_deliver
from mox_core.smtpclient.tls import TLSMode

__all__ = ["LoopbackSettings", "LoopbackTransport"]


class LoopbackSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ip: str = Field("127.0.0.1", description="Loopback address of the SMTP listener (127.0.0.0/8 or ::1).")
    port: int = Field(25, ge=1, le=65535, description="Port of the SMTP listener.")

    @field_validator("ip")
    @classmethod
    def _loopback(cls, v: str) -> str:
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"bad ip {v!r}") from None
        if not ip.is_loopback:
            raise ValueError(f"{v} is not a loopback address: the loopback transport delivers on this machine only")
        return v


class LoopbackTransport:
    """Delivers to ``ip:port`` on this machine."""

    destination_concurrency = 10

    def __init__(self, name: str, settings: LoopbackSettings) -> None:
        self.name = name
        self.settings = settings

    async def deliver(self, message: OutgoingMessage, ctx: DeliveryContext) -> Sequence[RecipientResult]:
        s = self.settings
        try:
            results, _ = await session_deliver(message, message.recipients, host=s.ip, ips=[s.ip], port=s.port,
                                               ehlo_name=ctx.hostname, tls_mode=TLSMode.OPPORTUNISTIC,
                                               allow_private=True)
        except SMTPClientError as exc:
            return [exc.result(r) for r in message.recipients]
        return results


@hookimpl
def mox_register_transports() -> list[TransportKind]:
    return [TransportKind("loopback", LoopbackSettings, LoopbackTransport,
                          "Deliver to an SMTP listener on this machine (mox localserve).")]
