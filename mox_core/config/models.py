"""Typed models of ``mox.toml`` and ``domains.toml``. Every field says what it is for.

``mox config describe`` generates a commented example from these models, so a description
here is documentation. Sections whose keys depend on plugins are plain tables here and are
validated by :mod:`mox_core.config.loader` against the registered kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mox_core.config.listeners import Listener
from mox_core.config.modelbase import Model

LogLevel = Literal["tracedata", "traceauth", "trace", "debug", "info", "warn", "error"]
LOG_LEVELS: tuple[str, ...] = ("tracedata", "traceauth", "trace", "debug", "info", "warn", "error")

# Keys of a [transports.NAME] table that core handles; the rest goes to the kind's model.
TRANSPORT_COMMON_KEYS = frozenset({"kind", "retry_intervals", "max_attempts", "destination_concurrency"})
# Keys of a [[web_handlers]] entry that core handles; the rest goes to the kind's model.
WEBHANDLER_COMMON_KEYS = frozenset({"kind", "log_name", "domain", "path_regexp", "dont_redirect_plaintext", "compress"})




# --------------------------------------------------------------------------------------------
# mox.toml


class DNS(Model):
    nameservers: list[str] = Field(
        default_factory=list,
        description="Resolvers as \"ip\" or \"ip:port\"; empty means the system's (/etc/resolv.conf).",
    )
    timeout: float = Field(5.0, gt=0, description="Seconds to wait for a DNS answer.")


class Postmaster(Model):
    account: str = Field(description="Account that receives mail for postmaster@.")
    mailbox: str = Field("Inbox", description="Mailbox in that account.")


class Queue(Model):
    concurrency: int = Field(10, ge=1, description="Deliveries in progress at once, per delivering process "
                             "(the main process, or each of the smtp_workers).")
    retry_intervals: list[float] = Field(
        default_factory=lambda: [450.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0],
        description="Seconds to wait after attempt 1, 2, ...; the last repeats.",
    )
    max_attempts: int = Field(8, ge=1, description="Attempts before a message fails with a DSN.")


class HTTP(Model):
    """Limits of the web server, for every web port."""

    head_timeout: float = Field(30.0, gt=0, description="Seconds a client has to send a request's head "
                                "(request line and headers); then 408 and the connection is closed.")
    max_head: int = Field(16384, ge=1024, description="Largest request head in bytes; larger gets 431.")
    keepalive_timeout: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open.")
    body_idle_timeout: float = Field(60.0, gt=0, description="Seconds a request body may pause; then the "
                                     "request is abandoned.")
    max_request_body: int = Field(104857600, ge=0, description="Largest request body in bytes; larger gets 413.")


class IMAPServer(Model):
    """An IMAP server reading the accounts' Maildirs (e.g. Dovecot), for mail clients'
    autoconfiguration; mox has no IMAP server of its own."""

    host: str = Field(description="Host name mail clients connect to.")
    port: int = Field(993, ge=1, le=65535, description="Port.")
    tls: Literal["implicit", "starttls"] = Field("implicit", description="implicit TLS (993) or STARTTLS (143).")


class LocalServe(Model):
    """Set by ``mox localserve``: a server for one machine that keeps every message."""

    account: str = Field("mox", description="Receives mail for every address no account has, in any domain.")
    simulate_failures: bool = Field(
        True, description="Local parts such as x-temperror@ or x-550@ get that reply (mox localserve's banner).")


LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"


class ACMEProvider(Model):
    """A certificate authority speaking ACME (RFC 8555), e.g. Let's Encrypt. Listeners with
    ``tls.acme`` naming it get their certificates from it: obtained and renewed by mox itself,
    kept under the data directory (``acme/``)."""

    directory_url: str = Field(LETSENCRYPT_DIRECTORY, description="The ACME directory of the CA "
                               "(Let's Encrypt's staging: https://acme-staging-v02.api.letsencrypt.org/directory).")
    contact_email: str = Field("", description="Address the CA may write to about the certificates "
                               "(expiry, problems); registering means agreeing to the CA's terms of service.")
    ca_file: Path | None = Field(
        None, description="PEM file with the CAs to trust for the directory's HTTPS instead of the system's "
        "(a test CA such as Pebble's); relative to the config directory.")
    challenges: list[Literal["tls-alpn-01", "http-01"]] = Field(
        default_factory=lambda: ["tls-alpn-01", "http-01"],
        description="Challenge types to use, in order of preference; the next is tried when one fails. "
        "tls-alpn-01 (RFC 8737) is answered on the HTTPS port (port), http-01 on a plain HTTP port "
        "(http_port) of the listener.")
    port: int = Field(443, ge=1, le=65535, description="Port mox answers tls-alpn-01 challenges on; the CA "
                      "connects to 443, so change it only behind a port forward.")
    http_port: int = Field(80, ge=1, le=65535, description="Plain HTTP port of the listener where mox answers "
                           "http-01 challenges (/.well-known/acme-challenge/); the CA connects to 80.")

    @field_validator("challenges")
    @classmethod
    def _challenges(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("challenges: one or both of tls-alpn-01 and http-01, each once")
        return v


class Testing(Model):
    allow_private_targets: bool = Field(
        False,
        description="Let direct delivery and web proxies connect to loopback and private "
        "addresses. Only for tests; never set on a real server.",
    )
    direct_smtp_port: int = Field(25, ge=1, le=65535, description="Port direct delivery dials.")
    mta_sts_port: int = Field(443, ge=1, le=65535, description="Port mox dnscheck fetches MTA-STS policies from.")


class StaticConfig(Model):
    """mox.toml: read once at start; changes need a restart."""

    hostname: str = Field(description="Fully qualified host name of this mail server.")
    data_dir: Path = Field(Path("data"), description="Data directory, relative to this file.")
    min_free_space: int | None = Field(
        None, ge=0, description="Bytes kept free on the data directory's file system: with less, MAIL FROM gets "
        "452 4.3.1 (so does a SIZE= larger than what is free), before the client sends any data. Default: 1.5 "
        "times the listener's smtp_max_message_size, as Postfix. 0: no check.",
    )
    log_level: LogLevel = Field("info", description="Default log level.")
    package_log_levels: dict[str, LogLevel] = Field(
        default_factory=dict, description="Log level per component, e.g. smtpserver = \"debug\"."
    )
    disabled_plugins: list[str] = Field(
        default_factory=list, description="Plugins not to load, by name (see mox plugins list)."
    )
    smtp_workers: int = Field(
        0, ge=0, le=64,
        description="Processes serving the SMTP (port 25), submission and submissions "
        "listeners, sharing each port, and delivering the queue, each to its share of the "
        "recipient domains ([queue] concurrency applies to each); the main process queues "
        "their submissions. 0: one per CPU (at most 8); 1: the main process does all of it "
        "itself.",
    )
    pin_smtp_workers: bool = Field(
        True,
        description="With one smtp_worker per usable CPU, run each worker on the CPU whose "
        "new connections it is given (and its deliveries with it): no moving between CPUs, "
        "caches stay warm. false: the kernel places them.",
    )
    dns: DNS = Field(default_factory=DNS, description="DNS resolver used for SPF, DKIM and MX.")
    postmaster: Postmaster = Field(description="Where mail for postmaster goes.")
    listeners: dict[str, Listener] = Field(
        default_factory=dict, description="Listeners by name."
    )
    transports: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Outgoing transports by name; `kind` picks the plugin, default direct.",
    )
    queue: Queue = Field(default_factory=Queue, description="Outgoing queue.")
    acme: dict[str, ACMEProvider] = Field(
        default_factory=dict, description="ACME providers (certificate authorities) by name, for "
        "listeners' tls.acme.")
    imap: IMAPServer | None = Field(None, description="IMAP server for the accounts, told to mail clients.")
    http: HTTP = Field(default_factory=HTTP, description="Limits of the web server.")
    localserve: LocalServe | None = Field(None, description="Local development mode (mox localserve).")
    testing: Testing = Field(default_factory=Testing, description="Settings for test setups only.")

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        from mox_core.smtp.domain import to_ascii

        to_ascii(v)
        return v.lower()

    @model_validator(mode="after")
    def _acme_known(self) -> StaticConfig:
        for name, lst in self.listeners.items():
            if lst.tls is not None and lst.tls.acme is not None and lst.tls.acme not in self.acme:
                raise ValueError(f"listeners.{name}.tls.acme: no provider {lst.tls.acme!r} in [acme]")
        return self


class TransportCommon(Model):
    kind: str = Field("direct", description="Transport kind, from a plugin (mox plugins list).")
    retry_intervals: list[float] | None = Field(
        None, description="Retry intervals in seconds for this transport (default: [queue])."
    )
    max_attempts: int | None = Field(None, ge=1, description="Attempts before failing.")
    destination_concurrency: int | None = Field(
        None, ge=1, le=1000,
        description="Deliveries through this transport at once to one recipient domain "
        "(default: the kind's; 1 for direct, 20 for smarthosts). [queue] concurrency bounds the total.",
    )


# --------------------------------------------------------------------------------------------
# domains.toml


class DKIMSelector(Model):
    private_key_file: Path = Field(description="PEM private key (RSA or Ed25519), relative to config dir.")
    hash: Literal["sha256"] = Field("sha256", description="Hash algorithm.")
    canonicalization: Literal["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"] = Field(
        "relaxed/relaxed", description="Header/body canonicalization."
    )
    headers: list[str] = Field(
        default_factory=lambda: [
            "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To",
            "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
        ],
        description="Headers to sign.",
    )


class DKIM(Model):
    selectors: dict[str, DKIMSelector] = Field(default_factory=dict, description="Selectors by name.")
    sign: list[str] = Field(default_factory=list, description="Selectors to sign outgoing mail with.")

    @model_validator(mode="after")
    def _sign_known(self) -> DKIM:
        for s in self.sign:
            if s not in self.selectors:
                raise ValueError(f"sign names unknown selector {s!r}")
        return self


class MTASTS(Model):
    """The domain's MTA-STS policy (RFC 8461), served at
    https://mta-sts.<domain>/.well-known/mta-sts.txt by listeners with mta_sts_https."""

    policy_id: str = Field(
        description="Identifies this version of the policy, 1-32 letters and digits; the "
        "_mta-sts TXT record names it, and senders refetch the policy when it changes "
        "(e.g. a date: \"20261206T120000\").",
    )
    mode: Literal["enforce", "testing", "none"] = Field(
        "enforce", description="enforce: senders refuse our MX hosts without a valid certificate."
    )
    max_age: int = Field(86400, ge=1, le=31557600, description="Seconds senders may cache the policy.")
    mx: list[str] = Field(
        default_factory=list,
        description="MX host names the policy allows (\"*.example.org\" allowed); empty: the "
        "mail server's host name.",
    )

    @field_validator("policy_id")
    @classmethod
    def _policy_id(cls, v: str) -> str:
        if not (1 <= len(v) <= 32 and v.isascii() and v.isalnum()):
            raise ValueError("policy_id must be 1 to 32 letters and digits (RFC 8461 §3.1)")
        return v


