"""The commented ``mox.toml`` and ``domains.toml`` that ``mox quickstart`` writes.

Two layouts. Without an existing web server, mox listens on 80 and 443 itself and gets its
certificates from Let's Encrypt (ACME, RFC 8555). With ``--existing-webserver``, mox keeps
off 80 and 443: SMTP and submission use the web server's certificate files (read again when
they change), and the MTA-STS policy, autoconfig and the account pages are served on a
loopback port for the web server to forward to. Either way the account and admin pages are
also on loopback port 1080, and metrics on 8010.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mox_core.config.models import LETSENCRYPT_DIRECTORY

__all__ = ["INTERNAL_PORT", "PROXIED_PORT", "Setup", "domains_toml", "mox_toml"]

INTERNAL_PORT = 1080  # account and admin pages, on loopback
PROXIED_PORT = 1081  # what a reverse proxy forwards to (with --existing-webserver)
METRICS_PORT = 8010


@dataclass
class Setup:
    """What quickstart was asked for, and what it made."""

    address: str
    localpart: str
    domain: str  # Unicode form, lower case
    hostname: str
    account: str
    ips: list[str]
    internal_ips: list[str]
    existing_webserver: bool = False
    cert: Path | None = None
    key: Path | None = None
    dkim: list[tuple[str, str, str]] = field(default_factory=list)  # (selector, algorithm, key file)
    policy_id: str = ""
    created: str = ""  # date, for the comments

    @property
    def acme(self) -> bool:
        return self.cert is None


def _list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def _public(s: Setup) -> str:
    if s.acme:
        tls = """# Certificates from Let's Encrypt, obtained and renewed by mox (see [acme.letsencrypt]).
[listeners.public.tls]
acme = "letsencrypt"
"""
    else:
        tls = f"""# The certificate files (full chain, and key) of {s.hostname}; renewed by whatever made them,
# mox reads them again when they change on disk.
[listeners.public.tls]
cert_file = "{s.cert}"
key_file = "{s.key}"
"""
    text = f"""# The public listener: mail from the internet (SMTP, port 25) and from your mail clients
# (submission: 465 with TLS, 587 with STARTTLS).
[listeners.public]
ips = {_list(s.ips)}

{tls}
[listeners.public.smtp]
enabled = true
port = 25

[listeners.public.submission]
enabled = true
port = 587

[listeners.public.submissions]
enabled = true
port = 465
"""
    if s.existing_webserver:
        return text
    return text + """
# The web server, on 80 and 443: ACME's challenges, the MTA-STS policy (RFC 8461) on
# mta-sts.<domain>, autoconfiguration of mail clients on autoconfig.<domain>, and the web
# handlers of domains.toml (none yet; plain HTTP redirects to HTTPS).
[listeners.public.webserver_http]
enabled = true
port = 80

[listeners.public.webserver_https]
enabled = true
port = 443

[listeners.public.mta_sts_https]
enabled = true
port = 443

[listeners.public.autoconfig_https]
enabled = true
port = 443
"""


def _acme_section(s: Setup) -> str:
    if not s.acme:
        return ""
    return f"""
# Let's Encrypt (ACME, RFC 8555): mox gets the certificates of {s.hostname},
# mta-sts.{s.domain} and autoconfig.{s.domain} by itself, and renews them. Registering
# means agreeing to Let's Encrypt's terms of service. The CA connects to ports 443
# (tls-alpn-01) and 80 (http-01) of those names: the DNS records below must be in place.
[acme.letsencrypt]
directory_url = "{LETSENCRYPT_DIRECTORY}"
contact_email = "{s.address}"
port = 443
http_port = 80
"""


def _proxied(s: Setup) -> str:
    if not s.existing_webserver:
        return ""
    return f"""
