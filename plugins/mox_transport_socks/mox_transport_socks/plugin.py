"""Hooks of the socks transport plugin."""

from __future__ import annotations

from mox_core import hookimpl
from mox_core.api import TransportKind
from mox_transport_socks.settings import SocksSettings


def _factory(name: str, settings: SocksSettings):
    from mox_transport_socks.transport import SocksTransport

    return SocksTransport(name, settings)


@hookimpl
def mox_register_transports() -> list[TransportKind]:
    return [
        TransportKind(
            name="socks",
            settings_model=SocksSettings,
            factory=_factory,
            description="Direct delivery with every connection made through a SOCKS5 proxy.",
        )
    ]
