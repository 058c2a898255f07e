"""Config of ``mox sendmail``: one TOML file naming the submission server and the credentials.

Found at ``-C PATH``, else ``$MOX_SENDMAIL_CONFIG``, else :data:`DEFAULT_PATH`. Validated with
pydantic; every problem becomes a :class:`~mox_core.errors.ConfigProblem` naming the file and
the key, and the command exits 78 (``EX_CONFIG``). Relative paths in the file (``ca_file``,
``password_file``, ``failures_dir``) are relative to the file's directory; ``~`` is expanded.

Address syntax checks live here too (:func:`parse_address_list`), because ``from_address`` and
``default_destination`` are validated with the same rules as recipients and ``-f``.

Unlike mox's ``/etc/moxsubmit.conf`` the sender addresses are not fixed here: ``-f`` sets the
envelope sender (mox issue #400) and ``from_address`` is only the default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from email import errors
from email.headerregistry import HeaderRegistry
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mox_core.errors import ConfigError, ConfigProblem
from mox_core.smtp.domain import to_ascii
from mox_core.smtpclient.sasl import DEFAULT_MECHANISMS, KNOWN_MECHANISMS

__all__ = [
    "CONTROL_CHARS",
    "DEFAULT_PATH",
    "ENV_VAR",
    "AddressError",
    "SendmailConfig",
    "config_path",
    "load_config",
    "parse_address_list",
    "parse_single_address",
]

DEFAULT_PATH = Path("/etc/mox/sendmail.toml")
ENV_VAR = "MOX_SENDMAIL_CONFIG"
DEFAULT_PORTS = {"implicit": 465, "starttls": 587, "none": 25}


# --------------------------------------------------------------------------------------------
# addresses (here because from_address and default_destination are checked with them)


class AddressError(ValueError):
    """An address that cannot go into MAIL FROM or RCPT TO."""


# C0 controls except TAB, and DEL: a CR or LF in an address would become a new SMTP command or
# header line (command or header injection); smtplib raises for them too (bpo-43124).
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LOCAL_NAME = re.compile(r"^[A-Za-z0-9._+=-]+$")
_registry = HeaderRegistry()


def _check_addr_spec(addr: str, shown: str) -> str:
    try:
        addr.encode("utf-8")
    except UnicodeEncodeError:
        raise AddressError(f"address in {shown!r} is not UTF-8") from None
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"bad address {addr!r}")
    if domain.startswith("["):
        literal = domain[1:-1] if domain.endswith("]") else ""
        try:
            ipaddress.ip_address(literal.removeprefix("IPv6:"))
        except ValueError:
            raise AddressError(f"bad address literal in {addr!r}") from None
    else:
        try:
            to_ascii(domain)
        except ValueError as exc:
            raise AddressError(f"bad domain in {addr!r}: {exc}") from None
    return addr


def parse_address_list(value: str, what: str = "recipient") -> list[str]:
    """Addresses of a header value or argument (``a@b, "N" <c@d>``), as addr-specs.

    A bare name without domain (``root``) is returned as it is, for ``default_destination``.
    Raises :class:`AddressError` for control characters, unparsable parts and bad domains.
    """
    if CONTROL_CHARS.search(value):
        raise AddressError(f"control character in {what} {value!r}")
    stripped = value.strip()
    if _LOCAL_NAME.match(stripped):
        return [stripped]
    try:
        header = _registry("To", value)
    except Exception:  # the stdlib parser raises IndexError etc. on some garbage
        raise AddressError(f"cannot parse {what} {value!r}") from None
    for defect in header.defects:
        # a defect like "invalid address in address-list" means part of the value was dropped
        if type(defect) is errors.InvalidHeaderDefect:
            raise AddressError(f"cannot parse {what} {value!r}: {defect}")
    return [_check_addr_spec(a.addr_spec, value) for a in header.addresses]


def parse_single_address(value: str) -> str:
    """Exactly one address with a domain (``a@b`` or ``<a@b>``): for -f and the config."""
    if CONTROL_CHARS.search(value):
        raise AddressError(f"control character in address {value!r}")
    addrs = parse_address_list(value, "address")
    if len(addrs) != 1:
        raise AddressError(f"need exactly one address, got {value!r}")
    if "@" not in addrs[0]:
        raise AddressError(f"address {value!r} has no domain")
    return addrs[0]


# --------------------------------------------------------------------------------------------
# the config file


class SendmailConfig(BaseModel):
    """The keys of ``sendmail.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="Submission server: DNS name or IP address. With TLS, the certificate "
                      "is checked against this name.")
    port: int | None = Field(None, ge=1, le=65535,
                             description="Port; default 465 (tls = implicit), 587 (starttls) or 25 (none).")
    tls: Literal["implicit", "starttls", "none"] = Field(
        "starttls", description="implicit: TLS from the first byte (port 465); starttls: STARTTLS is "
        "required; none: plain text (only for a server on this host).")
    verify_certificate: bool = Field(True, description="Check the server certificate (PKIX and host name).")
    ca_file: Path | None = Field(None, description="Extra CA certificates (PEM) to trust, besides the system's.")
    ehlo_name: str | None = Field(None, description="Name sent in EHLO; default this host's name.")
    username: str | None = Field(None, description="SASL user name; without it no AUTH is done.")
    password: str | None = Field(None, repr=False,
                                 description="Password; prefer password_file, or keep this file mode 0600.")
    password_file: Path | None = Field(None, description="File whose first line is the password.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    auth_mechanism: str = Field(
        "", description="SCRAM-SHA-256, SCRAM-SHA-1, CRAM-MD5 or PLAIN, used even if weaker ones are "
        "offered; empty: the most secure the server offers (PLAIN only over TLS).")
    from_address: str | None = Field(
        None, description="Envelope sender when -f is not given, and the From header added to "
        "messages without one; default the From header's address, else username if it is an address.")
    default_destination: str | None = Field(
        None, description="Where recipients without a domain (e.g. cron's 'root') are sent.")
    failures_dir: Path | None = Field(
        None, description="Where messages that could not be submitted are saved; default "
        "~/moxsubmit.failures (created with mode 0700, files 0600).")
    timeout: float = Field(180.0, gt=0, description="Seconds for the whole submission, connect included.")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        try:
            return to_ascii(v)
        except ValueError as exc:
            raise ValueError(f"bad host {v!r}: {exc}") from None

    @field_validator("auth_mechanism")
    @classmethod
    def _mechanism(cls, v: str) -> str:
        v = v.strip().upper()
        if v and v not in KNOWN_MECHANISMS:
            raise ValueError(f"unknown mechanism {v!r}; use one of {', '.join(KNOWN_MECHANISMS)} or leave empty")
        return v

    @field_validator("from_address", "default_destination")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return parse_single_address(v)
        except AddressError as exc:
            raise ValueError(str(exc)) from None

    # ------------------------------------------------------------------ derived values

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.tls]

    @property
    def effective_ehlo_name(self) -> str:
        return self.ehlo_name or socket.getfqdn() or "localhost"

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """What the client walks: the configured one only, or the secure ones, PLAIN last over TLS."""
        if self.auth_mechanism:
            return (self.auth_mechanism,)
        return DEFAULT_MECHANISMS + (("PLAIN",) if self.tls != "none" else ())

    def read_password(self) -> str:
        """The password from ``password``, ``password_file`` or ``password_env`` (checked at load)."""
        if self.password is not None:
            return self.password
        if self.password_env is not None:
            return os.environ[self.password_env]
        assert self.password_file is not None
        with open(self.password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")


def config_path(option: str | None) -> Path:
    """``-C`` beats ``$MOX_SENDMAIL_CONFIG`` beats :data:`DEFAULT_PATH`."""
    if option:
        return Path(option)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def load_config(path: Path) -> SendmailConfig:
    """Read and validate ``path``; raise :class:`ConfigError` listing every problem."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(file, "", "file not found (use -C PATH or $MOX_SENDMAIL_CONFIG)")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(file, "", f"invalid TOML: {exc}")]) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(file, "", f"cannot read: {exc.strerror}")]) from None
    base = path.parent
    for key in ("ca_file", "password_file", "failures_dir"):
        value = raw.get(key)
        if isinstance(value, str) and value:
            raw[key] = str(base / Path(value).expanduser())  # an absolute path stays as it is
    try:
        cfg = SendmailConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append(ConfigProblem(file, _loc(err["loc"]), msg))
        raise ConfigError(problems) from None
    problems = _check(cfg, file)
    if problems:
        raise ConfigError(problems)
    return cfg


def _check(cfg: SendmailConfig, file: str) -> list[ConfigProblem]:
    """Rules between keys, reported against the key to change."""
    problems: list[ConfigProblem] = []
    secrets = [k for k in ("password", "password_file", "password_env") if getattr(cfg, k) is not None]
    if cfg.username is None:
        for key in secrets:
            problems.append(ConfigProblem(file, key, "set without username"))
        if cfg.auth_mechanism:
            problems.append(ConfigProblem(file, "auth_mechanism", "set without username"))
    elif len(secrets) != 1:
        problems.append(ConfigProblem(file, "password", "with username, set exactly one of password, "
                                      f"password_file, password_env (got {', '.join(secrets) or 'none'})"))
    elif cfg.password_file is not None:
        try:
            cfg.read_password()
        except OSError as exc:
            problems.append(ConfigProblem(file, "password_file", f"cannot read {cfg.password_file}: {exc.strerror}"))
    elif cfg.password_env is not None and cfg.password_env not in os.environ:
        problems.append(ConfigProblem(file, "password_env", f"environment variable {cfg.password_env} is not set"))
    if cfg.auth_mechanism == "PLAIN" and cfg.tls == "none":
        problems.append(ConfigProblem(file, "auth_mechanism", "PLAIN would send the password in clear text; "
                                      "use tls = starttls or implicit"))
    if cfg.ca_file is not None and not cfg.ca_file.is_file():
        problems.append(ConfigProblem(file, "ca_file", f"{cfg.ca_file} is not a readable file"))
    return problems
