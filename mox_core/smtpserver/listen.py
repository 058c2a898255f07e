"""Start the SMTP, submission and submissions listeners of ``mox.toml``.

Each enabled service of each listener gets one asyncio server per IP, with a protocol
instance (:class:`~mox_core.smtpserver.protocol.MoxSMTP`) per connection and one shared
policy :class:`~mox_core.smtpserver.handler.Handler` per service.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import dns.resolver
import structlog

from mox_core.accounts.sasl import AuthFailureLimiter
from mox_core.config.holder import ConfigHolder
from mox_core.config.models import Listener
from mox_core.metrics import ServiceMetrics
from mox_core.smtpserver.handler import Handler
from mox_core.smtpserver.interfaces import CredentialStore, MessageStore, OutgoingQueue, SubmissionRateLimits
from mox_core.smtpserver.sessionlimit import SessionLimit

if TYPE_CHECKING:
    from mox_core.smtpserver.protocol import MoxSMTP

log = structlog.get_logger(component="smtpserver")


def tls_context(listener: Listener, config_dir: Path, *, data_dir: Path | None = None,
                hostname: str | None = None) -> ssl.SSLContext | None:
    """Server TLS context of the listener (TLS 1.2 or newer): its certificate files, or its
    ACME certificates (``data_dir``, ``hostname``); files are read again when they change
    (:mod:`mox_core.server.tls`)."""
    if listener.tls is None:
        return None
    from mox_core.server.tls import server_context

    return server_context(listener.tls, config_dir, data_dir=data_dir, hostname=hostname)


@dataclass
class Listening:
    name: str
    service: str
    ip: str
    port: int
    server: asyncio.base_events.Server


class _ServiceOptions(TypedDict):
    """The MoxSMTP arguments that differ between the services."""

    tls_context: ssl.SSLContext | None
    require_starttls: bool
    auth_require_tls: bool
    credential_store: CredentialStore | None


def _services(lst: Listener, tls: ssl.SSLContext | None, credentials: CredentialStore | None,
              ) -> list[tuple[str, int, _ServiceOptions, ssl.SSLContext | None]]:
    """(service, port, MoxSMTP options, implicit TLS context) of each enabled service."""
    services = []
    if lst.smtp.enabled:
        services.append(("smtp", lst.smtp.port, _ServiceOptions(
            tls_context=None if lst.smtp.no_starttls else tls,
            require_starttls=lst.smtp.require_starttls, auth_require_tls=True,
            credential_store=None,
        ), None))
    if lst.submission.enabled:
        services.append(("submission", lst.submission.port, _ServiceOptions(
            tls_context=tls, require_starttls=not lst.submission.no_require_starttls,
            auth_require_tls=not lst.submission.no_require_starttls,
            credential_store=credentials,
        ), None))
    if lst.submissions.enabled:
        services.append(("submissions", lst.submissions.port, _ServiceOptions(
            tls_context=None, require_starttls=False, auth_require_tls=False,
            credential_store=credentials,
        ), tls))
    return services


def _factory(holder: ConfigHolder, listener: str, lst: Listener, service: str, options: _ServiceOptions, *,
             store: MessageStore, resolver: dns.resolver.Resolver | None, queue: OutgoingQueue | None,
             auth_limiter: AuthFailureLimiter | None,
             ratelimits: SubmissionRateLimits | None) -> Callable[[], MoxSMTP]:
    from mox_core.smtpserver.protocol import MoxSMTP

    hostname = lst.hostname or holder.get().static.hostname
    counts = ServiceMetrics(listener, service)
    handler = Handler(holder, store, "smtp" if service == "smtp" else "submission",
                      resolver=resolver if service == "smtp" else None, queue=queue,
                      hostname=hostname, ratelimits=ratelimits, metrics=counts)
    size = lst.smtp_max_message_size
    limit = SessionLimit(lst.smtp_max_sessions_per_ip) if lst.smtp_max_sessions_per_ip else None

    def factory() -> MoxSMTP:
        return MoxSMTP(handler, hostname=hostname, max_message_size=size, idle_timeout=lst.smtp_idle_timeout,
                       auth_limiter=auth_limiter, metrics=counts, session_limit=limit, **options)

    return factory


def endpoints(holder: ConfigHolder) -> list[tuple[str, str, str, int]]:
    """(listener name, service, ip, port) of every enabled SMTP, submission and submissions
    service: what the worker processes of ``mox serve`` serve."""
    return [(name, service, ip, port) for name, lst in holder.get().static.listeners.items()
            for service, port, _, _ in _services(lst, None, None) for ip in lst.ips]


async def start_listeners(holder: ConfigHolder, *, store: MessageStore, credentials: CredentialStore | None,
                          resolver: dns.resolver.Resolver | None, queue: OutgoingQueue | None = None,
                          auth_limiter: AuthFailureLimiter | None = None,
                          ratelimits: SubmissionRateLimits | None = None,
                          services: frozenset[str] | None = None,
                          sockets: dict[tuple[str, str, str], list[socket.socket]] | None = None,
                          ) -> list[Listening]:
    """Bind every enabled service; raises OSError naming the address when a bind fails.

    ``services``: only these.
    ``sockets``: already bound listening sockets by (listener name, service, ip), used
    instead of binding (a worker process gets its sockets from the main process).
    """
    cfg = holder.get()
    out: list[Listening] = []
    loop = asyncio.get_running_loop()
    for name, lst in cfg.static.listeners.items():
        tls = tls_context(lst, cfg.config_dir, data_dir=cfg.data_dir, hostname=lst.hostname or cfg.static.hostname)
        for service, port, options, implicit_tls in _services(lst, tls, credentials):
            if services is not None and service not in services:
                continue
            factory = _factory(holder, name, lst, service, options, store=store, resolver=resolver,
                               queue=queue, auth_limiter=auth_limiter, ratelimits=ratelimits)
            for ip in lst.ips:
                try:
                    if sockets is not None:
                        server = await loop.create_server(factory, sock=sockets[(name, service, ip)][0],
                                                          ssl=implicit_tls, backlog=1024)
                    else:
                        server = await loop.create_server(factory, host=ip, port=port, ssl=implicit_tls,
                                                          reuse_address=True, backlog=1024)
                except OSError as exc:
                    raise OSError(exc.errno, f"listener {name}: {service} on {ip}:{port}: {exc.strerror}") from None
                log.info("listening", listener=name, service=service, address=f"{ip}:{port}")
                out.append(Listening(name, service, ip, port, server))
    return out


def bind_shared(name: str, service: str, ip: str, port: int,
                count: int) -> tuple[list[socket.socket], bool]:
    """``count`` listening sockets on ip:port sharing the port (SO_REUSEPORT), one per worker
    process; the kernel spreads new connections over them: by the CPU that received them
    when the second value is true (:func:`steer_by_cpu`), else by a hash.

    A plain bind first: with SO_REUSEPORT alone, a port held by another process of the same
    user (a second mox, say) would be silently shared instead of refused.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    out: list[socket.socket] = []
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((ip, port))
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((ip, port))
            sock.listen(1024)
            sock.setblocking(False)
    except OSError as exc:
        for sock in out:
            sock.close()
        raise OSError(exc.errno, f"listener {name}: {service} on {ip}:{port}: {exc.strerror}") from None
    return out, count > 1 and steer_by_cpu(out[0], count)


# Classic BPF for SO_ATTACH_REUSEPORT_CBPF: A = cpu; A %= n; return A. The result picks the
# socket of the reuseport group by the order the sockets were bound in.
_SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_AD_CPU = (-0x1000 + 36) & 0xFFFFFFFF
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16


def steer_by_cpu(sock: socket.socket, count: int) -> bool:
    """Give a new connection to the socket (worker) numbered after the CPU that received it,
    instead of a hash of its addresses (Linux 4.6+; best effort, else the hash stays).

    Why: with a hash, one client's consecutive connections land on every worker in turn, and
    each worker is woken cold (measured: 1 connection at a time, 2 workers 0.62x of Postfix,
    one process 0.87x). A client's connections arrive on its CPU's queue, so one busy client
    keeps one warm worker, and many clients, spread over the CPUs, use all workers.
    """
    import ctypes
    import struct
    import sys

    if not sys.platform.startswith("linux"):
        return False
    insns = [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_CPU), (_BPF_ALU_MOD_K, 0, 0, count), (_BPF_RET_A, 0, 0, 0)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in insns))
    prog = struct.pack("@HP", len(insns), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, prog)
    except OSError as exc:
        log.info("reuseport_cpu_steering_unavailable", error=str(exc))
        return False
    return True
