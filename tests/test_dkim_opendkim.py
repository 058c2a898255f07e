"""DKIM against an independent implementation: OpenDKIM (Debian's ``opendkim``) verifies what
mox signs, and mox verifies what OpenDKIM signs, RSA-2048 and Ed25519 (RFC 8463).

OpenDKIM runs in its offline test mode (``opendkim -x CONF -t FILE``), which prints the header
fields it would add; its key lookups go to the test's DNS server on loopback (``Nameservers``;
the domain is example.org: OpenDKIM's resolver, libunbound, answers names under .test itself).
Without opendkim the tests fail with the package to install (``scripts/install`` installs it).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from mox_core.checks import authres, dkimverify
from mox_core.outgoing.dkimsign import sign
from mox_testpeers.dnsserver import sync_resolver_for
from tests.conftest import program
from tests.test_dkim import _config, keys  # noqa: F401  (keys: the fixture)

MESSAGE = (b"From: Alice <admin@example.org>\r\nTo: x@example.net\r\nSubject: checked  by\tOpenDKIM\r\n"
           b"Date: Sun, 06 Dec 2026 18:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n"
           b"Hello,  world\t \r\nsecond line\r\n\r\n\r\n")


def opendkim_test(tmp_path: Path, conf: str, message: bytes) -> list[tuple[str, str]]:
    """The header fields OpenDKIM adds to ``message``: (name, value as it inserts it, CRLF)."""
    (tmp_path / "opendkim.conf").write_text(conf + "Syslog no\nRequireSafeKeys no\n")
    (tmp_path / "msg.eml").write_bytes(message)
    p = subprocess.run([program("opendkim", "opendkim"), "-x", str(tmp_path / "opendkim.conf"), "-t", str(tmp_path / "msg.eml"), "-vvv"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [(m.group(1), m.group(2).replace("\r\n", "\n").replace("\n", "\r\n")) for m in
            re.finditer(r"### INSHEADER: idx=\d+ hname='([^']*)' hvalue='([^']*)'", p.stdout)]


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "relaxed/simple", "simple/simple"])
@pytest.mark.parametrize("selector", ["rsa", "ed"])
def test_opendkim_verifies_what_mox_signs(tmp_path, keys, dns_server, canonicalization, selector):  # noqa: F811
    cfg = _config(tmp_path, keys, [selector], canonicalization)
    signed = sign(cfg, "example.org", MESSAGE) + MESSAGE
    conf = (f"Mode v\nAuthservID verify.example\nNameservers {dns_server.nameserver.replace(':', '@')}\n")
    added = opendkim_test(tmp_path, conf, signed)
    results = [v for n, v in added if n == "Authentication-Results"]
    assert results and "dkim=pass" in results[0] and "header.d=example.org" in results[0], added
    # and a changed body does not pass
    added = opendkim_test(tmp_path, conf, signed.replace(b"second", b"2nd"))
    assert "dkim=fail" in [v for n, v in added if n == "Authentication-Results"][0], added


@pytest.mark.parametrize(("selector", "canonicalization"), [
    ("rsa", "relaxed/relaxed"), ("rsa", "simple/simple"), ("rsa", "relaxed/simple"), ("ed", "relaxed/relaxed"),
    ("ed", "relaxed/simple")])
def test_mox_verifies_what_opendkim_signs(tmp_path, keys, dns_server, canonicalization, selector):  # noqa: F811
    # (OpenDKIM 2.11.0~beta2's Ed25519 signatures with simple header canonicalization fail
    # everywhere, in OpenDKIM's own verifier too, so they are not among these)
    algorithm = {"rsa": "rsa-sha256", "ed": "ed25519-sha256"}[selector]
    conf = (f"Mode s\nDomain example.org\nSelector {selector}\nKeyFile {keys[selector]}\n"
            f"SignatureAlgorithm {algorithm}\nCanonicalization {canonicalization}\nOversignHeaders From\n")
    added = opendkim_test(tmp_path, conf, MESSAGE)
    sigs = [v for n, v in added if n == "DKIM-Signature"]
    assert len(sigs) == 1 and f"a={algorithm};" in sigs[0], added
    signed = b"DKIM-Signature: " + sigs[0].encode() + b"\r\n" + MESSAGE
    dnsfunc = authres._dkim_dnsfunc(sync_resolver_for(dns_server))
    assert dkimverify.Message.parse(signed).verify(0, dnsfunc) == ("pass", "example.org", selector)
    assert authres._dkim_results(signed, dnsfunc, 5) == [("pass", "example.org", selector)]
    changed = signed.replace(b"second", b"2nd")
    assert authres._dkim_results(changed, dnsfunc, 5) == [("fail", "example.org", selector)]
