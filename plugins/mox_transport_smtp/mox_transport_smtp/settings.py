"""Settings of the ``smtp`` transport kind (mox ``SMTP:``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mox_core.api import smarthost_name


class SMTPSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="Smarthost DNS name; dialed and checked against its certificate.")
    port: int = Field(25, ge=1, le=65535, description="Smarthost port.")
    starttls_insecure_skip_verify: bool = Field(
        False, description="STARTTLS still required, but the certificate is not verified."
    )
    no_starttls: bool = Field(False, description="No STARTTLS at all: mail crosses the network in clear.")
    ca_file: str | None = Field(None, description="Extra CA certificates (PEM) to trust for the smarthost.")

    _host = field_validator("host")(classmethod(lambda cls, v: smarthost_name(v)))

    @model_validator(mode="after")
    def _tls(self) -> SMTPSettings:
        if self.no_starttls and self.starttls_insecure_skip_verify:
            raise ValueError("cannot have both no_starttls and starttls_insecure_skip_verify")
        return self
