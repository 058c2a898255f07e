"""The socks transport: direct delivery with every SMTP connection made through a SOCKS5 proxy.

As mox's ``Socks:`` transport. Everything but the TCP connect is direct delivery, shared with
the direct transport (:func:`mox_core.smtpclient.deliver_via_mx`): MX lookup, MTA-STS,
opportunistic STARTTLS with the plaintext fallback, next MX on temporary failures. DNS is
resolved here, with our own resolver; the proxy gets a CONNECT to ``<ip>:25`` (RFC 1928 §4,
address type IPv4/IPv6, never a name), so the private-address guard still judges the address we
actually ask for. The EHLO name is ``remote_hostname``, the name of the proxy's outgoing IPs.

Proxies: ``address`` first, then ``fallback_addresses`` in order, but only while a proxy is
*down*: its TCP port refuses, is unreachable, or does not answer the connect in time. A proxy
that is up and refuses us (wrong password, ruleset, destination refused, SOCKS timeout) fails
the connection: another proxy would only hide a configuration error or hit the same
destination. A proxy found down is tried after the others for ``proxy_down_for`` seconds.
Proxy failures are temporary, with a text starting "socks dialer:".

How "down" is told apart from a slow destination: python-socks dials the proxy itself and puts
one timeout around dial + SOCKS exchange + the proxy's own connect. We give it a ``forward``
(its hook for proxy chains) that does the TCP connect to the proxy with its own, shorter
timeout, so a dead proxy costs at most ``proxy_connect_timeout`` before the next one is tried.

Not routed through the proxy: DNS (as mox) and the HTTPS fetch of MTA-STS policies (the shared
fetcher dials directly; mox does the same).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import structlog
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy

from mox_core.api import DeliveryContext, MXDeliveryState, OutgoingMessage, RecipientResult, Timeouts, deliver_via_mx
from mox_transport_socks.settings import SocksSettings

__all__ = ["SocksDialError", "SocksTransport"]

log = structlog.get_logger(component="transport.socks")



class SocksDialError(Exception):
    """No connection through any proxy; the text starts with "socks dialer:"."""


class _ProxyDown(Exception):
    """The proxy's own TCP port could not be reached."""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class _Reach:
    """python-socks ``forward``: the plain TCP connect to the proxy, with its own timeout."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def connect(self, dest_host: str, dest_port: int, timeout: float | None = None,
                      **kwargs: Any) -> socket.socket:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(dest_host, dest_port, type=socket.SOCK_STREAM)
                last: OSError | None = None
                for family, type_, proto, _, addr in infos:
                    sock = socket.socket(family, type_, proto)
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, addr)
                    except OSError as exc:
                        sock.close()
                        last = exc
                        continue
                    except BaseException:  # cancelled, by our timeout or the caller
                        sock.close()
                        raise
                    return sock
                raise last or OSError(f"no addresses for {dest_host}")
        except TimeoutError:
            raise _ProxyDown(f"connect timeout after {self.timeout:g}s") from None
        except OSError as exc:  # asyncio's text is "Connect call failed (addr)": say why
            raise _ProxyDown(os.strerror(exc.errno) if exc.errno else str(exc)) from None


class SocksTransport:
    """A configured socks transport; built once per config by the plugin's factory.

    ``options`` are for tests and embedding: ``timeouts`` (:class:`Timeouts`), ``mtasts`` (an
    :class:`MTASTSCache`), ``proxy_connect_timeout`` (seconds for the TCP connect to one proxy,
    default 10), ``proxy_down_for`` (seconds a down proxy is tried last, default 60).
    """

    # one delivery at a time per recipient domain: the receiving servers are not ours to load
    # (a transport table's destination_concurrency in mox.toml overrides it)
    destination_concurrency = 1

    def __init__(self, name: str, settings: SocksSettings, **options: Any) -> None:
        self.name = name
        self.settings = settings
        self.options = options
        self.proxies: list[str] = [settings.address, *settings.fallback_addresses]
        self._down_until: dict[str, float] = {}
        self._state = MXDeliveryState(options.get("mtasts"))
        # RFC 1929 username/password, or none (no authentication method offered)
        self._credentials = ((settings.username, settings.password or "") if settings.username is not None
                             else (None, None))

    def proxy_order(self) -> list[str]:
        """Proxies in config order, those recently found down last."""
        now = time.monotonic()
        up = [p for p in self.proxies if self._down_until.get(p, 0.0) <= now]
        return up + [p for p in self.proxies if p not in up]

    async def dial(self, host: str, ip: str, port: int, timeout: float) -> socket.socket:
        """The :data:`~mox_core.smtpclient.Dialer`: ``ip:port`` through the first proxy that is up."""
        loop = asyncio.get_running_loop()
        # end a little before the caller's own timeout, so that a SOCKS timeout is reported as one
        deadline = loop.time() + timeout - min(0.5, timeout / 10)
        order = self.proxy_order()
        down: list[str] = []
        connect_timeout = self.options.get("proxy_connect_timeout", 10.0)
        for n, address in enumerate(order):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # leave a share of the budget for the proxies after this one and the SOCKS exchange
            reach = _Reach(min(connect_timeout, remaining / (len(order) - n + 1)))
            proxy_host, proxy_port = _split(address)
            proxy = Proxy(ProxyType.SOCKS5, proxy_host, proxy_port, *self._credentials,
                          rdns=False, forward=reach)
            try:
                sock = await proxy.connect(dest_host=ip, dest_port=port, timeout=remaining)
            except _ProxyDown as exc:
                self._down_until[address] = time.monotonic() + self.options.get("proxy_down_for", 60.0)
                down.append(f"{address}: {exc}")
                log.warning("socks_proxy_down", transport=self.name, proxy=address, error=str(exc))
                continue
            except Exception as exc:  # python_socks.ProxyError / ProxyTimeoutError, OSError
                raise SocksDialError(f"socks dialer: proxy {address}: {exc or type(exc).__name__}") from None
            self._down_until.pop(address, None)
            log.debug("socks_connected", transport=self.name, proxy=address, host=host, ip=ip, port=port)
            return sock
        raise SocksDialError("socks dialer: no proxy reachable: " + ("; ".join(down) or "no time left"))

    async def deliver(
        self, message: OutgoingMessage, ctx: DeliveryContext
    ) -> Sequence[RecipientResult]:
        return await deliver_via_mx(
            message,
            ctx,
            dial=self.dial,
            ehlo_name=self.settings.remote_hostname,
            mtasts=self._state.mtasts(ctx),
            timeouts=self.options.get("timeouts", Timeouts()),
            dialed_ips=self._state.dialed_ips(),
        )
