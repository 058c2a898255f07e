"""Settings of the ``socks`` transport kind (mox ``Socks:``)."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mox_core.api import to_ascii


def _split_hostport(v: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {v!r}: must be host:port")
    return v


class SocksSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = Field(description="SOCKS5 proxy as host:port.")
    fallback_addresses: list[str] = Field(
        default_factory=list, description="More proxies, tried in order when the previous one is down."
    )
    remote_ips: list[str] = Field(description="IPs the proxy's outgoing connections come from (for SPF checks).")
    remote_hostname: str = Field(description="DNS name of remote_ips, used as the EHLO name.")
    username: str | None = Field(None, description="Proxy user name (RFC 1929), optional.")
    password: str | None = Field(None, description="Proxy password, with username.")

    _address = field_validator("address")(classmethod(lambda cls, v: _split_hostport(v)))

    @field_validator("fallback_addresses")
    @classmethod
    def _fallbacks(cls, v: list[str]) -> list[str]:
        return [_split_hostport(a) for a in v]

    @field_validator("remote_ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one ip is required")
        for ip in v:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"bad ip {ip}") from None
        return v

    @field_validator("remote_hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        return to_ascii(v)

    @model_validator(mode="after")
    def _credentials(self) -> SocksSettings:
        if self.password is not None and self.username is None:
            raise ValueError("password without username: set both for proxy authentication")
        return self
