"""``mox dnsrecords`` and ``mox dnscheck`` against the test's loopback DNS server: the zone
dnsrecords suggests (plus reverse DNS) passes every check; broken zones fail the check they
break, with the record to publish. A running ``mox serve`` serves the MTA-STS policy over
HTTPS with a certificate of a test CA (trusted through ``SSL_CERT_FILE``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mox_core.outgoing.dkimsign import generate_key
from mox_testpeers import free_port, wait_banner
from mox_testpeers.dnsserver import DNSServer
from mox_testpeers.pebble import make_ca_and_cert
from tests.conftest import run_mox

DOMAIN, HOST, SOCKS_IP, SOCKS_HOST = "example.test", "mail.example.test", "127.0.0.10", "out.example.test"


class Site:
    def __init__(self, directory: Path, dns: DNSServer) -> None:
        self.dir, self.dns = directory, dns
        self.ca, cert, key = make_ca_and_cert(directory / "tls", (HOST, f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}"))
        self.smtp, self.submissions, self.https, self.admin = free_port(), free_port(), free_port(), free_port()
        (directory / "dkim").mkdir()
        generate_key(directory / "dkim" / "2026a.pem", algorithm="ed25519")
        generate_key(directory / "dkim" / "2026b.pem", algorithm="rsa")
        (directory / "mox.toml").write_text(textwrap.dedent(f"""\
            hostname = "{HOST}"
            data_dir = "data"
            smtp_workers = 1
            [dns]
            nameservers = ["{dns.nameserver}"]
            timeout = 2
            [postmaster]
            account = "admin"
            [testing]
            allow_private_targets = true
            mta_sts_port = {self.https}
            [listeners.public]
            ips = ["127.0.0.1"]
            tls = {{ cert_file = "{cert}", key_file = "{key}" }}
            smtp = {{ enabled = true, port = {self.smtp} }}
            submissions = {{ enabled = true, port = {self.submissions} }}
            mta_sts_https = {{ enabled = true, port = {self.https} }}
            autoconfig_https = {{ enabled = true, port = {self.https} }}
            admin_http = {{ enabled = true, port = {self.admin} }}
            [transports.viaproxy]
            kind = "socks"
            address = "127.0.0.1:1080"
            remote_ips = ["{SOCKS_IP}"]
            remote_hostname = "{SOCKS_HOST}"
            """))
        (directory / "domains.toml").write_text(textwrap.dedent(f"""\
            [domains."{DOMAIN}"]
            localpart_catchall_separators = ["+"]
            mta_sts = {{ policy_id = "20260101T000000", mode = "enforce" }}
            [domains."{DOMAIN}".dkim]
            sign = ["2026a", "2026b"]
            [domains."{DOMAIN}".dkim.selectors.2026a]
            private_key_file = "dkim/2026a.pem"
            [domains."{DOMAIN}".dkim.selectors.2026b]
            private_key_file = "dkim/2026b.pem"
            [accounts.admin]
            domain = "{DOMAIN}"
            [accounts.admin.destinations."admin@{DOMAIN}"]
            [accounts.admin.destinations."dmarc-reports@{DOMAIN}"]
            mailbox = "DMARC"
            [accounts.admin.destinations."tls-reports@{DOMAIN}"]
            mailbox = "TLSRPT"
            """))
        self.proc: subprocess.Popen | None = None

    def mox(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_mox("--config", str(self.dir / "mox.toml"), *args, env={"SSL_CERT_FILE": str(self.ca)})

    def start(self) -> None:
        r = subprocess.run([sys.executable, "-m", "mox_core", "--config", str(self.dir / "mox.toml"),
                            "setadminpassword"], input="admin-pw\n", capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        env = {k: v for k, v in os.environ.items() if k != "MOX_CONFIG"}
        env["SSL_CERT_FILE"] = str(self.ca)  # the admin page's check fetches the MTA-STS policy
        with open(self.dir / "mox.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mox_core", "--config", str(self.dir / "mox.toml"),
                                          "serve"], stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_banner("127.0.0.1", self.smtp, timeout=30, proc=self.proc)

    def load_zone(self) -> str:
        """The records ``mox dnsrecords`` prints, into the DNS server."""
        self.dns.clear()
        r = self.mox("dnsrecords", DOMAIN)
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines():
            if not line.strip() or line.startswith((";", "$")):
                continue
            name, rdtype, value = line.split(None, 2)
            if rdtype == "TXT":
                self.dns.add(name, "TXT", re.findall(r'"([^"]*)"', value))
            else:
                self.dns.add(name, rdtype, value)
        return r.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    dns = DNSServer().start()
    s = Site(tmp_path_factory.mktemp("dnscheck"), dns)
    s.start()
    try:
        yield s
    finally:
        if s.proc is not None:
            s.proc.terminate()
            s.proc.wait(20)
        dns.stop()


def test_dnsrecords_lists_what_the_config_needs_with_the_socks_ips_in_spf(site):
    zone = site.load_zone()
    assert re.search(rf'^{DOMAIN}\.\s+TXT\s+"v=spf1 ip4:127\.0\.0\.1 ip4:{re.escape(SOCKS_IP)} mx ~all"$', zone, re.M), zone
    assert re.search(rf'^{HOST}\.\s+TXT\s+"v=spf1 ip4:{re.escape(SOCKS_IP)} a -all"$', zone, re.M)
    assert re.search(rf"^{DOMAIN}\.\s+MX\s+10 {HOST}\.$", zone, re.M)
    assert re.search(rf'^2026a\._domainkey\.{DOMAIN}\.\s+TXT\s+"v=DKIM1; k=ed25519; p=', zone, re.M)
    assert re.search(rf'^2026b\._domainkey\.{DOMAIN}\.\s+TXT\s+"v=DKIM1; k=rsa; p=.*" ".*"$', zone, re.M)  # split in 255s
    assert f'_dmarc.{DOMAIN}.' in zone and f"rua=mailto:dmarc-reports@{DOMAIN}!10m" in zone
    assert re.search(rf'^_mta-sts\.{DOMAIN}\.\s+TXT\s+"v=STSv1; id=20260101T000000"$', zone, re.M)
    assert re.search(rf"^mta-sts\.{DOMAIN}\.\s+CNAME\s+{HOST}\.$", zone, re.M)
    assert f'_smtp._tls.{DOMAIN}.' in zone and f'_smtp._tls.{HOST}.' in zone
    assert re.search(rf"^_submissions\._tcp\.{DOMAIN}\.\s+SRV\s+0 1 {site.submissions} {HOST}\.$", zone, re.M)
    assert re.search(rf"^10\.0\.0\.127\.in-addr\.arpa\.\s+PTR\s+{SOCKS_HOST}\.$", zone, re.M)
    assert re.search(rf"^1\.0\.0\.127\.in-addr\.arpa\.\s+PTR\s+{HOST}\.$", zone, re.M)


def check(site, *, ok: bool) -> str:
    r = site.mox("dnscheck", DOMAIN)
    assert r.returncode == (0 if ok else 1), r.stdout + r.stderr
    return r.stdout


def row(out: str, name: str) -> str:
    """The lines of one check in the table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def test_the_suggested_zone_passes_every_check(site):
    site.load_zone()
    out = check(site, ok=True)
    assert "0 failure(s), 0 warning(s)" in out, out
    for name in ("MX", "SPF", "DKIM", "DMARC", "MTA-STS", "TLSRPT", "Autoconfig", "SRV", "Reverse DNS"):
        assert row(out, name).split()[len(name.split())] == "pass", row(out, name)
    assert "policy at https://mta-sts.example.test/.well-known/mta-sts.txt: mode enforce" in out


