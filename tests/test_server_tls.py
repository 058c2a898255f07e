"""Server TLS contexts (mox_core/server/tls.py): certificates read again when their files change,
a broken file keeps the previous certificate, ACME certificates by host name, and the
tls-alpn-01 challenge certificate only for a client offering acme-tls/1 (RFC 8737).

Handshakes run in memory (two ``ssl`` objects over memory BIOs), no sockets."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from structlog.testing import capture_logs

from mox_core.acme import store
from mox_core.acme.tlsalpn import ACME_IDENTIFIER_OID, challenge_certificate, client_hello_alpn
from mox_core.config.listeners import TLSFiles
from mox_core.server import tls as servertls
from mox_core.server.tls import server_context


def handshake(server: ssl.SSLContext, sni: str | None, alpn: list[str] | None = None) -> tuple[x509.Certificate, str | None]:
    """The leaf certificate the server presents, and the ALPN protocol chosen."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if alpn:
        client.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cobj = client.wrap_bio(c_in, c_out, server_hostname=sni)
    sobj = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, obj in enumerate((cobj, sobj)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            break
    assert all(done), "handshake did not complete"
    return x509.load_der_x509_certificate(cobj.getpeercert(binary_form=True)), cobj.selected_alpn_protocol()


def names(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def write_pair(directory: Path, name: str) -> tuple[Path, Path]:
    pem = store.temporary_certificate(name)
    key, _, chain = pem.partition(b"-----END PRIVATE KEY-----\n")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    for path, data in ((cert_path, chain), (key_path, key + b"-----END PRIVATE KEY-----\n")):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return cert_path, key_path


def test_changed_certificate_files_are_used_for_new_connections(tmp_path, monkeypatch):
    monkeypatch.setattr(servertls, "CHECK_INTERVAL", 0.0)
    cert, key = write_pair(tmp_path, "one.example")
    ctx = server_context(TLSFiles(cert_file=cert, key_file=key), tmp_path)
    assert names(handshake(ctx, "one.example")[0]) == ["one.example"]
    write_pair(tmp_path, "two.example")
    with capture_logs() as logs:
        assert names(handshake(ctx, "one.example")[0]) == ["two.example"]
        assert names(handshake(ctx, None)[0]) == ["two.example"]  # also without SNI
    assert any(e["event"] == "tls_certificate_reloaded" for e in logs)
    # a key that does not match (a half-done replacement): the previous certificate stays
    other = store.temporary_certificate("three.example")
    key.write_bytes(other.partition(b"-----END PRIVATE KEY-----\n")[0] + b"-----END PRIVATE KEY-----\n")
    with capture_logs() as logs:
        assert names(handshake(ctx, "one.example")[0]) == ["two.example"]
    assert any(e["event"] == "tls_certificate_reload_failed" for e in logs)


def test_changes_are_noticed_at_most_once_per_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(servertls, "CHECK_INTERVAL", 3600.0)
    cert, key = write_pair(tmp_path, "one.example")
    ctx = server_context(TLSFiles(cert_file=cert, key_file=key), tmp_path)
    write_pair(tmp_path, "two.example")
    assert names(handshake(ctx, "one.example")[0]) == ["one.example"]


def test_acme_certificates_by_host_name_with_the_listeners_as_default(tmp_path, monkeypatch):
    monkeypatch.setattr(servertls, "CHECK_INTERVAL", 0.0)
    ctx = server_context(TLSFiles(acme="le"), tmp_path, data_dir=tmp_path, hostname="mail.example.org")
    # made at once: a temporary certificate for the listener's host name
    leaf, _ = handshake(ctx, "mail.example.org")
    assert names(leaf) == ["mail.example.org"] and "mox temporary certificate" in leaf.issuer.rfc4514_string()
    store.write_private(store.cert_path(tmp_path, "mta-sts.example.org"), store.temporary_certificate("mta-sts.example.org"))
    assert names(handshake(ctx, "mta-sts.example.org")[0]) == ["mta-sts.example.org"]
    assert names(handshake(ctx, "unknown.example.org")[0]) == ["mail.example.org"]
    assert names(handshake(ctx, None)[0]) == ["mail.example.org"]
    assert (store.cert_path(tmp_path, "mail.example.org").stat().st_mode & 0o777) == 0o600


def test_tls_alpn_01_certificate_only_for_a_client_offering_acme_tls_1(tmp_path):
    ctx = server_context(TLSFiles(acme="le"), tmp_path, alpn=["http/1.1"], data_dir=tmp_path,
                         hostname="mail.example.org", acme_challenges=True)
    store.write_private(store.alpn01_path(tmp_path, "mail.example.org"),
                        challenge_certificate("mail.example.org", "token.thumbprint"))
    leaf, proto = handshake(ctx, "mail.example.org", ["acme-tls/1"])
    assert proto == "acme-tls/1" and names(leaf) == ["mail.example.org"]
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(ACME_IDENTIFIER_OID))
    assert ext.critical and len(ext.value.value) == 34 and ext.value.value[:2] == b"\x04\x20"
    # a browser at the same moment gets the real certificate
    leaf, proto = handshake(ctx, "mail.example.org", ["h2", "http/1.1"])
    assert proto == "http/1.1" and ext not in leaf.extensions
    # no challenge pending for a name: the CA's handshake is refused
    with pytest.raises(ssl.SSLError):
        handshake(ctx, "other.example.org", ["acme-tls/1"])


def test_client_hello_alpn_is_read_from_the_handshake_message():
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.set_alpn_protocols(["acme-tls/1", "h2"])
    out = ssl.MemoryBIO()
    obj = client.wrap_bio(ssl.MemoryBIO(), out, server_hostname="x.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    record = out.read()
    assert record[0] == 22  # TLS record header, then the ClientHello handshake message
    assert client_hello_alpn(record[5:]) == [b"acme-tls/1", b"h2"]
    assert client_hello_alpn(record[5:60]) == []  # cut short: nothing, no exception
