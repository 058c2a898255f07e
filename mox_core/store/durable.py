"""Durable, all-or-nothing local delivery into Maildirs, with group commit.

Why group commit (performance-notes.md point 4): the cost of a durable delivery is dominated by
flushes. With concurrent clients, one writer thread that takes *everything queued right now*,
writes and fsyncs each file, renames the batch into ``new/`` and then fsyncs each distinct
``new/`` directory once, turns N directory fsyncs into one. It never waits for a batch to fill:
with one client each batch holds one delivery and the cost is that of a plain
``asyncio.to_thread(write + fsync + rename + dir fsync)``.

The rule (reliability.md A.5): a caller's future resolves only after its own files were
fsynced, renamed, and every ``new/`` directory they were renamed into was fsynced. Only then
may the SMTP server answer 250. On any error the caller gets a :class:`StorageError` and none
of its files remains in any ``new/``.

A crash after a file's rename but before its directory fsync may leave the message on disk
without a 250 having been sent; the client retries and the duplicate is accepted (A.5).
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import structlog

from mox_core.store.maildir import INBOX, Maildir, StorageError, _unlink_quiet, fsync_dir, mailbox_dir, unique_name, write_file

__all__ = ["Delivery", "MaildirStore", "StoreStats", "commit_batch", "deliver_sync"]

log = structlog.get_logger(component="store.maildir")

# A hard link cannot replace a copy across filesystems (EXDEV), past the link limit (EMLINK)
# or where the filesystem refuses links (EPERM on some FUSE/vfat mounts): write a copy then.
_LINK_FALLBACK = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})


@dataclass(frozen=True, slots=True)
class Delivery:
    """One file to deliver: ``prefix + message`` into ``mailbox`` of the Maildir at ``root``.

    ``prefix`` holds per-recipient header lines (``Delivered-To:``, ``Return-Path:``) and is
    written with ``writev`` in front of ``message``, so per-recipient headers never cost a copy
    of a large body. Both must end in CRLF as the message is stored as received.
    """

    root: str | os.PathLike[str]
    message: bytes
    prefix: bytes = b""
    mailbox: str = INBOX

    def __post_init__(self) -> None:
        # Refuse a bad folder name here, in the caller, not as a failed batch in the writer.
        if self.mailbox.upper() != "INBOX":
            mailbox_dir(self.root, self.mailbox)

    @property
    def size(self) -> int:
        """Size of the file that will be written."""
        return len(self.prefix) + len(self.message)


@dataclass
class StoreStats:
    """Counters, mostly for tests and benchmarks: did batches form, how many flushes.

    ``largest_batch`` counts deliveries (``deliver()`` calls) in one batch.
    """

    batches: int = 0
    deliveries: int = 0
    failed: int = 0
    files_written: int = 0
    files_linked: int = 0
    file_fsyncs: int = 0
    dir_fsyncs: int = 0
    largest_batch: int = 0

    def add(self, other: StoreStats) -> None:
        for f in fields(self):
            if f.name == "largest_batch":
                self.largest_batch = max(self.largest_batch, other.largest_batch)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class MaildirCache:
    """Maildirs known to exist, by (root, mailbox), so ``ensure()`` runs once per folder."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], Maildir] = {}

    def get(self, root: str | os.PathLike[str], mailbox: str) -> Maildir:
        key = (os.fspath(root), mailbox)
        md = self._known.get(key)
        if md is None:
            md = Maildir.for_mailbox(key[0], mailbox)
            md.ensure()
            self._known[key] = md
        return md


# ---------------------------------------------------------------------------------------------
# One batch, synchronously


class _File:
    __slots__ = ("newdir", "path_new", "path_tmp", "state")

    def __init__(self, path_tmp: str, path_new: str, newdir: str) -> None:
        self.path_tmp = path_tmp
        self.path_new = path_new
        self.newdir = newdir
        self.state = 0  # 0: only in tmp/; 1: rename attempted (may be in new/)


