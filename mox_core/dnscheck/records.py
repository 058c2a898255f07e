"""The DNS records a domain needs, from the config (``mox dnsrecords``, ``mox quickstart``).

As mox suggests them: MX to the mail server's host name; SPF listing the sending IPs (the
SMTP listeners' explicit addresses and every SOCKS transport's ``remote_ips``), then ``mx``,
then ``~all`` for the domain, and ``v=spf1 a -all`` for the host name (the SOCKS IPs before
``a``: every sending IP must pass both records); a DKIM key record per
selector; DMARC ``p=reject`` with reports to ``dmarc-reports@``; the MTA-STS record and its
policy host; TLSRPT (RFC 8460) for the domain and the host; autoconfig and the SRV records of
RFC 6186 and RFC 8314 (implicit TLS preferred, POP3 and plain ports marked unavailable with
the target "."); and the reverse DNS (PTR) of the sending IPs.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from mox_core.config.resolved import Config
from mox_core.outgoing.dkimsign import public_key_of
from mox_core.smtp.domain import to_ascii

__all__ = [
    "Record",
    "dkim_value",
    "format_zone",
    "listener_ips",
    "report_address",
    "sending_ips",
    "socks_transports",
    "spf_domain_value",
    "spf_host_value",
    "suggested_records",
]


@dataclass(frozen=True)
class Record:
    """One record: ``name`` absolute (trailing dot), ``value`` in zone-file form except for
    TXT, whose value is the text itself (:meth:`line` quotes it in strings of 255)."""

    section: str
    name: str
    type: str
    value: str

    def zone_value(self) -> str:
        if self.type != "TXT":
            return self.value
        return " ".join(f'"{self.value[i:i + 255]}"' for i in range(0, max(len(self.value), 1), 255))

    def line(self) -> str:
        return f"{self.name:<40} {self.type:<5} {self.zone_value()}"

    def compact(self) -> str:
        return f"{self.name} {self.type} {self.zone_value()}"


def listener_ips(config: Config) -> list[tuple[str, str, str]]:
    """(ip, listener, host name) of the explicit (not unspecified) IPs of listeners with SMTP:
    the addresses mail leaves from."""
    out = []
    for name, lst in config.static.listeners.items():
        if not lst.smtp.enabled:
            continue
        for ip in lst.ips:
            if not ipaddress.ip_address(ip).is_unspecified:
                out.append((ip, name, to_ascii(lst.hostname or config.static.hostname)))
    return out


def socks_transports(config: Config) -> list[tuple[str, list[str], str]]:
    """(name, remote_ips, remote_hostname) of the transports that send through a proxy from
    other addresses (the ``socks`` kind: settings with ``remote_ips``)."""
    out = []
    for name, entry in config.transports.items():
        ips = getattr(entry.settings, "remote_ips", None)
        host = getattr(entry.settings, "remote_hostname", None)
        if ips:
            out.append((name, list(ips), str(host or "")))
    return out


def sending_ips(config: Config) -> list[str]:
    """Every IP mail is sent from, each once: listeners first, then SOCKS transports."""
    seen: dict[str, None] = {}
    for ip, _, _ in listener_ips(config):
        seen.setdefault(ip, None)
    for _, ips, _ in socks_transports(config):
        for ip in ips:
            seen.setdefault(ip, None)
    return list(seen)


def _spf_ips(ips: list[str]) -> str:
    return "".join(("ip6:" if ":" in ip else "ip4:") + ip + " " for ip in ips)


def spf_domain_value(config: Config) -> str:
    """``ip4:``/``ip6:`` per sending IP, then ``mx``, then ``~all``."""
    return f"v=spf1 {_spf_ips(sending_ips(config))}mx ~all"


def spf_host_value(config: Config) -> str:
    """``v=spf1 a -all``: the host name's own addresses; with the SOCKS transports' IPs
    before ``a``, since every sending IP must pass the host name's record too."""
    socks = [ip for _, ips, _ in socks_transports(config) for ip in ips]
    return f"v=spf1 {_spf_ips(list(dict.fromkeys(socks)))}a -all"


def dkim_value(algorithm: str, public: bytes) -> str:
    return f"v=DKIM1; k={algorithm}; p=" + base64.b64encode(public).decode()


def dkim_key_path(config: Config, path: Path) -> Path:
    return path if path.is_absolute() else config.config_dir / path


def report_address(config: Config, domain: str, localpart: str) -> str | None:
    """``localpart@domain`` when an account receives it (quickstart adds dmarc-reports@ and
    tls-reports@), else None."""
    address = f"{localpart}@{domain}"
    return address if address in config.dynamic.addresses else None


def _host_records(config: Config, host: str) -> list[Record]:
    out = []
    for ip, _, name in listener_ips(config):
        if name == host:
            out.append(Record("host", f"{host}.", "AAAA" if ":" in ip else "A", ip))
    return out + [Record("host", f"{host}.", "TXT", spf_host_value(config))]


def _reverse_records(config: Config, host: str) -> list[Record]:
    import dns.reversename

    out = [Record("reverse", dns.reversename.from_address(ip).to_text(), "PTR", f"{name}.")
           for ip, _, name in listener_ips(config)]
    for _, ips, remote in socks_transports(config):
        out += [Record("reverse", dns.reversename.from_address(ip).to_text(), "PTR", f"{remote}.") for ip in ips]
    return out


