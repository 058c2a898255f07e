"""``mox quickstart`` as an administrator uses it: the config it writes passes ``mox config
check`` and runs with ``mox serve`` (ports moved to free high ones). Without
``--existing-webserver`` mox gets its certificates from Pebble by itself and the zone it
printed passes ``mox dnscheck``; with it, the printed nginx configuration passes ``nginx -t``
and forwards to the running mox, the Caddy one passes ``caddy validate``, and a replaced
certificate file reaches SMTP without a restart."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from mox_core.accounts.adminpasswd import check_admin_password
from mox_testpeers import free_port, wait_banner, wait_for, wait_port
from mox_testpeers.pebble import Pebble, make_ca_and_cert
from tests.conftest import run_mox
from tests.test_acme import _issued_by_pebble, https_chain, san, starttls_chain

ADDRESS, DOMAIN, HOST = "admin@example.test", "example.test", "mail.example.test"


def quickstart(directory: Path, *args: str) -> str:
    r = run_mox("quickstart", ADDRESS, "--hostname", HOST, "--ip", "127.0.0.1", "--dir", str(directory), *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def passwords(out: str) -> tuple[str, str]:
    account = re.search(rf"^  {re.escape(ADDRESS)}\s+(\S+)", out, re.M)
    admin = re.search(r"^  admin pages\s+(\S+)", out, re.M)
    assert account and admin, out
    return account.group(1), admin.group(1)


def move_ports(config: Path, **extra: int) -> dict[int, int]:
    """Every well-known port of mox.toml to a free high port (the same new port for each
    occurrence of an old one); returns old -> new."""
    text = config.read_text()
    ports = {old: free_port() for old in {int(p) for p in re.findall(r"^(?:http_)?port = (\d+)$", text, re.M)}}
    ports.update(extra)
    text = re.sub(r"^((?:http_)?port) = (\d+)$", lambda m: f"{m.group(1)} = {ports[int(m.group(2))]}", text, flags=re.M)
    config.write_text(text)
    return ports


def load_zone(dns_server, zone: str) -> None:
    for line in zone.splitlines():
        if not re.match(r"^\S+\.\s+(A|AAAA|MX|TXT|CNAME|SRV|PTR)\s", line):
            continue
        name, rdtype, value = line.split(None, 2)
        if rdtype == "TXT":
            dns_server.add(name, "TXT", re.findall(r'"([^"]*)"', value))
        else:
            dns_server.add(name, rdtype, value)


class Serve:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.parent.parent / "mox.log"
        env = {k: v for k, v in os.environ.items() if k != "MOX_CONFIG"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mox_core", "--config", str(config), "serve"],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def serve():
    started: list[Serve] = []

    def start(config: Path) -> Serve:
        s = Serve(config)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_quickstart_with_acme_runs_gets_certificates_and_its_zone_passes_dnscheck(tmp_path, dns_server, serve):
    out = quickstart(tmp_path)
    account_pw, admin_pw = passwords(out)
    for record in (rf"^{DOMAIN}\.\s+MX\s+10 {HOST}\.$", rf'^{DOMAIN}\.\s+TXT\s+"v=spf1 ip4:127\.0\.0\.1 mx ~all"$',
                   rf'^{HOST}\.\s+TXT\s+"v=spf1 a -all"$', rf"^{HOST}\.\s+A\s+127\.0\.0\.1$",
                   rf'^\d{{4}}a\._domainkey\.{DOMAIN}\.\s+TXT\s+"v=DKIM1; k=ed25519; p=',
                   rf'^\d{{4}}b\._domainkey\.{DOMAIN}\.\s+TXT\s+"v=DKIM1; k=rsa; p=',
                   rf'^_dmarc\.{DOMAIN}\.\s+TXT\s+"v=DMARC1;p=reject;rua=mailto:dmarc-reports@{DOMAIN}!10m"$',
                   rf'^_mta-sts\.{DOMAIN}\.\s+TXT\s+"v=STSv1; id=\d{{8}}T\d{{6}}"$', rf"^mta-sts\.{DOMAIN}\.\s+CNAME\s+{HOST}\.$",
                   rf'^_smtp\._tls\.{DOMAIN}\.\s+TXT\s+"v=TLSRPTv1; rua=mailto:tls-reports@{DOMAIN}"$',
                   rf"^autoconfig\.{DOMAIN}\.\s+CNAME\s+{HOST}\.$",
                   rf"^_autodiscover\._tcp\.{DOMAIN}\.\s+SRV\s+0 1 443 autoconfig\.{DOMAIN}\.$",
                   rf"^_submissions\._tcp\.{DOMAIN}\.\s+SRV\s+0 1 465 {HOST}\.$",
                   rf"^1\.0\.0\.127\.in-addr\.arpa\.\s+PTR\s+{HOST}\.$"):
        assert re.search(record, out, re.M), record
    assert "Next steps:" in out and f"mox dnscheck {DOMAIN}" in out
    config = tmp_path / "config" / "mox.toml"
    check = run_mox("--config", str(config), "config", "check")
    assert check.returncode == 0, check.stderr
    assert check_admin_password(config.parent, admin_pw)

    ports = move_ports(config)
    # the records as printed; the SRV record follows the submissions port the test moved
    load_zone(dns_server, out.split("DNS records to create", 1)[1].split("Next steps:", 1)[0])
    dns_server.set(f"_submissions._tcp.{DOMAIN}", "SRV", [f"0 1 {ports[465]} {HOST}."])
    pebble = Pebble(dns_server.nameserver, ports[80], ports[443])
    pebble.start()
    try:
        text = config.read_text().replace('directory_url = "https://acme-v02.api.letsencrypt.org/directory"',
                                          f'directory_url = "{pebble.directory}"\nca_file = "{pebble.ca_file}"')
        text = text.replace("[postmaster]", f'[dns]\nnameservers = ["{dns_server.nameserver}"]\ntimeout = 2\n\n'
                            f"[testing]\nallow_private_targets = true\nmta_sts_port = {ports[443]}\n\n[postmaster]")
        config.write_text(text)
        s = serve(config)
        wait_banner("127.0.0.1", ports[25], timeout=30, proc=s.proc)
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.roots())
        for name in (HOST, f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}"):
            leaf = wait_for(lambda n=name: _https(ports[443], n, str(root)), 60, interval=0.2, what=f"certificate {name}")
            assert _issued_by_pebble(leaf) and san(leaf) == [name]
        assert _issued_by_pebble(starttls_chain("127.0.0.1", ports[25], HOST, str(root)))
        # the printed account password logs in (submissions, the certificate verified)
        with _smtps("127.0.0.1", ports[465], HOST, str(root)) as c:
            c.login(ADDRESS, account_pw)
        # the zone quickstart printed passes every check
        r = run_mox("--config", str(config), "dnscheck", DOMAIN, env={"SSL_CERT_FILE": str(root)})
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 failure(s), 0 warning(s)" in r.stdout, r.stdout
    finally:
        pebble.cleanup()


def _https(port: int, name: str, cafile: str):
    try:
        leaf, _ = https_chain("127.0.0.1", port, name, cafile)
    except (OSError, ssl.SSLError):
        return None
    return leaf if _issued_by_pebble(leaf) else None


class _SMTPSPinned(smtplib.SMTP_SSL):
    """SMTP over implicit TLS to an IP, with SNI and verification for a host name."""

    def __init__(self, ip: str, port: int, name: str, cafile: str) -> None:
        self._ip, self._name = ip, name
        super().__init__(ip, port, local_hostname="client.test", timeout=15,  # no getfqdn(): no system DNS
                         context=ssl.create_default_context(cafile=cafile))

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((self._ip, port), timeout)
        return self.context.wrap_socket(sock, server_hostname=self._name)


def _smtps(ip: str, port: int, name: str, cafile: str) -> smtplib.SMTP_SSL:
    return _SMTPSPinned(ip, port, name, cafile)


NGINX_IP = "127.0.0.95"


def _nginx(directory: Path, snippet: str, https: int, http: int, upstream: int) -> subprocess.Popen:
    """A private nginx serving the quickstart snippet (listen addresses and the upstream port
    moved, as an administrator with other ports would), after ``nginx -t``."""
    for sub in ("logs", "tmp"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    snippet = (snippet.replace("    listen [::]:443 ssl;\n", "").replace("    listen [::]:80;\n", "")
               .replace("listen 443 ssl;", f"listen {NGINX_IP}:{https} ssl;").replace("listen 80;", f"listen {NGINX_IP}:{http};")
               .replace("127.0.0.1:1081", f"127.0.0.1:{upstream}"))
    (directory / "mox.conf").write_text(snippet)
    user = "user root root;\n" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(f"""worker_processes 1;
