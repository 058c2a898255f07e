"""The errors of mox's SMTP client, in the shape the queue needs: permanent or temporary,
with the remote reply when there was one."""

from __future__ import annotations

from mox_core.outgoing.results import DeliveryStatus, RecipientResult

__all__ = ["RefusedTargetError", "SMTPClientError", "SMTPTLSError"]


class SMTPClientError(Exception):
    """A delivery problem, in the shape the queue needs (mox ``smtpclient.Error``).

    ``code``/``enhanced_code`` are the remote reply when there was one, else ``None`` (the
    enhanced code may be set for local decisions, e.g. ``5.3.4`` for a message too big).
    ``command`` is the SMTP step that failed ("greeting", "ehlo", "mail", "data", ...).
    """

    def __init__(self, permanent: bool, code: int | None, enhanced_code: str | None,
                 remote_host: str | None, text: str, *, command: str = "") -> None:
        self.permanent = permanent
        self.code = code
        self.enhanced_code = enhanced_code
        self.remote_host = remote_host
        self.text = text
        self.command = command
        super().__init__(text)

    def __str__(self) -> str:
        code = " ".join(str(x) for x in (self.code, self.enhanced_code) if x)
        where = f" ({self.remote_host})" if self.remote_host else ""
        return f"{code + ' ' if code else ''}{self.text}{where}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(permanent={self.permanent}, code={self.code}, "
                f"enhanced_code={self.enhanced_code!r}, remote_host={self.remote_host!r}, "
                f"text={self.text!r}, command={self.command!r})")

    def result(self, recipient: str) -> RecipientResult:
        status = DeliveryStatus.PERMANENT if self.permanent else DeliveryStatus.TEMPORARY
        return RecipientResult(recipient, status, self.code, self.enhanced_code,
                               self.remote_host, self.text)


class SMTPTLSError(SMTPClientError):
    """TLS could not be set up: handshake failed, or STARTTLS was refused or not offered."""


class RefusedTargetError(SMTPClientError):
    """Every address of a host is one mox does not connect to (loopback, private, link-local,
    the any-address; see ``dial.refused_target``): nothing was dialed. Temporary for dialing
    in general; direct delivery to an MX makes it permanent (5.4.4)."""
