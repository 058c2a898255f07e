"""The outgoing queue of the running server: list with filters, one message, and hold,
release, kick (retry now, optionally through another transport), drop and fail, for chosen
messages or for everything a filter matches.

The web process is not the queue's process: everything goes through the server's ctl socket
(``<data_dir>/ctl``, :mod:`mox_core.server.ctl`, the commands of
:meth:`mox_core.queue.Queue.ctl_handlers`), as ``mox queue ...`` does; the queue database is
never opened for writing here. Without a server answering there the page says so. The
overview's counts are read from the database read-only, as the metrics are.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from mox_core.admin.context import Admin
from mox_core.queue.records import Filter, QueuedMessage
from mox_core.server.ctl import CtlError, CtlUnavailable, call, socket_path
from mox_core.webui import Page

__all__ = ["OPS", "duration", "queue_counts", "register"]

LIMIT = 500
FILTER_KEYS = ("account", "from", "to", "held", "transport")
# op -> (ctl command, args, what the notice says was done)
OPS: dict[str, tuple[str, dict[str, Any], str]] = {
    "hold": ("queue.hold", {"hold": True}, "held"),
    "unhold": ("queue.hold", {"hold": False}, "released"),
    "kick": ("queue.kick", {}, "scheduled for delivery now"),
    "drop": ("queue.drop", {}, "dropped (no DSN)"),
    "fail": ("queue.fail", {}, "failed (the sender gets a DSN)"),
}
CONFIRM = ("drop", "fail")


def queue_counts(data_dir: Path) -> dict[str, Any]:
    """Recipients waiting and held (read-only from ``queue/index.db``), and whether the
    server's ctl socket is there."""
    waiting = held = 0
    db_path = Path(data_dir) / "queue" / "index.db"
    if db_path.exists():
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=2.0)
            try:
                for hold, n in db.execute("SELECT hold, COUNT(*) FROM msg GROUP BY hold"):
                    held, waiting = (held + n, waiting) if hold else (held, waiting + n)
            finally:
                db.close()
        except sqlite3.Error:
            pass
    return {"waiting": waiting, "held": held, "total": waiting + held,
            "server": socket_path(data_dir).exists()}


def duration(seconds: float) -> str:
    """``7m30s``, ``2h5m``, ``3d4h``: how far away a time is."""
    s = int(abs(seconds))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m}m"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def filter_of(values: Mapping[str, str], ids: tuple[int, ...] = ()) -> Filter:
    """The queue filter of the page's fields: ``held`` is yes/no/"", ``transport`` a
    transport name, ``-`` for messages without one, "" for any."""
    held = values.get("held", "")
    transport = values.get("transport", "")
    return Filter(ids=ids, account=values.get("account") or None, from_=values.get("from") or None,
                  to=values.get("to") or None, hold={"yes": True, "no": False}.get(held),
                  transport=None if transport == "" else ("" if transport == "-" else transport))


def _query(values: Mapping[str, str], **extra: Any) -> str:
    pairs = {k: values.get(k, "") for k in FILTER_KEYS if values.get(k)}
    pairs.update({k: v for k, v in extra.items() if v is not None})
    return ("?" + urlencode(pairs)) if pairs else ""


class _Unavailable(Exception):
    pass


async def _ctl(admin: Admin, command: str, args: dict[str, Any]) -> Any:
    try:
        return await asyncio.to_thread(call, socket_path(admin.data_dir), command, args, timeout=30.0)
    except CtlUnavailable:
        raise _Unavailable() from None


def _unavailable(admin: Admin, page: Page, **ctx: Any) -> Response:
    return page.render("queue.html", status=503, unavailable=str(socket_path(admin.data_dir)), messages=[],
                       values={}, **ctx)


def register(admin: Admin) -> None:
    _list_page(admin)
    _message_page(admin)
    _act(admin)


