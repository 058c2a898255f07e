"""Socks transport end to end: SocksTransport -> real SOCKS5 proxy (dante, microsocks) -> smtp-sink MX.

DNS comes from the loopback DNS server (resolved by us, not by the proxy); the MX is an
smtp-sink on 127.0.0.x:25. Both proxies reach loopback destinations only. The transport is
built the way core builds it: plugin factory with settings validated from a loaded config.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from mox_core.api import Timeouts
from mox_core.plugins.host import PluginHost
from mox_core.plugins.kinds import DeliveryContext, DeliveryStatus, OutgoingMessage
from mox_core.testing import load
from mox_testpeers import reserve
from mox_transport_socks.transport import SocksTransport

DELIVERED, TEMPORARY, PERMANENT = DeliveryStatus.DELIVERED, DeliveryStatus.TEMPORARY, DeliveryStatus.PERMANENT
TESTING = "[testing]\nallow_private_targets = true\n"
BODY = b"From: a@example.org\r\nSubject: via socks\r\n\r\nhello through the proxy\r\n"
# a broken test should fail in seconds, not after the RFC 5321 five minutes
QUICK = Timeouts(connect=5, command=10, data=10, tls_handshake=10)
EHLO = "out.example.org"


def socks_config(tmp_path, address: str, *, fallbacks=(), username=None, password=None, testing=True):
    lines = ['[transports.proxy]', 'kind = "socks"', f'address = "{address}"',
             f'fallback_addresses = [{", ".join(repr(a).replace(chr(39), chr(34)) for a in fallbacks)}]',
             'remote_ips = ["192.0.2.10"]', f'remote_hostname = "{EHLO}"']
    if username is not None:
        lines.append(f'username = "{username}"')
    if password is not None:
        lines.append(f'password = "{password}"')
    return load(tmp_path / "cfg", (TESTING if testing else "") + "\n".join(lines) + "\n")


def transport_from(config, **options) -> SocksTransport:
    kind = PluginHost.load().transports["socks"]
    t = kind.factory("proxy", config.transports["proxy"].settings)
    assert isinstance(t, SocksTransport)
    t.options.update({"timeouts": QUICK, **options})
    return t


def ctx_for(config, resolver) -> DeliveryContext:
    return DeliveryContext(transport_name="proxy", attempt=0, hostname=config.static.hostname,
                           config=config, resolver=resolver)


async def deliver(t: SocksTransport, ctx: DeliveryContext, rcpts=("b@dest.test",)):
    return list(await t.deliver(OutgoingMessage("a@example.org", list(rcpts), BODY), ctx))


@pytest.fixture
def mx(dns_server, smtp_sink_factory):
    """An smtp-sink as the MX of dest.test on 127.0.0.x:25."""
    sink = smtp_sink_factory(host=None, port=25)
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", sink.host)
    return sink


def proxy_addr(proxy) -> str:
    return f"{proxy.host}:{proxy.port}"


async def deliver_later(tmp_path, dns_resolver, mx, proxy: str) -> None:
    """A delivery through ``proxy`` to ``mx`` after one that must not have reached it; the
    MX then has exactly that one (a positive event to look at, not a fixed sleep)."""
    cfg = socks_config(tmp_path / "later", proxy)
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver), ["later@dest.test"])
    assert r.status is DELIVERED, r.text
    [msg] = mx.wait_for_messages(1)
    assert msg.rcpt_to == ["later@dest.test"]
    assert len(mx.dump_files(include_partial=True)) == 1


# ============================================================================ delivery through the proxy


@pytest.mark.parametrize("kind", ["dante", "microsocks"])
@pytest.mark.parametrize("auth", [False, True], ids=["noauth", "userpass"])
async def test_delivers_through_proxy(tmp_path, request, dns_server, dns_resolver, mx, kind, auth):
    creds = ("sockuser", "socks-pw") if auth else (None, None)
    proxy = request.getfixturevalue(f"socks_{kind}_factory")(*creds)
    cfg = socks_config(tmp_path, proxy_addr(proxy), username=creds[0], password=creds[1])
    results = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver), ["b@dest.test", "c@dest.test"])
    assert [(r.status, r.remote_host, r.code) for r in results] == [(DELIVERED, "mx.dest.test", 250)] * 2
    [msg] = mx.wait_for_messages(1)
    assert msg.helo == EHLO  # remote_hostname, not our own host name
    assert msg.rcpt_to == ["b@dest.test", "c@dest.test"] and msg.message["Subject"] == "via socks"
    # DNS was resolved by us: the MX lookup and the A lookup reached our DNS server
    assert dns_server.queries_for("dest.test", "MX") and dns_server.queries_for("mx.dest.test", "A")
    if kind == "microsocks":  # it logs each CONNECT: to the IP we resolved, not to a name
        assert f"connected to {mx.host}:25" in proxy.log_text(), proxy.log_text()
    # and the way there depends on the proxy: without it, the same MX is not reached
    proxy.stop()
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and "socks dialer: no proxy reachable" in r.text
    assert mx.count == 1


async def test_proxy_is_really_used(tmp_path, dns_resolver, mx, socks_microsocks):
    """Without a proxy listening there is no delivery, though the MX itself is reachable."""
    gone = reserve("127.0.0.1", None, hold=True)  # a port nobody listens on
    try:
        cfg = socks_config(tmp_path, f"127.0.0.1:{gone.port}")
        [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    finally:
        gone.release()
    assert r.status is TEMPORARY and r.code is None
    assert "socks dialer: no proxy reachable" in r.text and f"127.0.0.1:{gone.port}" in r.text
    await deliver_later(tmp_path, dns_resolver, mx, proxy_addr(socks_microsocks))


# ============================================================================ proxy failures


@pytest.mark.parametrize("kind, refusal", [
    ("dante", "Connection not allowed by ruleset"),  # pam.username: CONNECT refused after auth
    ("microsocks", "authentication failure"),  # RFC 1929 status != 0
])
async def test_wrong_proxy_password_is_temporary(tmp_path, request, dns_resolver, mx, kind, refusal):
    proxy = request.getfixturevalue(f"socks_{kind}_factory")("sockuser", "socks-pw")
    cfg = socks_config(tmp_path, proxy_addr(proxy), username="sockuser", password="wrong")
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and r.code is None and r.remote_host == "mx.dest.test"
    assert "socks dialer: proxy " + proxy_addr(proxy) in r.text and refusal in r.text, r.text
    assert mx.count == 0


async def test_no_credentials_to_auth_proxy_is_temporary(tmp_path, socks_microsocks_factory, dns_resolver, mx):
    proxy = socks_microsocks_factory("sockuser", "socks-pw")
    cfg = socks_config(tmp_path, proxy_addr(proxy))
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and "No acceptable authentication methods" in r.text


async def test_refusing_proxy_is_not_replaced_by_fallback(tmp_path, socks_dante_factory, socks_microsocks_factory,
                                                          dns_resolver, mx):
    """A proxy that is up and refuses us fails the attempt: the fallback (which would let us
    through) is only for proxies that are down, so a configuration error is not hidden."""
    strict = socks_dante_factory("sockuser", "socks-pw")
    open_proxy = socks_microsocks_factory()
    cfg = socks_config(tmp_path, proxy_addr(strict), fallbacks=[proxy_addr(open_proxy)],
                       username="sockuser", password="wrong")
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is TEMPORARY and "socks dialer: proxy " + proxy_addr(strict) in r.text
    assert mx.count == 0


async def test_first_proxy_down_then_fallback(tmp_path, socks_dante_factory, socks_microsocks, dns_resolver, mx):
    down = reserve("127.0.0.1", None, hold=True)
    try:
        cfg = socks_config(tmp_path, f"127.0.0.1:{down.port}", fallbacks=[proxy_addr(socks_microsocks)])
        t = transport_from(cfg)
        ctx = ctx_for(cfg, dns_resolver)
        [r] = await deliver(t, ctx)
        assert (r.status, r.remote_host) == (DELIVERED, "mx.dest.test"), r
        assert mx.wait_for_messages(1)[0].helo == EHLO
        # the proxy found down is tried last for a while
        assert t.proxy_order() == [proxy_addr(socks_microsocks), f"127.0.0.1:{down.port}"]
    finally:
        down.release()


async def test_fallback_order_and_recovery(tmp_path, socks_dante_factory, socks_microsocks_factory, dns_resolver, mx):
    """Fallbacks in order: the second is used when the first is down; the first again once back."""
    first = reserve("127.0.0.1", None, hold=True)
    second = socks_dante_factory()
    third = socks_microsocks_factory()
    cfg = socks_config(tmp_path, f"127.0.0.1:{first.port}", fallbacks=[proxy_addr(second), proxy_addr(third)])
    t = transport_from(cfg, proxy_down_for=0)
    ctx = ctx_for(cfg, dns_resolver)
    try:
        [r] = await deliver(t, ctx)
        assert r.status is DELIVERED
        second.stop()  # now the first two are down: the third carries the next message
        [r] = await deliver(t, ctx)
        assert r.status is DELIVERED, r
        assert mx.wait_for_messages(2)
    finally:
        first.release()


async def test_proxy_connect_timeout_then_fallback(tmp_path, socks_microsocks, dns_resolver, mx):
    """A proxy whose port does not answer (SYNs dropped) costs only the proxy connect timeout."""
    black = socket.socket()
    black.bind(("127.0.0.1", 0))
    black.listen(0)
    filler = socket.create_connection(black.getsockname(), timeout=2)  # fills the accept queue
    try:
        addr = "{}:{}".format(*black.getsockname())
        cfg = socks_config(tmp_path, addr, fallbacks=[proxy_addr(socks_microsocks)])
        t = transport_from(cfg, proxy_connect_timeout=1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        [r] = await deliver(t, ctx_for(cfg, dns_resolver))
        assert r.status is DELIVERED, r
        assert loop.time() - start < 5
        assert t.proxy_order()[-1] == addr
    finally:
        filler.close()
        black.close()


async def test_hung_proxy_is_a_socks_timeout_not_a_fallback(tmp_path, socks_microsocks, dns_resolver, mx):
    """A proxy that accepts the TCP connection but never answers is up (the kernel accepted for
    it): the attempt fails with a SOCKS timeout; the fallback is for proxies that are down."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # never accept()ed, never answered
    try:
        addr = "{}:{}".format(*hung.getsockname())
        cfg = socks_config(tmp_path, addr, fallbacks=[proxy_addr(socks_microsocks)])
        t = transport_from(cfg, timeouts=Timeouts(connect=2, command=10, data=10, tls_handshake=10))
        [r] = await deliver(t, ctx_for(cfg, dns_resolver))
    finally:
        hung.close()
    assert r.status is TEMPORARY and r.code is None
    assert f"socks dialer: proxy {addr}: Proxy connection timed out" in r.text, r.text
    assert mx.count == 0 and "connected to" not in socks_microsocks.log_text()