class _Unit:
    """The files of one ``deliver()`` call: they succeed or fail together."""

    __slots__ = ("deliveries", "error", "files")

    def __init__(self, deliveries: Sequence[Delivery]) -> None:
        self.deliveries = deliveries
        self.files: list[_File] = []
        self.error: StorageError | None = None

    def fail(self, exc: OSError, step: str, rollback_dirs: set[str]) -> None:
        """Remove every file of this unit from tmp/ and new/; note dirs that need an fsync."""
        self.error = StorageError.from_oserror(exc, step)
        for f in self.files:
            if f.state:
                # unlink new first: a crash between the two leaves at most a tmp/ leftover
                if _unlink_quiet(f.path_new):
                    rollback_dirs.add(f.newdir)
            _unlink_quiet(f.path_tmp)
        log.error(
            "maildir_delivery_failed",
            step=step,
            errno=exc.errno,
            error=str(exc),
            code=self.error.code,
            recipients=len(self.deliveries),
        )


def _write_unit(unit: _Unit, maildirs: MaildirCache, stats: StoreStats) -> None:
    """Put every file of ``unit`` into its ``tmp/``, fsynced; hard-link identical copies."""
    sources: list[tuple[Delivery, int | None, str]] = []  # written files a link may reuse
    for d in unit.deliveries:
        md = maildirs.get(d.root, d.mailbox)
        name = unique_name(d.size)
        f = _File(os.path.join(md.tmp, name), os.path.join(md.new, name), md.new)
        src = next(
            (
                path
                for sd, dev, path in sources
                if dev == md.dev and sd.prefix == d.prefix and (sd.message is d.message or sd.message == d.message)
            ),
            None,
        )
        if src is not None:
            try:
                # The source inode is already fsynced; the new name becomes durable with the
                # fsync of the new/ it is renamed into, like any other file.
                os.link(src, f.path_tmp)
            except OSError as exc:
                if exc.errno not in _LINK_FALLBACK:
                    raise
            else:
                unit.files.append(f)
                stats.files_linked += 1
                continue
        try:
            write_file(f.path_tmp, d.prefix, d.message)
        except FileNotFoundError:
            md.ensure()  # the Maildir was removed behind our back since we cached it
            write_file(f.path_tmp, d.prefix, d.message)
        unit.files.append(f)
        stats.files_written += 1
        stats.file_fsyncs += 1
        sources.append((d, md.dev, f.path_tmp))


def commit_batch(
    batch: Sequence[Sequence[Delivery]],
    maildirs: MaildirCache | None = None,
    stats: StoreStats | None = None,
) -> list[list[Path] | StorageError]:
    """Durably deliver each unit of ``batch``; one result per unit, in order.

    A unit is the list of files of one message (one per recipient): all of them end up in
    their ``new/``, or none does. Units fail independently. Steps: write+fsync every file into
    ``tmp/``, rename every file into ``new/``, fsync each distinct ``new/`` once. A unit whose
    step fails is rolled back: its tmp files and already renamed files are unlinked, and the
    directories it was visible in are fsynced again (best effort: if that unlink is lost in a
    crash, the unacknowledged message reappears and the client's retry duplicates it, which
    A.5 accepts; losing acknowledged mail it does not).
    """
    maildirs = maildirs if maildirs is not None else MaildirCache()
    local = StoreStats(batches=1, deliveries=len(batch), largest_batch=len(batch))
    units = [_Unit(ds) for ds in batch]
    rollback_dirs: set[str] = set()

    for unit in units:
        try:
            _write_unit(unit, maildirs, local)
        except OSError as exc:
            unit.fail(exc, "write", rollback_dirs)

    for unit in units:
        if unit.error is None:
            try:
                for f in unit.files:
                    f.state = 1
                    os.rename(f.path_tmp, f.path_new)
            except OSError as exc:
                unit.fail(exc, "rename", rollback_dirs)

    by_dir: dict[str, list[_Unit]] = {}
    for unit in units:
        if unit.error is None:
            for f in unit.files:
                users = by_dir.setdefault(f.newdir, [])
                if not users or users[-1] is not unit:
                    users.append(unit)
    for newdir, users in by_dir.items():
        try:
            fsync_dir(newdir)
            local.dir_fsyncs += 1
        except OSError as exc:
            # Final for everyone in this directory: no retrying fsync and reporting success.
            for unit in users:
                if unit.error is None:
                    unit.fail(exc, "fsync_dir", rollback_dirs)

    for newdir in rollback_dirs:
        try:
            fsync_dir(newdir)
        except OSError:
            pass

    local.failed = sum(1 for u in units if u.error is not None)
    if stats is not None:
        stats.add(local)
    return [u.error if u.error is not None else [Path(f.path_new) for f in u.files] for u in units]


