"""A throwaway plugin implementing every hook, registered by tests with PluginHost.register."""

from __future__ import annotations

import click
from pydantic import BaseModel, ConfigDict

from mox_core import hookimpl
from mox_core.plugins.kinds import (
    DeliveryStatus,
    RateLimitDecision,
    RateLimiterKind,
    RecipientResult,
    RouteMatcherKind,
    TransportKind,
    WebHandlerKind,
)


class MemorySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = "mem"


class MemoryTransport:
    def __init__(self, name, settings):
        self.name, self.settings, self.delivered = name, settings, []

    async def deliver(self, message, ctx):
        self.delivered.append(message)
        return [RecipientResult(r, DeliveryStatus.DELIVERED, 250, "2.0.0", self.settings.label)
                for r in message.recipients]


class CapSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_recipients: int


class Cap:
    """At most ``max_recipients`` recipients per account, ever; counts in the queue database."""

    def __init__(self, name, settings, state_dir):
        self.settings = settings

    def setup(self, db):
        db.execute("CREATE TABLE IF NOT EXISTS test_cap (account TEXT PRIMARY KEY, n INTEGER NOT NULL)")

    def _count(self, db, account):
        row = db.execute("SELECT n FROM test_cap WHERE account = ?", (account,)).fetchone()
        return row[0] if row else 0

    def check(self, db, submission):
        if self._count(db, submission.account) + len(submission.recipients) > self.settings.max_recipients:
            return RateLimitDecision(451, "4.7.1", "cap reached", setting="max_recipients")
        return None

    def record(self, db, submission):
        db.execute("INSERT INTO test_cap(account, n) VALUES (?, ?) "
                   "ON CONFLICT(account) DO UPDATE SET n = n + excluded.n",
                   (submission.account, len(submission.recipients)))


class HelloSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    greeting: str = "hello"


def hello_app(settings, ctx):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": f"{settings.greeting} {ctx.domain}".encode()})
    return app


@hookimpl
def mox_register_transports():
    return [TransportKind("memory", MemorySettings, MemoryTransport)]


@hookimpl
def mox_register_route_matchers():
    return [RouteMatcherKind(
        name="to_localpart_prefix",
        value_type=str,
        matches=lambda prefix, ctx: ctx.recipient.split("@")[0].startswith(prefix),
    )]


@hookimpl
def mox_register_webhandlers():
    return [WebHandlerKind("hello", HelloSettings, hello_app)]


@hookimpl
def mox_register_rate_limiters():
    return [RateLimiterKind("cap", CapSettings, Cap)]


@click.command("hello")
def hello_command():
    """Say hello (from a plugin)."""
    click.echo("hello from every_hook")


@hookimpl
def mox_add_cli_commands(cli):
    cli.add_command(hello_command)
