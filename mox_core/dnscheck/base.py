"""The results of the DNS checks, and what every check gets (:class:`Context`)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

import dns.resolver

from mox_core.config.resolved import Config
from mox_core.dnscheck.lookups import Lookups
from mox_core.dnscheck.records import Record

__all__ = ["CheckResult", "Context", "DNSCheck", "Status", "format_table"]


class Status(enum.StrEnum):
    PASS = "pass"
    WARNING = "warning"
    FAILURE = "failure"


@dataclass
class CheckResult:
    """One check: its status, what was found or is wrong, and the records to publish."""

    name: str
    status: Status = Status.PASS
    messages: list[str] = field(default_factory=list)
    fix: list[str] = field(default_factory=list)  # zone-file lines

    def warn(self, message: str) -> None:
        self.messages.append(message)
        if self.status is Status.PASS:
            self.status = Status.WARNING

    def fail(self, message: str) -> None:
        self.messages.append(message)
        self.status = Status.FAILURE

    def suggest(self, *records: Record) -> None:
        for r in records:
            if r.compact() not in self.fix:
                self.fix.append(r.compact())


@dataclass
class DNSCheck:
    domain: str
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(r.status is not Status.FAILURE for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "ok": self.ok, "results": [asdict(r) for r in self.results]}


@dataclass
class Context:
    """What every check gets: the config, the domain, the lookups, the suggested records."""

    config: Config
    domain: str  # ASCII
    host: str  # ASCII host name of the server
    lookups: Lookups
    sync_resolver: dns.resolver.Resolver
    records: list[Record]
    lookup_timeout: float

    def suggested(self, section: str, name: str | None = None) -> list[Record]:
        return [r for r in self.records if r.section == section and (name is None or r.name == name)]


def format_table(check: DNSCheck) -> str:
    """The results as ``mox dnscheck`` prints them: a row per check, its messages below the
    first, then the records to publish (``fix:``)."""
    width = max(len(r.name) for r in check.results)
    indent = " " * (width + 11)
    lines = [f"DNS check of {check.domain}", "", f"{'CHECK':<{width}}  {'RESULT':<8} DETAILS"]
    for r in check.results:
        messages = r.messages or ["ok"]
        lines.append(f"{r.name:<{width}}  {r.status.value:<8} {messages[0]}")
        lines += [indent + m for m in messages[1:]]
        lines += [f"{'':<{width}}  {'fix:':<8} {f}" for f in r.fix]
    failures = sum(r.status is Status.FAILURE for r in check.results)
    warnings = sum(r.status is Status.WARNING for r in check.results)
    lines += ["", f"{failures} failure(s), {warnings} warning(s)"]
    return "\n".join(lines) + "\n"
