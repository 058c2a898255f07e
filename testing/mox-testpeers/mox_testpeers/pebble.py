"""Pebble, Let's Encrypt's ACME test CA (Debian package ``pebble``), as a test peer on loopback.

Pebble's own HTTPS (ACME directory and management API) uses a throw-away CA made here
(``ca_file``); the roots and intermediates that sign the issued certificates are made anew at
every start (``roots()``). Validation goes to ``http_port`` (http-01) and ``tls_port``
(tls-alpn-01) of the addresses the test's DNS server gives (``dns`` is ``"ip:port"``).
Environment: no random validation delay, no rejected nonces, authorizations reused.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import time
import urllib.request
from pathlib import Path

from . import PeerError, free_port, make_private_dir, require_tool
from .lifecycle import Peer, PeerProcess

__all__ = ["Pebble", "make_ca_and_cert"]


def make_ca_and_cert(directory: Path, names: tuple[str, ...]) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for ``names`` (DNS names or IPs):
    (ca.pem, cert.pem, key.pem) in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mox test minica")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class Pebble(Peer):
    """``pebble`` on ``host`` (free ports): ``.directory`` (ACME directory URL), ``.ca_file``
    (trust it for the directory's HTTPS), ``.roots()`` and ``.intermediates()`` (PEM of what
    signs the issued certificates), ``.log_text()``."""

    kind = "pebble"

    def __init__(self, dns: str, http_port: int, tls_port: int, *, host: str = "127.0.0.1",
                 validity: int | None = None) -> None:
        super().__init__()
        self.dns, self.http_port, self.tls_port = dns, http_port, tls_port
        self.host = host
        self.validity = validity
        self.process: PeerProcess | None = None
        self.mgmt_port = 0

    @property
    def directory(self) -> str:
        return f"https://{self.host}:{self.port}/dir"

    @property
    def ca_file(self) -> str:
        assert self.dir is not None
        return str(self.dir / "ca.pem")

    def _setup(self) -> None:
        self.binary = require_tool("pebble", "pebble")
        self.dir = make_private_dir("pebble")
        make_ca_and_cert(self.dir, ("localhost", self.host))

    def _begin_attempt(self, used: set[str]) -> None:
        assert self.dir is not None
        self.port, self.mgmt_port = free_port(self.host), free_port(self.host)
        cfg = {"pebble": {
            "listenAddress": f"{self.host}:{self.port}", "managementListenAddress": f"{self.host}:{self.mgmt_port}",
            "certificate": str(self.dir / "cert.pem"), "privateKey": str(self.dir / "key.pem"),
            "httpPort": self.http_port, "tlsPort": self.tls_port, "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}
        if self.validity is not None:
            cfg["pebble"]["certificateValidityPeriod"] = self.validity
        (self.dir / "pebble-config.json").write_text(json.dumps(cfg))

    def _launch(self, timeout: float) -> None:
        assert self.dir is not None
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "100"}
        self.process = PeerProcess([self.binary, "-config", str(self.dir / "pebble-config.json"),
                                    "-dnsserver", self.dns], log_file=self.dir / "pebble.log", env=env,
                                   cwd=str(self.dir))
        self.process.start(lambda proc: self._wait_ready(proc, timeout))

    def _wait_ready(self, proc, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise PeerError(f"pebble exited with {proc.returncode}")
            try:
                self._get(self.directory)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("pebble's directory did not answer") from None
                time.sleep(0.05)

    def _failure_details(self, error: BaseException) -> str:
        return f"{error}\nlog:\n{self.log_text()}"

    def _halt(self) -> None:
        if self.process is not None:
            self.process.stop()

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            return r.read()

    def roots(self) -> bytes:
        """The current root CA (PEM); a new one at every start of pebble."""
        return self._get(f"https://{self.host}:{self.mgmt_port}/roots/0")

    def intermediates(self) -> bytes:
        return self._get(f"https://{self.host}:{self.mgmt_port}/intermediates/0")

    def log_text(self) -> str:
        return self.process.log_text() if self.process is not None else ""
