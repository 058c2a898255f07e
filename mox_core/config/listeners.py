"""Listeners of ``mox.toml``: the IP addresses mox listens on, and per listener which
services it serves on which port: SMTP, submission, submissions, and the web services
(web handlers, account pages, admin pages, MTA-STS policy, autoconfig, metrics).

Several web services may share a port (the usual: everything on 80 and 443); a request is
routed by host name and path (``mox_core/web/``). A port serves plain HTTP or HTTPS, not
both: an HTTPS service needs the listener's ``tls``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from mox_core.config.modelbase import Model

__all__ = [
    "AccountService",
    "AdminService",
    "AutoconfigService",
    "HTTPService",
    "KeyCert",
    "Listener",
    "MetricsService",
    "SMTPListener",
    "SubmissionListener",
    "SubmissionsListener",
    "TLSFiles",
    "WebserverService",
    "WellKnownService",
]


class KeyCert(Model):
    cert_file: Path = Field(description="PEM certificate chain, relative to the config directory.")
    key_file: Path = Field(description="PEM private key, relative to the config directory.")


class TLSFiles(Model):
    """The listener's certificates: files (``cert_file`` and ``key_file``), or from an ACME
    provider of ``[acme]`` (RFC 8555). Files are read again when they change on disk."""

    cert_file: Path | None = Field(
        None, description="PEM certificate chain, relative to the config directory (not with acme).")
    key_file: Path | None = Field(
        None, description="PEM private key, relative to the config directory (not with acme).")
    acme: str | None = Field(
        None,
        description="Get the certificates from this provider of [acme] (e.g. \"letsencrypt\"): for the "
        "listener's host name, and mta-sts.<domain> and autoconfig.<domain> where the listener serves "
        "those over HTTPS. Instead of cert_file and key_file.",
    )
    key_certs: list[KeyCert] = Field(
        default_factory=list,
        description="More certificates, for other host names: a TLS client naming one of their "
        "names (SNI) gets that certificate, any other the first one.",
    )

    @model_validator(mode="after")
    def _source(self) -> TLSFiles:
        files = (self.cert_file is not None, self.key_file is not None)
        if self.acme is not None:
            if any(files):
                raise ValueError("tls: either acme or cert_file and key_file, not both")
        elif not all(files):
            raise ValueError("tls needs cert_file and key_file, or acme")
        return self


class SMTPListener(Model):
    enabled: bool = Field(False, description="Accept incoming mail from the internet with SMTP.")
    port: int = Field(25, ge=1, le=65535, description="Port for incoming SMTP.")
    no_starttls: bool = Field(False, description="Do not offer STARTTLS (needs no TLS files).")
    require_starttls: bool = Field(False, description="Refuse MAIL FROM before STARTTLS.")


class SubmissionListener(Model):
    enabled: bool = Field(False, description="Accept mail from accounts, STARTTLS then AUTH.")
    port: int = Field(587, ge=1, le=65535, description="Port for submission.")
    no_require_starttls: bool = Field(
        False, description="Allow AUTH without TLS. For tests on loopback only; never on a network."
    )


class SubmissionsListener(Model):
    enabled: bool = Field(False, description="Accept mail from accounts over implicit TLS.")
    port: int = Field(465, ge=1, le=65535, description="Port for submissions (implicit TLS).")


def _checked_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError("path must start with /")
    return v if v.endswith("/") else v + "/"


class HTTPService(Model):
    """The account or admin pages, over plain HTTP or HTTPS."""

    enabled: bool = Field(False, description="Serve this on the listener.")
    port: int = Field(80, ge=1, le=65535, description="TCP port.")
    path: str = Field("/", description="Path the pages are served under; starts and ends with /.")
    forwarded: bool = Field(
        False, description="Behind a reverse proxy: take the client's IP from the first "
        "X-Forwarded-For address (for rate limits and logs).",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _checked_path(v)


class AccountService(HTTPService):
    """The account pages (log in with an account's address and password)."""

    path: str = Field("/account/", description="Path the account pages are served under; starts and ends with /.")


class AdminService(HTTPService):
    """The admin pages (log in with the admin password, mox setadminpassword)."""

    path: str = Field("/admin/", description="Path the admin pages are served under; starts and ends with /.")


class WebserverService(Model):
    """The web handlers and domain redirects of domains.toml."""

    enabled: bool = Field(False, description="Serve the web handlers of domains.toml on the listener.")
    port: int = Field(80, ge=1, le=65535, description="TCP port.")
    rate_limit_disabled: bool = Field(
        False, description="No per-IP request limit on this port (for sites with much traffic)."
    )


class WellKnownService(Model):
    """The MTA-STS policy (RFC 8461) on mta-sts.<domain>, or autoconfig for mail clients."""

    enabled: bool = Field(False, description="Serve this on the listener.")
    port: int = Field(443, ge=1, le=65535, description="TCP port.")
    non_tls: bool = Field(
        False, description="Serve it over plain HTTP (behind a reverse proxy that does the TLS)."
    )
    forwarded: bool = Field(
        False, description="Behind a reverse proxy: take the client's IP from X-Forwarded-For."
    )


class AutoconfigService(WellKnownService):
    """Thunderbird autoconfig and Microsoft autodiscover for the configured domains."""


class MetricsService(Model):
    enabled: bool = Field(False, description="Serve Prometheus metrics at /metrics on the listener.")
    port: int = Field(8010, ge=1, le=65535, description="TCP port (plain HTTP; keep it internal).")


class Listener(Model):
    ips: list[str] = Field(description="IP addresses to listen on, e.g. [\"127.0.0.1\", \"::1\"].")
    hostname: str | None = Field(None, description="Host name for this listener; default: hostname.")
    tls: TLSFiles | None = Field(None, description="Certificates for STARTTLS, implicit TLS and HTTPS.")
    smtp_max_message_size: int = Field(
        104857600, ge=1024, description="Largest message accepted, in bytes (SIZE extension)."
    )
    smtp_max_sessions_per_ip: int = Field(
        50, ge=0, description="SMTP, submission and submissions sessions one client address (IPv6: its /64) may "
        "have open at once, per service and process; one more gets 421 and is closed. 0: no limit.",
    )
    smtp_idle_timeout: float = Field(
        300.0, gt=0, description="Seconds an SMTP session may wait for the client's next command (or the next "
        "bytes of a message) before 421 and close. RFC 5321 asks for at least 300.",
    )
    smtp: SMTPListener = Field(default_factory=SMTPListener, description="Incoming SMTP (port 25).")
    submission: SubmissionListener = Field(
        default_factory=SubmissionListener, description="Submission (port 587)."
    )
    submissions: SubmissionsListener = Field(
        default_factory=SubmissionsListener, description="Submissions (port 465)."
    )
    account_http: AccountService = Field(
        default_factory=lambda: AccountService(port=80), description="Account pages over plain HTTP.",
    )
    account_https: AccountService = Field(
        default_factory=lambda: AccountService(port=443), description="Account pages over HTTPS.",
    )
    admin_http: AdminService = Field(
        default_factory=lambda: AdminService(port=80),
        description="Admin pages over plain HTTP (only on loopback listeners, please).",
    )
    admin_https: AdminService = Field(
        default_factory=lambda: AdminService(port=443), description="Admin pages over HTTPS.",
    )
    webserver_http: WebserverService = Field(
        default_factory=lambda: WebserverService(port=80), description="Web handlers over plain HTTP."
    )
    webserver_https: WebserverService = Field(
        default_factory=lambda: WebserverService(port=443), description="Web handlers over HTTPS."
    )
    mta_sts_https: WellKnownService = Field(
        default_factory=WellKnownService,
        description="MTA-STS policies (RFC 8461) of the domains, on mta-sts.<domain>.",
    )
    autoconfig_https: AutoconfigService = Field(
        default_factory=AutoconfigService,
        description="Mail client autoconfiguration on autoconfig.<domain> (Thunderbird, Microsoft).",
    )
    metrics_http: MetricsService = Field(default_factory=MetricsService, description="Prometheus metrics.")

    @field_validator("ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one IP address is required")
        for ip in v:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"bad ip {ip!r}") from None
        return v

    @model_validator(mode="after")
    def _tls_needed(self) -> Listener:
        if self.tls is None:
            if self.submissions.enabled:
                raise ValueError("submissions needs tls (cert_file and key_file, or acme)")
            if self.submission.enabled and not self.submission.no_require_starttls:
                raise ValueError(
                    "submission requires STARTTLS and so needs tls (or no_require_starttls for tests)"
                )
            if self.smtp.enabled and self.smtp.require_starttls:
                raise ValueError("smtp require_starttls needs tls")
            for name, tls in self.web_services():
                if tls:
                    raise ValueError(f"{name} needs tls (cert_file and key_file, or acme)")
        ports: dict[int, tuple[str, bool]] = {}
        for name, tls in self.web_services():
            port = getattr(self, name).port
            other = ports.setdefault(port, (name, tls))
            if other[1] != tls:
                raise ValueError(f"{name} and {other[0]} share port {port}, but one is HTTPS and the other not")
        smtp_ports = {s.port: n for n, s in (("smtp", self.smtp), ("submission", self.submission),
                                             ("submissions", self.submissions)) if s.enabled}
        for port, (name, _) in ports.items():
            if port in smtp_ports:
                raise ValueError(f"{name} and {smtp_ports[port]} both use port {port}")
        return self

    def web_services(self) -> list[tuple[str, bool]]:
        """(setting name, HTTPS?) of every enabled web service."""
        out = []
        for name in ("account_http", "admin_http", "webserver_http", "metrics_http"):
            if getattr(self, name).enabled:
                out.append((name, False))
        for name in ("account_https", "admin_https", "webserver_https"):
            if getattr(self, name).enabled:
                out.append((name, True))
        for name in ("mta_sts_https", "autoconfig_https"):
            svc = getattr(self, name)
            if svc.enabled:
                out.append((name, not svc.non_tls))
        return out
