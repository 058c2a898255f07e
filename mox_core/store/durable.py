"""Durable, all-or-nothing local delivery into Maildirs, with group commit.

Why group commit: a durable delivery costs flushes. Each file needs its own fsync, but the
fsync of the ``new/`` directory it is renamed into can be shared: rename everything that is
ready, then fsync each distinct ``new/`` once. File writes and their fsyncs run in a few
threads in parallel (as ``asyncio.to_thread`` would run them); the rename + directory fsync
step is done by one thread at a time for everything written so far. Nothing ever waits for a
batch to fill: with one client each batch holds one delivery and the cost is that of a plain
``asyncio.to_thread(write + fsync + rename + dir fsync)``.

The durability rule: a caller's future resolves only after its own files were fsynced,
renamed, and every ``new/`` directory they were renamed into was fsynced. Only then may the
SMTP server answer 250. On any error the caller gets a :class:`StorageError` and none of its
files remains in any ``new/``.

A crash after a file's rename but before its directory fsync may leave the message on disk
without a 250 having been sent; the client retries and the duplicate is accepted: a duplicate
is acceptable, losing acknowledged mail is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import structlog

from mox_core.store.maildir import (
    INBOX,
    Maildir,
    StorageError,
    fsync_dir,
    mailbox_dir,
    unique_name,
    unlink_quiet,
    write_file,
)

__all__ = ["Delivery", "MaildirCache", "MaildirStore", "StoreStats", "commit_batch", "deliver_sync"]

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
        """Merge a thread's local counters (kept lock-free while it works) into these."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.largest_batch = max(self.largest_batch, other.largest_batch)


_SUMMED = tuple(f.name for f in fields(StoreStats) if f.name != "largest_batch")


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

    def fail(self, exc: BaseException, step: str, rollback_dirs: set[str]) -> None:
        """Remove every file of this unit from tmp/ and new/; note dirs that need an fsync.

        Non-OSErrors are bugs; they still become a 451 so that no caller waits forever.
        """
        if isinstance(exc, OSError):
            self.error = StorageError.from_oserror(exc, step)
            log.error(
                "maildir_delivery_failed", step=step, errno=exc.errno, error=str(exc), code=self.error.code
            )
        else:
            self.error = StorageError.local_error(step=step, detail=repr(exc))
            log.error("maildir_delivery_crashed", step=step, exc_info=exc)
        self.discard(rollback_dirs)

    def discard(self, rollback_dirs: set[str]) -> None:
        """Unlink this unit's files wherever they are; add the ``new/`` dirs that changed."""
        for f in self.files:
            # unlink new first: a crash between the two leaves at most a tmp/ leftover
            if f.state and unlink_quiet(f.path_new):
                rollback_dirs.add(f.newdir)
            unlink_quiet(f.path_tmp)

    def result(self) -> list[Path] | StorageError:
        return self.error if self.error is not None else [Path(f.path_new) for f in self.files]


def _same_content(a: Delivery, b: Delivery) -> bool:
    return a.prefix == b.prefix and (a.message is b.message or a.message == b.message)


def _write_unit(unit: _Unit, maildirs: MaildirCache, stats: StoreStats) -> None:
    """Put every file of ``unit`` into its ``tmp/``, fsynced; hard-link identical copies."""
    sources: list[tuple[Delivery, tuple[int | None, tuple[int, int] | None], str]] = []  # files a link may reuse
    for d in unit.deliveries:
        md = maildirs.get(d.root, d.mailbox)
        name = unique_name(d.size)
        f = _File(os.path.join(md.tmp, name), os.path.join(md.new, name), md.new)
        place = (md.dev, md.owner)  # a link shares its inode's owner too
        src = next((path for sd, at, path in sources if at == place and _same_content(sd, d)), None)
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
            write_file(f.path_tmp, d.prefix, d.message, md.owner)
        except FileNotFoundError:
            md.ensure()  # the Maildir was removed behind our back since we cached it
            write_file(f.path_tmp, d.prefix, d.message, md.owner)
        unit.files.append(f)
        stats.files_written += 1
        stats.file_fsyncs += 1
        sources.append((d, (md.dev, md.owner), f.path_tmp))


def write_units(units: Sequence[_Unit], maildirs: MaildirCache, stats: StoreStats) -> None:
    """Stage 1: every file of every unit written and fsynced in ``tmp/``. Failures roll back."""
    for unit in units:
        try:
            _write_unit(unit, maildirs, stats)
        except Exception as exc:
            unit.fail(exc, "write", set())


def publish_units(units: Sequence[_Unit], stats: StoreStats) -> None:
    """Stage 2 (the group commit): rename all files of ``units`` into ``new/``, then fsync
    each distinct ``new/`` once. Units already failed are skipped; units fail independently.

    A unit whose step fails is rolled back: its tmp files and already renamed files are
    unlinked, and the directories it was visible in are fsynced again (best effort: if that
    unlink is lost in a crash, the unacknowledged message reappears and the client's retry
    duplicates it, which is acceptable; losing acknowledged mail is not).
    """
    live = [u for u in units if u.error is None]
    stats.batches += 1
    stats.largest_batch = max(stats.largest_batch, len(live))
    rollback_dirs: set[str] = set()

    for unit in live:
        try:
            for f in unit.files:
                f.state = 1
                os.rename(f.path_tmp, f.path_new)
        except OSError as exc:
            unit.fail(exc, "rename", rollback_dirs)

    by_dir: dict[str, list[_Unit]] = {}
    for unit in live:
        if unit.error is None:
            for f in unit.files:
                users = by_dir.setdefault(f.newdir, [])
                if not users or users[-1] is not unit:
                    users.append(unit)
    for newdir, users in by_dir.items():
        try:
            fsync_dir(newdir)
            stats.dir_fsyncs += 1
        except OSError as exc:
            # Final for everyone in this directory: no retrying fsync and reporting success.
            for unit in users:
                if unit.error is None:
                    unit.fail(exc, "fsync_dir", rollback_dirs)

    for newdir in rollback_dirs:
        with contextlib.suppress(OSError):
            fsync_dir(newdir)


