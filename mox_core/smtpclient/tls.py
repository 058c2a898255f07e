"""TLS of mox's SMTP client: how a session uses it (:class:`TLSMode`) and the client
context (TLS 1.2 or newer; the certificate checked only where a mode says so)."""

from __future__ import annotations

import enum
import ssl

__all__ = ["TLSMode", "make_ssl_context"]


class TLSMode(enum.Enum):
    """How a session uses TLS (the modes of mox's direct delivery and smarthost transports)."""

    SKIP = "skip"  # never STARTTLS (transport setting no_starttls)
    OPPORTUNISTIC = "opportunistic"  # STARTTLS if announced; certificate not checked
    REQUIRED_UNVERIFIED = "required-unverified"  # STARTTLS even if not announced; not checked
    REQUIRED_VERIFIED = "required-verified"  # STARTTLS required, PKIX against the host name
    IMMEDIATE = "immediate"  # implicit TLS right after connect (port 465), PKIX verified


def make_ssl_context(*, verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """Client TLS context: TLS >= 1.2; PKIX and host name checked when ``verify``.

    ``ca_file`` adds CAs to the system's (mox ``AdditionalToSystem``), for test CAs and
    private smarthosts.
    """
    if verify:
        ctx = ssl.create_default_context()
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
