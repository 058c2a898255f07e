"""The socks transport object. Delivery itself is built in the transports issue (#5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mox_core.kinds import DeliveryContext, OutgoingMessage, RecipientResult


class SocksTransport:
    """A configured socks transport; built once per config by the plugin's factory."""

    def __init__(self, name: str, settings: Any, **options: Any) -> None:
        self.name = name
        self.settings = settings
        self.options = options

    async def deliver(
        self, message: OutgoingMessage, ctx: DeliveryContext
    ) -> Sequence[RecipientResult]:
        raise NotImplementedError(f"transport kind socks: delivery is not built yet")
