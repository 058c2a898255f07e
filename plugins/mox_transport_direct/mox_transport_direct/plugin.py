"""Hooks of the direct transport plugin."""

from __future__ import annotations

from mox_core import hookimpl
from mox_core.api import TransportKind
from mox_transport_direct.settings import DirectSettings


def _factory(name: str, settings: DirectSettings):
    from mox_transport_direct.transport import DirectTransport

    return DirectTransport(name, settings)


@hookimpl
def mox_register_transports() -> list[TransportKind]:
    return [
        TransportKind(
            name="direct",
            settings_model=DirectSettings,
            factory=_factory,
            description="Deliver to the MX hosts of each recipient domain (the default).",
        )
    ]
