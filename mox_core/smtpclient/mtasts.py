"""MTA-STS (RFC 8461): whether a recipient domain requires verified TLS to listed MX hosts.

Why: without it, an attacker on the path can strip STARTTLS or answer for the domain's MX; a
domain with an ``enforce`` policy tells us which MX names are genuine and that their
certificates must verify. The policy comes from a TXT record (``_mta-sts.<domain>``) naming a
policy id, and a file fetched over verified HTTPS from ``mta-sts.<domain>``. Policies are cached
for their ``max_age`` in memory and, when a data directory is given, on disk, so a restart does
not open a window for a downgrade (RFC 8461 §5.1).

The fetcher is injectable (:class:`PolicyFetcher`) so tests serve a policy from a loopback HTTPS
server with a test CA. The default fetcher uses the stdlib only: the request is one fixed GET,
and it must resolve through our own resolver and respect the private-address guard, which an
HTTP library would not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver
import structlog

from mox_core.smtpclient.dial import dial_host, gather_ips
from mox_core.smtpclient.errors import SMTPClientError
from mox_core.smtpclient.tls import make_ssl_context

__all__ = [
    "HTTPSPolicyFetcher",
    "MTASTSCache",
    "Policy",
    "PolicyError",
    "PolicyFetcher",
    "lookup_policy_id",
    "parse_policy",
    "parse_record",
]

log = structlog.get_logger(component="smtpclient.mtasts")

Mode = Literal["enforce", "testing", "none"]
_MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.3
_MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: one year
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")  # RFC 8461 §3.1 sts-id


class PolicyError(ValueError):
    """A TXT record or policy file that does not parse."""


@dataclass(frozen=True)
class Policy:
    """A parsed policy file (RFC 8461 §3.2)."""

    mode: Mode
    max_age: int
    mx: tuple[str, ...] = ()
    version: str = "STSv1"

    def matches(self, host: str) -> bool:
        """Whether MX ``host`` is allowed; ``*.`` matches exactly one label (RFC 8461 §4.1)."""
        h = host.lower().rstrip(".")
        for pattern in self.mx:
            p = pattern.lower().rstrip(".")
            if p.startswith("*."):
                first, dot, rest = h.partition(".")
                if dot and first and rest == p[2:]:
                    return True
            elif h == p:
                return True
        return False


def parse_record(text: str) -> str:
    """The ``id`` of a ``v=STSv1; id=...`` TXT record (RFC 8461 §3.1)."""
    fields: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    if not parts or parts[0] != "v=STSv1":
        raise PolicyError(f"not an MTA-STS record: {text[:100]!r}")
    for part in parts[1:]:
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise PolicyError(f"bad field {part!r} in MTA-STS record")
        fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    if not _ID.match(policy_id):
        raise PolicyError(f"bad or missing id in MTA-STS record {text[:100]!r}")
    return policy_id


def parse_policy(text: str) -> Policy:
    """Parse a policy file; raises :class:`PolicyError` (RFC 8461 §3.2)."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"bad policy line {line[:100]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value)
        else:
            values.setdefault(key, value)  # "the first is used" for repeated fields
    if values.get("version") != "STSv1":
        raise PolicyError("policy version must be STSv1")
    mode = values.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad policy mode {mode!r}")
    max_age_text = values.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", max_age_text) or int(max_age_text) > _MAX_AGE_LIMIT:
        raise PolicyError(f"bad policy max_age {max_age_text!r}")
    if mode != "none" and not mx:
        raise PolicyError("policy without mx")
    for pattern in mx:
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9_.-]+", pattern):
            raise PolicyError(f"bad policy mx {pattern!r}")
    return Policy(mode=mode, max_age=int(max_age_text), mx=tuple(mx))  # type: ignore[arg-type]


