"""Where ACME certificates and challenges live under the data directory, shared by the main
process (which writes them) and every process that serves TLS or HTTP (which reads them).

Layout of ``<data_dir>/acme/`` (directories mode 0700, files with keys mode 0600):

* ``certs/<host name>.pem``: the private key followed by the certificate chain (leaf first),
  one file so that a reader never sees a new key with an old certificate; replaced by an
  atomic rename. Until the CA issues one, a temporary self-signed certificate.
* ``account-<hash>.pem``: the ACME account key, per directory URL.
* ``challenges/http-01/<token>``: the key authorization served at
  ``/.well-known/acme-challenge/<token>`` (RFC 8555 §8.3).
* ``challenges/tls-alpn-01/<host name>.pem``: the challenge certificate (RFC 8737 §3).

Host names are the lower-case ASCII (IDNA) form, which has no character that could leave the
directory.
"""

from __future__ import annotations

import contextlib
import datetime
import re
from dataclasses import dataclass
from pathlib import Path

from mox_core.privatefile import write_private
from mox_core.smtp.domain import to_ascii

__all__ = [
    "HTTP01_PREFIX",
    "CertInfo",
    "acme_dir",
    "alpn01_path",
    "cert_info",
    "cert_path",
    "ensure_certificate",
    "http01_key_authorization",
    "http01_path",
    "key_and_chain",
    "remove_quietly",
    "temporary_certificate",
    "write_private",
]

HTTP01_PREFIX = "/.well-known/acme-challenge/"
TEMPORARY_ORG = "mox temporary certificate"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")  # base64url, RFC 8555 §8.1


def acme_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "acme"


def _name(name: str) -> str:
    return to_ascii(name.rstrip("."))


def cert_path(data_dir: Path, name: str) -> Path:
    """The key-and-chain file of host ``name``; ValueError when it is not a host name."""
    return acme_dir(data_dir) / "certs" / f"{_name(name)}.pem"


def http01_path(data_dir: Path, token: str) -> Path:
    if not _TOKEN.match(token):
        raise ValueError(f"bad http-01 token {token[:50]!r}")
    return acme_dir(data_dir) / "challenges" / "http-01" / token


def alpn01_path(data_dir: Path, name: str) -> Path:
    return acme_dir(data_dir) / "challenges" / "tls-alpn-01" / f"{_name(name)}.pem"


def http01_key_authorization(data_dir: Path, token: str) -> bytes | None:
    """What the web process answers at ``/.well-known/acme-challenge/<token>``; None when no
    such challenge is pending."""
    try:
        return http01_path(data_dir, token).read_bytes()
    except (ValueError, OSError):
        return None


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def key_and_chain(key_pem: bytes, chain_pem: bytes) -> bytes:
    return key_pem.rstrip(b"\n") + b"\n" + chain_pem.lstrip(b"\n")


def temporary_certificate(name: str, days: int = 30) -> bytes:
    """A self-signed ECDSA P-256 certificate for ``name`` with its key (one PEM), served
    until the CA's certificate arrives: TLS works (unverified) from the first start."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TEMPORARY_ORG),
                         x509.NameAttribute(NameOID.COMMON_NAME, _name(name))])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(_name(name))]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_and_chain(key_pem, cert.public_bytes(serialization.Encoding.PEM))


def ensure_certificate(data_dir: Path, name: str) -> Path:
    """The certificate file of ``name``, made temporary (self-signed) when there is none."""
    path = cert_path(data_dir, name)
    if not path.exists():
        write_private(path, temporary_certificate(name))
    return path


@dataclass(frozen=True)
class CertInfo:
    """What the manager needs to know of a certificate file."""

    names: tuple[str, ...]
    not_before: float  # Unix time
    not_after: float
    issuer: str
    serial: int
    temporary: bool

    def renew_at(self, fraction: float) -> float:
        """When ``fraction`` of the lifetime has passed (0 for a temporary certificate)."""
        if self.temporary:
            return 0.0
        return self.not_before + fraction * (self.not_after - self.not_before)


def cert_info(path: Path) -> CertInfo | None:
    """The leaf certificate of a key-and-chain file; None when missing or unreadable."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)]
    return CertInfo(names=names, not_before=cert.not_valid_before_utc.timestamp(),
                    not_after=cert.not_valid_after_utc.timestamp(), issuer=cert.issuer.rfc4514_string(),
                    serial=cert.serial_number, temporary=TEMPORARY_ORG in orgs and cert.issuer == cert.subject)
