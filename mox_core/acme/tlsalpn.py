"""The tls-alpn-01 challenge (RFC 8737): the CA opens a TLS connection to port 443 naming the
host (SNI) and offering only the ALPN protocol ``acme-tls/1``; the server must then present a
self-signed certificate for that name with the critical ``acmeIdentifier`` extension holding
the SHA-256 of the key authorization. Any other client of the same name keeps getting the
real certificate.

Telling the CA's handshake apart needs the client's ALPN list before the certificate is
chosen. Python's SNI callback runs before ALPN selection and does not see it, so the
listening context's message callback (``SSLContext._msg_callback``, called with every TLS
handshake message, the ClientHello first) reads the ALPN extension of the ClientHello and
marks the connection; the SNI callback then switches a marked connection to the challenge
certificate. The message callback is a private attribute of Python's ``ssl`` module (there
since Python 3.8): where it is missing, tls-alpn-01 is not answered and http-01 remains.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
import struct
from pathlib import Path
from typing import Any

import structlog

from mox_core.acme.store import alpn01_path, key_and_chain

__all__ = ["ACME_TLS_1", "ChallengeResponder", "challenge_certificate", "client_hello_alpn"]

log = structlog.get_logger(component="acme")

ACME_TLS_1 = "acme-tls/1"
# id-pe-acmeIdentifier, RFC 8737 §6.1
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"
_HANDSHAKE, _CLIENT_HELLO, _EXT_ALPN = 22, 1, 16
_MARK = "_mox_acme_tls_1"


def challenge_certificate(name: str, key_authorization: str) -> bytes:
    """RFC 8737 §3: a self-signed certificate with exactly one SAN, ``name``, and the critical
    acmeIdentifier extension whose value is the DER OCTET STRING of SHA-256(key
    authorization); with its key, as one PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme tls-alpn-01 challenge")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(ACME_IDENTIFIER_OID),
                                                      b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_and_chain(key_pem, cert.public_bytes(serialization.Encoding.PEM))


def client_hello_alpn(msg: bytes) -> list[bytes]:
    """The ALPN protocol names (RFC 7301 §3.1) of a ClientHello handshake message (type,
    3-byte length, body; RFC 8446 §4.1.2); empty when it has none or does not parse."""
    try:
        pos = 4 + 2 + 32  # handshake header, legacy_version, random
        pos += 1 + msg[pos]  # legacy_session_id
        pos += 2 + struct.unpack_from("!H", msg, pos)[0]  # cipher_suites
        pos += 1 + msg[pos]  # legacy_compression_methods
        end = pos + 2 + struct.unpack_from("!H", msg, pos)[0]
        pos += 2
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", msg, pos)
            pos += 4
            if ext_type == _EXT_ALPN:
                data = msg[pos:pos + ext_len]
                names, i = [], 2
                while i < len(data):
                    n = data[i]
                    names.append(bytes(data[i + 1:i + 1 + n]))
                    i += 1 + n
                return names
            pos += ext_len
    except (IndexError, struct.error):
        return []
    return []


def _note_client_hello(conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any,
                       data: bytes) -> None:
    if direction == "read" and content_type == _HANDSHAKE and msg_type == _CLIENT_HELLO:
        if ACME_TLS_1.encode() in client_hello_alpn(data):
            try:
                setattr(conn, _MARK, True)
            except AttributeError:
                pass


class ChallengeResponder:
    """Answers tls-alpn-01 on a listening context of the web process, from the challenge
    files the main process's client writes (:func:`mox_core.acme.store.alpn01_path`)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def install(self, ctx: ssl.SSLContext) -> bool:
        """Watch the ClientHellos of connections to ``ctx``; False where this Python cannot."""
        if not hasattr(ctx, "_msg_callback"):
            log.warning("acme_tls_alpn_unsupported", note="this Python's ssl module has no message "
                        "callback; tls-alpn-01 challenges are not answered, use http-01")
            return False
        ctx._msg_callback = _note_client_hello  # type: ignore[attr-defined]
        return True

    @staticmethod
    def wants_challenge(sslobj: Any) -> bool:
        """Whether the client of ``sslobj`` offered ``acme-tls/1`` (a CA validating)."""
        return bool(getattr(sslobj, _MARK, False))

    def context(self, name: str) -> ssl.SSLContext | None:
        """A context with the pending challenge certificate of ``name`` (ALPN acme-tls/1 only);
        None when no challenge for it is pending."""
        try:
            path = alpn01_path(self.data_dir, name)
        except ValueError:
            return None
        if not path.exists():
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(path))
        except (OSError, ssl.SSLError):
            return None
        ctx.set_alpn_protocols([ACME_TLS_1])
        log.info("acme_tls_alpn_challenge_served", name=name)
        return ctx
