"""Finding a host's addresses and connecting to them, with a pluggable dialer.

Why pluggable: direct delivery connects over TCP itself; the socks transport runs the very same
MX loop but connects through a SOCKS5 proxy. Both hand a :data:`Dialer` to
:func:`mox_core.smtpclient.mx.deliver_via_mx`; everything after the connect is shared.

Why the address guard: MX and A records are controlled by whoever owns the recipient domain,
so without it anyone could make us connect to 127.0.0.1:25 or to a cloud metadata address
(server-side request forgery through DNS). Tests on loopback set ``[testing] allow_private_targets``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from mox_core.smtpclient.errors import RefusedTargetError, SMTPClientError

__all__ = [
    "Dialer",
    "dial_host",
    "dns_error_text",
    "gather_ips",
    "order_ips",
    "refused_target",
    "tcp_dial",
    "to_streams",
]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
#: ``await dial(host, ip, port, timeout)``: a connected socket or stream pair, or raise.
#: ``host`` is the name being connected to (for logs and SOCKS), ``ip`` the address chosen.
Dialer = Callable[[str, str, int, float], Awaitable[Streams | socket.socket]]

_READ_LIMIT = 64 * 1024
_DNS_TIMEOUT = 30.0  # per lookup, as mox's direct delivery
_SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT


async def tcp_dial(host: str, ip: str, port: int, timeout: float) -> Streams:
    """The default dialer: a plain TCP connection to ``ip:port``."""
    async with asyncio.timeout(timeout):
        return await asyncio.open_connection(ip, port, limit=_READ_LIMIT)


async def to_streams(conn: Streams | socket.socket) -> Streams:
    """A dialer may return a connected socket (python-socks does); wrap it in streams."""
    if isinstance(conn, socket.socket):
        conn.setblocking(False)
        return await asyncio.open_connection(sock=conn, limit=_READ_LIMIT)
    return conn


def refused_target(ip: str) -> str | None:
    """Why we must not connect to ``ip`` unless private targets are allowed; ``None`` if fine."""
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip)
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return "unspecified address"
    if addr.is_loopback:
        return "loopback address"
    if addr.is_link_local:
        return "link-local address"
    if addr.is_multicast:
        return "multicast address"
    if addr.is_private or addr.is_reserved or (addr.version == 4 and addr in _SHARED_SPACE):
        return "private address"
    return None


def order_ips(ips: Sequence[str], dialed: Sequence[str]) -> list[str]:
    """Order a host's IPs for this attempt, given the IPs dialed in earlier attempts (mox).

    The family *not* used last time comes first, to get around a blocklisted address; within
    the family used last, its previous address comes first only if that family was dialed
    exactly once (to keep greylisting state). Stable: DNS order is kept otherwise.
    """
    if not dialed:
        return list(ips)
    prev = dialed[-1]
    prev_v4 = ":" not in prev
    same_family = sum(1 for ip in dialed if (":" not in ip) == prev_v4)
    prefer_prev = same_family == 1
    return sorted(ips, key=lambda ip: ((":" not in ip) == prev_v4, not (prefer_prev and ip == prev)))


async def gather_ips(resolver: dns.asyncresolver.Resolver, host: str, *, ipv4: bool = True,
                     ipv6: bool = True, missing_permanent: bool = False) -> list[str]:
    """A and/or AAAA addresses of ``host`` (CNAMEs followed by the resolver), IPv4 first.

    Raises a temporary :class:`SMTPClientError` for DNS failures, and for a host without
    addresses (permanent instead with ``missing_permanent``, for an implicit MX: RFC 5321 §5.1
    says such a domain cannot receive mail).
    """
    rdtypes = [t for t, on in (("A", ipv4), ("AAAA", ipv6)) if on]
    answers = await asyncio.gather(*(_lookup(resolver, host, t) for t in rdtypes), return_exceptions=True)
    ips: list[str] = []
    failures: list[str] = []
    for rdtype, ans in zip(rdtypes, answers, strict=True):
        if isinstance(ans, BaseException):
            failures.append(f"{rdtype}: {dns_error_text(ans)}")
        else:
            ips += ans
    if ips:
        return ips
    if failures:
        raise SMTPClientError(False, None, None, host, f"looking up ip addresses of {host}: " + "; ".join(failures),
                              command="dns")
    families = " or ".join(rdtypes)
    raise SMTPClientError(missing_permanent, None, "5.1.2" if missing_permanent else "4.4.4", host,
                          f"host {host} has no {families} records", command="dns")


async def _lookup(resolver: dns.asyncresolver.Resolver, host: str, rdtype: str) -> list[str]:
    try:
        async with asyncio.timeout(_DNS_TIMEOUT):
            ans = await resolver.resolve(host.rstrip(".") + ".", rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [rd.address for rd in ans]


def dns_error_text(exc: BaseException) -> str:
    """Short text for a DNS exception, for error messages."""
    if isinstance(exc, (TimeoutError, dns.exception.Timeout)):
        return "dns timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "dns server failure (SERVFAIL)"
    return str(exc) or type(exc).__name__


async def dial_host(host: str, ips: Sequence[str], port: int, *, dial: Dialer = tcp_dial,
                    timeout: float = 30.0, allow_private: bool = False) -> tuple[Streams, str]:
    """Connect to the first of ``ips`` that answers; returns the streams and the IP used.

    The ``timeout`` budget is divided evenly over the addresses (mox). Refused targets (see
    :func:`refused_target`) are skipped; all failures are temporary errors for this host.
    """
    allowed: list[str] = []
    problems: list[str] = []
    for ip in ips:
        why = None if allow_private else refused_target(ip)
        if why:
            problems.append(f"not connecting to {ip}: {why} (allowed only with [testing] allow_private_targets)")
        else:
            allowed.append(ip)
    if not allowed:
        cls = RefusedTargetError if problems else SMTPClientError
        raise cls(False, None, "4.4.1", host, f"dialing {host}: " + "; ".join(problems or ["no addresses"]),
                  command="dial")
    per_ip = timeout / len(allowed)
    for ip in allowed:
        try:
            async with asyncio.timeout(per_ip):
                conn: Any = await dial(host, ip, port, per_ip)
                streams = await to_streams(conn)
            return streams, ip
        except Exception as exc:  # any dialer error (OSError, proxy errors) is per address
            problems.append(connect_error_text(exc, ip, port))
    raise SMTPClientError(False, None, "4.4.1", host, f"dialing {host}: " + "; ".join(problems), command="dial")


def connect_error_text(exc: BaseException, ip: str, port: int) -> str:
    """Why connecting to ``ip`` ``port`` failed, in mail terms, for the queue, DSNs and
    people ("connection refused by 192.0.2.1 port 25"), not Python's wording of the error
    ("[Errno 111] Connect call failed ('192.0.2.1', 25)")."""
    where = f"{ip} port {port}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} (connect timeout)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}"
    if isinstance(exc, ConnectionResetError):
        return f"connection reset by {where}"
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"{where}: {'network' if exc.errno == errno.ENETUNREACH else 'host'} unreachable"
        reason = exc.strerror or os.strerror(exc.errno)
        return f"connecting to {where}: {reason[:1].lower()}{reason[1:]}"
    return f"connecting to {where}: {exc or type(exc).__name__}"  # a proxy's error, say
