"""The seams of the SMTP server (mox_core/smtpserver/interfaces.py).

The objects that the main process and a worker process hand to the SMTP handler and listeners
must have what the Protocols there list: each method, a coroutine exactly when the Protocol's
is, taking the same parameters in the same way (extra ones only with defaults). A rename or a
new required parameter on either side fails here, not in production.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from mox_core.accounts.db import AccountCredentials
from mox_core.outgoing.ratelimit import RateLimits
from mox_core.queue import Queue
from mox_core.server.handoff import MainLink
from mox_core.smtpserver import interfaces
from mox_core.store import Delivery, MaildirStore

# (what the SMTP server needs, what gives it): main process and worker process
IMPLEMENTATIONS = [
    (interfaces.MessageStore, MaildirStore),
    (interfaces.OutgoingQueue, Queue),
    (interfaces.OutgoingQueue, MainLink),
    (interfaces.SubmissionRateLimits, RateLimits),
    (interfaces.SubmissionRateLimits, MainLink),
    (interfaces.CredentialStore, AccountCredentials),
]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _methods(protocol: type) -> dict[str, Any]:
    return {name: value for name, value in vars(protocol).items()
            if inspect.isfunction(value) and not name.startswith("_")}


def incompatibilities(protocol: type, cls: type) -> list[str]:
    """How ``cls`` fails to give what ``protocol`` lists; empty when it gives all of it."""
    problems = []
    for name, wanted in _methods(protocol).items():
        have = getattr(cls, name, None)
        where = f"{cls.__name__}.{name}"
        if not callable(have):
            problems.append(f"{where} is missing")
            continue
        if inspect.iscoroutinefunction(wanted) != inspect.iscoroutinefunction(have):
            problems.append(f"{where} must {'' if inspect.iscoroutinefunction(wanted) else 'not '}be async")
        want_params = list(inspect.signature(wanted).parameters.values())[1:]
        have_params = list(inspect.signature(have).parameters.values())[1:]
        have_by_name = {p.name: p for p in have_params}
        want_positional = [p.name for p in want_params if p.kind in _POSITIONAL]
        have_positional = [p.name for p in have_params if p.kind in _POSITIONAL]
        if have_positional[:len(want_positional)] != want_positional:
            problems.append(f"{where} takes ({', '.join(have_positional)}) by position, "
                            f"the SMTP server passes ({', '.join(want_positional)})")
        for p in want_params:
            q = have_by_name.get(p.name)
            if q is None:
                problems.append(f"{where} has no parameter {p.name}")
            elif q.kind == q.POSITIONAL_ONLY and p.kind != p.POSITIONAL_ONLY:
                problems.append(f"{where}: {p.name} cannot be passed by name")
            elif p.default is not p.empty and q.default is q.empty:
                problems.append(f"{where}: {p.name} needs a default (the SMTP server may leave it out)")
        for q in have_params:
            if q.name not in {p.name for p in want_params} and q.default is q.empty and q.kind not in _VARIADIC:
                problems.append(f"{where} requires {q.name}, which the SMTP server does not pass")
    return problems


@pytest.mark.parametrize(("protocol", "cls"), IMPLEMENTATIONS,
                         ids=[f"{c.__name__}-{p.__name__}" for p, c in IMPLEMENTATIONS])
def test_each_object_gives_what_the_smtp_server_needs(protocol: type, cls: type) -> None:
    assert incompatibilities(protocol, cls) == []
    if getattr(protocol, "_is_runtime_protocol", False):
        assert issubclass(cls, protocol)


def test_the_check_names_drift() -> None:
    class Renamed:
        async def add(self, *, account: str | None, sender: str, recipients: list[str], data: bytes,
                      local_deliveries: list[Delivery], smtputf8: bool = False, rate_limit: object = None,
                      logged: bool = False) -> list[int]:
            return []

    class Blocking:
        def deliver(self, deliveries: list[Delivery]) -> None:
            pass

    class Reordered:
        def prepare(self, mail_from: str, account: str, recipients: list[str], size: int = 0) -> None:
            pass

    assert incompatibilities(interfaces.OutgoingQueue, Renamed) == [
        "Renamed.add has no parameter mail_from",
        "Renamed.add: local_deliveries needs a default (the SMTP server may leave it out)",
        "Renamed.add requires sender, which the SMTP server does not pass",
    ]
    assert incompatibilities(interfaces.MessageStore, Blocking) == ["Blocking.deliver must be async"]
    assert incompatibilities(interfaces.SubmissionRateLimits, Reordered) == [
        "Reordered.prepare takes (mail_from, account, recipients, size) by position, "
        "the SMTP server passes (account, mail_from, recipients, size)"]
    assert incompatibilities(interfaces.MessageStore, object) == ["object.deliver is missing"]
