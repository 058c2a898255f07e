"""Submissions served by the worker processes, queued by the main process.

With ``smtp_workers`` the workers serve the submission listeners as they serve SMTP: TLS,
AUTH, the checks of the From header, DKIM signing, all the CPU a submission costs. What they
do not do is commit to the queue: each worker committing its own messages made them wait for
each other on SQLite's write lock, one fsync each, and lost against the main process doing
it all (bench/RESULTS.md, tried twice). So a worker hands every message to the main process
over its link (a socket pair made when the worker starts); the main process checks the
account's rate limits and adds the message to its queue store, where the messages of all
workers share one group commit, and answers with the new queue ids or the refusal. The
worker then answers the client: the 250 still comes only after the message, its envelope and
its local copies are durable.

The link also carries failed logins, so the limit per client address holds for the server,
not per worker: a worker counts its own (it refuses at once when they alone reach the limit)
and tells the main process, which counts those of every worker and tells every worker of each
failure, with how long the address is blocked. An attempt in flight on another worker at
that moment may still be answered.

Frames, both ways: a 4-byte length, a JSON object, then the byte strings the object lists by
length (``"blobs"``)::

    worker -> main  {"op": "add", "id", "account", "mail_from", "recipients", "smtputf8",
                     "rate": [account, mail_from, recipients, size] | null,
                     "local": [[maildir, mailbox, prefix blob, message blob], ...],
                     "blobs": [...]}                 blob 0: the message to queue
                    {"op": "auth_failed" | "auth_ok", "ip"}
    main -> worker  {"id", "ids": [queue ids]} | {"id", "refused": [code, enhanced, text,
                     setting], "rate": true | false}
                    {"op": "auth_failures", "ip": key, "blocked_for": seconds}
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import structlog

from mox_core.accounts.sasl import AuthFailureLimiter
from mox_core.outgoing.ratelimit import RateLimited, RateLimits
from mox_core.plugins.kinds import RateLimitDecision
from mox_core.queue import Queue
from mox_core.smtp import codes
from mox_core.store import Delivery, StorageError

log = structlog.get_logger(component="smtpserver")

_LEN = struct.Struct("!I")


def _frame(head: dict[str, Any], blobs: Sequence[bytes] = ()) -> list[bytes]:
    if blobs:
        head["blobs"] = [len(b) for b in blobs]
    js = json.dumps(head, separators=(",", ":")).encode()
    return [_LEN.pack(len(js)) + js, *blobs]


async def _read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], list[bytes]]:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    head = json.loads(await reader.readexactly(n))
    return head, [await reader.readexactly(size) for size in head.get("blobs", ())]


def _unavailable() -> StorageError:
    code, enhanced, text = codes.split(codes.QUEUE_UNAVAILABLE)
    return StorageError(code, enhanced, text, step="handoff")


class RateLimitRequest(NamedTuple):
    """What a worker's handler gets from ``prepare``: the arguments of
    :meth:`mox_core.outgoing.ratelimit.RateLimits.prepare`, run by the main process."""

    account: str
    mail_from: str
    recipients: list[str]
    size: int


# ---------------------------------------------------------------------------------------------
# The main process


class WorkerSubmissions:
    """The main process's side of the workers' links: queue their submissions, count their
    failed logins. ``attach`` each worker's end of a new link (``SMTPWorkers`` does)."""

    def __init__(self, queue: Queue, ratelimits: RateLimits, auth_limiter: AuthFailureLimiter):
        self.queue = queue
        self.ratelimits = ratelimits
        self.auth_limiter = auth_limiter
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._adds: set[asyncio.Task[None]] = set()

    def attach(self, index: int, sock: socket.socket) -> None:
        """Serve worker ``index``'s link (a new worker's: the one it replaces is gone)."""
        old = self._readers.pop(index, None)
        if old is not None:
            old.cancel()
        self._readers[index] = asyncio.create_task(self._serve(index, sock))

    async def _serve(self, index: int, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        self._writers[index] = writer
        try:
            while True:
                head, blobs = await _read_frame(reader)
                op = head.get("op")
                if op == "add":
                    task = asyncio.create_task(self._add(head, blobs, writer))
                    self._adds.add(task)
                    task.add_done_callback(self._adds.discard)
                elif op == "auth_failed":
                    self._auth_failed(head["ip"])
                elif op == "auth_ok":
                    self.auth_limiter.succeeded(head["ip"])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker is gone; its replacement comes with a new link
        except Exception:
            log.exception("worker_link_failed", worker=index)
        finally:
            if self._writers.get(index) is writer:
                del self._writers[index]
            writer.close()

    async def _add(self, head: dict[str, Any], blobs: list[bytes], writer: asyncio.StreamWriter) -> None:
        reply: dict[str, Any] = {"id": head["id"]}
        try:
            rate = None
            if head["rate"] is not None and self.ratelimits is not None:
                rate = self.ratelimits.prepare(*head["rate"])
            local = [Delivery(root, blobs[message], blobs[prefix], mailbox)
                     for root, mailbox, prefix, message in head["local"]]
            reply["ids"] = await self.queue.add(
                account=head["account"], mail_from=head["mail_from"], recipients=head["recipients"],
                data=blobs[0], local_deliveries=local, smtputf8=head["smtputf8"], rate_limit=rate,
                logged=True,
            )
        except RateLimited as exc:
            d = exc.decision
            reply.update(refused=[d.code, d.enhanced_code, d.text, d.setting], rate=True)
        except StorageError as exc:
            reply.update(refused=[exc.code, exc.enhanced_code, exc.text, None], rate=False)
        except Exception:  # the worker's client must get an answer: a temporary one
            log.exception("submission_handoff_failed")
            exc = _unavailable()
            reply.update(refused=[exc.code, exc.enhanced_code, exc.text, None], rate=False)
        if not writer.is_closing():
            writer.writelines(_frame(reply))

    def _auth_failed(self, ip: str) -> None:
        self.auth_limiter.failed(ip)
        note = _frame({"op": "auth_failures", "ip": self.auth_limiter.key(ip),
                       "blocked_for": self.auth_limiter.blocked_for(ip)})
        for writer in self._writers.values():
            if not writer.is_closing():
                writer.writelines(note)

    async def close(self) -> None:
        """After the workers stopped: stop reading, finish the adds already started."""
        for task in self._readers.values():
            task.cancel()
        await asyncio.gather(*self._readers.values(), *self._adds, return_exceptions=True)
        self._readers.clear()


# ---------------------------------------------------------------------------------------------
# A worker


class LinkedAuthLimiter(AuthFailureLimiter):
    """A worker's failed logins: its own, and those the main process counted for all workers."""

    def __init__(self, link: MainLink):
        super().__init__()
        self._link = link
        # client key -> (when its failures elsewhere expire, until when it is blocked)
        self._elsewhere: dict[str, tuple[float, float]] = {}

    def note(self, key: str, blocked_for: float) -> None:
        """The main process counted a failure of ``key`` (on any worker)."""
        now = self._clock()
        if len(self._elsewhere) > 100_000:
            self._elsewhere = {k: v for k, v in self._elsewhere.items() if v[0] > now}
        self._elsewhere[key] = (now + self.window, now + blocked_for)

    def blocked(self, ip: str) -> bool:
        if super().blocked(ip):
            return True
        seen = self._elsewhere.get(self.key(ip))
        return seen is not None and seen[1] > self._clock()

    def failed(self, ip: str) -> None:
        super().failed(ip)
        self._link.send({"op": "auth_failed", "ip": ip})

    def succeeded(self, ip: str) -> None:
        key = self.key(ip)
        # the main process hears of it only when it has failures to forget (most logins: not)
        seen = self._elsewhere.pop(key, None)
        if key in self._failures or (seen is not None and seen[0] > self._clock()):
            self._link.send({"op": "auth_ok", "ip": ip})
        super().succeeded(ip)


class MainLink:
    """A worker's side of its link: the main process's queue (``add``), rate limits
    (``prepare``) and count of failed logins (``auth_limiter``), for the worker's submission
    listeners. When the link is gone, ``add`` raises :class:`StorageError` (451)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count()
        self.auth_limiter = LinkedAuthLimiter(self)

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._reader = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                head, _ = await _read_frame(reader)
                if "id" in head:
                    fut = self._pending.pop(head["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(head)
                elif head.get("op") == "auth_failures":
                    self.auth_limiter.note(head["ip"], head["blocked_for"])
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("main_process_link_closed", waiting=len(self._pending))
        except Exception:
            log.exception("main_process_link_failed", waiting=len(self._pending))
        finally:
            if self._writer is not None:
                self._writer.close()
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(_unavailable())

    def send(self, head: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.writelines(_frame(head))

    def prepare(self, account: str, mail_from: str, recipients: list[str], size: int = 0) -> RateLimitRequest:
        return RateLimitRequest(account, mail_from, recipients, size)

    async def add(self, *, account: str | None, mail_from: str, recipients: Sequence[str], data: bytes,
                  local_deliveries: Sequence[Delivery] = (), smtputf8: bool = False,
                  rate_limit: RateLimitRequest | None = None, logged: bool = True) -> list[int]:
        """:meth:`mox_core.queue.Queue.add` in the main process; the new queue ids."""
        writer = self._writer
        if writer is None or writer.is_closing():
            raise _unavailable()
        blobs = [data]
        numbers: dict[int, int] = {id(data): 0}

        def blob(b: bytes) -> int:
            n = numbers.get(id(b))
            if n is None:
                n = numbers[id(b)] = len(blobs)
                blobs.append(b)
            return n

        local = [[os.fspath(d.root), d.mailbox, blob(d.prefix), blob(d.message)] for d in local_deliveries]
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        writer.writelines(_frame({
            "op": "add", "id": msg_id, "account": account, "mail_from": mail_from,
            "recipients": list(recipients), "smtputf8": smtputf8,
            "rate": list(rate_limit) if rate_limit is not None else None, "local": local,
        }, blobs))
        try:
            head = await fut
        finally:
            self._pending.pop(msg_id, None)
        if "ids" in head:
            return head["ids"]
        code, enhanced, text, setting = head["refused"]
        if head["rate"]:
            raise RateLimited(RateLimitDecision(code, enhanced, text, setting))
        raise StorageError(code, enhanced, text, step="main process")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
