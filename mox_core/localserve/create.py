"""The folder of ``mox localserve``: made on the first start, used as it is on later ones.

It holds a self-signed certificate for localhost, ``mox.toml`` and ``domains.toml`` with
comments (edit them as you like), a DKIM key for ``localhost``, the admin password and the
account ``mox`` (address ``mox@localhost``) with a known password, and, under ``data/``,
everything mox keeps (Maildir, queue).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from mox_core.errors import MoxError
from mox_core.privatefile import write_private

__all__ = ["ACCOUNT", "ADDRESS", "ADMIN_PASSWORD", "PASSWORD", "PORTS", "LocalServeDir", "ensure"]

ACCOUNT = "mox"
ADDRESS = "mox@localhost"
PASSWORD = "moxmoxmox"
ADMIN_PASSWORD = "moxadmin"
# the usual ports plus 1000, as mox localserve: no privileges needed
PORTS = {"smtp": 1025, "submission": 1587, "submissions": 1465, "http": 1080, "https": 1443, "metrics": 1081}


@dataclass(frozen=True)
class LocalServeDir:
    path: Path
    created: bool  # made by this start

    @property
    def config(self) -> Path:
        return self.path / "mox.toml"


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def ensure(directory: Path, ip: str | None = None) -> LocalServeDir:
    """The localserve folder at ``directory``, made when it has no ``mox.toml`` yet.

    ``ip``: listen on this address instead of 127.0.0.1 and ::1; only when the folder is
    made (later starts use what its mox.toml says)."""
    if (directory / "mox.toml").exists():
        if ip is not None:
            raise MoxError(f"--ip only applies when the folder is made; {directory} exists already "
                           f"(change the ips in {directory / 'mox.toml'} instead)")
        return LocalServeDir(directory, created=False)
    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise MoxError(f"--ip {ip!r}: not an IP address") from None
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ips = [ip] if ip is not None else (["127.0.0.1", "::1"] if ipv6_loopback_works() else ["127.0.0.1"])
    _write_certificate(directory, ips)
    from mox_core.outgoing.dkimsign import generate_key

    (directory / "dkim").mkdir(exist_ok=True)
    generate_key(directory / "dkim" / "localserve.localhost.pem", algorithm="ed25519")
    (directory / "domains.toml").write_text(DOMAINS_TOML)
    write_private(directory / "sendmail.toml", sendmail_toml(ips[0]).encode())
    (directory / "mox.toml").write_text(mox_toml(ips))  # last: its presence means "made"
    _set_passwords(directory)
    return LocalServeDir(directory, created=True)


def _set_passwords(directory: Path) -> None:
    from mox_core.accounts.adminpasswd import set_admin_password
    from mox_core.accounts.db import set_password
    from mox_core.config.loader import load_config
    from mox_core.plugins.host import PluginHost

    cfg = load_config(directory / "mox.toml", PluginHost.load())
    set_password(cfg, ACCOUNT, PASSWORD)
    set_admin_password(directory, ADMIN_PASSWORD)


def sendmail_toml(ip: str) -> str:
    return f'''# mox sendmail -C this-file: submits to mox localserve as {ADDRESS} (docs/sendmail.md)
host = "{ip}"
port = {PORTS["submission"]}
tls = "none"  # loopback only
username = "{ADDRESS}"
password = "{PASSWORD}"
from_address = "{ADDRESS}"
default_destination = "{ADDRESS}"
failures_dir = "sendmail-failures"
'''


def _write_certificate(directory: Path, ips: list[str]) -> None:
    """A self-signed ECDSA P-256 certificate for localhost and the listen addresses, valid
    for 4 years (as mox localserve's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=4 * 365))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_private(directory / "localhost.key", key_pem)
    (directory / "localhost.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def mox_toml(ips: list[str]) -> str:
    ip_list = ", ".join(f'"{i}"' for i in ips)
    p = PORTS
    return f'''# mox localserve: a whole mail server on this machine, for trying mox and for testing
# applications that send mail. Made by the first `mox localserve`; later starts use it as
# it is, so change what you like (`mox config describe` documents every setting).

hostname = "localhost"
data_dir = "data"
log_level = "info"
# one process does it all: enough on a laptop, and quick to start
smtp_workers = 1

[postmaster]
account = "{ACCOUNT}"

# Mail for any address that no account has goes to the account mox, and local parts such as
# x-temperror@ or x-550@ simulate failures (see the banner of mox localserve).
[localserve]
account = "{ACCOUNT}"

[listeners.local]
ips = [{ip_list}]

[listeners.local.tls]
cert_file = "localhost.crt"
key_file = "localhost.key"

[listeners.local.smtp]
enabled = true
port = {p["smtp"]}

[listeners.local.submission]
enabled = true
port = {p["submission"]}
# STARTTLS is not required on loopback: applications may log in over plain TCP
no_require_starttls = true

[listeners.local.submissions]
enabled = true
port = {p["submissions"]}

[listeners.local.webserver_http]
enabled = true
port = {p["http"]}

[listeners.local.account_http]
enabled = true
port = {p["http"]}

[listeners.local.admin_http]
enabled = true
port = {p["http"]}

[listeners.local.webserver_https]
enabled = true
port = {p["https"]}

[listeners.local.account_https]
enabled = true
port = {p["https"]}

[listeners.local.admin_https]
enabled = true
port = {p["https"]}

[listeners.local.metrics_http]
enabled = true
port = {p["metrics"]}

# Every outgoing message goes back to the SMTP listener above: nothing leaves this machine.
[transports.local]
kind = "loopback"
ip = "{ips[0]}"
port = {p["smtp"]}
'''


DOMAINS_TOML = f'''# mox localserve's domains and accounts. Reloaded while mox runs; the admin pages
# (/admin/) and `mox config account add ...` change it too, keeping these comments.

[domains.localhost]
localpart_catchall_separators = ["+"]

[domains.localhost.dkim]
sign = ["localserve"]

[domains.localhost.dkim.selectors.localserve]
private_key_file = "dkim/localserve.localhost.pem"

[accounts.{ACCOUNT}]
domain = "localhost"

[accounts.{ACCOUNT}.destinations."{ADDRESS}"]

# Every outgoing message through the loopback transport of mox.toml.
[[routes]]
transport = "local"
'''