def _list_page(admin: Admin) -> None:
    @admin.ui.page("/queue")
    async def queue_page(page: Page) -> Response:
        values = {k: page.request.query_params.get(k, "").strip() for k in FILTER_KEYS}
        f = filter_of(values)
        transports = sorted(admin.cfg.transports)
        accounts = sorted(admin.cfg.dynamic.model.accounts)
        try:
            res = await _ctl(admin, "queue.list", {"filter": {**f.to_json(), "limit": LIMIT}})
        except _Unavailable:
            return _unavailable(admin, page, transports=transports, accounts=accounts)
        except CtlError as exc:
            return page.render("queue.html", status=502, error=str(exc), messages=[], values=values,
                               transports=transports, accounts=accounts)
        msgs = [QueuedMessage.from_json(m) for m in res["messages"]]
        return page.render("queue.html", messages=msgs, now=res["now"], values=values, limit=LIMIT,
                           filtered=any(values.values()), query=_query(values), notice=_notice(page),
                           transports=transports, accounts=accounts, duration=duration)


def _notice(page: Page) -> str:
    op, count = page.request.query_params.get("done", ""), page.request.query_params.get("count", "")
    if op not in OPS or not count.isdigit():
        return ""
    n = int(count)
    return f"{n} message{'' if n == 1 else 's'} {OPS[op][2]}."


def _message_page(admin: Admin) -> None:
    @admin.ui.page("/queue/{msg_id:int}")
    async def message_page(page: Page) -> Response:
        msg_id = page.request.path_params["msg_id"]
        try:
            res = await _ctl(admin, "queue.list", {"filter": Filter(ids=(msg_id,)).to_json()})
            if not res["messages"]:
                return admin.ui.error(page.request, 404, f"There is no message {msg_id} in the queue.",
                                      page.session)
            dump = await _ctl(admin, "queue.dump", {"id": msg_id})
        except _Unavailable:
            return _unavailable(admin, page, transports=[], accounts=[])
        except CtlError as exc:
            return admin.ui.error(page.request, 502, str(exc), page.session)
        msg = QueuedMessage.from_json(res["messages"][0])
        headers = _headers(base64.b64decode(dump["data"]))
        return page.render("queue_message.html", m=msg, now=res["now"], headers=headers, duration=duration,
                           transports=sorted(admin.cfg.transports), notice=_notice(page))


def _headers(data: bytes) -> list[tuple[str, str]]:
    head = data.split(b"\r\n\r\n", 1)[0][:64 * 1024]
    msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\r\n\r\n")
    out = []
    for name, value in msg.items():
        try:
            out.append((name, str(value)))
        except (ValueError, TypeError):
            out.append((name, "(unreadable)"))
    return out


def _targets(form: Mapping[str, str]) -> tuple[Filter | None, str]:
    """The messages an action is for: the ticked ones (``m.<id>``), the one of ``id``, or
    all that the filter fields match (``target=filter``)."""
    if form.get("target") == "filter":
        return filter_of(form), "every message the filter matches"
    ids = [int(k[2:]) for k, v in form.items() if k.startswith("m.") and k[2:].isdigit() and v]
    if form.get("id", "").isdigit():
        ids.append(int(form["id"]))
    if not ids:
        return None, ""
    return Filter(ids=tuple(sorted(set(ids)))), f"message{'s' if len(set(ids)) > 1 else ''} " + \
        ", ".join(str(i) for i in sorted(set(ids)))


def _act(admin: Admin) -> None:
    @admin.ui.action("/queue/act")
    async def act(page: Page) -> Response:
        form = page.form
        op = form.get("op", "")
        target, what = _targets(form)
        back = form.get("back", "")
        if op not in OPS:
            return admin.ui.error(page.request, 400, "Unknown queue action.", page.session)
        if target is None:
            return page.redirect("/queue" + _query(form, none=1))
        if op in CONFIRM and form.get("confirm") != "1":
            return page.render("queue_confirm.html", op=op, what=what, form=form, status=200)
        command, args, _ = OPS[op]
        args = {**args, "filter": target.to_json()}
        if op == "kick" and form.get("kick_transport", "=") != "=":
            args["transport"] = form["kick_transport"]
        try:
            res = await _ctl(admin, command, args)
        except _Unavailable:
            return _unavailable(admin, page, transports=[], accounts=[])
        except CtlError as exc:
            return admin.ui.error(page.request, 502, f"The server refused: {exc}", page.session)
        if back.isdigit() and op not in CONFIRM:
            return page.redirect(f"/queue/{back}?done={op}&count={res['count']}")
        return page.redirect("/queue" + _query(form, done=op, count=res["count"]))
