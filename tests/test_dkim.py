"""DKIM signing with per-domain selectors, and `mox dkim gen`, verified through loopback DNS."""

from __future__ import annotations

import re

import dkim

from mox_core.authres import _dkim_dnsfunc
from mox_core.dkimsign import sign
from mox_core.config import load_config
from mox_core.plugins import PluginHost
from mox_core.testconfig import MINIMAL_DOMAINS, MINIMAL_STATIC, write_config
from mox_core.testpeers.dnsserver import sync_resolver_for
from tests.conftest import run_mox

MSG = b"From: admin@example.org\r\nTo: x@example.net\r\nSubject: signed\r\n\r\nbody\r\n"


def test_dkim_gen_sign_and_verify(tmp_path, dns_server):
    key = tmp_path / "sel1.pem"
    r = run_mox("dkim", "gen", "--selector", "sel1", "--domain", "example.org", str(key))
    assert r.returncode == 0, r.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    record = r.stdout.splitlines()[0]
    m = re.fullmatch(r'sel1\._domainkey\.example\.org\. TXT (.*)', record)
    assert m, record
    strings = re.findall(r'"([^"]*)"', m.group(1))
    assert all(len(s) <= 255 for s in strings)
    dns_server.add("sel1._domainkey.example.org", "TXT", strings)

    path = write_config(tmp_path / "c", MINIMAL_STATIC, MINIMAL_DOMAINS.replace(
        '[domains."example.org"]\n',
        f'[domains."example.org"]\n[domains."example.org".dkim]\nsign = ["sel1"]\n'
        f'[domains."example.org".dkim.selectors.sel1]\nprivate_key_file = "{key}"\n'), base=False)
    cfg = load_config(path, PluginHost.load())
    sig = sign(cfg, "example.org", MSG)
    assert sig.startswith(b"DKIM-Signature: ") and b"d=example.org" in sig and b"s=sel1" in sig
    dnsfunc = _dkim_dnsfunc(sync_resolver_for(dns_server))
    assert dkim.verify(sig + MSG, dnsfunc=dnsfunc)
    assert not dkim.verify(sig + MSG.replace(b"body", b"BODY"), dnsfunc=dnsfunc)
    assert sign(cfg, "other.example", MSG) == b""
