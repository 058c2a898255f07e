"""Server TLS contexts from a listener's certificate files, with the certificate chosen by
the host name the client asks for (SNI, RFC 6066 §3).

A listener's ``tls`` names one certificate and key, plus any number in ``key_certs``; a client
naming a host that one of their certificates covers (exact, or a ``*.`` wildcard for one
label) gets that certificate, any other client the first one. TLS 1.2 or newer.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from mox_core.config.listeners import TLSFiles

__all__ = ["cert_names", "name_matches", "server_context"]


def _resolve(p: Path, config_dir: Path) -> Path:
    return p if p.is_absolute() else config_dir / p


def _context(cert: Path, key: Path, alpn: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def cert_names(cert: Path) -> list[str]:
    """The DNS names of the (first) certificate in the PEM file ``cert``, lower-case."""
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [a.value.lower() for a in c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                if isinstance(a.value, str)]


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 §6.4: exact, or ``*.example.org`` for one label in front of example.org."""
    if pattern == name:
        return True
    if pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:]
    return False


def server_context(tls: TLSFiles, config_dir: Path, *, alpn: list[str] | None = None) -> ssl.SSLContext:
    """The context for a listener's TLS; raises ``OSError``/``ssl.SSLError`` for unusable
    files, naming them."""
    pairs = [(tls.cert_file, tls.key_file)] + [(kc.cert_file, kc.key_file) for kc in tls.key_certs]
    contexts: list[tuple[list[str], ssl.SSLContext]] = []
    for cert, key in pairs:
        cpath, kpath = _resolve(cert, config_dir), _resolve(key, config_dir)
        try:
            ctx = _context(cpath, kpath, alpn)
            names = cert_names(cpath) if len(pairs) > 1 else []
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise OSError(f"tls certificate {cpath} / key {kpath}: {exc}") from None
        contexts.append((names, ctx))
    default = contexts[0][1]
    if len(contexts) == 1:
        return default

    def choose(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if not server_name:
            return
        name = server_name.lower().rstrip(".")
        for names, ctx in contexts:
            if any(name_matches(p, name) for p in names):
                sslobj.context = ctx
                return

    default.sni_callback = choose
    return default