class Domain(Model):
    description: str = Field("", description="Free text.")
    localpart_catchall_separator: str | None = Field(
        None, description="One separator, e.g. \"+\" (you+tag@ reaches you@). Or use the list form."
    )
    localpart_catchall_separators: list[str] = Field(
        default_factory=list, description="Separators, e.g. [\"+\", \"-\"]."
    )
    localpart_case_sensitive: bool = Field(False, description="Match localparts with exact case.")
    disabled: bool = Field(False, description="Refuse mail for this domain with a temporary error.")
    dkim: DKIM = Field(default_factory=DKIM, description="DKIM signing.")
    mta_sts: MTASTS | None = Field(None, description="MTA-STS policy for mail to this domain.")
    routes: list[dict[str, Any]] = Field(
        default_factory=list, description="Routes for mail from this domain."
    )

    @model_validator(mode="after")
    def _separators(self) -> Domain:
        if self.localpart_catchall_separator is not None and self.localpart_catchall_separators:
            raise ValueError(
                "cannot have both localpart_catchall_separator and localpart_catchall_separators"
            )
        seen = set()
        for s in self.separators():
            if not s:
                raise ValueError("empty localpart catchall separator")
            if s in seen:
                raise ValueError(f"duplicate localpart catchall separator {s}")
            seen.add(s)
        return self

    def separators(self) -> list[str]:
        if self.localpart_catchall_separator is not None:
            return [self.localpart_catchall_separator]
        return list(self.localpart_catchall_separators)

    def canonical_localpart(self, localpart: str, *, strip_separators: bool = True) -> str:
        """Lower-case unless case sensitive, then cut at the first of each separator."""
        lp = localpart if self.localpart_case_sensitive else localpart.lower()
        if strip_separators:
            for sep in self.separators():
                lp = lp.split(sep, 1)[0]
        return lp


