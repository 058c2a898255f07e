"""The recipient (and sender) local parts with which ``mox localserve`` simulates failures,
so that an application's error handling can be tested (as mox's localserve):

- ending in ``temperror``: 451, ending in ``permerror``: 550;
- ending in three digits from 400 to 599: that code (``x-421@``, ``x-552@``);
- ending in ``timeout``: no answer for an hour, then 451;

at the stage the local part names: a local part starting with ``mailfrom`` applies to the
sender at MAIL FROM, one starting with ``rcptto`` to a recipient at RCPT TO, any other to a
recipient at the end of DATA. The stage of DATA is reached on the SMTP listener, also by
submissions: the queue delivers them to it, so a submission to ``x-permerror@example.com``
is accepted and then comes back as a DSN, as it would from a real remote server.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpecialReply", "special_reply"]

TIMEOUT_SECONDS = 3600.0


@dataclass(frozen=True)
class SpecialReply:
    stage: str  # "mail", "rcpt" or "data"
    code: int
    timeout: bool = False  # wait TIMEOUT_SECONDS before the reply

    @property
    def reply(self) -> str:
        cls = self.code // 100
        enhanced = f"{cls}.0.0" if cls in (4, 5) else "2.0.0"
        what = "timeout" if self.timeout else "error"
        return f"{self.code} {enhanced} localserve: simulated {what} ({self.code}) as asked for by the local part"


def _localpart(address: str) -> str:
    return address.rpartition("@")[0].lower() if "@" in address else address.lower()


def special_reply(address: str, stage: str) -> SpecialReply | None:
    """The simulated reply for ``address`` at ``stage`` (``mail`` for the sender; ``rcpt`` or
    ``data`` for a recipient), None when its local part asks for none there."""
    lp = _localpart(address)
    if not lp:
        return None
    wanted = "mail" if lp.startswith("mailfrom") else "rcpt" if lp.startswith("rcptto") else "data"
    if stage == "mail":
        if wanted != "mail":
            return None
    elif stage != wanted:
        return None
    if lp.endswith("temperror"):
        return SpecialReply(stage, 451)
    if lp.endswith("permerror"):
        return SpecialReply(stage, 550)
    if lp.endswith("timeout"):
        return SpecialReply(stage, 451, timeout=True)
    tail = lp[-3:]
    if len(lp) >= 3 and tail.isdigit() and 400 <= int(tail) < 600:
        return SpecialReply(stage, int(tail))
    return None
