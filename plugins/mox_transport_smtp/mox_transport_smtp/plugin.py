"""Hooks of the smtp transport plugin."""

from __future__ import annotations

from mox_core import hookimpl
from mox_core.api import TransportKind
from mox_transport_smtp.settings import SMTPSettings


def _factory(name: str, settings: SMTPSettings):
    from mox_transport_smtp.transport import SMTPTransport

    return SMTPTransport(name, settings)


@hookimpl
def mox_register_transports() -> list[TransportKind]:
    return [
        TransportKind(
            name="smtp",
            settings_model=SMTPSettings,
            factory=_factory,
            description="Relay everything to one smarthost, without authentication.",
        )
    ]
