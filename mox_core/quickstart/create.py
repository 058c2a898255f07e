"""Making the folders of ``mox quickstart``: ``config/`` (mox.toml, domains.toml, the DKIM keys,
the admin password, the reverse-proxy configurations) and ``data/`` (with the account's
password), as mox's quickstart does."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from mox_core.errors import MoxError
from mox_core.quickstart.templates import Setup, domains_toml, mox_toml
from mox_core.smtp.domain import to_ascii, to_unicode

__all__ = ["Made", "make", "new_password", "plan"]

_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no l, o, 0, 1: easy to read and type


def new_password() -> str:
    """Four groups of four letters and digits (about 80 bits)."""
    return "-".join("".join(secrets.choice(_ALPHABET) for _ in range(4)) for _ in range(4))


@dataclass
class Made:
    setup: Setup
    config_dir: Path
    config_path: Path
    account_password: str
    admin_password: str


def _check_tls_files(cert: Path, key: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise MoxError(f"--cert {cert} / --key {key}: {exc}") from None


def plan(address: str, *, hostname: str | None, ips: list[str], internal_ips: list[str],
         existing_webserver: bool, cert: Path | None, key: Path | None) -> Setup:
    """Check the arguments; the :class:`Setup` to write."""
    localpart, at, domain = address.rpartition("@")
    if not at or not localpart or not domain:
        raise MoxError(f"{address!r} is not an email address (you@example.com)")
    try:
        domain = to_unicode(domain)
        host = to_unicode(hostname or f"mail.{domain}")
        to_ascii(host)
    except ValueError as exc:
        raise MoxError(str(exc)) from None
    if "." not in host:
        raise MoxError(f"host name {host!r} must be fully qualified (mail.{domain})")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise MoxError(f"--ip {ip!r}: not an IP address") from None
    if (cert is None) != (key is None):
        raise MoxError("--cert and --key go together")
    if existing_webserver and cert is None:
        raise MoxError("--existing-webserver needs --cert and --key: the certificate files of your web server "
                       f"for {host} (mox uses them for SMTP and submission)")
    if cert is not None and key is not None:
        cert, key = cert.absolute(), key.absolute()
        _check_tls_files(cert, key)
    account = localpart.lower()
    if not all(c.isalnum() or c in "._-" for c in account):
        account = "mox"
    now = datetime.datetime.now(datetime.UTC)
    return Setup(address=f"{localpart}@{domain}", localpart=localpart, domain=domain.lower(), hostname=host,
                 account=account, ips=ips, internal_ips=internal_ips, existing_webserver=existing_webserver,
                 cert=cert, key=key, policy_id=now.strftime("%Y%m%dT%H%M%S"), created=now.strftime("%Y-%m-%d"))


def _dkim_keys(config_dir: Path, s: Setup) -> None:
    """Two selectors that both sign, as mox makes them: ``<year>a`` Ed25519, ``<year>b`` RSA-2048."""
    from mox_core.outgoing.dkimsign import generate_key

    (config_dir / "dkim").mkdir(mode=0o700, exist_ok=True)
    year = s.created[:4]
    d = to_ascii(s.domain)
    for selector, algorithm, kind in ((f"{year}a", "ed25519", "ed25519"), (f"{year}b", "rsa", "rsa2048")):
        rel = f"dkim/{selector}._domainkey.{d}.{kind}.pem"
        generate_key(config_dir / rel, 2048, algorithm)
        s.dkim.append((selector, "Ed25519" if algorithm == "ed25519" else "RSA, 2048 bits", rel))


def make(directory: Path, s: Setup) -> Made:
    """Write everything under ``directory`` (``config/`` and ``data/``); refuses when
    ``config/mox.toml`` exists."""
    from mox_core.accounts.adminpasswd import set_admin_password
    from mox_core.accounts.db import set_password
    from mox_core.config.loader import load_config
    from mox_core.plugins.host import PluginHost
    from mox_core.quickstart.proxy import caddy_config, nginx_config

    config_dir = directory / "config"
    config_path = config_dir / "mox.toml"
    if config_path.exists():
        raise MoxError(f"{config_path} exists already; quickstart makes a new config (use --dir for another folder)")
    config_dir.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(mode=0o700, exist_ok=True)
    _dkim_keys(config_dir, s)
    (config_dir / "domains.toml").write_text(domains_toml(s))
    if s.existing_webserver:
        (config_dir / "nginx-mox.conf").write_text(nginx_config(s))
        (config_dir / "Caddyfile-mox").write_text(caddy_config(s))
    config_path.write_text(mox_toml(s))
    made = Made(s, config_dir, config_path, new_password(), new_password())
    cfg = load_config(config_path, PluginHost.load())
    set_password(cfg, s.account, made.account_password)
    set_admin_password(config_dir, made.admin_password)
    return made