async def lookup_policy_id(resolver: dns.asyncresolver.Resolver, domain: str) -> str | None:
    """The policy id from ``_mta-sts.<domain>`` TXT, or ``None`` when there is no usable record.

    RFC 8461 §3.1: records not starting with ``v=STSv1;`` are ignored; anything but exactly
    one remaining record means no policy. DNS failures raise (the caller decides).
    """
    try:
        async with asyncio.timeout(30):
            ans = await resolver.resolve(f"_mta-sts.{domain}.", "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    texts = [b"".join(rd.strings).decode("utf-8", errors="replace") for rd in ans]
    texts = [t for t in texts if t.startswith("v=STSv1;") or t == "v=STSv1"]
    if len(texts) != 1:
        return None
    try:
        return parse_record(texts[0])
    except PolicyError:
        return None


class PolicyFetcher(Protocol):
    """``await fetcher(domain, resolver)`` returns the policy text or raises."""

    async def __call__(self, domain: str, resolver: dns.asyncresolver.Resolver) -> str: ...


@dataclass
class HTTPSPolicyFetcher:
    """GET ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 §3.3).

    The certificate must verify for ``mta-sts.<domain>``; only 200 counts (no redirects);
    the body is at most 64 KiB. ``port``, ``ca_file`` and ``allow_private`` exist for tests.
    """

    port: int = 443
    ca_file: str | None = None
    allow_private: bool = False
    timeout: float = 60.0

    async def __call__(self, domain: str, resolver: dns.asyncresolver.Resolver) -> str:
        host = f"mta-sts.{domain}"
        async with asyncio.timeout(self.timeout):
            ips = await gather_ips(resolver, host)
            (reader, writer), _ = await dial_host(host, ips, self.port, timeout=self.timeout,
                                                  allow_private=self.allow_private)
            try:
                await writer.start_tls(make_ssl_context(verify=True, ca_file=self.ca_file), server_hostname=host)
                writer.write(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                             "User-Agent: mox\r\nAccept: text/plain\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                return await _read_response(reader)
            finally:
                writer.close()


async def _read_response(reader: asyncio.StreamReader) -> str:
    status = (await reader.readuntil(b"\n")).decode("latin-1").split()
    if len(status) < 2 or not status[0].startswith("HTTP/1."):
        raise PolicyError("malformed HTTP response")
    if status[1] != "200":
        raise PolicyError(f"HTTP status {status[1]} (only 200 is accepted)")
    headers: dict[str, str] = {}
    while True:
        line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        if not line:
            break
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "text/plain":
        raise PolicyError(f"policy has content-type {ctype!r}, not text/plain")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\n")).split(b";")[0].strip(), 16)
            if size == 0:
                break
            if len(body) + size > _MAX_POLICY_SIZE:
                raise PolicyError("policy too large")
            body += await reader.readexactly(size)
            await reader.readuntil(b"\n")
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > _MAX_POLICY_SIZE:
            raise PolicyError("policy too large")
        body = await reader.readexactly(length)
    else:
        body = await reader.read(_MAX_POLICY_SIZE + 1)
        if len(body) > _MAX_POLICY_SIZE:
            raise PolicyError("policy too large")
    return body.decode("utf-8")


@dataclass
class _Cached:
    policy_id: str
    fetched: float
    mode: Mode
    max_age: int
    mx: list[str]

    @property
    def policy(self) -> Policy:
        return Policy(mode=self.mode, max_age=self.max_age, mx=tuple(self.mx))

    def valid(self, now: float) -> bool:
        return now < self.fetched + self.max_age


class MTASTSCache:
    """Policies by domain, refreshed per RFC 8461 §5.1. One instance per server process.

    ``get()`` returns the policy to apply (``None``: deliver without MTA-STS). A temporary DNS
    failure on the TXT lookup without a valid cached policy raises a temporary
    :class:`SMTPClientError` (as mox: the attempt is retried later); a failed *fetch* means
    "no policy" unless a valid one is cached (RFC 8461 §5).
    """

    @classmethod
    def for_context(cls, ctx: Any) -> MTASTSCache:
        """The cache a transport keeps for a delivery context: policies persisted in the data
        directory, and fetches allowed to private addresses only with the testing setting."""
        config = getattr(ctx, "config", None)
        allow_private = bool(config and config.static.testing.allow_private_targets)
        data_dir = config.data_dir if config is not None else None
        return cls(HTTPSPolicyFetcher(allow_private=allow_private), data_dir=data_dir)

    def __init__(self, fetcher: PolicyFetcher | None = None, *, data_dir: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.fetcher: PolicyFetcher = fetcher or HTTPSPolicyFetcher()
        self.dir = Path(data_dir) / "mtasts" if data_dir is not None else None
        self.clock = clock
        self._mem: dict[str, _Cached] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, domain: str, resolver: dns.asyncresolver.Resolver) -> Policy | None:
        domain = domain.lower().rstrip(".")
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one fetch per domain at a time
            return await self._get(domain, resolver)

    async def _get(self, domain: str, resolver: dns.asyncresolver.Resolver) -> Policy | None:
        now = self.clock()
        cached = self._load(domain)
        valid = cached if cached is not None and cached.valid(now) else None
        try:
            policy_id = await lookup_policy_id(resolver, domain)
        except (dns.exception.DNSException, TimeoutError) as exc:
            if valid is not None:
                return valid.policy
            raise SMTPClientError(False, None, "4.4.3", None,
                                  f"looking up mta-sts record for {domain}: {exc or type(exc).__name__}",
                                  command="mtasts") from None
        if policy_id is None:
            return valid.policy if valid is not None else None
        if valid is not None and valid.policy_id == policy_id:
            return valid.policy
        try:
            policy = parse_policy(await self.fetcher(domain, resolver))
        except Exception as exc:  # RFC 8461 §5: no policy could be fetched
            log.info("mtasts_fetch_failed", domain=domain, error=str(exc) or type(exc).__name__)
            return valid.policy if valid is not None else None
        entry = _Cached(policy_id, now, policy.mode, policy.max_age, list(policy.mx))
        self._mem[domain] = entry
        self._save(domain, entry)
        log.debug("mtasts_policy", domain=domain, mode=policy.mode, mx=list(policy.mx), max_age=policy.max_age)
        return policy

    def _path(self, domain: str) -> Path | None:
        if self.dir is None or not re.fullmatch(r"[a-z0-9._-]+", domain):
            return None
        return self.dir / f"{domain}.json"

    def _load(self, domain: str) -> _Cached | None:
        if domain in self._mem:
            return self._mem[domain]
        path = self._path(domain)
        if path is None:
            return None
        try:
            entry = _Cached(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        self._mem[domain] = entry
        return entry

    def _save(self, domain: str, entry: _Cached) -> None:
        """Best effort: a lost cache file only means one more fetch."""
        path = self._path(domain)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(entry)))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("mtasts_cache_write_failed", domain=domain, error=str(exc))

