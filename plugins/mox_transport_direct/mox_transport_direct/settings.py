"""Settings of the ``direct`` transport kind (mox ``Direct:``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DirectSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disable_ipv4: bool = Field(False, description="Do not connect to IPv4 addresses of MX hosts.")
    disable_ipv6: bool = Field(False, description="Do not connect to IPv6 addresses of MX hosts.")

    @model_validator(mode="after")
    def _one_family(self) -> DirectSettings:
        if self.disable_ipv4 and self.disable_ipv6:
            raise ValueError("both IPv4 and IPv6 are disabled, enable at least one")
        return self