def test_no_spf_record_is_a_failure_with_the_record_to_publish(site):
    site.load_zone()
    site.dns.set(DOMAIN, "TXT", [])
    out = row(check(site, ok=False), "SPF")
    assert "failure" in out and f"no SPF record for domain {DOMAIN}" in out
    assert f'fix:     {DOMAIN}. TXT "v=spf1 ip4:127.0.0.1 ip4:127.0.0.10 mx ~all"' in out, out


def test_a_socks_ip_missing_from_spf_fails_its_evaluation(site):
    site.load_zone()
    site.dns.set(DOMAIN, "TXT", ["v=spf1 ip4:127.0.0.1 mx ~all"])
    out = row(check(site, ok=False), "SPF")
    assert f'IP "{SOCKS_IP}" does not pass domain SPF evaluation, status not "pass" but "softfail"' in out, out
    assert 'IP "127.0.0.1" does not pass' not in out


def test_a_wrong_dkim_key_is_a_failure(site, tmp_path):
    site.load_zone()
    other = generate_key(tmp_path / "other.pem", algorithm="ed25519")
    import base64

    site.dns.set(f"2026a._domainkey.{DOMAIN}", "TXT", ["v=DKIM1; k=ed25519; p=" + base64.b64encode(other).decode()])
    out = row(check(site, ok=False), "DKIM")
    assert f"selector 2026a: the key published at 2026a._domainkey.{DOMAIN} is not the key of" in out, out
    assert "selector 2026b: rsa key matches (signs)" in out


