"""pytest plugin of mox-testpeers (entry point ``pytest11: mox_testpeers``): real test peers on
127.0.0.0/8 for the tests of mox and of its plugins.

Fixtures (all function scoped; the drivers live in the submodules of :mod:`mox_testpeers`,
imported only when a fixture is used):

``dns_server``
    :class:`~mox_testpeers.dnsserver.DNSServer`, started on 127.0.0.1 (UDP+TCP, free port):
    ``.add(name, type, value)``, ``.set``, ``.remove``, ``.add_null_mx``, ``.fail(name, type,
    "SERVFAIL"|"TIMEOUT"|"NXDOMAIN"|"NODATA"|"TRUNCATE"|rcode, times=None)``, ``.delay``,
    ``.queries``, ``.nameserver`` ("127.0.0.1:PORT"), ``.host``, ``.port``.
``dns_resolver``
    ``dns.asyncresolver.Resolver`` asking only ``dns_server`` (no /etc/resolv.conf, no cache,
    timeout 2 s). ``resolver_for(server, timeout=...)`` / ``sync_resolver_for`` for others.
``smtp_sink``
    :class:`~mox_testpeers.sink.SmtpSink` on a free port of 127.0.0.1: ``.host``, ``.port``,
    ``.messages()``, ``.count``, ``.wait_for_messages(n)``, ``.clear()``, ``.stop()``. Options via
    indirect parametrization: ``@pytest.mark.parametrize("smtp_sink", [{"reject_4xx": "RCPT"}],
    indirect=True)``.
``smtp_sink_factory``
    ``smtp_sink_factory(host=None, port=25, **options) -> SmtpSink``; ``host=None`` means
    127.0.0.2 if free, else another free 127.0.0.x (put ``sink.host`` in DNS).
``postfix_smarthost`` / ``postfix_smarthost_factory(**options)``
    :class:`~mox_testpeers.postfix.PostfixSmarthost`: STARTTLS submission with SASL
    (SCRAM-SHA-256, SCRAM-SHA-1, CRAM-MD5, PLAIN, LOGIN), users ``{"alice": "secret-pw"}``,
    ``.host``, ``.port``, ``.tls_port`` (implicit TLS), ``.cafile``, ``.ssl_context()``,
    ``.users``, ``.add_user()``, ``.maildir``, ``.messages()``, ``.wait_for_messages(n)``.
``postfix_mx_factory``
    ``postfix_mx_factory(domain="dest.test", host=None, port=25, **options) -> PostfixMX``:
    ``.host``, ``.port``, ``.domain``, ``.cafile``, ``.maildir``, ``.messages(mailbox)``,
    ``.wait_for_messages(n)``, ``.postconf(**params)``.
``socks_dante`` / ``socks_microsocks`` (and ``..._factory(username=None, password=None)``)
    :class:`~mox_testpeers.socks.SocksProxy`: ``.host``, ``.port``, ``.url``,
    ``.username``, ``.password``, ``.proxy_url(user, pw)``, ``.connect(host, port)``.
    No auth by default; indirect parameter ``"auth"``/``True`` gives user ``sockuser`` /
    ``socks-pw``, a ``(user, password)`` tuple or dict gives those.
``mox_server_factory``
    ``factory(domains, static_extra="", nameserver=None, passwords=None, start=True, ...)
    -> MoxServer``: a real ``mox serve`` process (:class:`~mox_testpeers.moxserver.MoxServer`)
    with SMTP, submission and submissions on free ports of 127.0.0.1: ``.smtp_port``,
    ``.mox(*args)``, ``.messages(account)``, ``.wait_for_messages(account, n)``, ``.kill()``,
    ``.start()``, ``.log_text()``.

A missing program makes the fixture *fail* with the Debian package to install (never skip).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest


@contextlib.contextmanager
def _peer_errors(what: str):
    """Turn a peer start-up problem into a test failure with a clear message (not a skip)."""
    from mox_testpeers import PeerError

    try:
        yield
    except PeerError as e:
        pytest.fail(f"{what}: {e}", pytrace=False)
    except TimeoutError as e:
        pytest.fail(f"{what}: {e}", pytrace=False)


def _param(request, default: Any = None) -> Any:
    return getattr(request, "param", default)


class _Factory:
    """Starts peers on demand; cleans them all up (newest first) at teardown."""

    def __init__(self, what: str, make):
        self.what = what
        self._make = make
        self.instances: list = []

    def __call__(self, *args, **kwargs):
        with _peer_errors(self.what):
            peer = self._make(*args, **kwargs)
            self.instances.append(peer)
            peer.start()
        return peer

    def close(self) -> None:
        for peer in reversed(self.instances):
            try:
                peer.cleanup()
            except Exception:  # teardown must go on
                pass
        self.instances.clear()


# ------------------------------------------------------------------------------- DNS


@pytest.fixture
def dns_server():
    """Authoritative DNS server on 127.0.0.1 (UDP and TCP, free port), zone changeable live."""
    from mox_testpeers.dnsserver import DNSServer

    server = DNSServer()
    with _peer_errors("dns_server"):
        server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dns_resolver(dns_server):
    """``dns.asyncresolver.Resolver`` for ``dns_server`` only (no system configuration)."""
    from mox_testpeers.dnsserver import resolver_for

    return resolver_for(dns_server)


# ------------------------------------------------------------------------------- smtp-sink


@pytest.fixture
def smtp_sink_factory():
    """``factory(host=None, port=25, **options) -> SmtpSink`` (several sinks per test)."""
    from mox_testpeers.sink import SmtpSink

    def make(host: str | None = None, port: int | None = 25, **options):
        return SmtpSink(host=host, port=port, **options)

    factory = _Factory("smtp_sink_factory", make)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def smtp_sink(request):
    """smtp-sink on a free port of 127.0.0.1; options by indirect parametrization (a dict)."""
    from mox_testpeers.sink import SmtpSink

    options = dict(_param(request, None) or {})
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", None)
    factory = _Factory("smtp_sink", SmtpSink)
    try:
        yield factory(**options)
    finally:
        factory.close()


# ------------------------------------------------------------------------------- Postfix


@pytest.fixture
def postfix_smarthost_factory():
    """``factory(users=None, implicit_tls=True, **options) -> PostfixSmarthost``."""
    from mox_testpeers.postfix import PostfixSmarthost

    def make(users: dict[str, str] | None = None, implicit_tls: bool = True, **options):
        return PostfixSmarthost(users, implicit_tls=implicit_tls, **options)

    factory = _Factory("postfix_smarthost", make)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def postfix_smarthost(request, postfix_smarthost_factory):
    """Private Postfix submission smarthost (STARTTLS + SASL, implicit TLS on ``.tls_port``)."""
    return postfix_smarthost_factory(**dict(_param(request, None) or {}))


@pytest.fixture
def postfix_mx_factory():
    """``factory(domain="dest.test", host=None, port=25, **options) -> PostfixMX``."""
    from mox_testpeers.postfix import PostfixMX

    def make(domain: str = "dest.test", host: str | None = None, port: int = 25, **options):
        return PostfixMX(domain, host=host, port=port, **options)

    factory = _Factory("postfix_mx_factory", make)
    try:
        yield factory
    finally:
        factory.close()


# ------------------------------------------------------------------------------- SOCKS5


def _socks_credentials(param) -> tuple[str | None, str | None]:
    from mox_testpeers.socks import DEFAULT_PASSWORD, DEFAULT_USERNAME

    if param in (None, False, "none", "noauth", ""):
        return None, None
    if param is True or param in ("auth", "userpass", "pam"):
        return DEFAULT_USERNAME, DEFAULT_PASSWORD
    if isinstance(param, dict):
        return param["username"], param["password"]
    if isinstance(param, (tuple, list)) and len(param) == 2:
        return param[0], param[1]
    raise ValueError(f"unsupported SOCKS fixture parameter {param!r}: use None, 'auth', "
                     f"(user, password) or {{'username': ..., 'password': ...}}")


def _socks_factory(kind: str):
    from mox_testpeers.socks import DanteProxy, MicroSocksProxy

    cls = DanteProxy if kind == "dante" else MicroSocksProxy

    def make(username: str | None = None, password: str | None = None, **options):
        return cls(username, password, **options)

    return _Factory(f"socks_{kind}", make)


@pytest.fixture
def socks_dante_factory():
    """``factory(username=None, password=None) -> DanteProxy`` (auth via pam_pwdfile)."""
    factory = _socks_factory("dante")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def socks_microsocks_factory():
    """``factory(username=None, password=None) -> MicroSocksProxy``."""
    factory = _socks_factory("microsocks")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def socks_dante(request, socks_dante_factory):
    """dante SOCKS5 on 127.0.0.1 (loopback destinations only); param None or "auth"."""
    return socks_dante_factory(*_socks_credentials(_param(request)))


@pytest.fixture
def socks_microsocks(request, socks_microsocks_factory):
    """microsocks SOCKS5 on 127.0.0.1 (loopback destinations only); param None or "auth"."""
    return socks_microsocks_factory(*_socks_credentials(_param(request)))


# --------------------------------------------------------------------------------------------
# mox itself


@pytest.fixture
def mox_server_factory(tmp_path):
    """``factory(domains=..., static_extra="", nameserver=None, start=True, static_top="") -> MoxServer``.

    A real ``mox serve`` process on 127.0.0.1 with SMTP, submission (STARTTLS) and
    submissions (implicit TLS) on free ports and a self-signed certificate for localhost.
    """
    from mox_testpeers.moxserver import MoxServer

    servers = []

    def factory(domains: str, static_extra: str = "", nameserver: str | None = None,
                passwords: dict[str, str] | None = None, start: bool = True, name: str = "mox",
                env: dict[str, str] | None = None, static_top: str = ""):
        server = MoxServer(tmp_path / f"{name}{len(servers)}", static_extra=static_extra,
                           domains=domains, nameserver=nameserver, env=dict(env or {}),
                           static_top=static_top)
        servers.append(server)
        for account, password in (passwords or {}).items():
            server.set_password(account, password)
        return server.start() if start else server

    yield factory
    for server in servers:
        server.stop()