def commit_batch(
    batch: Sequence[Sequence[Delivery]],
    maildirs: MaildirCache | None = None,
    stats: StoreStats | None = None,
) -> list[list[Path] | StorageError]:
    """Durably deliver each unit of ``batch`` in the calling thread; one result per unit.

    A unit is the list of files of one message (one per recipient): all of them end up in
    their ``new/``, or none does. Units fail independently.
    """
    maildirs = maildirs if maildirs is not None else MaildirCache()
    local = StoreStats(deliveries=len(batch))
    units = [_Unit(ds) for ds in batch]
    write_units(units, maildirs, local)
    publish_units(units, local)
    local.failed = sum(1 for u in units if u.error is not None)
    if stats is not None:
        stats.add(local)
    return [u.result() for u in units]


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
# The writer threads

_STOP = object()


class _Job:
    """One ``deliver()`` call in flight: its unit, and the future to resolve in its loop."""

    __slots__ = ("fut", "loop", "unit")

    def __init__(self, unit: _Unit, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[list[Path]]) -> None:
        self.unit = unit
        self.loop = loop
        self.fut = fut


def _resolve_in_loop(pairs: list[tuple[asyncio.Future[list[Path]], list[Path] | StorageError]]) -> None:
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

    Two stages, so that the expensive part runs in parallel and the cheap part is shared:

    1. ``writers`` threads take deliveries from a queue, one at a time, and write and fsync
       their files into ``tmp/``. A thread keeps taking what is queued *now* (never waiting
       for more, up to ``max_batch``) before it goes on, so even one thread forms batches.
       File fsyncs of different threads overlap, as they would with ``asyncio.to_thread``.
    2. Group commit: the thread that finds no commit running becomes the committer. It takes
       everything written so far by all threads, renames it into ``new/``, fsyncs each
       distinct ``new/`` once, and resolves those futures; then it looks again, until nothing
       is left. Deliveries written meanwhile wait for that commit and join the next one.

    With one client a delivery passes both stages in the same thread, for the cost of one
    ``asyncio.to_thread(write + fsync + rename + dir fsync)``. Safe to call from several event
    loops; results go back to the loop that asked.

    Cancelling ``deliver()`` before its files are renamed discards them; after that the
    message is in ``new/`` unacknowledged (a possible duplicate, never a loss).
    """

    def __init__(self, *, writers: int = 4, max_batch: int = 64) -> None:
        if writers < 1 or max_batch < 1:
            raise ValueError("writers and max_batch must be at least 1")
        self.stats = StoreStats()
        self._max_batch = max_batch
        self._maildirs = MaildirCache()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # stats, pending, committing
        self._pending: list[_Job] = []  # written, waiting for a commit
        self._committing = False
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
            self._queue.put(_Job(_Unit(deliveries), loop, fut))
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
            written: list[_Job] = []
            stop = False
            while True:
                if item is _STOP:  # one marker per thread: leave the others' markers alone
                    stop = True
                    break
                job: _Job = item
                if not job.fut.cancelled():  # racy read, but it only errs towards writing
                    self._write(job)
                    if job.unit.error is None:
                        written.append(job)
                if len(written) >= self._max_batch:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            if written:
                self._publish(written)
            if stop:
                return

    def _write(self, job: _Job) -> None:
        local = StoreStats()
        write_units([job.unit], self._maildirs, local)
        with self._lock:
            self.stats.add(local)
        if job.unit.error is not None:
            self._resolve([job])  # no reason to make a failure wait for a commit

    def _publish(self, jobs: list[_Job]) -> None:
        """Hand written jobs to the committer, becoming it if none is running."""
        with self._lock:
            self._pending.extend(jobs)
            if self._committing:
                return  # the running committer looks again before it stops
            self._committing = True
        while True:
            with self._lock:
                batch = self._pending
                if not batch:
                    self._committing = False
                    return
                self._pending = []
            self._commit(batch)

    def _commit(self, batch: list[_Job]) -> None:
        live: list[_Job] = []
        for job in batch:
            if job.fut.cancelled():
                job.unit.discard(set())  # never acknowledged: do not make it visible
            else:
                live.append(job)
        if not live:
            return
        local = StoreStats()
        try:
            publish_units([j.unit for j in live], local)
        except Exception as exc:  # a bug must not leave callers waiting or files in new/
            rollback: set[str] = set()
            for job in live:
                if job.unit.error is None:
                    job.unit.fail(exc, "commit", rollback)
        with self._lock:
            self.stats.add(local)
        self._resolve(live)

    def _resolve(self, jobs: list[_Job]) -> None:
        local = StoreStats(deliveries=len(jobs))
        per_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for job in jobs:
            result = job.unit.result()
            if isinstance(result, StorageError):
                local.failed += 1
            per_loop.setdefault(job.loop, []).append((job.fut, result))
        with self._lock:
            self.stats.add(local)
        for loop, pairs in per_loop.items():
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve_in_loop, pairs)
