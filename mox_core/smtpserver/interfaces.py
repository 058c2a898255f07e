"""What the SMTP server needs from the rest of mox: the objects it is given, as Protocols.

:class:`~mox_core.smtpserver.handler.Handler` and
:func:`~mox_core.smtpserver.listen.start_listeners` take these as parameters instead of
importing them, because a worker process (``smtp_workers``) gives them other objects than the
main process does:

* MessageStore: :class:`mox_core.store.MaildirStore` in both.
* OutgoingQueue: :class:`mox_core.queue.Queue` in the main process,
  :class:`mox_core.server.handoff.MainLink` in a worker.
* SubmissionRateLimits: :class:`mox_core.outgoing.ratelimit.RateLimits` in the main process,
  ``MainLink`` in a worker.
* CredentialStore: :class:`mox_core.accounts.db.AccountCredentials` in both.

(``MainLink`` sends the worker's submissions and rate-limit checks to the main process, which
queues them: server/handoff.py.) tests/test_smtpserver_interfaces.py checks that each class
above has every method listed here with parameters that accept the calls the SMTP server
makes, so the two sides cannot drift apart unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

from mox_core.accounts.sasl import CredentialStore  # with the AUTH mechanisms that use it
from mox_core.outgoing.ratelimit import RateLimitCheck
from mox_core.store import Delivery

if TYPE_CHECKING:
    from mox_core.server.handoff import RateLimitRequest

__all__ = ["CredentialStore", "MessageStore", "OutgoingQueue", "RateLimitToken", "SubmissionRateLimits"]

# What SubmissionRateLimits.prepare returns and OutgoingQueue.add takes back as ``rate_limit``;
# the SMTP server only carries it from one to the other. In the main process the
# RateLimitCheck that the queue runs when it commits the message; in a worker the
# RateLimitRequest that MainLink sends to the main process, which runs the check there.
RateLimitToken: TypeAlias = "RateLimitCheck | RateLimitRequest"


@runtime_checkable
class MessageStore(Protocol):
    """Local delivery into Maildirs (messages for local recipients only)."""

    async def deliver(self, deliveries: Sequence[Delivery]) -> object:
        """Deliver one message to every entry of ``deliveries`` as one unit, returning once
        all are durable (written, fsynced, renamed into ``new/``); raise
        :class:`mox_core.store.StorageError` with the reply to give if any failed, and then
        none was delivered. The SMTP server answers 250 only after this returns."""
        ...


@runtime_checkable
class OutgoingQueue(Protocol):
    """The outgoing queue, for submissions with remote recipients (and for local-only
    submissions when rate limits apply, so they are counted where they are checked)."""

    async def add(self, *, account: str | None, mail_from: str, recipients: Sequence[str], data: bytes,
                  local_deliveries: Sequence[Delivery] = (), smtputf8: bool = False,
                  rate_limit: RateLimitToken | None = None, logged: bool = False) -> list[int]:
        """Queue ``data`` for ``recipients`` and make ``local_deliveries`` in the same durable
        step; the new queue ids. Raises :class:`mox_core.store.StorageError` or
        :class:`mox_core.outgoing.ratelimit.RateLimited` (with the reply) and keeps nothing."""
        ...


@runtime_checkable
class SubmissionRateLimits(Protocol):
    """The per-account limits of submissions."""

    def prepare(self, account: str, mail_from: str, recipients: list[str],
                size: int = 0) -> RateLimitToken | None:
        """What the queue is to check and count for this submission; None if no limit
        applies."""
        ...