class Destination(Model):
    mailbox: str = Field("Inbox", description="Mailbox to deliver to.")
    full_name: str = Field("", description="Display name used in From by account pages.")
    smtp_error: str = Field(
        "", description="Reject at RCPT instead: \"550 text\" or \"421 text\"."
    )

    @field_validator("smtp_error")
    @classmethod
    def _smtp_error(cls, v: str) -> str:
        if v and not (v.startswith("550") or v.startswith("421")):
            raise ValueError("smtp_error must start with 550 or 421")
        return v


class Account(Model):
    domain: str | None = Field(None, description="Default domain of the account.")
    description: str = Field("", description="Free text.")
    full_name: str = Field("", description="Display name.")
    destinations: dict[str, Destination] = Field(
        default_factory=dict,
        description="Addresses delivered to this account; \"@example.org\" is a catch-all.",
    )
    routes: list[dict[str, Any]] = Field(
        default_factory=list, description="Routes for mail from this account, checked first."
    )
    max_outgoing_messages_per_day: int = Field(
        1000, description="Recipients this account may send to in 24 hours."
    )
    max_first_time_recipients_per_day: int = Field(
        200, description="New recipients (never sent to before) per 24 hours."
    )
    rate_limiters: list[str] | None = Field(
        None, description="Rate limiters checked for this account, in order; default the built-ins."
    )
    quota_message_size: int = Field(0, ge=0, description="Max total size of stored mail; 0 unlimited.")