def _client_records(config: Config, domain: str, host: str) -> list[Record]:
    static = config.static
    out = []
    if any(lst.autoconfig_https.enabled for lst in static.listeners.values()):
        out += [Record("autoconfig", f"autoconfig.{domain}.", "CNAME", f"{host}."),
                Record("autoconfig", f"_autodiscover._tcp.{domain}.", "SRV", f"0 1 443 autoconfig.{domain}.")]
    subs = next((lst for lst in static.listeners.values() if lst.submissions.enabled), None)
    if subs is not None:
        sub_host = to_ascii(subs.hostname or static.hostname)
        out.append(Record("srv", f"_submissions._tcp.{domain}.", "SRV", f"0 1 {subs.submissions.port} {sub_host}."))
    out.append(Record("srv", f"_submission._tcp.{domain}.", "SRV", "0 0 0 ."))
    if static.imap is not None:
        imap_srv = "_imaps" if static.imap.tls == "implicit" else "_imap"
        other = "_imap" if imap_srv == "_imaps" else "_imaps"
        out += [Record("srv", f"{imap_srv}._tcp.{domain}.", "SRV", f"0 1 {static.imap.port} {static.imap.host}."),
                Record("srv", f"{other}._tcp.{domain}.", "SRV", "0 0 0 .")]
    out += [Record("srv", f"_pop3._tcp.{domain}.", "SRV", "0 0 0 ."),
            Record("srv", f"_pop3s._tcp.{domain}.", "SRV", "0 0 0 .")]
    return out


def suggested_records(config: Config, domain: str) -> list[Record]:
    """The records ``domain`` (one of the config's) needs; ValueError for another domain."""
    d = to_ascii(domain)
    dom = config.dynamic.domains.get(d)
    if dom is None:
        raise ValueError(f"unknown domain {domain!r}")
    host = to_ascii(config.static.hostname)
    out = _host_records(config, host) + _reverse_records(config, host)
    out.append(Record("mx", f"{d}.", "MX", f"10 {host}."))
    for selector, sel in dom.dkim.selectors.items():
        try:
            algorithm, public = public_key_of(dkim_key_path(config, sel.private_key_file))
        except (OSError, ValueError):
            continue
        out.append(Record("dkim", f"{selector}._domainkey.{d}.", "TXT", dkim_value(algorithm, public)))
    out.append(Record("spf", f"{d}.", "TXT", spf_domain_value(config)))
    dmarc = report_address(config, d, "dmarc-reports")
    out.append(Record("dmarc", f"_dmarc.{d}.", "TXT", "v=DMARC1;p=reject" + (f";rua=mailto:{dmarc}!10m" if dmarc else "")))
    if dom.mta_sts is not None:
        out += [Record("mtasts", f"_mta-sts.{d}.", "TXT", f"v=STSv1; id={dom.mta_sts.policy_id}"),
                Record("mtasts", f"mta-sts.{d}.", "CNAME", f"{host}.")]
    tlsrpt = report_address(config, d, "tls-reports")
    if tlsrpt:
        out += [Record("tlsrpt", f"_smtp._tls.{d}.", "TXT", f"v=TLSRPTv1; rua=mailto:{tlsrpt}"),
                Record("tlsrpt", f"_smtp._tls.{host}.", "TXT", f"v=TLSRPTv1; rua=mailto:{tlsrpt}")]
    return out + _client_records(config, d, host)


_SECTIONS = {
    "host": "The mail server's host name: its addresses, and SPF for its own messages (DSNs).",
    "reverse": "Reverse DNS: set by whoever provides each IP address (hosting provider, ISP), not in "
               "your zone.\n; Receivers check that the sending IP's name is the host name it greets with.",
    "mx": "Mail for the domain goes to this host.",
    "dkim": "DKIM keys (RFC 6376, RFC 8463): outgoing messages are signed with these selectors.",
    "spf": "SPF (RFC 7208): the IPs allowed to send for the domain, then the MX hosts; ~all (softfail) for\n"
           "; anything else, so receivers still evaluate DKIM and DMARC instead of refusing at once.",
    "dmarc": "DMARC (RFC 7489): reject messages that fail both aligned SPF and DKIM, and ask for reports.\n"
             "; If you send through mailing lists that break DKIM signatures, start with p=none.",
    "mtasts": "MTA-STS (RFC 8461): senders must use verified TLS to the MX hosts of the policy served at\n"
              "; https://mta-sts.<domain>/.well-known/mta-sts.txt. Change the id when the policy changes.",
    "tlsrpt": "TLS reporting (RFC 8460): senders report TLS failures of deliveries to you.",
    "autoconfig": "Mail client configuration: Thunderbird's autoconfig, Microsoft's autodiscover.",
    "srv": "Where mail clients submit (RFC 6186, RFC 8314: implicit TLS); \".\" marks a service as not offered.",
}


def format_zone(records: list[Record]) -> str:
    """The records as a zone-file fragment, grouped, with a comment per group."""
    lines = ["; Time to live of 5 minutes while setting up; raise it once everything works.", "$TTL 300"]
    section = None
    for r in records:
        if r.section != section:
            section = r.section
            lines += ["", f"; {_SECTIONS.get(section, section)}"]
        lines.append(r.line())
    return "\n".join(lines) + "\n"