def test_no_dmarc_record_is_a_failure(site):
    site.load_zone()
    site.dns.remove(f"_dmarc.{DOMAIN}")
    out = row(check(site, ok=False), "DMARC")
    assert f"no DMARC record at _dmarc.{DOMAIN}" in out and "v=DMARC1;p=reject;rua=mailto:dmarc-reports@" in out


def test_an_mta_sts_record_without_a_policy_served_is_a_failure(site):
    site.load_zone()
    site.dns.remove(f"mta-sts.{DOMAIN}")
    site.dns.add(f"mta-sts.{DOMAIN}", "A", "127.0.0.9")  # nothing serves the policy there
    out = row(check(site, ok=False), "MTA-STS")
    assert "the policy at https://mta-sts.example.test/.well-known/mta-sts.txt could not be fetched" in out, out
    assert f"fix:     mta-sts.{DOMAIN}. CNAME {HOST}." in out


def test_reverse_dns_of_a_socks_ip_must_name_its_remote_hostname(site):
    site.load_zone()
    site.dns.set("10.0.0.127.in-addr.arpa", "PTR", ["elsewhere.example."])
    out = row(check(site, ok=False), "Reverse DNS")
    assert f"For SOCKS transport viaproxy, ensure IPs {SOCKS_IP} have reverse address {SOCKS_HOST}" in out, out


def test_unknown_domain_and_json(site):
    r = site.mox("dnscheck", "other.example")
    assert r.returncode == 1 and "unknown domain" in r.stderr
    site.load_zone()
    r = site.mox("dnscheck", "--json", DOMAIN)
    import json

    data = json.loads(r.stdout)
    assert data["ok"] is True and {x["name"] for x in data["results"]} >= {"MX", "SPF", "DKIM", "MTA-STS"}


async def test_a_lookup_timeout_fails_its_check_and_the_overall_timeout_ends_the_rest(site):
    from mox_core.config.loader import load_config
    from mox_core.dnscheck import Status, check_domain
    from mox_core.plugins.host import PluginHost
    from mox_testpeers.dnsserver import resolver_for, sync_resolver_for

    site.load_zone()
    cfg = load_config(site.dir / "mox.toml", PluginHost.load())
    site.dns.timeout(f"_dmarc.{DOMAIN}", "TXT")
    result = await check_domain(cfg, DOMAIN, resolver=resolver_for(site.dns, timeout=0.3),
                                sync_resolver=sync_resolver_for(site.dns, timeout=0.3), lookup_timeout=0.5, timeout=20)
    dmarc = next(r for r in result.results if r.name == "DMARC")
    assert dmarc.status is Status.FAILURE and "no answer within 0.5s" in dmarc.messages[0], dmarc
    assert not result.ok and next(r for r in result.results if r.name == "MX").status is Status.PASS
    site.dns.clear_failures()
    site.dns.delay(DOMAIN, "MX", 3.0)
    result = await check_domain(cfg, DOMAIN, resolver=resolver_for(site.dns, timeout=5),
                                sync_resolver=sync_resolver_for(site.dns, timeout=5), lookup_timeout=10, timeout=1)
    mx = next(r for r in result.results if r.name == "MX")
    assert mx.status is Status.FAILURE and mx.messages == ["no result within 1s"]
    assert next(r for r in result.results if r.name == "DKIM").status is Status.PASS
    site.dns.clear_failures()


def test_the_admin_pages_show_the_records_and_the_check(site):
    import httpx

    from tests.adminweb import csrf_of

    zone = site.load_zone()
    base = f"http://127.0.0.1:{site.admin}/admin"
    with httpx.Client(timeout=60, trust_env=False) as c:
        page = c.get(f"{base}/login")
        r = c.post(f"{base}/login", data={"csrf": csrf_of(page.text), "password": "admin-pw"},
                   headers={"origin": f"http://127.0.0.1:{site.admin}"})
        assert r.status_code == 303
        records = c.get(f"{base}/domains/{DOMAIN}/dns")
        assert records.status_code == 200
        assert f"{DOMAIN}." in records.text and "v=spf1 ip4:127.0.0.1 ip4:127.0.0.10 mx ~all" in records.text
        assert "Check DNS now" in records.text and "failures</span>" not in records.text
        checked = c.get(f"{base}/domains/{DOMAIN}/dns", params={"check": "1"})
        assert checked.status_code == 200
        assert "no failures" in checked.text
        for name in ("MX", "SPF", "DKIM", "DMARC", "MTA-STS"):
            assert f'<th scope="row">{name}</th>' in checked.text
        site.dns.set(DOMAIN, "TXT", [])  # no SPF any more: the page shows the failure and the fix
        broken = c.get(f"{base}/domains/{DOMAIN}/dns", params={"check": "1"})
        assert f"no SPF record for domain {DOMAIN}" in broken.text
        assert "failures</span>" in broken.text
    assert zone
