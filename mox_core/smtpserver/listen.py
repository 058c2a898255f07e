"""Start the SMTP, submission and submissions listeners of ``mox.toml``.

Each enabled service of each listener gets one asyncio server per IP, with a protocol
instance (:class:`~mox_core.smtpserver.protocol.MoxSMTP`) per connection and one shared
policy :class:`~mox_core.smtpserver.handler.Handler` per service.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mox_core.config import ConfigHolder
from mox_core.configmodels import Listener
from mox_core.smtpserver.handler import Handler

log = structlog.get_logger(component="smtpserver")


def tls_context(listener: Listener, config_dir: Path) -> ssl.SSLContext | None:
    """Server TLS context from the listener's certificate files (TLS 1.2 or newer)."""
    if listener.tls is None:
        return None
    cert = listener.tls.cert_file if listener.tls.cert_file.is_absolute() else config_dir / listener.tls.cert_file
    key = listener.tls.key_file if listener.tls.key_file.is_absolute() else config_dir / listener.tls.key_file
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass
class Listening:
    name: str
    service: str
    ip: str
    port: int
    server: asyncio.base_events.Server


async def start_listeners(holder: ConfigHolder, *, store: Any, credentials: Any, resolver: Any,
                          queue: Any = None, auth_limiter: Any = None,
                          ratelimits: Any = None) -> list[Listening]:
    """Bind every enabled service; raises OSError naming the address when a bind fails."""
    from mox_core.smtpserver.protocol import MoxSMTP

    cfg = holder.get()
    out: list[Listening] = []
    loop = asyncio.get_running_loop()
    for name, lst in cfg.static.listeners.items():
        tls = tls_context(lst, cfg.config_dir)
        hostname = lst.hostname or cfg.static.hostname
        services = []
        if lst.smtp.enabled:
            services.append(("smtp", lst.smtp.port, dict(
                tls_context=None if lst.smtp.no_starttls else tls,
                require_starttls=lst.smtp.require_starttls, auth_require_tls=True,
                credential_store=None,
            ), None))
        if lst.submission.enabled:
            services.append(("submission", lst.submission.port, dict(
                tls_context=tls, require_starttls=not lst.submission.no_require_starttls,
                auth_require_tls=not lst.submission.no_require_starttls,
                credential_store=credentials,
            ), None))
        if lst.submissions.enabled:
            services.append(("submissions", lst.submissions.port, dict(
                tls_context=None, require_starttls=False, auth_require_tls=False,
                credential_store=credentials,
            ), tls))
        for service, port, options, implicit_tls in services:
            handler = Handler(holder, store, "smtp" if service == "smtp" else "submission",
                              resolver=resolver if service == "smtp" else None, queue=queue,
                              hostname=hostname, ratelimits=ratelimits)

            def factory(handler: Handler = handler, options: dict[str, Any] = options,
                        size: int = lst.smtp_max_message_size, hostname: str = hostname) -> MoxSMTP:
                return MoxSMTP(handler, hostname=hostname, max_message_size=size,
                               auth_limiter=auth_limiter, **options)

            for ip in lst.ips:
                try:
                    server = await loop.create_server(factory, host=ip, port=port, ssl=implicit_tls,
                                                      reuse_address=True, backlog=1024)
                except OSError as exc:
                    raise OSError(exc.errno, f"listener {name}: {service} on {ip}:{port}: {exc.strerror}") from None
                log.info("listening", listener=name, service=service, address=f"{ip}:{port}")
                out.append(Listening(name, service, ip, port, server))
    return out
