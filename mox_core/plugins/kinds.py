"""What plugins register, and the runtime contracts of what they register.

A hook returns *kinds*: small frozen records naming a kind, its settings model and a factory.
The factories build the objects that do I/O later (transports, limiters, ASGI apps); those
objects follow the ``typing.Protocol`` classes below. Plugins import these names from
``mox_core.plugins.kinds``; core never imports a plugin.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    from mox_core.config.load import Config

__all__ = [
    "DeliveryContext",
    "DeliveryStatus",
    "OutgoingMessage",
    "RateLimitDecision",
    "RateLimiter",
    "RateLimiterKind",
    "RecipientResult",
    "RouteContext",
    "RouteMatcherKind",
    "Submission",
    "Transport",
    "TransportKind",
    "WebHandlerContext",
    "WebHandlerKind",
]


# --------------------------------------------------------------------------------------------
# Transports


class DeliveryStatus(enum.Enum):
    """Outcome of one delivery attempt for one recipient."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # try again later (4xx, timeout, connection or TLS error)
    PERMANENT = "permanent"  # give up, send a DSN (5xx)


@dataclass(frozen=True)
class RecipientResult:
    """Result of a delivery attempt for one recipient, as the queue records it.

    ``code`` and ``enhanced_code`` are the remote SMTP reply (``550``, ``"5.1.1"``) when there
    was one; ``None`` for connection, DNS and TLS errors. ``remote_host`` is the host that
    gave the reply (or that could not be reached), ``text`` the reply text or error message.
    """

    recipient: str
    status: DeliveryStatus
    code: int | None = None
    enhanced_code: str | None = None
    remote_host: str | None = None
    text: str = ""

    @property
    def permanent(self) -> bool:
        return self.status is DeliveryStatus.PERMANENT


@dataclass(frozen=True)
class OutgoingMessage:
    """A message as handed to a transport: envelope plus the bytes to send (CRLF lines)."""

    mail_from: str
    recipients: Sequence[str]
    data: bytes
    account: str | None = None
    smtputf8: bool = False
    has_8bit: bool = False


@dataclass(frozen=True)
class DeliveryContext:
    """What a transport needs to know about the attempt besides the message itself."""

    transport_name: str  # "" for the implicit default direct delivery
    attempt: int  # attempts made before this one (0 for the first)
    hostname: str  # our host name, used in EHLO unless the transport says otherwise
    config: Config | None = None
    resolver: Any = None  # a dns.asyncresolver.Resolver configured from mox.toml
    # open SMTP sessions kept by the queue for the next message to the same smarthost
    # (mox_core.smtpclient.SessionCache); None: a new session per message
    sessions: Any = None


@runtime_checkable
class Transport(Protocol):
    """A configured transport, built once per config by its kind's factory."""

    async def deliver(
        self, message: OutgoingMessage, ctx: DeliveryContext
    ) -> Sequence[RecipientResult]:
        """Try to deliver ``message`` to all its recipients in one go.

        Returns one result per recipient, in the order of ``message.recipients``. Must not
        raise for delivery problems; those are results. An exception is treated as a
        temporary failure for every recipient and logged as a bug.
        """
        ...


@dataclass(frozen=True)
class TransportKind:
    """A transport kind, e.g. ``smtp``: usable as ``kind = "smtp"`` under ``[transports.X]``.

    ``factory(name, settings)`` gets the transport's name in config and a validated instance
    of ``settings_model`` and returns a :class:`Transport`.
    """

    name: str
    settings_model: type[BaseModel]
    factory: Callable[[str, BaseModel], Transport]
    description: str = ""


# --------------------------------------------------------------------------------------------
# Route matchers


@dataclass(frozen=True)
class RouteContext:
    """The delivery attempt a route is matched against."""

    from_domain: str  # envelope sender domain, lower-case IDNA ASCII ("" for the null sender)
    to_domain: str  # recipient domain, lower-case IDNA ASCII
    attempts: int  # delivery attempts made before this one (0 for the first attempt)
    account: str | None = None  # sending account, None for mail not submitted by an account
    sender: str = ""
    recipient: str = ""


