"""What plugins register, and the runtime contracts of what they register.

A hook returns *kinds*: small frozen records naming a kind, its settings model and a factory.
The factories build the objects that do I/O later (transports, limiters, ASGI apps); those
objects follow the ``typing.Protocol`` classes below. Plugins import these names from
``mox_core.plugins.kinds``; core never imports a plugin.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

from mox_core.outgoing.results import DeliveryStatus, RecipientResult

if TYPE_CHECKING:
    import dns.asyncresolver

    from mox_core.config.models import Account, StaticConfig
    from mox_core.smtpclient.sessions import SessionCache

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
    "ServerConfig",
    "Submission",
    "Transport",
    "TransportKind",
    "WebHandlerContext",
    "WebHandlerKind",
]


# --------------------------------------------------------------------------------------------
# Transports


@dataclass(frozen=True)
class OutgoingMessage:
    """A message as handed to a transport: envelope plus the bytes to send (CRLF lines)."""

    mail_from: str
    recipients: Sequence[str]
    data: bytes
    account: str | None = None
    smtputf8: bool = False
    has_8bit: bool = False


class ServerConfig(Protocol):
    """What a transport or web handler may read of the server's config (it is given a
    :class:`mox_core.config.resolved.Config`): the directory of ``mox.toml``, against which
    relative file names in settings are resolved, and ``mox.toml``'s settings."""

    @property
    def config_dir(self) -> Path: ...

    @property
    def static(self) -> StaticConfig: ...


@dataclass(frozen=True)
class DeliveryContext:
    """What a transport needs to know about the attempt besides the message itself."""

    transport_name: str  # "" for the implicit default direct delivery
    attempt: int  # attempts made before this one (0 for the first)
    hostname: str  # our host name, used in EHLO unless the transport says otherwise
    config: ServerConfig | None = None
    resolver: dns.asyncresolver.Resolver | None = None  # configured from mox.toml's [dns]
    # open SMTP sessions kept by the queue for the next message to the same smarthost;
    # None: a new session per message
    sessions: SessionCache | None = None


@runtime_checkable
class Transport(Protocol):
    """A configured transport, built once per config by its kind's factory.

    ``destination_concurrency`` is how many deliveries to one destination (a recipient
    domain, or the smarthost) may run at once; the queue reads it unless the transport's
    table in mox.toml sets ``destination_concurrency`` (default 1 when a transport class does
    not set it: one connection per domain, as direct delivery wants).
    """

    destination_concurrency: ClassVar[int]

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


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


@dataclass(frozen=True)
class WebHandlerContext:
    """Given to a web handler factory: where the handler sits in config, and what of the
    server it may use.

    ``domain`` is the lower-case ASCII host name the handler serves, ``path_regexp`` the
    regular expression its paths match (starting with ``^``), ``log_name`` its name in the
    access log and metrics (the 0-based index as a string when the config gives none).
    ``internal_services`` are core's own web applications by service name (``account``,
    ``admin``), for a handler kind that mounts one under another path.
    """

    domain: str
    path_regexp: str
    log_name: str
    config_dir: Path | None = None  # the directory of mox.toml
    data_dir: Path | None = None  # mox's data directory, for caches a handler may keep
    allow_private_targets: bool = False  # [testing]: backends on loopback/private IPs allowed
    internal_services: Mapping[str, ASGIApp] = field(default_factory=dict)


@dataclass(frozen=True)
class WebHandlerKind:
    """A web handler kind, e.g. ``static``: usable as ``kind = "static"`` in ``[[web_handlers]]``.

    ``app_factory(settings, ctx)`` gets a validated ``settings_model`` instance and returns an
    ASGI application; it is called again for every reload of ``domains.toml`` (requests in
    flight finish with the application they started with).

    The web server calls the application for a request whose host is ``ctx.domain`` and whose
    path matches ``ctx.path_regexp``, after core's own steps (per-IP rate limit, path
    cleaning, the system handlers, domain redirects, the redirect of plain HTTP to HTTPS
    unless the entry sets ``dont_redirect_plaintext``). The scope is a plain ASGI ``http`` or
    ``websocket`` scope: ``path`` is cleaned (no ``.`` or ``..`` segments, never empty),
    ``scheme`` says whether the request came over TLS, ``client`` is the client's address,
    and ``scope["mox"]`` holds ``{"handler": log_name, "match": (start, end)}``, the span of
    the path that ``path_regexp`` matched.

    An application may *decline* a request: returning without having sent
    ``http.response.start`` (for a websocket: without accepting, closing or answering it)
    passes the request on to the next handler in config order, and to core's internal
    services and the 404 after the last. It must decline before reading the request body.
    Responses are compressed by core when the entry sets ``compress``.
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
    account_config: Account | None = None  # the account's settings


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
    factory: Callable[[str, BaseModel, Path], RateLimiter]
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
