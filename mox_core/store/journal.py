"""Local delivery through a journal: the 250 after one flush, the Maildir files right after.

Why (bench/RESULTS.md): delivering a message durably into a Maildir puts two flushes and a
file creation on the way to the 250 (create in ``tmp/``, write, fsync, rename into ``new/``,
fsync ``new/``), and creating a file is the slowest and most variable step on ext4 (up to a
millisecond of kernel CPU per create after many deletions). Postfix answers after one flush of
its queue file and delivers later. :class:`JournaledStore` does the same with an append-only
journal per process: ``deliver()`` appends the message and its deliveries, each with the
Maildir file name chosen now, to the current segment file and ``fdatasync``s it (group
commit: whatever was appended meanwhile shares the flush). Then the 250 may go out
(reliability.md A.5: written, flushed, recognisable when incomplete), and the
:class:`MaildirStore` writes the Maildir files durably in its threads, after which a done mark
for the record is appended to the segment. A message shows in ``new/`` a few milliseconds
after its 250.

Segment files ``<dir>/<seq>.seg`` (seq: 16 hex digits, increasing). Records, back to back::

    b"MXJ1" | header length u32 | data length u32 | crc32(header + data) u32 | header | data

``header`` is JSON: ``{"seg": seq, "d": [[root, mailbox, name, prefix], ...]}`` for a message
(``prefix`` decoded as latin-1, which is lossless) or ``{"seg": seq, "done": [offset]}``
marking the record at that offset as written into its Maildirs. Replay (:meth:`open`) reads a
segment up to the first record that does not check out (the torn end of a batch that was
never acknowledged) and writes the files of every record without a done mark, skipping files
already in their ``new/`` or ``cur/``. A segment is removed once it is full (``segment_max``)
and all its records are done; a clean shutdown removes the last one too.

Crash windows, none losing mail: a complete record of a batch whose flush had not returned
was never acknowledged, yet may be delivered on replay (a duplicate of what the client sends
again). A record whose files were durable but whose done mark was not flushed yet (done marks
ride on the next commit's flush) is written again on replay only if its file is gone from
``new/`` and ``cur/``, i.e. the user moved or deleted it in between: a duplicate.

A Maildir write that fails after the 250 (disk full, permissions) is logged and retried with
back-off (``RETRY_DELAYS``); the record stays in the journal until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from mox_core.errors import MoxError
from mox_core.store.durable import Delivery, MaildirStore
from mox_core.store.maildir import StorageError, fsync_dir, mailbox_dir, mkdir_durable, unique_name, unlink_quiet

__all__ = ["JournalInUse", "JournaledStore", "read_segment", "undone_records"]

log = structlog.get_logger(component="store.journal")

MAGIC = b"MXJ1"
_FRAME = struct.Struct("<4sIII")  # magic, header length, data length, crc32(header + data)
SEGMENT_MAX = 8 * 1024 * 1024  # a new segment file after this many bytes
RETRY_DELAYS = (10.0, 60.0, 300.0)  # seconds before writing a record's files again; last repeats
_MAX_HEADER = 64 * 1024 * 1024  # a longer header length on replay is damage, not a record
_IOV_MAX = 1000  # buffers per writev (Linux allows 1024)


class JournalInUse(MoxError):
    """Another process holds this journal directory (a running ``mox serve``)."""


@dataclasses.dataclass
class ReadRecord:
    """A record read back from a segment file by :func:`read_segment`."""

    offset: int
    deliveries: list[Delivery]


def read_segment(path: str, seq: int) -> tuple[list[ReadRecord], set[int], int]:
    """Parse a segment file: its message records, the offsets marked done, and where the
    valid part ends (the first record that is short, damaged or of another segment)."""
    with open(path, "rb") as f:
        buf = f.read()
    records: list[ReadRecord] = []
    done: set[int] = set()
    pos, end = 0, len(buf)
    while pos + _FRAME.size <= end:
        magic, hlen, dlen, crc = _FRAME.unpack_from(buf, pos)
        start = pos + _FRAME.size
        stop = start + hlen + dlen
        if magic != MAGIC or hlen > _MAX_HEADER or stop > end:
            break
        header, data = buf[start : start + hlen], buf[start + hlen : stop]
        if zlib.crc32(data, zlib.crc32(header)) != crc:
            break
        try:
            head = json.loads(header)
            if head.get("seg") != seq:
                break
            if "done" in head:
                done.update(int(o) for o in head["done"])
            else:
                records.append(ReadRecord(pos, [
                    Delivery(root, data, prefix.encode("latin-1"), mailbox, name)
                    for root, mailbox, name, prefix in head["d"]
                ]))
        except (ValueError, TypeError, KeyError, AttributeError):
            break
        pos = stop
    return records, done, pos


def undone_records(top: str | os.PathLike[str]) -> int:
    """How many records in the journals under ``top`` (``data_dir/journal``) are not yet
    written into their Maildirs (for tests and tools: a running server's segments change)."""
    count = 0
    for seg in Path(top).glob("*/*.seg"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            records, done, _ = read_segment(str(seg), int(seg.stem, 16))
            count += sum(1 for r in records if r.offset not in done)
    return count


class _Segment:
    __slots__ = ("broken", "closed", "fd", "path", "pending", "seq", "size", "syncing")

    def __init__(self, seq: int, path: str, fd: int, size: int) -> None:
        self.seq = seq
        self.path = path
        self.fd = fd
        self.size = size  # bytes of valid records and marks; where the next append goes
        self.pending = 0  # records not done yet
        self.closed = False  # no more records (full, or from before this start)
        self.broken = False  # a write or flush failed: nothing more is appended, not even marks
        self.syncing = False  # the journal thread is flushing it: its file stays open


class _Record:
    __slots__ = ("attempts", "deliveries", "offset", "segment")

    def __init__(self, segment: _Segment, offset: int, deliveries: list[Delivery]) -> None:
        self.segment = segment
        self.offset = offset
        self.deliveries = deliveries
        self.attempts = 0


class _Item:
    """One ``deliver()`` call on its way through the journal thread."""

    __slots__ = ("deliveries", "error", "fut", "loop", "records")

    def __init__(self, deliveries: list[Delivery], loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]):
        self.deliveries = deliveries
        self.loop = loop
        self.fut = fut
        self.records: list[_Record] = []
        self.error: StorageError | None = None


def _resolve(pairs: list[tuple[asyncio.Future[None], StorageError | None]]) -> None:
    for fut, error in pairs:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _frame(header: dict[str, Any], data: bytes = b"") -> list[bytes]:
    head = json.dumps(header, separators=(",", ":")).encode()
    return [_FRAME.pack(MAGIC, len(head), len(data), zlib.crc32(data, zlib.crc32(head))), head, data]


def _groups(deliveries: list[Delivery]) -> list[list[Delivery]]:
    """Deliveries of the same message bytes share a record (the data is written once)."""
    groups: list[list[Delivery]] = []
    for d in deliveries:
        for g in groups:
            if g[0].message is d.message:
                g.append(d)
                break
        else:
            groups.append([d])
    return groups


def _writev_all(fd: int, bufs: list[bytes]) -> None:
    """Write every buffer, in order, however the kernel splits it; no progress is EIO."""
    i = 0
    while i < len(bufs):
        chunk = bufs[i : i + _IOV_MAX]
        want = sum(len(b) for b in chunk)
        n = os.writev(fd, chunk)
        if n < want:
            rest = b"".join(chunk)[n:]
            while rest:
                w = os.write(fd, rest)
                if w <= 0:
                    raise OSError(errno.EIO, "write made no progress")
                rest = rest[w:]
        i += _IOV_MAX


class JournaledStore:
    """``await store.deliver([...])`` returns once the message is in the journal, flushed.

    The same interface as :class:`MaildirStore` (which it uses for the Maildir files):
    ``deliver``, ``aclose``/``close``, ``stats``. :meth:`open` (blocking) must run first: it
    takes the directory's lock and writes what a crash left in the journal. ``adopt`` names
    journal directories of processes that no longer exist (e.g. fewer SMTP workers than at
    the last start): their records are written too, and they are locked while this store runs.
    """

    def __init__(self, directory: str | os.PathLike[str], *, maildir_store: MaildirStore | None = None,
                 segment_max: int = SEGMENT_MAX, lock_wait: float = 10.0) -> None:
        self.dir = os.fspath(directory)
        self.lock_wait = lock_wait
        self.maildir_store = maildir_store if maildir_store is not None else MaildirStore()
        self.segment_max = segment_max
        self._lock = threading.Lock()  # segments, appends to their files, counters
        self._idle = threading.Condition(self._lock)
        self._pending: list[_Item] = []
        self._flush_scheduled = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._current: _Segment | None = None
        self._segments: dict[str, _Segment] = {}  # by path: every segment with an open file
        self._next_seq = 1
        self._in_flight = 0  # records handed to the Maildir store, not yet back
        self._timers: set[threading.Timer] = set()
        self._lock_fds: list[int] = []
        self._opened = False
        self._closed = False  # no new deliveries (close() began)
        self._stopped = False  # no new Maildir writes (close() waits for those under way)
        self.replayed = 0  # records found undone at open()

    @property
    def stats(self) -> Any:
        return self.maildir_store.stats

    # -- start: lock, replay -------------------------------------------------------------

    def open(self, adopt: Sequence[str | os.PathLike[str]] = ()) -> int:
        """Lock the directory, write what a crash left undone, start the first segment.
        Returns the number of records replayed (their files are written in the background)."""
        todo: list[_Record] = []
        try:
            for d in [self.dir, *map(os.fspath, adopt)]:
                mkdir_durable(d)
                self._lock_dir(d)
                todo += self._load(d)
        except BaseException:
            for seg in self._segments.values():
                os.close(seg.fd)
            self._segments.clear()
            for fd in self._lock_fds:
                os.close(fd)
            self._lock_fds = []
            raise
        self._opened = True
        self._current = self._new_segment()
        self.replayed = len(todo)
        if todo:
            log.info("journal_replay", records=len(todo), directory=self.dir)
        for rec in todo:
            self._apply(rec)
        return len(todo)

    def _lock_dir(self, d: str) -> None:
        """Lock ``d``, waiting up to ``lock_wait`` seconds: the process of a previous start
        may still be exiting (a worker killed with its main process)."""
        fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise JournalInUse(f"journal {d} is in use by another process") from None
                time.sleep(0.05)
        self._lock_fds.append(fd)

    def _load(self, d: str) -> list[_Record]:
        """The undone records of the segments in ``d``; empty segments are removed."""
        todo: list[_Record] = []
        listed: dict[str, set[str]] = {}  # cur/ directories read, by path: names without flags
        for name in sorted(os.listdir(d)):
            if not name.endswith(".seg"):
                continue
            try:
                seq = int(name[:-4], 16)
            except ValueError:
                continue
            path = os.path.join(d, name)
            self._next_seq = max(self._next_seq, seq + 1)
            records, done, end = read_segment(path, seq)
            undone = [r for r in records if r.offset not in done]
            if not undone:
                os.unlink(path)
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            # marks go right after the last valid record, not after a torn tail
            os.ftruncate(fd, end)
            os.lseek(fd, end, os.SEEK_SET)
            seg = _Segment(seq, path, fd, end)
            seg.closed = True
            self._segments[path] = seg
            for r in undone:
                missing = [x for x in r.deliveries if not _present(x, listed)]
                rec = _Record(seg, r.offset, missing)
                seg.pending += 1
                todo.append(rec)
            log.info("journal_segment_loaded", path=path, records=len(records), undone=len(undone))
        return todo

    def _new_segment(self) -> _Segment:
        seq = self._next_seq
        self._next_seq += 1
        path = os.path.join(self.dir, f"{seq:016x}.seg")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fsync_dir(self.dir)  # findable after a crash before a record in it is acknowledged
        except OSError:
            os.close(fd)
            unlink_quiet(path)
            raise
        seg = self._segments[path] = _Segment(seq, path, fd, 0)
        return seg

    # -- deliver: the 250-after-DATA path ------------------------------------------------

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[Path]:
        """Journal one message for every entry of ``deliveries``; return the paths its files
        will have in ``new/`` once the journal is flushed. Raises :class:`StorageError`
        (452 4.3.1 / 451 4.3.0) if the journal could not be written; then nothing is kept."""
        if not deliveries:
            return []
        named = [d if d.name else dataclasses.replace(d, name=unique_name(d.size)) for d in deliveries]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._closed or not self._opened:
                raise StorageError.local_error(step="closed", detail="journal is not open")
            self._pending.append(_Item(named, loop, fut))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._executor.submit(self._flush)
        await fut
        return [mailbox_dir(d.root, d.mailbox) / "new" / d.name for d in named]  # type: ignore[operator]

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._flush_scheduled = False
        try:
            self._commit(batch)
        except BaseException as exc:  # a bug must not leave SMTP sessions waiting forever
            log.exception("journal_batch_crashed")
            for it in batch:
                if it.error is None:
                    it.error = StorageError.local_error(step="journal", detail=repr(exc))
        per_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for it in batch:
            per_loop.setdefault(it.loop, []).append((it.fut, it.error))
        for loop, pairs in per_loop.items():
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, pairs)
        for it in batch:
            if it.error is None:
                for rec in it.records:
                    self._apply(rec)
        if self._current is None and not self._closed:
            # the next segment, made now rather than on the next message's way to its 250
            try:
                self._current = self._new_segment()
            except OSError as exc:
                log.error("journal_segment_failed", error=str(exc))

    def _commit(self, batch: list[_Item]) -> None:
        for _ in range(2):  # a second try in a new segment if a failed done mark broke this one
            try:
                seg = self._current or self._new_segment()
            except OSError as exc:
                self._fail(batch, exc, "segment")
                return
            self._current = seg
            bufs: list[bytes] = []
            sizes: list[tuple[_Item, list[Delivery], int]] = []
            for it in batch:
                for group in _groups(it.deliveries):
                    frame = _frame({"seg": seg.seq, "d": [
                        [os.fspath(d.root), d.mailbox, d.name, d.prefix.decode("latin-1")] for d in group
                    ]}, group[0].message)
                    bufs += frame
                    sizes.append((it, group, sum(map(len, frame))))
            with self._lock:
                if seg.broken:
                    continue
                start = seg.size
                try:
                    _writev_all(seg.fd, bufs)
                except OSError as exc:
                    self._cut(seg, start)
                    self._fail(batch, exc, "write")
                    return
                offset = start
                for it, group, size in sizes:
                    it.records.append(_Record(seg, offset, group))
                    offset += size
                seg.size = offset
                seg.syncing = True
            try:
                os.fdatasync(seg.fd)
            except OSError as exc:
                # final for this segment (no retrying a failed flush); its acknowledged records
                # are still written into their Maildirs, but nothing more goes into the file
                with self._lock:
                    seg.syncing = False
                    seg.broken = seg.closed = True
                    if self._current is seg:
                        self._current = None
                    self._maybe_remove(seg)
                for it in batch:
                    it.records = []
                self._fail(batch, exc, "fdatasync")
                return
            with self._lock:
                seg.syncing = False
                seg.pending += sum(len(it.records) for it in batch)
                if seg.size >= self.segment_max and not seg.closed:
                    seg.closed = True
                    if self._current is seg:
                        self._current = None
            return
        self._fail(batch, OSError(errno.EIO, "journal segment failed"), "segment")

    def _cut(self, seg: _Segment, size: int) -> None:
        """After a failed write, cut the segment back to ``size`` (under the lock); if that
        fails too, append nothing more to it."""
        try:
            os.ftruncate(seg.fd, size)
            os.lseek(seg.fd, size, os.SEEK_SET)
        except OSError:
            seg.broken = seg.closed = True
            if self._current is seg:
                self._current = None
            self._maybe_remove(seg)

    def _fail(self, batch: list[_Item], exc: OSError, step: str) -> None:
        err = StorageError.from_oserror(exc, step)
        log.error("journal_write_failed", step=step, errno=exc.errno, error=str(exc), code=err.code,
                  messages=len(batch))
        for it in batch:
            it.error = err

    # -- after the 250: the Maildir files ------------------------------------------------

    def _apply(self, rec: _Record) -> None:
        if not rec.deliveries:  # all its files were there already (replay)
            self._done(rec)
            return
        with self._lock:
            if self._stopped:  # close() no longer waits: the record stays for the next start
                return
            self._in_flight += 1
        try:
            self.maildir_store.submit(rec.deliveries, lambda result: self._applied(rec, result))
        except StorageError:  # shutting down: the record stays for the next start
            with self._lock:
                self._in_flight -= 1
                self._idle.notify_all()

    def _applied(self, rec: _Record, result: Any) -> None:
        """In a Maildir writer thread, once the record's files are durable (or failed)."""
        if isinstance(result, StorageError):
            rec.attempts += 1
            delay = RETRY_DELAYS[min(rec.attempts, len(RETRY_DELAYS)) - 1]
            log.error("journal_delivery_failed", error=str(result), code=result.code, attempts=rec.attempts,
                      retry_in=delay, recipients=len(rec.deliveries))
            with self._lock:
                self._in_flight -= 1
                self._idle.notify_all()
                if self._closed:
                    return
                timer = threading.Timer(delay, self._retry, [rec])
                timer.daemon = True
                self._timers.add(timer)
            timer.start()
            return
        self._done(rec, in_flight=True)

    def _retry(self, rec: _Record) -> None:
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
            if self._closed:
                return
        self._apply(rec)

    def _done(self, rec: _Record, *, in_flight: bool = False) -> None:
        seg = rec.segment
        with self._lock:
            if in_flight:
                self._in_flight -= 1
            if not seg.broken:
                frame = _frame({"seg": seg.seq, "done": [rec.offset]})
                try:
                    _writev_all(seg.fd, frame)
                    seg.size += sum(map(len, frame))
                except OSError as exc:
                    log.error("journal_mark_failed", error=str(exc))
                    self._cut(seg, seg.size)
            seg.pending -= 1
            self._maybe_remove(seg)
            self._idle.notify_all()

    def _maybe_remove(self, seg: _Segment) -> None:
        """Under the lock: remove a closed segment whose records are all done."""
        if not (seg.closed and seg.pending == 0 and not seg.syncing and self._segments.get(seg.path) is seg):
            return
        del self._segments[seg.path]
        with contextlib.suppress(OSError):
            os.fdatasync(seg.fd)  # its marks, in case the unlink is lost in a crash
        os.close(seg.fd)
        unlink_quiet(seg.path)

    # -- stop ------------------------------------------------------------------------------

    def close(self) -> None:
        """Journal what was handed in, wait for the Maildir writes under way, close (blocking).

        Records still waiting for a retry stay in the journal for the next start."""
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, set()
        for t in timers:
            t.cancel()
        self._executor.shutdown(wait=True)  # journals and hands on what was handed in
        with self._lock:
            self._stopped = True
            while self._in_flight:
                self._idle.wait()
            if self._current is not None:
                self._current.closed = True
                self._maybe_remove(self._current)
                self._current = None
            for seg in list(self._segments.values()):  # undone records: kept for the next start
                with contextlib.suppress(OSError):
                    os.fdatasync(seg.fd)
                os.close(seg.fd)
            self._segments.clear()
        self.maildir_store.close()
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> JournaledStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _present(d: Delivery, listed: dict[str, set[str]]) -> bool:
    """Whether the file of ``d`` is in its ``new/`` or, read already, in ``cur/`` (named
    ``<name>:2,<flags>`` there). A partial copy in ``tmp/`` is removed: it is written again.
    ``listed`` keeps the ``cur/`` directories read so far (names without their flags)."""
    md = mailbox_dir(d.root, d.mailbox)
    name = d.name or ""
    if os.path.exists(md / "new" / name):
        return True
    cur = str(md / "cur")
    names = listed.get(cur)
    if names is None:
        try:
            names = {entry.partition(":")[0] for entry in os.listdir(cur)}
        except FileNotFoundError:
            names = set()
        listed[cur] = names
    if name in names:
        return True
    unlink_quiet(str(md / "tmp" / name))
    return False
