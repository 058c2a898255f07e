"""``mox queue ...`` and ``mox routes explain``.

Queue commands talk to the running server over the ctl socket (``<data_dir>/ctl``), which
applies the change and wakes its scheduler. When no server answers there, they open the queue
database directly instead (SQLite WAL makes a second reader/writer safe), holding the queue's
exclusive lock so a server cannot start delivering from it at the same moment; a note on
stderr says so. If the lock is taken but the socket does not answer, the command fails rather
than guessing.

Output follows mox's queue commands: ``messages:`` then one line per message, counts as
"N messages scheduled" and so on.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from mox_core.config.resolved import Config
from mox_core.errors import MoxError
from mox_core.queue.store import Filter, QueuedMessage
from mox_core.server.ctl import CtlError, CtlUnavailable, call, socket_path

__all__ = ["format_list", "go_duration", "queue_group", "register", "routes_group"]


def register(cli: click.Group) -> None:
    """Add ``queue`` and ``routes`` to the ``mox`` command group (idempotent)."""
    for cmd in (queue_group, routes_group):
        if cmd.name not in cli.commands:
            cli.add_command(cmd)


# --------------------------------------------------------------------------------------------
# transport: ctl socket, else the database


def _request(state: Any, command: str, args: dict[str, Any]) -> Any:
    cfg: Config = state.load_config()
    try:
        return call(socket_path(cfg.data_dir), command, args)
    except CtlUnavailable:
        pass
    except CtlError as exc:
        raise click.ClickException(str(exc)) from None
    if not (cfg.data_dir / "queue" / "index.db").exists():
        return _empty(command)
    click.echo("mox: server not running, working on the queue database directly", err=True)
    try:
        return asyncio.run(_offline(cfg, command, args))
    except MoxError as exc:
        raise click.ClickException(str(exc)) from None


def _empty(command: str) -> Any:
    if command == "queue.list":
        return {"now": 0, "messages": []}
    if command == "queue.dump":
        raise click.ClickException("no message with that id (the queue is empty)")
    return {"count": 0}


async def _offline(cfg: Config, command: str, args: dict[str, Any]) -> Any:
    from mox_core.queue import Queue, QueueLocked

    q = Queue(cfg)
    try:
        await q.open(lock=True)
    except QueueLocked:
        await q.store.close()
        raise click.ClickException(
            "the queue is in use by a running mox, but its ctl socket does not answer"
        ) from None
    try:
        return await q.ctl_handlers()[command](args)
    finally:
        await q.close()


# --------------------------------------------------------------------------------------------
# formatting


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String`` rounded to seconds: ``7m30s``, ``1h0m0s``."""
    s = int(round(seconds))
    sign = "-" if s < 0 else ""
    s = abs(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{sign}{h}h{m}m{sec}s"
    if m:
        return f"{sign}{m}m{sec}s"
    return f"{sign}{sec}s"


def format_list(messages: list[QueuedMessage], now: float) -> list[str]:
    out = ["messages:"]
    if not messages:
        out.append("(none)")
    for m in messages:
        queued = datetime.fromtimestamp(m.queued).astimezone().isoformat(timespec="seconds")
        last = "none" if m.last_attempt is None else go_duration(now - m.last_attempt)
        out.append(
            f"{m.id:5d} {queued} from:{m.mail_from} to:{m.recipient} "
            f"next {go_duration(m.next_attempt - now)} last {last} error {json.dumps(m.last_error)}"
        )
    return out


# --------------------------------------------------------------------------------------------
# commands


def _ids(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("comma-separated message ids, e.g. 1,2") from None


def _filter_options(*, with_transport: bool = True) -> Callable[[Any], Any]:
    opts = [
        click.option("--ids", callback=_ids, default=None, help="Comma-separated message ids."),
        click.option("--account", default=None, help="Sending account."),
        click.option("--from", "from_", default=None,
                     help="Substring of the sender, e.g. @example.com."),
        click.option("--to", default=None, help="Substring of the recipient."),
        click.option("--hold", type=click.Choice(["true", "false"]), default=None,
                     help="Only held (true) or not held (false) messages."),
        click.option("-n", "limit", type=click.IntRange(min=1), default=None,
                     help="At most this many messages."),
    ]
    if with_transport:
        opts.append(click.option("--transport", "transport_filter", default=None,
                                 help="Transport override; \"\" for messages without one."))

    def deco(f: Any) -> Any:
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def _filter(kw: dict[str, Any]) -> dict[str, Any]:
    hold = kw.get("hold")
    return Filter(
        ids=kw.get("ids") or (), account=kw.get("account"), from_=kw.get("from_"), to=kw.get("to"),
        transport=kw.get("transport_filter"), hold=None if hold is None else hold == "true",
        limit=kw.get("limit"),
    ).to_json()


@click.group("queue")
def queue_group() -> None:
    """The outgoing queue of the running server (or its database when it is not running)."""


@queue_group.command("list")
@_filter_options()
@click.pass_obj
def queue_list(state: Any, **kw: Any) -> None:
    """List queued messages, one line per recipient, latest next attempt first."""
    res = _request(state, "queue.list", {"filter": _filter(kw)})
    msgs = [QueuedMessage.from_json(m) for m in res["messages"]]
    for line in format_list(msgs, res["now"]):
        click.echo(line)


@queue_group.command("kick")
@_filter_options(with_transport=False)
@click.option("--transport", default=None,
              help="Deliver through this transport from now on (\"\" = back to routes).")
@click.pass_obj
def queue_kick(state: Any, transport: str | None, **kw: Any) -> None:
    """Schedule the next delivery attempt now."""
    res = _request(state, "queue.kick", {"filter": _filter(kw), "transport": transport})
    click.echo(f"{res['count']} messages scheduled")


@queue_group.command("drop")
@_filter_options()
@click.pass_obj
def queue_drop(state: Any, **kw: Any) -> None:
    """Remove messages from the queue without a DSN."""
    res = _request(state, "queue.drop", {"filter": _filter(kw)})
    click.echo(f"{res['count']} messages dropped")


@queue_group.command("hold")
@_filter_options()
@click.pass_obj
def queue_hold(state: Any, **kw: Any) -> None:
    """Hold messages: they are not delivered until released."""
    res = _request(state, "queue.hold", {"filter": _filter(kw), "hold": True})
    click.echo(f"{res['count']} messages changed")


@queue_group.command("unhold")
@_filter_options()
@click.pass_obj
def queue_unhold(state: Any, **kw: Any) -> None:
    """Release held messages."""
    res = _request(state, "queue.hold", {"filter": _filter(kw), "hold": False})
    click.echo(f"{res['count']} messages changed")


@queue_group.command("fail")
@_filter_options()
@click.pass_obj
def queue_fail(state: Any, **kw: Any) -> None:
    """Fail messages now; the sender gets a DSN ("delivery canceled by admin")."""
    res = _request(state, "queue.fail", {"filter": _filter(kw)})
    click.echo(f"{res['count']} message(s) marked as failed")


@queue_group.command("dump")
@click.argument("msg_id", type=int)
@click.pass_obj
def queue_dump(state: Any, msg_id: int) -> None:
    """Write the queued message to stdout, as it will be sent."""
    res = _request(state, "queue.dump", {"id": msg_id})
    out = click.get_binary_stream("stdout")
    out.write(base64.b64decode(res["data"]))
    out.flush()


@click.group("routes")
def routes_group() -> None:
    """Routes from domains.toml."""


@routes_group.command("explain")
@click.option("--from", "from_addr", required=True, help="Envelope sender address (\"\" for <>).")
@click.option("--to", "to_addr", required=True, help="Recipient address.")
@click.option("--attempt", type=click.IntRange(min=1), default=1, show_default=True,
              help="Delivery attempt, counting from 1 (attempt N: N-1 attempts made).")
@click.option("--account", default=None,
              help="Sending account (default: the account owning the --from address).")
@click.pass_obj
def routes_explain(state: Any, from_addr: str, to_addr: str, attempt: int,
                   account: str | None) -> None:
    """Show each route considered for a message, whether it matched, and the transport."""
    from mox_core.outgoing.routing import explain

    cfg = state.load_config()
    for line in explain(cfg, from_addr, to_addr, attempt, account=account).lines():
        click.echo(line)