@dataclass(frozen=True)
class RouteMatcherKind:
    """A route criterion, usable as a key in a route, e.g. ``to_domain = [".example.com"]``.

    ``value_type`` is the type of the value in config (validated with a pydantic
    ``TypeAdapter``); ``parse(value)`` may turn that into a prepared form once, at config
    load, and raise ``ValueError`` with a message for a bad value; ``matches(prepared, ctx)``
    says whether the route applies to the attempt. A route matches when all its criteria do.
    """

    name: str
    value_type: Any
    matches: Callable[[Any, RouteContext], bool]
    parse: Callable[[Any], Any] = lambda value: value
    description: str = ""


# --------------------------------------------------------------------------------------------
# Web handlers


@dataclass(frozen=True)
class WebHandlerContext:
    """Given to a web handler factory: where the handler sits in config."""

    domain: str
    path_regexp: str
    log_name: str
    config_dir: Any = None  # pathlib.Path of the directory of mox.toml
    allow_private_targets: bool = False


ASGIApp = Callable[[Mapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


@dataclass(frozen=True)
class WebHandlerKind:
    """A web handler kind, e.g. ``static``: usable as ``kind = "static"`` in ``[[web_handlers]]``.

    ``app_factory(settings, ctx)`` gets a validated ``settings_model`` instance and returns an
    ASGI application that serves requests routed to this handler.
    """

    name: str
    settings_model: type[BaseModel]
    app_factory: Callable[[BaseModel, WebHandlerContext], ASGIApp]
    description: str = ""


# --------------------------------------------------------------------------------------------
# Rate limiters


@dataclass(frozen=True)
class Submission:
    """A message an account wants to send, as rate limiters see it, before it is queued."""

    account: str
    mail_from: str
    recipients: Sequence[str]  # canonical addresses
    size: int = 0
    id: str = ""  # unique per submission: lets record() be idempotent
    time: float = 0.0  # when it was submitted (seconds since the epoch; 0: now)
    account_config: Any = None  # the account's settings (mox_core.config.models.Account)


@dataclass(frozen=True)
class RateLimitDecision:
    """Why a submission is refused. ``setting`` names the config setting to change."""

    code: int
    enhanced_code: str
    text: str
    setting: str | None = None


@runtime_checkable
class RateLimiter(Protocol):
    """A configured rate limiter, built by its kind's factory.

    Limiters keep their counts in the outgoing queue's SQLite database, so that checking,
    queueing and counting a submission are one transaction, whichever process (or thread)
    adds to the queue. ``check`` and ``record`` are plain functions, called in the queue's
    writer thread inside that write transaction (``BEGIN IMMEDIATE``: no other writer, in
    any process, runs until it commits): what ``check`` reads includes what ``record`` wrote
    for earlier submissions of the same transaction. They must not commit, roll back or
    block on anything but the database; an exception fails only this submission (451) and
    undoes what it wrote. Counts kept anywhere else (memory, files) are not rolled back
    when the transaction is, and are not shared between processes.
    """

    def check(self, db: sqlite3.Connection, submission: Submission) -> RateLimitDecision | None:
        """Called for every submission before it is queued. ``None`` allows it."""
        ...

    def record(self, db: sqlite3.Connection, submission: Submission) -> None:
        """Called when every limiter allowed it and its queue rows were inserted, in the same
        transaction: count it (it is queued once that transaction commits)."""
        ...


@dataclass(frozen=True)
class RateLimiterKind:
    """A rate limiter kind. ``factory(name, settings, state_dir)`` returns a :class:`RateLimiter`.

    ``state_dir`` is a directory of the data directory reserved for this limiter kind (not
    created), for anything it needs besides its tables in the queue database.
    """

    name: str
    settings_model: type[BaseModel]
    factory: Callable[[str, BaseModel, Any], RateLimiter]
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
