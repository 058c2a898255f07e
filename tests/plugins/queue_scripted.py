"""A throwaway transport plugin for queue tests: results scripted by the test, no network.

Registers two kinds backed by the same class: ``direct`` (so a bare plugin host has a default
transport) and ``queue_scripted`` (for named transports in mox.toml). Every call is recorded in
``SCRIPT.calls``; ``SCRIPT.respond(rcpt, ...)`` queues the results for a recipient, else
``SCRIPT.default`` applies; ``SCRIPT.gate`` (an asyncio.Event) holds deliveries until set.
With ``$QUEUE_SCRIPTED_BLOCK_FILE`` set, each call appends its recipients to that file and
then never returns (crash tests kill the process meanwhile).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from mox_core import hookimpl
from mox_core.plugins.kinds import DeliveryStatus, RecipientResult, TransportKind

D, T, P = DeliveryStatus.DELIVERED, DeliveryStatus.TEMPORARY, DeliveryStatus.PERMANENT


class ScriptedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = ""


@dataclass
class Call:
    transport: str  # name in config, "" for the default
    kind: str
    recipients: list[str]
    attempt: int  # attempts made before this one (DeliveryContext.attempt)
    time: float | None  # SCRIPT.clock.now() when a clock is set
    mail_from: str
    data: bytes


@dataclass
class Script:
    calls: list[Call] = field(default_factory=list)
    responses: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    default: tuple[Any, ...] = (D, 250, "2.0.0", "ok")
    gate: asyncio.Event | None = None
    active: int = 0
    max_active: int = 0
    clock: Any = None
    raise_error: Exception | None = None

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def respond(self, recipient: str, *results: tuple[Any, ...]) -> None:
        """Queue results for ``recipient``: (status, code, enhanced_code, text[, host])."""
        self.responses.setdefault(recipient, []).extend(results)

    def recipients_delivered(self) -> list[str]:
        return [r for c in self.calls for r in c.recipients]


SCRIPT = Script()
BUILT: list[tuple[str, str]] = []  # (kind, name) of every transport built


class ScriptedTransport:
    def __init__(self, kind: str, name: str, settings: ScriptedSettings) -> None:
        self.kind, self.name, self.settings = kind, name, settings
        BUILT.append((kind, name))

    async def deliver(self, message, ctx):
        block = os.environ.get("QUEUE_SCRIPTED_BLOCK_FILE")
        if block:
            with open(block, "a") as f:
                f.write(" ".join(message.recipients) + "\n")
                f.flush()
                os.fsync(f.fileno())
            await asyncio.Event().wait()
        SCRIPT.calls.append(Call(ctx.transport_name, self.kind, list(message.recipients), ctx.attempt,
                                 SCRIPT.clock.now() if SCRIPT.clock else None, message.mail_from,
                                 message.data))
        SCRIPT.active += 1
        SCRIPT.max_active = max(SCRIPT.max_active, SCRIPT.active)
        try:
            if SCRIPT.gate is not None:
                await SCRIPT.gate.wait()
            if SCRIPT.raise_error is not None:
                raise SCRIPT.raise_error
        finally:
            SCRIPT.active -= 1
        out = []
        for r in message.recipients:
            queued = SCRIPT.responses.get(r)
            spec = queued.pop(0) if queued else SCRIPT.default
            status, code, ecode, text, *host = spec
            out.append(RecipientResult(r, status, code, ecode, host[0] if host else "mx.remote.example", text))
        return out


@hookimpl
def mox_register_transports():
    return [
        TransportKind("direct", ScriptedSettings, lambda n, s: ScriptedTransport("direct", n, s)),
        TransportKind("queue_scripted", ScriptedSettings,
                      lambda n, s: ScriptedTransport("queue_scripted", n, s)),
    ]
