"""``mox quickstart ADDRESS``: a working configuration for a new mail server, the passwords,
the DNS records to create and what to do next (docs/quickstart.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mox_core.quickstart.create import Made, make, plan
from mox_core.quickstart.templates import INTERNAL_PORT, PROXIED_PORT

__all__ = ["quickstart_command", "report"]


def _ipv6() -> bool:
    from mox_core.localserve.create import ipv6_loopback_works

    return ipv6_loopback_works()


def _records(made: Made) -> str:
    from mox_core.config.loader import load_config
    from mox_core.dnscheck import format_zone, suggested_records
    from mox_core.plugins.host import PluginHost

    cfg = load_config(made.config_path, PluginHost.load())
    text = format_zone(suggested_records(cfg, made.setup.domain))
    if made.setup.acme:
        text += ("\n; Optional: only Let's Encrypt may issue certificates for the domain (RFC 8659).\n"
                 f'; {made.setup.domain}. CAA 0 issue "letsencrypt.org"\n')
    return text


def _proxy_section(made: Made) -> str:
    s, cdir = made.setup, made.config_dir
    return f"""
Your web server keeps ports 80 and 443. It must forward the MTA-STS policy, autoconfig and the
account pages to mox on 127.0.0.1:{PROXIED_PORT}. For nginx ({cdir / "nginx-mox.conf"}):

{(cdir / "nginx-mox.conf").read_text()}
For Caddy ({cdir / "Caddyfile-mox"}):

{(cdir / "Caddyfile-mox").read_text()}
mox reads {s.cert} and {s.key} again when they change, so renewals by your web server's
ACME client reach SMTP and submission without a restart; mox must be able to read them.
"""


def report(made: Made, directory: Path) -> str:
    s = made.setup
    ports = "25, 465 and 587" if s.existing_webserver else "25, 465, 587, 80 and 443"
    no_ips = "" if s.ips and not all(ip in ("0.0.0.0", "::") for ip in s.ips) else (
        f"\nAlso create A (and AAAA) records for {s.hostname} with this machine's public IP addresses. The\n"
        "public listener listens on all addresses, so those, the ip4:/ip6: of SPF and the reverse DNS are\n"
        "not listed: put the public addresses in ips of [listeners.public] and run mox dnsrecords again.\n")
    certs = ("mox gets the certificates from Let's Encrypt by itself once the DNS records are in place\n"
             "   (mox acme status shows them; until then a temporary self-signed one is used)."
             if s.acme else "SMTP and submission use the certificate files you gave.")
    return f"""mox quickstart made a configuration for {s.address} in {directory}:

  config/mox.toml       the server: host name {s.hostname}, listeners{", Let's Encrypt" if s.acme else ""}
  config/domains.toml   domain {s.domain}, account {s.account}
  config/dkim/          DKIM keys: {", ".join(f"{sel} ({alg})" for sel, alg, _ in s.dkim)}
  config/adminpasswd    the admin password (a salted hash)
  data/                 mail (Maildir), queue, certificates

Passwords, shown only this once (change them with mox setaccountpassword {s.account} and
mox setadminpassword):

  {s.address:<30} {made.account_password}   (submission and the account pages)
  {"admin pages":<30} {made.admin_password}

DNS records to create (mox dnsrecords {s.domain} prints them again):

{_records(made)}{no_ips}{_proxy_section(made) if s.existing_webserver else ""}
Next steps:

1. Create the DNS records above at your DNS provider, and have the provider of your IP addresses
   (hosting provider, ISP) set their reverse DNS (PTR) to {s.hostname}.
2. Let ports {ports} reach this machine (firewall, NAT).
3. Start mox in {directory}: mox serve (as a system service, run it there as root or as a
   user allowed to bind the ports).
4. {certs}
5. Check the DNS records: mox dnscheck {s.domain} (it says what is still wrong).
6. Mail clients: submission to {s.hostname} port 465 (TLS), login {s.address}; Thunderbird finds
   this by itself (autoconfig). Incoming mail is in data/accounts/{s.account}/Maildir, in the account
   pages (http://127.0.0.1:{INTERNAL_PORT}/account/ on this machine), or through an IMAP server
   reading the Maildir (e.g. Dovecot; name it in [imap] of mox.toml for autoconfig).
"""


@click.command("quickstart")
@click.argument("address")
@click.option("--hostname", default=None, help="Host name of this mail server (default: mail.<domain>).")
@click.option("--existing-webserver", is_flag=True,
              help="A web server already uses ports 80 and 443: serve the web parts on loopback for it to "
                   "forward to, and use its certificate (--cert, --key).")
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM certificate chain for SMTP and submission (instead of Let's Encrypt).")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Its PEM private key.")
@click.option("--ip", "ips", multiple=True, help="Public IP address to listen on (repeat; default: all).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder to make config/ and data/ in.")
def quickstart_command(address: str, hostname: str | None, existing_webserver: bool, cert: Path | None,
                       key: Path | None, ips: tuple[str, ...], directory: Path) -> Any:
    """Make a configuration for a new mail server for ADDRESS (you@example.com): mox.toml,
    domains.toml, DKIM keys and passwords; print the DNS records to create and the next steps."""
    v6 = _ipv6()
    setup = plan(address, hostname=hostname, ips=list(ips) or (["0.0.0.0", "::"] if v6 else ["0.0.0.0"]),
                 internal_ips=["127.0.0.1", "::1"] if v6 else ["127.0.0.1"],
                 existing_webserver=existing_webserver, cert=cert, key=key)
    directory = directory.absolute()
    made = make(directory, setup)
    click.echo(report(made, directory), nl=False)
