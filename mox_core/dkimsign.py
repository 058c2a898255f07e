"""DKIM signing of outgoing mail (RFC 6376) with the selectors of each domain.

``[domains."example.org".dkim]`` in domains.toml names selectors with their private key files
(relative to the config directory) and which of them sign. Keys are RSA (dkimpy); they are
read once and cached by path and modification time. ``mox dkim gen`` makes a key and prints
the DNS record to publish.
"""

from __future__ import annotations

import os
from pathlib import Path

import dkim
import structlog

from mox_core.config import Config
from mox_core.smtp.domain import to_ascii

log = structlog.get_logger(component="dkim")

_keys: dict[tuple[str, float], bytes] = {}


def _key(path: Path) -> bytes:
    mtime = path.stat().st_mtime
    k = (str(path), mtime)
    if k not in _keys:
        _keys[k] = path.read_bytes()
    return _keys[k]


def sign(config: Config, from_domain: str, message: bytes) -> bytes:
    """The DKIM-Signature header lines to put in front of ``message`` (b"" if not signing).

    ``from_domain`` is the domain of the message's From address. A broken key is logged and
    the message goes out unsigned rather than not at all.
    """
    try:
        domain = to_ascii(from_domain)
    except ValueError:
        return b""
    dom = config.dynamic.domains.get(domain)
    if dom is None or not dom.dkim.sign:
        return b""
    out = b""
    for name in dom.dkim.sign:
        sel = dom.dkim.selectors[name]
        path = sel.private_key_file if sel.private_key_file.is_absolute() else config.config_dir / sel.private_key_file
        header_c, _, body_c = sel.canonicalization.partition("/")
        try:
            sig = dkim.sign(
                message, name.encode(), domain.encode(), _key(path),
                canonicalize=(header_c.encode(), body_c.encode()),
                include_headers=[h.encode() for h in sel.headers],
                linesep=b"\r\n",
            )
        except (OSError, dkim.DKIMException) as exc:
            log.error("dkim_sign_failed", domain=domain, selector=name, error=str(exc))
            continue
        out += sig if sig.endswith(b"\r\n") else sig + b"\r\n"
    return out


def generate_key(path: Path, bits: int = 2048) -> bytes:
    """Write a new RSA private key (PEM, mode 0600) and return the public key (DER)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def dns_record(selector: str, domain: str, public_der: bytes) -> str:
    """The TXT record in zone-file syntax, split into strings of at most 255 characters."""
    import base64

    value = "v=DKIM1; k=rsa; p=" + base64.b64encode(public_der).decode()
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    return f"{selector}._domainkey.{to_ascii(domain)}. TXT " + " ".join(f'"{c}"' for c in chunks)
