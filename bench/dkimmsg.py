"""Keys and messages of bench/dkimcost.py, and its checks of what mox did with them."""

from __future__ import annotations

import base64
import random
import sqlite3
from pathlib import Path

import dkim
from common import LOCAL_RCPT, MoxBench
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

INCOMING_DOMAIN = "src.bench.example"  # not under .test: OpenDKIM's resolver keeps .test to itself
INCOMING_SENDER = f"sender@{INCOMING_DOMAIN}"
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


class Keys:
    """One RSA-2048 and one Ed25519 key (PEM, PKCS #8), in ``directory``."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.private = {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                        "ed25519": ed25519.Ed25519PrivateKey.generate()}
        self.files = {}
        for alg, key in self.private.items():
            self.files[alg] = directory / f"{alg}.pem"
            self.files[alg].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))

    def record(self, alg: str) -> str:
        """The TXT record publishing the public key (RFC 6376 §3.6.1; RFC 8463 §4)."""
        pub = self.private[alg].public_key()
        if alg == "rsa":
            der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()

    def dkimpy_private(self, alg: str) -> bytes:
        """The key as dkimpy's sign() takes it: PEM for RSA, the base64 seed for Ed25519."""
        if alg == "rsa":
            return self.files[alg].read_bytes()
        raw = self.private[alg].private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
        return base64.b64encode(raw)

    def dnsfunc(self, domains: dict[str, str]):  # type: ignore[no-untyped-def]
        """dkimpy's key lookup for ``{domain: alg}`` (selector "rsa" or "ed")."""
        table = {f"{'rsa' if alg == 'rsa' else 'ed'}._domainkey.{d}.".encode(): self.record(alg).encode()
                 for d, alg in domains.items()}
        return lambda name, timeout=5: table.get(name)


def text_body(length: int, seed: int = 8463) -> bytes:
    """``length`` bytes of plain text: words with single spaces, lines of at most 76."""
    rng = random.Random(seed)
    words = [w.encode() for w in ("the message was received and stored before the reply while "
                                  "signatures of every domain are checked on arrival by mail servers").split()]
    lines, size, line = [], 0, b""
    while size < length:
        w = rng.choice(words)
        if len(line) + 1 + len(w) > 76:
            lines.append(line + b"\r\n")
            size += len(line) + 2
            line = b""
        line = line + b" " + w if line else w
    body = b"".join(lines)[: length - 2]
    return body.rstrip(b" ") + b"\r\n"


def incoming_messages(lengths: list[int], directory: Path, keys: Keys) -> tuple[dict, dict]:
    """Files for smtp-source ``-F`` (LF line ends; it sends CRLF): {length: unsigned} and
    {alg: {length: signed}}, signed by dkimpy as the sending domain's MTA would."""
    unsigned: dict[int, Path] = {}
    signed: dict[str, dict[int, Path]] = {"rsa": {}, "ed25519": {}}
    for length in sorted(set(lengths)):
        message = (f"From: <{INCOMING_SENDER}>\r\nTo: <{LOCAL_RCPT}>\r\n"
                   "Date: Thu, 26 Nov 2026 11:19:44 +0000\r\n"
                   f"Message-Id: <{length}.dkim@{INCOMING_DOMAIN}>\r\nSubject: dkim bench\r\n"
                   "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n").encode()
        message += text_body(length)
        unsigned[length] = directory / f"unsigned-{length}.eml"
        unsigned[length].write_bytes(message.replace(b"\r\n", b"\n"))
        for alg, files in signed.items():
            sig = dkim.sign(message, b"rsa" if alg == "rsa" else b"ed", INCOMING_DOMAIN.encode(),
                            keys.dkimpy_private(alg), canonicalize=(b"relaxed", b"relaxed"),
                            include_headers=SIGNED_HEADERS,
                            signature_algorithm=b"rsa-sha256" if alg == "rsa" else b"ed25519-sha256")
            files[length] = directory / f"signed-{alg}-{length}.eml"
            files[length].write_bytes((sig + message).replace(b"\r\n", b"\n"))
    return unsigned, signed


def newest_maildir(mox: MoxBench) -> bytes:
    new = mox.data_dir / "accounts" / "bench" / "Maildir" / "new"
    newest = max(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return newest.read_bytes()


def check_queued_signature(mox: MoxBench, algorithm: str, keys: Keys) -> None:
    """The newest message in mox's queue (a small one: in the index) starts with a
    DKIM-Signature of ``algorithm`` that dkimpy verifies with the published key."""
    db = mox.data_dir / "queue" / "index.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        data = con.execute("SELECT data FROM msg_data ORDER BY base_id DESC LIMIT 1").fetchone()[0]
    finally:
        con.close()
    if not data.startswith(b"DKIM-Signature:") or f"a={algorithm};".encode() not in data[:200]:
        raise RuntimeError(f"mox queued no {algorithm} signature: {data[:300]!r}")
    dnsfunc = keys.dnsfunc({"rsa.bench.test": "rsa", "ed.bench.test": "ed25519"})
    if not dkim.verify(data, dnsfunc=dnsfunc):
        raise RuntimeError(f"dkimpy does not verify mox's {algorithm} signature: {data[:600]!r}")