def deliver_sync(deliveries: Sequence[Delivery], maildirs: MaildirCache | None = None) -> list[Path]:
    """Deliver one message durably in the calling thread (e.g. a ``sendmail`` CLI).

    Same guarantees as :meth:`MaildirStore.deliver`; raises :class:`StorageError`.
    """
    if not deliveries:
        return []
    result = commit_batch([deliveries], maildirs)[0]
    if isinstance(result, StorageError):
        raise result
    return result


# ---------------------------------------------------------------------------------------------
# The writer thread(s)

_STOP = object()
_Item = tuple[Sequence[Delivery], asyncio.AbstractEventLoop, "asyncio.Future[list[Path]]"]


def _resolve(pairs: list[tuple[asyncio.Future[list[Path]], list[Path] | StorageError]]) -> None:
    """Runs in the event loop: hand results to the waiting ``deliver()`` calls."""
    for fut, result in pairs:
        if fut.done():  # cancelled meanwhile
            continue
        if isinstance(result, StorageError):
            fut.set_exception(result)
        else:
            fut.set_result(result)


class MaildirStore:
    """Async front end: ``await store.deliver([...])`` resolves when the files are durable.

    ``writers`` threads (default one, the setup measured in performance-notes.md) each take
    whatever is queued when they become free, up to ``max_batch`` deliveries, and commit it
    with :func:`commit_batch`. More than one writer lets flushes overlap on a slow disk.
    Safe to call from several event loops; results go back to the loop that asked.

    Cancelling a ``deliver()`` before a writer picked it up skips it; after that the write
    completes, unacknowledged (a possible duplicate, never a loss).
    """

    def __init__(self, *, writers: int = 1, max_batch: int = 256) -> None:
        if writers < 1 or max_batch < 1:
            raise ValueError("writers and max_batch must be at least 1")
        self.stats = StoreStats()
        self._max_batch = max_batch
        self._maildirs = MaildirCache()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stats_lock = threading.Lock()
        self._state_lock = threading.Lock()  # closed-check + put vs close + stop markers
        self._closed = False
        self._threads = [
            # daemon: a forgotten close() must not hang interpreter exit. Unfinished work then
            # was never acknowledged, which is safe.
            threading.Thread(target=self._run, name=f"maildir-writer-{i}", daemon=True)
            for i in range(writers)
        ]
        for t in self._threads:
            t.start()

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[Path]:
        """Deliver one message to every entry of ``deliveries`` as one unit.

        Returns the paths in ``new/``, in order, once all are durable. Raises
        :class:`StorageError` (452 4.3.1 / 451 4.3.0) if any failed; then none was delivered.
        """
        if not deliveries:
            return []
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Path]] = loop.create_future()
        with self._state_lock:
            if self._closed:
                raise StorageError.local_error(step="closed", detail="store is shut down")
            self._queue.put((deliveries, loop, fut))
        return await fut

    def close(self) -> None:
        """Stop accepting work, finish everything queued, and join the writers (blocking)."""
        with self._state_lock:
            if not self._closed:
                self._closed = True
                for _ in self._threads:
                    self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop; pending deliveries still resolve."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> MaildirStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- writer side -------------------------------------------------------------------------

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            item = get()
            if item is _STOP:
                return
            batch: list[_Item] = [item]
            stop = False
            # Take what is queued *now*; never wait for more (single-client latency).
            while len(batch) < self._max_batch:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:  # leave further stop markers to the other writers
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Item]) -> None:
        # fut.cancelled() read from this thread is racy but only errs towards writing.
        live = [it for it in batch if not it[2].cancelled()]
        if not live:
            return
        local = StoreStats()
        try:
            results = commit_batch([it[0] for it in live], self._maildirs, local)
        except BaseException as exc:  # a bug must not leave callers waiting forever
            log.exception("maildir_batch_crashed")
            err = StorageError.local_error(step="batch", detail=repr(exc))
            results = [err] * len(live)
        with self._stats_lock:
            self.stats.add(local)
        per_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for (_, loop, fut), result in zip(live, results, strict=True):
            per_loop.setdefault(loop, []).append((fut, result))
        for loop, pairs in per_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, pairs)
            except RuntimeError:  # loop closed: nobody is waiting any more
                pass
