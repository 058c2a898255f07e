"""Settings of the ``submission`` and ``submissions`` transport kinds (mox ``Submission:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mox_core.api import smarthost_name

MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN")
# The automatic choice, most secure first; PLAIN must be listed explicitly.
DEFAULT_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5")

Mechanism = Literal["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN"]


class SubmissionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="Submission server DNS name; dialed and checked against its certificate.")
    port: int | None = Field(None, ge=1, le=65535, description="Port; default 587 (submission) or 465 (submissions).")
    username: str = Field(description="SASL user name.")
    password: str | None = Field(None, description="Password (prefer password_env or password_file).")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    password_file: str | None = Field(None, description="File holding the password (first line).")
    mechanisms: list[str] = Field(
        default_factory=list,
        description="Mechanisms to try in order; empty: the most secure the server offers, "
        "from SCRAM-SHA-256, SCRAM-SHA-1, CRAM-MD5 (PLAIN only if listed).",
    )
    starttls_insecure_skip_verify: bool = Field(
        False, description="TLS still required, but the certificate is not verified."
    )
    no_starttls: bool = Field(False, description="submission only: no STARTTLS (credentials in clear).")
    ca_file: str | None = Field(None, description="Extra CA certificates (PEM) to trust.")

    _host = field_validator("host")(classmethod(lambda cls, v: smarthost_name(v)))

    @field_validator("mechanisms")
    @classmethod
    def _mechanisms(cls, v: list[str]) -> list[str]:
        seen = set()
        for m in v:
            if m not in MECHANISMS:
                raise ValueError(f"unknown authentication mechanism {m} (known: {', '.join(MECHANISMS)})")
            if m in seen:
                raise ValueError(f"duplicate authentication mechanism {m}")
            seen.add(m)
        return v

    @model_validator(mode="after")
    def _password(self) -> SubmissionSettings:
        given = [x for x in (self.password, self.password_env, self.password_file) if x is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of password, password_env, password_file")
        if self.no_starttls and self.starttls_insecure_skip_verify:
            raise ValueError("cannot have both no_starttls and starttls_insecure_skip_verify")
        return self


class SubmissionsSettings(SubmissionSettings):
    """Implicit TLS: the options that turn TLS off or down make no sense here."""

    @model_validator(mode="after")
    def _immediate_tls(self) -> SubmissionsSettings:
        if self.no_starttls:
            raise ValueError("cannot have no_starttls with immediate TLS")
        if self.starttls_insecure_skip_verify:
            raise ValueError("cannot have starttls_insecure_skip_verify with immediate TLS")
        return self
