"""Settings of the ``smtp`` transport kind (mox ``SMTP:``)."""

from __future__ import annotations

import ipaddress

from mox_core.smtp.domain import to_ascii
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SMTPSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="Smarthost DNS name; dialed and checked against its certificate.")
    port: int = Field(25, ge=1, le=65535, description="Smarthost port.")
    starttls_insecure_skip_verify: bool = Field(
        False, description="STARTTLS still required, but the certificate is not verified."
    )
    no_starttls: bool = Field(False, description="No STARTTLS at all: mail crosses the network in clear.")
    ca_file: str | None = Field(None, description="Extra CA certificates (PEM) to trust for the smarthost.")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            pass
        else:
            raise ValueError(f"bad host {v!r}: must be a DNS name, not an IP address")
        try:
            return to_ascii(v)
        except ValueError as exc:
            raise ValueError(f"bad host {v!r}: {exc}") from None

    @model_validator(mode="after")
    def _tls(self) -> SMTPSettings:
        if self.no_starttls and self.starttls_insecure_skip_verify:
            raise ValueError("cannot have both no_starttls and starttls_insecure_skip_verify")
        return self
