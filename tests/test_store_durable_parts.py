"""The parts of ``mox_core.store.durable`` that the delivery tests (tests/test_store_maildir.py)
reach only through timing: hard links for identical copies, the counters, the cache of
Maildirs, a commit that crashes, closing, and results for futures cancelled meanwhile."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from mox_core.store import durable
from mox_core.store.durable import Delivery, MaildirCache, MaildirStore, StoreStats, commit_batch, deliver_sync
from mox_core.store.maildir import StorageError

MSG = b"Subject: t\r\n\r\nhello\r\n"


def new_files(root: Path) -> list[Path]:
    return sorted((root / "new").iterdir()) if (root / "new").exists() else []


def test_identical_copies_are_hard_links_different_ones_are_not(tmp_path):
    stats = StoreStats()
    same_a, same_b = MSG, b"".join([b"Subject: t\r\n", b"\r\nhello\r\n"])  # equal, not the same object
    assert same_a == same_b and same_a is not same_b
    [paths] = commit_batch([[Delivery(tmp_path / "a", same_a), Delivery(tmp_path / "b", same_b),
                             Delivery(tmp_path / "c", same_a, prefix=b"X-To: c\r\n"),
                             Delivery(tmp_path / "d", b"other\r\n")]], stats=stats)
    assert [p.read_bytes() for p in paths] == [MSG, MSG, b"X-To: c\r\n" + MSG, b"other\r\n"]
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino
    assert len({os.stat(p).st_ino for p in paths}) == 3
    assert (stats.files_written, stats.files_linked, stats.file_fsyncs) == (3, 1, 3)


def test_commit_batch_counts(tmp_path):
    stats = StoreStats()
    (tmp_path / "blocked").write_text("a file where a Maildir should be")
    results = commit_batch([[Delivery(tmp_path / "a", MSG)], [Delivery(tmp_path / "blocked" / "x", MSG)],
                            [Delivery(tmp_path / "b", MSG), Delivery(tmp_path / "c", MSG)]], stats=stats)
    assert isinstance(results[1], StorageError) and results[1].step == "write"
    assert [len(r) for r in (results[0], results[2])] == [1, 2]
    assert (stats.batches, stats.deliveries, stats.failed, stats.largest_batch) == (1, 3, 1, 2)
    assert (stats.files_written, stats.dir_fsyncs) == (2, 3)
    commit_batch([[Delivery(tmp_path / "a", MSG)]], stats=stats)
    assert (stats.batches, stats.deliveries, stats.failed, stats.largest_batch) == (2, 4, 1, 2)


def test_stats_add():
    a = StoreStats(batches=1, deliveries=2, failed=3, files_written=4, files_linked=5, file_fsyncs=6,
                   dir_fsyncs=7, largest_batch=8)
    a.add(StoreStats(batches=10, deliveries=10, failed=10, files_written=10, files_linked=10, file_fsyncs=10,
                     dir_fsyncs=10, largest_batch=3))
    assert a == StoreStats(11, 12, 13, 14, 15, 16, 17, 8)
    a.add(StoreStats(largest_batch=9))
    assert a.largest_batch == 9


@pytest.fixture
def mkdirs(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = os.mkdir

    def spy(path, mode=0o777):
        seen.append(str(path))
        return real(path, mode)

    monkeypatch.setattr(os, "mkdir", spy)
    return seen


def test_a_given_cache_is_used_and_filled(tmp_path, mkdirs):
    cache = MaildirCache()
    commit_batch([[Delivery(tmp_path / "u", MSG)]], cache)
    assert mkdirs  # created
    mkdirs.clear()
    commit_batch([[Delivery(tmp_path / "u", MSG)]], cache)
    deliver_sync([Delivery(tmp_path / "u", MSG)], cache)
    assert mkdirs == []  # known: not even tried again
    commit_batch([[Delivery(tmp_path / "u", MSG)]])  # a cache of its own: tries (they exist)
    assert mkdirs
    assert len(new_files(tmp_path / "u")) == 4


def test_deliver_sync(tmp_path):
    assert deliver_sync([]) == []
    [p] = deliver_sync([Delivery(tmp_path / "u", MSG, prefix=b"Delivered-To: u\r\n")])
    assert p.parent == tmp_path / "u" / "new" and p.read_bytes() == b"Delivered-To: u\r\n" + MSG
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError) as exc:
        deliver_sync([Delivery(tmp_path / "f" / "u", MSG)])
    assert exc.value.code == 451 and exc.value.step == "write"


def test_store_refuses_bad_sizes():
    for kw in ({"writers": 0}, {"max_batch": 0}):
        with pytest.raises(ValueError, match="^writers and max_batch must be at least 1$"):
            MaildirStore(**kw)
    MaildirStore(writers=1, max_batch=1).close()  # one at a time is allowed


def test_store_defaults_four_writers_and_batches_of_64():
    store = MaildirStore()
    try:
        assert len(store._threads) == 4 and store._max_batch == 64
    finally:
        store.close()


def test_store_threads_and_close(monkeypatch):
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    store = MaildirStore(writers=3)
    names = sorted(t.name for t in threading.enumerate() if t.name.startswith("maildir-writer-"))
    assert names[-3:] == ["maildir-writer-0", "maildir-writer-1", "maildir-writer-2"]
    assert all(t.daemon for t in store._threads)
    store.close()
    store.close()  # twice: nothing more to do
    assert not any(t.is_alive() for t in store._threads) and errors == []


async def test_deliver_after_close(tmp_path):
    store = MaildirStore(writers=1)
    await store.aclose()
    with pytest.raises(StorageError) as exc:
        await store.deliver([Delivery(tmp_path / "u", MSG)])
    assert str(exc.value) == "451 4.3.0 local error in processing (closed: store is shut down)"
    assert await store.deliver([]) == []


async def test_a_crashing_commit_fails_its_deliveries_and_leaves_nothing(tmp_path, monkeypatch):
    def crash(units, stats):
        for u in units:  # as far as it got: renamed into new/
            for f in u.files:
                f.state = 1
                os.rename(f.path_tmp, f.path_new)
        raise RuntimeError("boom")

    monkeypatch.setattr(durable, "publish_units", crash)
    async with MaildirStore(writers=1) as store:
        with pytest.raises(StorageError) as exc:
            await asyncio.wait_for(store.deliver([Delivery(tmp_path / "u", MSG), Delivery(tmp_path / "v", MSG)]), 10)
        assert (exc.value.code, exc.value.step, exc.value.detail) == (451, "commit", "RuntimeError('boom')")
        assert store.stats.failed == 1
    for root in (tmp_path / "u", tmp_path / "v"):
        assert list((root / "new").iterdir()) == [] and list((root / "tmp").iterdir()) == []


async def test_results_skip_futures_already_done():
    loop = asyncio.get_running_loop()
    cancelled, waiting, failing = loop.create_future(), loop.create_future(), loop.create_future()
    cancelled.cancel()
    err = StorageError.local_error(step="x")
    durable._resolve_in_loop([(cancelled, [Path("/a")]), (waiting, [Path("/b")]), (failing, err)])
    assert waiting.result() == [Path("/b")]
    assert failing.exception() is err


def failing_fsync_of(directory: Path, err: int):
    """os.fsync failing with ``err`` for ``directory`` only."""
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) and os.readlink(f"/proc/self/fd/{fd}") == str(directory):
            raise OSError(err, os.strerror(err))
        real_fsync(fd)

    return fsync


def test_two_messages_in_one_new_dir_both_fail_when_its_fsync_fails(tmp_path, monkeypatch):
    """One fsync of new/ for the whole batch: when it fails, every message renamed into that
    directory fails (none may be acknowledged without it), not only the first."""
    MaildirCache().get(tmp_path / "u", "Inbox")  # made before the fault
    monkeypatch.setattr(os, "fsync", failing_fsync_of(tmp_path / "u" / "new", errno.EIO))
    stats = StoreStats()
    results = commit_batch([[Delivery(tmp_path / "u", MSG)], [Delivery(tmp_path / "u", MSG + b"2\r\n")],
                            [Delivery(tmp_path / "u", MSG + b"3\r\n")]], stats=stats)
    assert [(r.code, r.step) for r in results] == [(451, "fsync_dir")] * 3
    assert new_files(tmp_path / "u") == [] and stats.failed == 3


def test_a_maildir_removed_behind_the_cache_is_made_again(tmp_path):
    cache = MaildirCache()
    deliver_sync([Delivery(tmp_path / "u", MSG)], cache)
    shutil.rmtree(tmp_path / "u")
    [p] = deliver_sync([Delivery(tmp_path / "u", MSG, prefix=b"X-Again: 1\r\n")], cache)
    assert p.parent == tmp_path / "u" / "new" and p.read_bytes() == b"X-Again: 1\r\n" + MSG


def test_as_root_delivered_files_take_the_maildirs_owner(tmp_path):
    """Also when the Maildir was removed and made again, and for a second copy that is not a
    link (another prefix). Not as root there is nobody else to give a file to."""
    if os.geteuid() != 0:
        [p] = deliver_sync([Delivery(tmp_path / "u", MSG)])
        assert os.stat(p).st_uid == os.geteuid()
        return
    owner = (5000, 5001)
    os.chown(tmp_path, *owner)
    cache = MaildirCache()
    paths = deliver_sync([Delivery(tmp_path / "u", MSG), Delivery(tmp_path / "u", MSG, prefix=b"X-B: 1\r\n")],
                         cache)
    owners = [(os.stat(p).st_uid, os.stat(p).st_gid) for p in paths]
    shutil.rmtree(tmp_path / "u")
    [again] = deliver_sync([Delivery(tmp_path / "u", MSG)], cache)
    owners.append((os.stat(again).st_uid, os.stat(again).st_gid))
    assert owners == [owner] * 3


async def test_failures_resolved_together_are_each_counted(tmp_path, monkeypatch):
    MaildirCache().get(tmp_path / "u", "Inbox")
    store = MaildirStore(writers=1)
    try:
        monkeypatch.setattr(os, "fsync", failing_fsync_of(tmp_path / "u" / "new", errno.ENOSPC))
        jobs = [durable._Job(durable._Unit([Delivery(tmp_path / "u", MSG + b"%d\r\n" % i)]),
                             asyncio.get_running_loop(), asyncio.get_running_loop().create_future())
                for i in range(2)]
        for job in jobs:
            store._write(job)
        await asyncio.to_thread(store._commit, jobs)  # one commit, one resolve for both
        assert store.stats.failed == 2
        for job in jobs:
            with pytest.raises(StorageError, match="^452 4.3.1 "):
                await asyncio.wait_for(job.fut, 10)
    finally:
        store.close()


def test_a_result_for_an_event_loop_that_is_gone_is_dropped(tmp_path):
    """The caller's loop closed while its message was written: nobody waits for the result,
    and the writer goes on (no exception out of the writer thread)."""
    loop = asyncio.new_event_loop()
    fut = loop.create_future()
    loop.close()
    store = MaildirStore(writers=1)
    try:
        job = durable._Job(durable._Unit([Delivery(tmp_path / "u", MSG)]), loop, fut)
        store._write(job)
        store._commit([job])  # resolving into the closed loop raises RuntimeError there: dropped
        assert store.stats.deliveries == 1 and len(new_files(tmp_path / "u")) == 1
        assert deliver_sync([Delivery(tmp_path / "u", MSG)])
    finally:
        store.close()
