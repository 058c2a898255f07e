"""What one delivery attempt gives for each recipient: the contract between the transports
(and mox's SMTP client) and the outgoing queue, which records it and retries or gives up.

A leaf module, so that the SMTP client can use these without importing the plugin kinds;
plugins import them from :mod:`mox_core.api`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["DeliveryStatus", "RecipientResult"]


class DeliveryStatus(enum.Enum):
    """Outcome of one delivery attempt for one recipient."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # try again later (4xx, timeout, connection or TLS error)
    PERMANENT = "permanent"  # give up, send a DSN (5xx)


@dataclass(frozen=True)
class RecipientResult:
    """Result of a delivery attempt for one recipient, as the queue records it.

    ``code`` and ``enhanced_code`` are the remote SMTP reply (``550``, ``"5.1.1"``) when there
    was one; ``None`` for connection, DNS and TLS errors. ``remote_host`` is the host that
    gave the reply (or that could not be reached), ``text`` the reply text or error message.
    """

    recipient: str
    status: DeliveryStatus
    code: int | None = None
    enhanced_code: str | None = None
    remote_host: str | None = None
    text: str = ""

    @property
    def permanent(self) -> bool:
        return self.status is DeliveryStatus.PERMANENT