async def test_all_proxies_down_is_temporary(tmp_path, dns_resolver, mx):
    a, b = reserve("127.0.0.1", None, hold=True), reserve("127.0.0.1", None, hold=True)
    try:
        cfg = socks_config(tmp_path, f"127.0.0.1:{a.port}", fallbacks=[f"127.0.0.1:{b.port}"])
        [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    finally:
        a.release()
        b.release()
    assert r.status is TEMPORARY
    assert r.text.count("refused") == 2 and f":{a.port}" in r.text and f":{b.port}" in r.text, r.text


# ============================================================================ shared direct-delivery behaviour


async def test_destination_refused_moves_to_next_mx(tmp_path, socks_microsocks, dns_server, dns_resolver,
                                                    smtp_sink_factory):
    """The proxy answers "connection refused" for MX 1 (nothing listens there): next MX."""
    dead = reserve(None, 25)
    second = smtp_sink_factory(host=None, port=25)
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.")
    dns_server.add("dest.test", "MX", "20 mx2.dest.test.")
    dns_server.add("mx1.dest.test", "A", dead.host)
    dns_server.add("mx2.dest.test", "A", second.host)
    cfg = socks_config(tmp_path, proxy_addr(socks_microsocks))
    try:
        [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    finally:
        dead.release()
    assert (r.status, r.remote_host) == (DELIVERED, "mx2.dest.test"), r
    assert second.wait_for_messages(1)


@pytest.mark.parametrize("fault, status, code", [
    ({"reject_4xx": "RCPT", "soft_reply": "451 4.7.1 greylisted, come back later"}, TEMPORARY, 451),
    ({"reject_5xx": "RCPT", "hard_reply": "550 5.1.1 no such user here"}, PERMANENT, 550),
])
async def test_reply_classification_through_proxy(tmp_path, socks_dante, dns_server, dns_resolver,
                                                  smtp_sink_factory, fault, status, code):
    sink = smtp_sink_factory(host=None, port=25, **fault)
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", sink.host)
    cfg = socks_config(tmp_path, proxy_addr(socks_dante))
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    reply = (fault.get("soft_reply") or fault["hard_reply"]).split(" ", 2)
    assert (r.status, r.code, r.enhanced_code, r.remote_host) == (status, code, reply[1], "mx.dest.test")
    assert r.text == reply[2]  # the server's own words, for the DSN and `mox queue list`


async def test_private_target_guard_applies_to_the_mx(tmp_path, socks_dante, dns_resolver, mx):
    """Without [testing] allow_private_targets the loopback MX is refused before the proxy is
    asked: the guard judges the final destination, not the (admin-chosen) proxy."""
    cfg = socks_config(tmp_path, proxy_addr(socks_dante), testing=False)
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver))
    assert r.status is PERMANENT and r.enhanced_code == "5.4.4"
    assert f"not connecting to {mx.host}: loopback address" in r.text
    await deliver_later(tmp_path, dns_resolver, mx, proxy_addr(socks_dante))


async def test_null_mx_is_permanent(tmp_path, socks_microsocks, dns_server, dns_resolver):
    dns_server.add_null_mx("nomail.test")
    cfg = socks_config(tmp_path, proxy_addr(socks_microsocks))
    [r] = await deliver(transport_from(cfg), ctx_for(cfg, dns_resolver), ["x@nomail.test"])
    assert r.status is PERMANENT and r.enhanced_code == "5.1.10"


def test_password_without_username_is_a_config_error(tmp_path):
    from mox_core.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load(tmp_path, '[transports.p]\nkind = "socks"\naddress = "127.0.0.1:1080"\n'
             'remote_ips = ["192.0.2.10"]\nremote_hostname = "out.example.org"\npassword = "x"\n')
    assert "password without username" in exc.value.problems[0].message
