"""Maildir delivery: layout, durability order, failure rollback, group commit, crash safety."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mox_core.store import (
    Delivery,
    Maildir,
    MaildirStore,
    StorageError,
    deliver_sync,
    mailbox_dir,
    unique_name,
)
from mox_core.store.maildir import (
    CODE_INSUFFICIENT_STORAGE,
    CODE_LOCAL_ERROR,
    ENHANCED_INSUFFICIENT_STORAGE,
    ENHANCED_LOCAL_ERROR,
)

MSG = b"From: a@ext.test\r\nTo: u@local.test\r\nSubject: t\r\n\r\nhello\r\n.dot line\r\n"
NAME_RE = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.[^/:,]+,S=(\d+)$")

_real_fsync = os.fsync
_real_rename = os.rename
_real_open = os.open


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def is_dir_fd(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def listing(md: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(md / sub)) for sub in ("tmp", "new", "cur")}


def ready(root: Path, mailbox: str = "Inbox") -> Maildir:
    """Create the Maildir before a fault is injected, so creation fsyncs are not the target."""
    md = Maildir.for_mailbox(root, mailbox)
    md.ensure()
    return md


class TimedStore(MaildirStore):
    """A lost wake-up must fail the test, not hang the run."""

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[Path]:
        async with asyncio.timeout(10):
            return await super().deliver(deliveries)


@pytest.fixture
async def store() -> Any:
    s = TimedStore()
    yield s
    await s.aclose()


class WriterGate:
    """Blocks the next file fsync (``kind="file"``) or ``new/`` fsync (``kind="dir"``) of the
    store's threads until released: a busy writer or committer, to shape batches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._armed = True

        def fsync(fd: int) -> None:
            if (
                self._armed
                and threading.current_thread().name.startswith("maildir-writer")
                and is_dir_fd(fd) == (kind == "dir")
            ):
                self._armed = False
                self.entered.set()
                self.release.wait(10)
            _real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


@pytest.fixture
def commit_gate(monkeypatch: pytest.MonkeyPatch) -> WriterGate:
    return WriterGate(monkeypatch, "dir")


@pytest.fixture
def write_gate(monkeypatch: pytest.MonkeyPatch) -> WriterGate:
    return WriterGate(monkeypatch, "file")


async def settle(*aws: Any) -> list[Any]:
    """Await with a deadline: a lost wake-up must fail the test, not hang it."""
    return await asyncio.wait_for(asyncio.gather(*aws), 10)


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def enqueue(store: MaildirStore, deliveries: list[Delivery]) -> asyncio.Task[list[Path]]:
    """Start a deliver() and let it reach the queue."""
    task = asyncio.create_task(store.deliver(deliveries))
    await asyncio.sleep(0)
    return task


# ---------------------------------------------------------------------------------------------
# Layout, names, content