class WebHandlerCommon(Model):
    kind: str = Field(description="Handler kind, from a plugin: static, redirect, forward, internal.")
    log_name: str = Field("", description="Name in the access log and metrics; default the handler's index.")
    domain: str = Field(description="Host name the handler serves.")
    path_regexp: str = Field("^/", description="Regular expression the request path must match; must start with ^.")
    dont_redirect_plaintext: bool = Field(False, description="Serve plain HTTP as is instead of redirecting to HTTPS.")
    compress: bool = Field(False, description="Compress responses with gzip when the client accepts it.")


class DynamicConfig(Model):
    """domains.toml: reloaded while mox runs."""

    domains: dict[str, Domain] = Field(default_factory=dict, description="Domains by name.")
    accounts: dict[str, Account] = Field(default_factory=dict, description="Accounts by name.")
    routes: list[dict[str, Any]] = Field(
        default_factory=list, description="Global routes, checked after account and domain routes."
    )
    web_domain_redirects: dict[str, str] = Field(
        default_factory=dict, description="Redirect every request for one domain to another."
    )
    web_handlers: list[dict[str, Any]] = Field(
        default_factory=list, description="Web handlers, checked in order."
    )
    rate_limiters: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Extra rate limiters by name; `kind` picks the plugin."
    )
