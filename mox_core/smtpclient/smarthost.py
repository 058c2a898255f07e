"""Pieces every smarthost transport (smtp, submission, and third-party ones) needs.

Settings name files relative to the directory of mox.toml; problems on our side (an unusable
CA file, a missing password) are temporary failures with enhanced code 4.3.5 ("system
incorrectly configured", RFC 3463 §3.4) and a text naming the setting; the smarthost's name is
resolved through the resolver from ``[dns]`` when the queue passes none.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Any

from mox_core.plugins.kinds import DeliveryContext, DeliveryStatus, OutgoingMessage, RecipientResult
from mox_core.smtp.domain import to_ascii
from mox_core.smtpclient.tls import make_ssl_context

__all__ = ["CONFIG_PROBLEM", "DESTINATION_CONCURRENCY", "ResolverCache", "ca_file_problem", "config_path", "local_failure",
           "smarthost_name"]

CONFIG_PROBLEM = "4.3.5"

#: Deliveries a smarthost transport runs at once to one recipient domain (the queue's
#: ``destination_concurrency``; Postfix's ``default_destination_concurrency_limit``). Direct
#: delivery keeps one per domain; a smarthost is our own relay and takes parallel sessions.
DESTINATION_CONCURRENCY = 20


def smarthost_name(value: str) -> str:
    """Validate a smarthost ``host`` setting: a DNS name (it is checked against the
    certificate), not an IP address and without a trailing dot (mox: "bad host")."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        raise ValueError(f"bad host {value!r}: must be a DNS name, not an IP address")
    try:
        return to_ascii(value)
    except ValueError as exc:
        raise ValueError(f"bad host {value!r}: {exc}") from None


def config_path(path: str | None, ctx: DeliveryContext | None) -> str | None:
    """``path`` relative to the directory of mox.toml (absolute paths unchanged)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_absolute() and ctx is not None and ctx.config is not None:
        p = ctx.config.config_dir / p
    return str(p)


def ca_file_problem(ca_file: str | None) -> str | None:
    """Why ``ca_file`` cannot be used, or None: checked before dialing, so that a broken file
    is reported as what it is instead of as a TLS failure of the smarthost."""
    if ca_file is None:
        return None
    try:
        make_ssl_context(verify=True, ca_file=ca_file)
    except OSError as exc:
        return f"reading ca_file {ca_file}: {exc.strerror or exc}"
    except ssl.SSLError as exc:
        return f"loading ca_file {ca_file}: {exc.reason or exc}"
    return None


def local_failure(message: OutgoingMessage, text: str) -> list[RecipientResult]:
    """Every recipient fails temporarily for a problem on our side (config, files)."""
    return [RecipientResult(r, DeliveryStatus.TEMPORARY, None, CONFIG_PROBLEM, None, text)
            for r in message.recipients]


class ResolverCache:
    """``ctx.resolver``, else the resolver from ``[dns]``, built once per config."""

    def __init__(self) -> None:
        self._key: Any = None
        self._resolver: Any = None

    def get(self, ctx: DeliveryContext) -> Any:
        if ctx.resolver is not None:
            return ctx.resolver
        dns_cfg = ctx.config.static.dns if ctx.config is not None else None
        if self._resolver is None or self._key is not dns_cfg:
            import dns.asyncresolver

            from mox_core.dns.resolver import make_async_resolver

            self._resolver = make_async_resolver(dns_cfg) if dns_cfg is not None else dns.asyncresolver.Resolver()
            self._key = dns_cfg
        return self._resolver