pid logs/nginx.pid;
error_log logs/error.log notice;
{user}events {{ worker_connections 64; }}
http {{
    access_log logs/access.log;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    include mox.conf;
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    base = [nginx, "-p", f"{directory}/", "-c", str(directory / "nginx.conf"), "-e", str(directory / "logs/error.log")]
    t = subprocess.run(base + ["-t"], capture_output=True, text=True)
    assert t.returncode == 0, t.stderr
    assert "syntax is ok" in t.stderr and "test is successful" in t.stderr
    proc = subprocess.Popen(base + ["-g", "daemon off;"])
    wait_port(NGINX_IP, https, proc=proc)
    return proc


def _get(ip: str, port: int, host: str, path: str, cafile: str | None) -> tuple[int, dict[str, str], bytes]:
    if cafile is None:
        conn = http.client.HTTPConnection(ip, port, timeout=10)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=10, context=ssl.create_default_context(cafile=cafile))
        conn.sock = ssl.create_default_context(cafile=cafile).wrap_socket(
            socket.create_connection((ip, port), 10), server_hostname=host)
    conn.request("GET", path, headers={"Host": host, "X-Forwarded-For": "203.0.113.7"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def test_quickstart_with_an_existing_webserver_behind_nginx_and_caddy(tmp_path, serve):
    ca, cert, key = make_ca_and_cert(tmp_path / "tls", (HOST, f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}"))
    out = quickstart(tmp_path / "mox", "--existing-webserver", "--cert", str(cert), "--key", str(key))
    account_pw, _ = passwords(out)
    conf = tmp_path / "mox" / "config"
    nginx_conf, caddyfile = (conf / "nginx-mox.conf").read_text(), (conf / "Caddyfile-mox").read_text()
    assert nginx_conf in out and caddyfile in out
    assert "proxy_set_header Host $host;" in nginx_conf and f"server_name mta-sts.{DOMAIN} autoconfig.{DOMAIN};" in nginx_conf
    text = (conf / "mox.toml").read_text()
    assert "[acme" not in text and "port = 443" not in text and "port = 80\n" not in text
    assert "forwarded = true" in text and f'cert_file = "{cert}"' in text
    check = run_mox("--config", str(conf / "mox.toml"), "config", "check")
    assert check.returncode == 0, check.stderr
    ports = move_ports(conf / "mox.toml")
    s = serve(conf / "mox.toml")
    wait_banner("127.0.0.1", ports[25], timeout=30, proc=s.proc)
    wait_port("127.0.0.1", ports[1081], proc=s.proc)

    https, http_port = free_port(NGINX_IP), free_port(NGINX_IP)
    nginx = _nginx(tmp_path / "nginx", nginx_conf, https, http_port, ports[1081])
    try:
        status, headers, body = _get(NGINX_IP, https, f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt", str(ca))
        assert status == 200 and body == f"version: STSv1\nmode: enforce\nmax_age: 86400\nmx: {HOST}\n".encode()
        status, _, body = _get(NGINX_IP, https, f"autoconfig.{DOMAIN}", f"/mail/config-v1.1.xml?emailaddress={ADDRESS}",
                               str(ca))
        assert status == 200 and f"<hostname>{HOST}</hostname>".encode() in body and f"<port>{ports[465]}</port>".encode() in body
        status, _, body = _get(NGINX_IP, http_port, f"autoconfig.{DOMAIN}", "/mail/config-v1.1.xml", None)
        assert status == 200 and b"<clientConfig" in body
        status, headers, _ = _get(NGINX_IP, https, HOST, "/account/", str(ca))
        assert status == 303 and headers["location"].startswith("/account/"), headers
        status, _, body = _get(NGINX_IP, https, HOST, headers["location"], str(ca))
        assert status == 200 and b'type="password"' in body
        status, _, _ = _get(NGINX_IP, https, f"mta-sts.{DOMAIN}", "/admin/", str(ca))
        assert status == 404  # only the three paths are forwarded
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)

    # Caddy's configuration validates (Caddy gets its certificates itself; nothing is started)
    caddy = shutil.which("caddy")
    assert caddy, "caddy is not installed: apt-get install caddy"
    cdir = tmp_path / "caddy"
    cdir.mkdir()
    (cdir / "Caddyfile").write_text("{\n\tadmin off\n\tstorage file_system " + str(cdir / "data") + "\n}\n\n" + caddyfile)
    env = {**os.environ, "XDG_DATA_HOME": str(cdir / "xdg-data"), "XDG_CONFIG_HOME": str(cdir / "xdg-config")}
    v = subprocess.run([caddy, "validate", "--config", str(cdir / "Caddyfile"), "--adapter", "caddyfile"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert v.returncode == 0 and "Valid configuration" in v.stdout + v.stderr, v.stdout + v.stderr

    # the web server renews its certificate: SMTP presents the new one, mox still running
    before = starttls_chain("127.0.0.1", ports[25], HOST, str(ca))
    _, cert2, key2 = make_ca_and_cert(tmp_path / "tls2", (HOST,))
    os.replace(cert2, cert)
    os.replace(key2, key)
    after = wait_for(lambda: (c := starttls_chain("127.0.0.1", ports[25], HOST, None)).serial_number
                     != before.serial_number and c, 5, interval=0.1, what="the new certificate on SMTP")
    assert san(after) == [HOST] and s.proc.poll() is None
    with _smtps("127.0.0.1", ports[465], HOST, str(tmp_path / "tls2" / "ca.pem")) as c:
        c.login(ADDRESS, account_pw)