# Behind your web server (see the nginx and Caddy configurations quickstart printed):
# the MTA-STS policy, autoconfig and the account pages, as plain HTTP on loopback. The web
# server does TLS and forwards with the Host header; forwarded = true takes the client's
# address from X-Forwarded-For.
[listeners.proxied]
ips = ["127.0.0.1"]

[listeners.proxied.mta_sts_https]
enabled = true
port = {PROXIED_PORT}
non_tls = true
forwarded = true

[listeners.proxied.autoconfig_https]
enabled = true
port = {PROXIED_PORT}
non_tls = true
forwarded = true

[listeners.proxied.account_http]
enabled = true
port = {PROXIED_PORT}
forwarded = true
"""


def mox_toml(s: Setup) -> str:
    return f"""# mox.toml: written by `mox quickstart {s.address}` on {s.created}.
# Read when mox starts: restart mox after a change. `mox config describe` documents every
# setting, `mox config check` checks this file and domains.toml.

# The name of this mail server: its A/AAAA records point here, its reverse DNS names it.
hostname = "{s.hostname}"
# Mail, queue and certificates; relative to this file's directory.
data_dir = "../data"
log_level = "info"

# Mail for postmaster@ of every domain.
[postmaster]
account = "{s.account}"
mailbox = "Postmaster"
{_acme_section(s)}
{_public(s)}{_proxied(s)}
# Account pages (log in with {s.address}) and admin pages, only on this machine:
# http://127.0.0.1:{INTERNAL_PORT}/account/ and http://127.0.0.1:{INTERNAL_PORT}/admin/; from elsewhere
# through an SSH tunnel (ssh -L {INTERNAL_PORT}:127.0.0.1:{INTERNAL_PORT} {s.hostname}). Metrics for
# Prometheus at http://127.0.0.1:{METRICS_PORT}/metrics.
[listeners.internal]
ips = {_list(s.internal_ips)}

[listeners.internal.account_http]
enabled = true
port = {INTERNAL_PORT}

[listeners.internal.admin_http]
enabled = true
port = {INTERNAL_PORT}

[listeners.internal.metrics_http]
enabled = true
port = {METRICS_PORT}
"""


def domains_toml(s: Setup) -> str:
    d = s.domain
    selectors = "\n".join(f"""[domains."{d}".dkim.selectors."{sel}"]
# {algorithm}
private_key_file = "{path}"
""" for sel, algorithm, path in s.dkim)
    return f"""# domains.toml: written by `mox quickstart {s.address}` on {s.created}.
# Domains and accounts. mox reloads it when it changes; the admin pages and
# `mox config domain|account|address add|rm` edit it and keep these comments.

[domains."{d}"]
# {s.localpart}+anything@{d} reaches {s.address}.
localpart_catchall_separators = ["+"]

# DKIM (RFC 6376): outgoing mail is signed with both keys. Ed25519 (RFC 8463) is small but
# not verified by every receiver yet; RSA is. Their DNS records are printed by
# `mox dnsrecords {d}`.
[domains."{d}".dkim]
sign = {_list([sel for sel, _, _ in s.dkim])}

{selectors}
# MTA-STS (RFC 8461): senders must deliver to this server with verified TLS. The policy is
# served at https://mta-sts.{d}/.well-known/mta-sts.txt; change policy_id (and the
# _mta-sts TXT record) whenever the policy changes. An empty mx list means the host name.
[domains."{d}".mta_sts]
policy_id = "{s.policy_id}"
mode = "enforce"
max_age = 86400

[accounts.{s.account}]
domain = "{d}"

[accounts.{s.account}.destinations."{s.address}"]

# Reports from other mail servers about your domain: DMARC aggregate reports (RFC 7489)
# and TLS reports (RFC 8460), each into a mailbox of its own. The DNS records name them.
[accounts.{s.account}.destinations."dmarc-reports@{d}"]
mailbox = "DMARC"

[accounts.{s.account}.destinations."tls-reports@{d}"]
mailbox = "TLSRPT"
"""
