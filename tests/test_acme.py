"""ACME end to end: ``mox serve`` gets its certificates from Pebble (Let's Encrypt's test CA,
Debian package ``pebble``) by itself, over tls-alpn-01 and http-01, serves them on SMTP
STARTTLS and HTTPS in every process, renews them on request without a restart, and keeps
serving a temporary certificate while the CA cannot validate.

Everything on loopback: the test's DNS server answers Pebble's lookups for the host names
with 127.0.0.1 and 127.0.0.2, where mox listens on the ports Pebble validates.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509

from mox_testpeers import free_port, port_is_free, wait_banner, wait_for
from mox_testpeers.pebble import Pebble
from tests.conftest import run_mox

DOMAIN = "example.test"
ALPN_HOST, HTTP_HOST = "mail.alpn.test", "mail.http.test"


def _port_free_on_both() -> int:
    while True:
        port = free_port()
        if port_is_free("127.0.0.2", port):
            return port


def starttls_chain(ip: str, port: int, sni: str, cafile: str | None) -> x509.Certificate:
    """The leaf certificate mox presents after STARTTLS for ``sni``; the handshake verifies
    the chain against ``cafile`` when given (so the intermediate must be served)."""
    with socket.create_connection((ip, port), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220")
        raw.sendall(b"EHLO client.test\r\n")
        while not (line := f.readline()).startswith(b"250 "):
            assert line.startswith(b"250-"), line
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        with _client_ctx(cafile).wrap_socket(raw, server_hostname=sni) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def https_chain(ip: str, port: int, sni: str, cafile: str | None, path: str = "/") -> tuple[x509.Certificate, bytes]:
    with socket.create_connection((ip, port), timeout=10) as raw:
        with _client_ctx(cafile).wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            body = b""
            while chunk := tls.recv(65536):
                body += chunk
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)), body


def _client_ctx(cafile: str | None) -> ssl.SSLContext:
    if cafile is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=cafile)


def san(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


class ACMESetup:
    def __init__(self, directory: Path, dns_server, pebble: Pebble, http_port: int, tls_port: int) -> None:
        self.dir, self.dns, self.pebble = directory, dns_server, pebble
        self.http_port, self.tls_port = http_port, tls_port
        self.smtp_alpn, self.submissions, self.smtp_http = free_port(), free_port(), _port_free_on_both()
        self.proc: subprocess.Popen | None = None
        self.log = directory / "mox.log"

    def write(self, workers: int = 2) -> None:
        pebble = self.pebble
        provider = f'directory_url = "{pebble.directory}"\nca_file = "{pebble.ca_file}"\ncontact_email = "admin@{DOMAIN}"'
        (self.dir / "mox.toml").write_text(textwrap.dedent(f"""\
            hostname = "{ALPN_HOST}"
            data_dir = "data"
            log_level = "debug"
            smtp_workers = {workers}
            [dns]
            nameservers = ["{self.dns.nameserver}"]
            timeout = 2
            [postmaster]
            account = "admin"
            [acme.pebble-alpn]
            challenges = ["tls-alpn-01"]
            port = {self.tls_port}
            [acme.pebble-http]
            challenges = ["http-01"]
            http_port = {self.http_port}
            [listeners.alpn]
            ips = ["127.0.0.1"]
            tls = {{ acme = "pebble-alpn" }}
            smtp = {{ enabled = true, port = {self.smtp_alpn} }}
            submissions = {{ enabled = true, port = {self.submissions} }}
            mta_sts_https = {{ enabled = true, port = {self.tls_port} }}
            autoconfig_https = {{ enabled = true, port = {self.tls_port} }}
            [listeners.http]
            ips = ["127.0.0.2"]
            hostname = "{HTTP_HOST}"
            tls = {{ acme = "pebble-http" }}
            smtp = {{ enabled = true, port = {self.smtp_http} }}
            webserver_http = {{ enabled = true, port = {self.http_port} }}
            """).replace("[acme.pebble-alpn]\n", f"[acme.pebble-alpn]\n{provider}\n")
            .replace("[acme.pebble-http]\n", f"[acme.pebble-http]\n{provider}\n"))
        (self.dir / "domains.toml").write_text(textwrap.dedent(f"""\
            [domains."{DOMAIN}"]
            mta_sts = {{ policy_id = "20260101T000000", mode = "enforce", mx = ["{ALPN_HOST}"] }}
            [accounts.admin]
            domain = "{DOMAIN}"
            [accounts.admin.destinations."admin@{DOMAIN}"]
            """))

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MOX_CONFIG"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mox_core", "--config", str(self.dir / "mox.toml"),
                                          "serve"], stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_banner("127.0.0.1", self.smtp_alpn, timeout=30, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def mox(self, *args: str):
        return run_mox("--config", str(self.dir / "mox.toml"), *args)


@pytest.fixture
def acme_setup(tmp_path, dns_server):
    http_port, tls_port = _port_free_on_both(), _port_free_on_both()
    for name in (ALPN_HOST, f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}"):
        dns_server.add(name, "A", "127.0.0.1")
    dns_server.add(HTTP_HOST, "A", "127.0.0.2")
    pebble = Pebble(dns_server.nameserver, http_port, tls_port)
    try:
        pebble.start()
    except Exception as exc:  # a missing pebble fails the test, with the package to install
        pytest.fail(f"pebble: {exc}", pytrace=False)
    setup = ACMESetup(tmp_path, dns_server, pebble, http_port, tls_port)
    try:
        yield setup
    finally:
        setup.stop()
        pebble.cleanup()


def _issued_by_pebble(cert: x509.Certificate) -> bool:
    return "Pebble Intermediate CA" in cert.issuer.rfc4514_string()


def test_serve_gets_renews_and_serves_acme_certificates_in_every_process(acme_setup):
    s = acme_setup
    s.write(workers=2)
    s.start()
    root = s.dir / "pebble-root.pem"
    root.write_bytes(s.pebble.roots())
    ca = str(root)
    # the CA's certificates arrive by themselves: SMTP STARTTLS (a worker process) verifies
    leaf = wait_for(lambda: _try(lambda: starttls_chain("127.0.0.1", s.smtp_alpn, ALPN_HOST, ca)), 60,
                    interval=0.2, what="a Pebble certificate on SMTP STARTTLS")
    assert _issued_by_pebble(leaf) and san(leaf) == [ALPN_HOST]
    http_leaf = wait_for(lambda: _try(lambda: starttls_chain("127.0.0.2", s.smtp_http, HTTP_HOST, ca)), 60,
                         interval=0.2, what="the http-01 certificate")
    assert _issued_by_pebble(http_leaf) and san(http_leaf) == [HTTP_HOST]
    # HTTPS (the web process) for mta-sts.<domain>, with the policy
    sts_leaf, body = wait_for(lambda: _try(lambda: https_chain("127.0.0.1", s.tls_port, f"mta-sts.{DOMAIN}", ca,
                                                               "/.well-known/mta-sts.txt")), 60, interval=0.2,
                              what="the mta-sts certificate")
    assert _issued_by_pebble(sts_leaf) and san(sts_leaf) == [f"mta-sts.{DOMAIN}"]
    assert b"200 OK" in body and f"mx: {ALPN_HOST}".encode() in body
    auto_leaf, _ = wait_for(lambda: _try(lambda: https_chain("127.0.0.1", s.tls_port, f"autoconfig.{DOMAIN}", ca)),
                            60, interval=0.2, what="the autoconfig certificate")
    assert san(auto_leaf) == [f"autoconfig.{DOMAIN}"]
    # submissions (implicit TLS) presents it too; without SNI the host name's certificate
    with socket.create_connection(("127.0.0.1", s.submissions), timeout=10) as raw:
        with _client_ctx(ca).wrap_socket(raw, server_hostname=ALPN_HOST) as tls:
            assert tls.recv(100).startswith(b"220")
    nosni = starttls_chain("127.0.0.1", s.smtp_alpn, None, None)
    assert san(nosni) == [ALPN_HOST]
    log = s.log_text()
    assert '"challenge": "tls-alpn-01"' in log and '"challenge": "http-01"' in log, log[-3000:]
    key = s.dir / "data" / "acme" / "certs" / f"{ALPN_HOST}.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    pids = _pids(s.proc.pid)

    # renewal now, without a restart: every process serves the new certificates
    r = s.mox("acme", "renew")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{ALPN_HOST}: obtained" in r.stdout and f"{HTTP_HOST}: obtained" in r.stdout
    wait_for(lambda: starttls_chain("127.0.0.1", s.smtp_alpn, ALPN_HOST, ca).serial_number != leaf.serial_number,
             5, interval=0.1, what="the renewed certificate on SMTP")
    wait_for(lambda: starttls_chain("127.0.0.2", s.smtp_http, HTTP_HOST, ca).serial_number
             != http_leaf.serial_number, 5, interval=0.1, what="the renewed http-01 certificate")
    wait_for(lambda: https_chain("127.0.0.1", s.tls_port, f"mta-sts.{DOMAIN}", ca)[0].serial_number
             != sts_leaf.serial_number, 5, interval=0.1, what="the renewed certificate on HTTPS")
    assert _pids(s.proc.pid) == pids
    status = s.mox("acme", "status")
    assert status.returncode == 0 and f"{ALPN_HOST} (pebble-alpn, listener alpn): issued by" in status.stdout


def _try(fn):
    try:
        cert = fn()
    except (OSError, ssl.SSLError, AssertionError):
        return None
    leaf = cert[0] if isinstance(cert, tuple) else cert
    return cert if _issued_by_pebble(leaf) else None


def _pids(parent: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()} | {parent}


def test_a_failed_validation_is_logged_with_the_fix_and_the_temporary_certificate_stays(acme_setup):
    s = acme_setup
    s.dns.set(ALPN_HOST, "A", "127.0.0.3")  # nothing listens there: the CA cannot connect
    s.write(workers=1)
    s.start()
    wait_for(lambda: '"event": "acme_certificate_failed"' in s.log_text(), 30, what="the failure in the log")
    failed = next(line for line in s.log_text().splitlines()
                  if "acme_certificate_failed" in line and ALPN_HOST in line)
    assert "Failed to connect" in failed and "check that the A/AAAA records of mail.alpn.test" in failed, failed
    assert '"retry_in": "60s"' in failed and "temporary self-signed certificate" in failed
    # still serving, with the temporary certificate
    leaf = starttls_chain("127.0.0.1", s.smtp_alpn, ALPN_HOST, None)
    assert san(leaf) == [ALPN_HOST] and "mox temporary certificate" in leaf.issuer.rfc4514_string()
    status = s.mox("acme", "status")
    assert "temporary self-signed" in status.stdout and "fix: " in status.stdout and "port 443" in status.stdout
    # DNS fixed: a renewal now (before the retry is due) gets it
    s.dns.set(ALPN_HOST, "A", "127.0.0.1")
    r = s.mox("acme", "renew", ALPN_HOST)
    assert r.returncode == 0 and f"{ALPN_HOST}: obtained" in r.stdout, r.stdout + r.stderr
    root = s.dir / "pebble-root.pem"
    root.write_bytes(s.pebble.roots())
    leaf = wait_for(lambda: _try(lambda: starttls_chain("127.0.0.1", s.smtp_alpn, ALPN_HOST, str(root))), 5,
                    interval=0.1, what="the certificate after the fix")
    assert _issued_by_pebble(leaf)
