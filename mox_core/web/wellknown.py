"""The system handlers on well-known names, which web handlers cannot override: the MTA-STS
policy of a domain (RFC 8461 §3.2) on ``mta-sts.<domain>``, and the account settings mail
clients fetch on ``autoconfig.<domain>`` (Thunderbird's autoconfig, Microsoft's
autodiscover), describing the submission listener (and an IMAP server when ``[imap]`` names
one).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from urllib.parse import parse_qs

from mox_core.config.resolved import Config
from mox_core.web.request import Host

__all__ = [
    "AUTOCONFIG_PATH",
    "AUTODISCOVER_PATH",
    "MTA_STS_PATH",
    "ClientSettings",
    "autoconfig_domain",
    "autoconfig_xml",
    "autodiscover_xml",
    "client_settings",
    "mta_sts_domain",
    "mta_sts_policy",
]

MTA_STS_PATH = "/.well-known/mta-sts.txt"
AUTOCONFIG_PATH = "/mail/config-v1.1.xml"
AUTODISCOVER_PATH = "/autodiscover/autodiscover.xml"
MAX_AUTODISCOVER_REQUEST = 64 * 1024


def mta_sts_domain(host: Host) -> str | None:
    """The domain whose policy ``mta-sts.<domain>`` asks for; None for other hosts."""
    name = host.domain
    if name is None or not name.startswith("mta-sts.") or len(name) <= len("mta-sts."):
        return None
    return name[len("mta-sts."):]


def mta_sts_policy(config: Config, domain: str) -> bytes | None:
    """The policy file (RFC 8461 §3.2: ``key: value`` lines ending in LF), None when the
    domain is not ours or has no MTA-STS policy. An empty ``mx`` list gives our host name."""
    dom = config.dynamic.domains.get(domain)
    if dom is None or dom.mta_sts is None:
        return None
    p = dom.mta_sts
    lines = ["version: STSv1", f"mode: {p.mode}", f"max_age: {p.max_age}"]
    lines += [f"mx: {mx}" for mx in (p.mx or [config.static.hostname])]
    return ("\n".join(lines) + "\n").encode()


def autoconfig_domain(config: Config, host: Host) -> str | None:
    """The domain a client asks about on this host: the host, without an ``autoconfig.`` or
    ``autodiscover.`` prefix, when it is one of our domains or our host names."""
    name = host.domain
    if name is None:
        return None
    for prefix in ("autoconfig.", "autodiscover."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    ours = {config.static.hostname} | {lst.hostname.lower() for lst in config.static.listeners.values()
                                       if lst.hostname}
    if name in config.dynamic.domains or name in ours:
        return name
    return None


@dataclass(frozen=True)
class Server:
    hostname: str
    port: int
    tls: str  # "SSL" (implicit TLS) or "STARTTLS"


@dataclass(frozen=True)
class ClientSettings:
    submission: Server | None
    imap: Server | None


def client_settings(config: Config) -> ClientSettings:
    """Where a mail client submits: the first listener with submissions (implicit TLS,
    RFC 8314 prefers it), else with submission (STARTTLS); and the IMAP server of ``[imap]``."""
    submission = None
    for want in ("submissions", "submission"):
        for lst in config.static.listeners.values():
            svc = getattr(lst, want)
            if svc.enabled:
                submission = Server(lst.hostname or config.static.hostname, svc.port,
                                    "SSL" if want == "submissions" else "STARTTLS")
                break
        if submission:
            break
    imap = None
    if config.static.imap is not None:
        i = config.static.imap
        imap = Server(i.host, i.port, "SSL" if i.tls == "implicit" else "STARTTLS")
    return ClientSettings(submission, imap)


def autoconfig_xml(config: Config, domain: str, query: bytes) -> bytes:
    """Thunderbird's ``config-v1.1.xml`` for ``domain``; the login is the address from the
    ``emailaddress`` query parameter, else ``%EMAILADDRESS%`` (the client fills it in)."""
    address = (parse_qs(query.decode("latin-1")).get("emailaddress") or ["%EMAILADDRESS%"])[0]
    e = html.escape
    cs = client_settings(config)
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<clientConfig version="1.1">',
           f'  <emailProvider id="{e(domain)}">', f"    <domain>{e(domain)}</domain>",
           f"    <displayName>{e(address)}</displayName>", f"    <displayShortName>{e(domain)}</displayShortName>"]
    if cs.imap is not None:
        out += ['    <incomingServer type="imap">', *_server_lines(cs.imap, address), "    </incomingServer>"]
    if cs.submission is not None:
        out += ['    <outgoingServer type="smtp">', *_server_lines(cs.submission, address), "    </outgoingServer>"]
    out += ["  </emailProvider>", "</clientConfig>", ""]
    return "\n".join(out).encode()


def _server_lines(s: Server, address: str) -> list[str]:
    e = html.escape
    return [f"      <hostname>{e(s.hostname)}</hostname>", f"      <port>{s.port}</port>",
            f"      <socketType>{s.tls}</socketType>", f"      <username>{e(address)}</username>",
            "      <authentication>password-cleartext</authentication>"]


_EMAIL = re.compile(rb"<(?:\w+:)?EMailAddress>\s*([^<\s]{1,320})\s*</(?:\w+:)?EMailAddress>")


def autodiscover_xml(config: Config, body: bytes) -> bytes | None:
    """Microsoft's autodiscover answer (the "outlook" response schema) for the address in the
    request; None when the request names no address. The request is not parsed as XML (no
    entities, no DOCTYPE): only its ``EMailAddress`` element is read."""
    m = _EMAIL.search(body[:MAX_AUTODISCOVER_REQUEST])
    if m is None:
        return None
    address = m.group(1).decode("utf-8", "replace")
    e = html.escape
    cs = client_settings(config)
    protocols = []
    for kind, s in (("IMAP", cs.imap), ("SMTP", cs.submission)):
        if s is None:
            continue
        protocols += ["      <Protocol>", f"        <Type>{kind}</Type>", f"        <Server>{e(s.hostname)}</Server>",
                      f"        <Port>{s.port}</Port>", f"        <LoginName>{e(address)}</LoginName>",
                      "        <SSL>on</SSL>", f"        <Encryption>{'SSL' if s.tls == 'SSL' else 'TLS'}</Encryption>",
                      "        <SPA>off</SPA>", "        <AuthRequired>on</AuthRequired>", "      </Protocol>"]
    out = ['<?xml version="1.0" encoding="utf-8"?>',
           '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">',
           '  <Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a">',
           "    <Account>", "      <AccountType>email</AccountType>", "      <Action>settings</Action>",
           *protocols, "    </Account>", "  </Response>", "</Autodiscover>", ""]
    return "\n".join(out).encode()