async def test_layout_and_content_byte_exact(tmp_path: Path, store: MaildirStore) -> None:
    root = tmp_path / "u"
    prefix = b"Delivered-To: u@local.test\r\nReturn-Path: <a@ext.test>\r\n"
    [path] = await store.deliver([Delivery(root, MSG, prefix=prefix)])
    assert path.parent == root / "new"
    assert path.read_bytes() == prefix + MSG
    m = NAME_RE.match(path.name)
    assert m, path.name
    assert int(m.group(5)) == len(prefix) + len(MSG) == path.stat().st_size
    assert int(m.group(3)) == os.getpid()
    assert listing(root) == {"tmp": [], "new": [path.name], "cur": []}
    for sub in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE((root / sub).stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_creating_maildir_fsyncs_each_parent(
    tmp_path: Path, store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fsync(fd: int) -> None:
        calls.append(("dir:" if is_dir_fd(fd) else "file:") + fd_path(fd))
        _real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "a" / "b"
    await store.deliver([Delivery(root, MSG)])
    first_file = next(i for i, c in enumerate(calls) if c.startswith("file:"))
    created = calls[:first_file]
    # a created in tmp_path, b in a, tmp/new/cur in b: each parent fsynced before any write
    for parent in (tmp_path, tmp_path / "a", root):
        assert f"dir:{parent}" in created
    assert calls[-1] == f"dir:{root / 'new'}"


def test_mailbox_names() -> None:
    assert mailbox_dir("/m/u") == Path("/m/u")
    assert mailbox_dir("/m/u", "INBOX") == Path("/m/u")
    assert mailbox_dir("/m/u", "inbox") == Path("/m/u")
    assert mailbox_dir("/m/u", "Archive") == Path("/m/u/.Archive")
    assert mailbox_dir("/m/u", "Archive/2024") == Path("/m/u/.Archive.2024")
    for bad in ("a.b", "../x", "/x", "x/", "a//b", "", "a\0b"):
        with pytest.raises(ValueError):
            mailbox_dir("/m/u", bad)
        with pytest.raises(ValueError):
            Delivery("/m/u", MSG, mailbox=bad)


async def test_subfolder_delivery(tmp_path: Path, store: MaildirStore) -> None:
    root = tmp_path / "u"
    [path] = await store.deliver([Delivery(root, MSG, mailbox="Lists/dev")])
    folder = root / ".Lists.dev"
    assert path.parent == folder / "new"
    assert (folder / "maildirfolder").is_file()
    assert listing(root) == {"tmp": [], "new": [], "cur": []}  # the account Maildir exists too
    assert path.read_bytes() == MSG


def test_unique_names() -> None:
    names = {unique_name(10) for _ in range(20000)}
    assert len(names) == 20000
    assert all(NAME_RE.match(n) for n in names)
    assert "," not in unique_name() and "/" not in unique_name()


def test_storage_error_replies() -> None:
    e = StorageError.from_oserror(OSError(errno.ENOSPC, "No space left on device"), "write")
    assert (e.code, e.enhanced_code, e.text) == (452, "4.3.1", "insufficient system storage")
    assert e.reply == "452 4.3.1 insufficient system storage"
    assert StorageError.from_oserror(OSError(errno.EDQUOT, "quota")).code == 452
    e = StorageError.from_oserror(OSError(errno.EIO, "I/O error"))
    assert e.reply == "451 4.3.0 local error in processing"
    assert not e.permanent and e.errno == errno.EIO


# ---------------------------------------------------------------------------------------------
# Ordering: nothing resolves before its file fsync, rename and directory fsync


async def test_dir_fsync_happens_before_future_resolves(
    tmp_path: Path, store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "u"
    ready(root)
    events: list[tuple[str, ...]] = []
    holder: dict[str, asyncio.Task[list[Path]]] = {}

    def fsync(fd: int) -> None:
        if is_dir_fd(fd):
            time.sleep(0.05)  # a premature resolution would surely show up meanwhile
            _real_fsync(fd)
            events.append(("dir_fsync", fd_path(fd), str(holder["task"].done())))
        else:
            _real_fsync(fd)
            events.append(("file_fsync", fd_path(fd)))

    def rename(src: str, dst: str) -> None:
        _real_rename(src, dst)
        events.append(("rename", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    holder["task"] = asyncio.create_task(store.deliver([Delivery(root, MSG)]))
    [path] = await holder["task"]
    events.append(("returned",))

    tmp_file = str(root / "tmp" / path.name)
    assert events == [
        ("file_fsync", tmp_file),
        ("rename", tmp_file, str(path)),
        ("dir_fsync", str(root / "new"), "False"),
        ("returned",),
    ]


# ---------------------------------------------------------------------------------------------
# Group commit


async def test_200_concurrent_deliveries_land_in_batches(tmp_path: Path, store: MaildirStore) -> None:
    roots = [tmp_path / f"u{i % 4}" for i in range(200)]
    bodies = [MSG + b"n=%d\r\n" % i for i in range(200)]
    results = await settle(
        *(
            store.deliver([Delivery(r, b, prefix=b"X-N: %d\r\n" % i)])
            for i, (r, b) in enumerate(zip(roots, bodies, strict=True))
        )
    )
    for i, [path] in enumerate(results):
        assert path.parent == roots[i] / "new"
        assert path.read_bytes() == b"X-N: %d\r\n" % i + bodies[i]
    assert sum(len(listing(tmp_path / f"u{k}")["new"]) for k in range(4)) == 200
    assert all(listing(tmp_path / f"u{k}")["tmp"] == [] for k in range(4))
    st = store.stats
    assert st.deliveries == 200 and st.files_written == 200 and st.file_fsyncs == 200
    assert st.batches < 200 and st.largest_batch > 1
    assert st.dir_fsyncs <= 4 * st.batches and st.dir_fsyncs < 200


async def test_batch_takes_everything_written(
    tmp_path: Path, store: MaildirStore, commit_gate: WriterGate
) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    for r in roots:
        ready(r)
    first = await enqueue(store, [Delivery(roots[0], MSG)])
    await commit_gate.wait_entered()  # the committer is busy with the first batch
    rest = [await enqueue(store, [Delivery(roots[i % 2], MSG)]) for i in range(10)]
    await until(lambda: store.stats.file_fsyncs == 11)  # written meanwhile, by the other threads
    assert not any(t.done() for t in rest)
    commit_gate.release.set()
    await settle(first, *rest)
    st = store.stats
    assert (st.batches, st.largest_batch, st.deliveries) == (2, 10, 11)
    assert st.dir_fsyncs == 1 + 2  # once per distinct new/ per batch, not per file


async def test_one_writer_takes_everything_queued(tmp_path: Path, write_gate: WriterGate) -> None:
    store = TimedStore(writers=1)
    root = tmp_path / "u"
    ready(root)
    first = await enqueue(store, [Delivery(root, MSG)])
    await write_gate.wait_entered()  # the only writer is busy
    rest = [await enqueue(store, [Delivery(root, MSG)]) for i in range(10)]
    write_gate.release.set()
    await settle(first, *rest)
    await store.aclose()
    st = store.stats
    # it went on writing what had queued up, then committed all of it at once
    assert (st.batches, st.largest_batch, st.dir_fsyncs, st.file_fsyncs) == (1, 11, 1, 11)


async def test_single_client_does_not_wait_for_a_batch(tmp_path: Path, store: MaildirStore) -> None:
    root = tmp_path / "u"
    ready(root)
    for _ in range(20):
        t0 = time.monotonic()
        await store.deliver([Delivery(root, MSG)])
        assert time.monotonic() - t0 < 0.5
    assert store.stats.batches == 20
    assert len(listing(root)["new"]) == 20


async def test_units_in_one_batch_fail_independently(
    tmp_path: Path, store: MaildirStore, commit_gate: WriterGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    ready(good)
    ready(bad)

    def rename(src: str, dst: str) -> None:
        if str(dst).startswith(str(bad)):
            raise OSError(errno.EIO, "I/O error")
        _real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    first = await enqueue(store, [Delivery(good, MSG)])
    await commit_gate.wait_entered()
    t_good = await enqueue(store, [Delivery(good, MSG)])
    t_bad = await enqueue(store, [Delivery(bad, MSG)])
    await until(lambda: store.stats.file_fsyncs == 3)
    commit_gate.release.set()
    await settle(first)
    [[p]] = await settle(t_good)
    with pytest.raises(StorageError) as ei:
        await settle(t_bad)
    assert ei.value.code == CODE_LOCAL_ERROR
    assert store.stats.largest_batch == 2
    assert p.read_bytes() == MSG and len(listing(good)["new"]) == 2
    assert listing(bad) == {"tmp": [], "new": [], "cur": []}


async def test_close_drains_pending_work(tmp_path: Path, write_gate: WriterGate) -> None:
    store = TimedStore(writers=1, max_batch=8)
    root = tmp_path / "u"
    ready(root)
    tasks = [await enqueue(store, [Delivery(root, MSG + b"0\r\n")])]
    await write_gate.wait_entered()  # the rest stays queued behind the busy writer
    # 42, not a multiple of max_batch: the writer finds the stop marker behind the last two
    tasks += [await enqueue(store, [Delivery(root, MSG + b"%d\r\n" % i)]) for i in range(1, 42)]
    closing = asyncio.create_task(store.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done()
    write_gate.release.set()
    await asyncio.wait_for(closing, 10)
    paths = [p for [p] in await settle(*tasks)]
    assert [p.read_bytes() for p in paths] == [MSG + b"%d\r\n" % i for i in range(42)]
    assert store.stats.deliveries == 42 and store.stats.largest_batch == 8
    with pytest.raises(StorageError) as ei:
        await store.deliver([Delivery(root, MSG)])
    assert ei.value.code == CODE_LOCAL_ERROR


async def test_cancelled_before_pickup_is_not_written(tmp_path: Path, write_gate: WriterGate) -> None:
    store = TimedStore(writers=1)
    root = tmp_path / "u"
    ready(root)
    first = await enqueue(store, [Delivery(root, MSG)])
    await write_gate.wait_entered()
    doomed = await enqueue(store, [Delivery(root, MSG)])
    doomed.cancel()
    await asyncio.sleep(0)
    write_gate.release.set()
    [[p]] = await settle(first)
    await store.aclose()
    assert doomed.cancelled()
    assert store.stats.files_written == 1
    assert listing(root) == {"tmp": [], "new": [p.name], "cur": []}


async def test_cancelled_before_commit_is_discarded(
    tmp_path: Path, store: MaildirStore, commit_gate: WriterGate
) -> None:
    root = tmp_path / "u"
    ready(root)
    first = await enqueue(store, [Delivery(root, MSG)])
    await commit_gate.wait_entered()
    doomed = await enqueue(store, [Delivery(root, MSG)])
    await until(lambda: store.stats.file_fsyncs == 2)  # written, waiting for the commit
    doomed.cancel()
    await asyncio.sleep(0)
    commit_gate.release.set()
    [[p]] = await settle(first)
    await store.aclose()
    assert store.stats.batches == 1
    assert listing(root) == {"tmp": [], "new": [p.name], "cur": []}


# ---------------------------------------------------------------------------------------------
# Failure injection: the right reply, and nothing left in tmp/ or new/


def _fail_open(root: Path, err: int) -> Callable[..., int]:
    def fake(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if str(path).startswith(str(root / "tmp")):
            raise OSError(err, os.strerror(err))
        return _real_open(path, flags, *a, **kw)

    return fake


def _fail_writev(root: Path, err: int) -> Callable[..., int]:
    def fake(fd: int, bufs: Any) -> int:
        os.write(fd, bytes(bufs[0])[:3])  # something partial reaches the disk first
        raise OSError(err, os.strerror(err))

    return fake


def _fail_file_fsync(root: Path, err: int) -> Callable[[int], None]:
    def fake(fd: int) -> None:
        if not is_dir_fd(fd):
            raise OSError(err, os.strerror(err))
        _real_fsync(fd)

    return fake


def _fail_dir_fsync(root: Path, err: int) -> Callable[[int], None]:
    def fake(fd: int) -> None:
        if is_dir_fd(fd) and fd_path(fd) == str(root / "new"):
            raise OSError(err, os.strerror(err))
        _real_fsync(fd)

    return fake


def _fail_rename(root: Path, err: int) -> Callable[[str, str], None]:
    def fake(src: str, dst: str) -> None:
        raise OSError(err, os.strerror(err))

    return fake


FAULTS = {
    "open": ("open", _fail_open),
    "writev": ("writev", _fail_writev),
    "file_fsync": ("fsync", _fail_file_fsync),
    "rename": ("rename", _fail_rename),
    "dir_fsync": ("fsync", _fail_dir_fsync),
}
ERRNOS = [
    (errno.ENOSPC, CODE_INSUFFICIENT_STORAGE, ENHANCED_INSUFFICIENT_STORAGE),
    (errno.EDQUOT, CODE_INSUFFICIENT_STORAGE, ENHANCED_INSUFFICIENT_STORAGE),
    (errno.EIO, CODE_LOCAL_ERROR, ENHANCED_LOCAL_ERROR),
]


@pytest.mark.parametrize(("err", "code", "enhanced"), ERRNOS, ids=["ENOSPC", "EDQUOT", "EIO"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_fault_gives_reply_and_leaves_nothing(
    tmp_path: Path,
    store: MaildirStore,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    err: int,
    code: int,
    enhanced: str,
) -> None:
    root = tmp_path / "u"
    ready(root)
    attr, make = FAULTS[fault]
    monkeypatch.setattr(os, attr, make(root, err))
    with pytest.raises(StorageError) as ei:
        await store.deliver([Delivery(root, MSG, prefix=b"Delivered-To: u@local.test\r\n")])
    assert (ei.value.code, ei.value.enhanced_code) == (code, enhanced)
    assert ei.value.errno == err
    assert ei.value.step == {"rename": "rename", "dir_fsync": "fsync_dir"}.get(fault, "write")
    assert listing(root) == {"tmp": [], "new": [], "cur": []}
    assert store.stats.failed == 1

    monkeypatch.undo()  # space is back: the store keeps serving, no restart needed
    [p] = await store.deliver([Delivery(root, MSG)])
    assert p.read_bytes() == MSG


async def test_mkdir_failure_is_a_storage_error(
    tmp_path: Path, store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def mkdir(path: Any, mode: int = 0o777) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(StorageError) as ei:
        await store.deliver([Delivery(tmp_path / "u", MSG)])
    assert ei.value.code == CODE_INSUFFICIENT_STORAGE


async def test_short_writes_are_completed(
    tmp_path: Path, store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real_write(fd, bytes(bufs[0])[:5]))
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:4096]))
    body = MSG + os.urandom(100_000)
    prefix = b"Delivered-To: u@local.test\r\n"
    [p] = await store.deliver([Delivery(tmp_path / "u", body, prefix=prefix)])
    assert p.read_bytes() == prefix + body
    [p] = await store.deliver([Delivery(tmp_path / "u", body)])
    assert p.read_bytes() == body


# ---------------------------------------------------------------------------------------------
# One message, several recipients: all or nothing


def _three(tmp_path: Path, same: bool) -> list[Delivery]:
    roots = [tmp_path / n for n in ("a", "b", "c")]
    for r in roots:
        ready(r)
    return [
        Delivery(r, MSG, prefix=b"" if same else b"Delivered-To: %s@l\r\n" % r.name.encode()) for r in roots
    ]


@pytest.mark.parametrize("same", [True, False], ids=["links", "copies"])
async def test_multi_recipient_rename_failure_rolls_back_all(
    tmp_path: Path, store: MaildirStore, monkeypatch: pytest.MonkeyPatch, same: bool
) -> None:
    deliveries = _three(tmp_path, same)
    renamed: list[str] = []

    def rename(src: str, dst: str) -> None:
        if str(dst).startswith(str(tmp_path / "c")):
            raise OSError(errno.EIO, "I/O error")
        _real_rename(src, dst)
        renamed.append(str(dst))

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(StorageError) as ei:
        await store.deliver(deliveries)
    assert ei.value.code == CODE_LOCAL_ERROR
    assert len(renamed) == 2  # a and b were visible for a moment ...
    for name in "abc":  # ... and are gone again
        assert listing(tmp_path / name) == {"tmp": [], "new": [], "cur": []}


async def test_multi_recipient_dir_fsync_failure_rolls_back_all(
    tmp_path: Path, store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliveries = _three(tmp_path, same=False)
    dir_fsyncs: list[str] = []

    def fsync(fd: int) -> None:
        if is_dir_fd(fd):
            dir_fsyncs.append(fd_path(fd))
            if fd_path(fd) == str(tmp_path / "b" / "new"):
                raise OSError(errno.ENOSPC, "No space left on device")
        _real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError) as ei:
        await store.deliver(deliveries)
    assert ei.value.code == CODE_INSUFFICIENT_STORAGE
    for name in "abc":
        assert listing(tmp_path / name) == {"tmp": [], "new": [], "cur": []}
    # a/new was fsynced with the file in it, so it is fsynced again after the unlink
    assert dir_fsyncs.count(str(tmp_path / "a" / "new")) == 2


async def test_multi_recipient_success_links_identical_copies(tmp_path: Path, store: MaildirStore) -> None:
    paths = await store.deliver(_three(tmp_path, same=True))
    assert [p.parent.parent.name for p in paths] == ["a", "b", "c"]
    assert len({p.stat().st_ino for p in paths}) == 1 and paths[0].stat().st_nlink == 3
    assert all(p.read_bytes() == MSG for p in paths)
    assert (store.stats.files_written, store.stats.files_linked, store.stats.file_fsyncs) == (1, 2, 1)
    assert store.stats.dir_fsyncs == 3


async def test_multi_recipient_prefixes_are_copies(tmp_path: Path, store: MaildirStore) -> None:
    paths = await store.deliver(_three(tmp_path, same=False))
    assert len({p.stat().st_ino for p in paths}) == 3
    for p in paths:
        assert p.read_bytes() == b"Delivered-To: %s@l\r\n" % p.parent.parent.name.encode() + MSG


async def test_link_across_filesystems_falls_back_to_copy(
    tmp_path: Path, store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def link(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", link)
    paths = await store.deliver(_three(tmp_path, same=True))
    assert len({p.stat().st_ino for p in paths}) == 3
    assert all(p.read_bytes() == MSG for p in paths)
    assert store.stats.files_written == 3


def test_deliver_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [p] = deliver_sync([Delivery(tmp_path / "u", MSG)])
    assert p.read_bytes() == MSG
    monkeypatch.setattr(os, "fsync", _fail_file_fsync(tmp_path, errno.ENOSPC))
    with pytest.raises(StorageError) as ei:
        deliver_sync([Delivery(tmp_path / "u", MSG)])
    assert ei.value.code == 452
    assert listing(tmp_path / "u")["new"] == [p.name]


def test_clean_tmp(tmp_path: Path) -> None:
    md = ready(tmp_path / "u")
    old, fresh = Path(md.tmp) / "old", Path(md.tmp) / "fresh"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    past = time.time() - 37 * 3600
    os.utime(old, (past, past))
    assert md.clean_tmp() == 1
    assert sorted(os.listdir(md.tmp)) == ["fresh"]


# ---------------------------------------------------------------------------------------------
# Crash: SIGKILL while deliveries are in flight


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from mox_core.store import Delivery, MaildirStore

    root, body = sys.argv[1], bytes(range(256)) * 200

    async def client(store, i):
        while True:
            [path] = await store.deliver([Delivery(root, body, prefix=b"X-Client: %d\\r\\n" % i)])
            sys.stdout.write(f"{path}\\n")
            sys.stdout.flush()

    async def main():
        store = MaildirStore()
        await asyncio.gather(*(client(store, i) for i in range(8)))

    asyncio.run(main())
    """
)


def _read_lines(stream: Any, n: int) -> Iterator[str]:
    for _ in range(n):
        line = stream.readline()
        if not line:
            return
        yield line.rstrip("\n")


def test_sigkill_keeps_every_acknowledged_delivery(tmp_path: Path) -> None:
    root = tmp_path / "u"
    body = bytes(range(256)) * 200
    valid = {b"X-Client: %d\r\n" % i + body for i in range(8)}
    cmd = [sys.executable, "-c", CHILD, str(root)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        try:
            acked = list(_read_lines(child.stdout, 300))
            assert len(acked) == 300, "child stopped early"
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            acked += child.stdout.read().splitlines()  # acknowledged before the kill landed
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == -signal.SIGKILL
    for line in acked:
        p = Path(line)
        assert p.parent == root / "new"
        assert p.read_bytes() in valid
    # whatever is in new/, acknowledged or not, is complete; partial files only ever in tmp/
    in_new = os.listdir(root / "new")
    assert len(in_new) >= len(acked)
    for name in in_new:
        assert (root / "new" / name).read_bytes() in valid
