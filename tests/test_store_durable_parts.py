"""The parts of ``mox_core.store.durable`` that the delivery tests (tests/test_store_maildir.py)
reach only through timing: hard links for identical copies, the counters, the cache of
Maildirs, a commit that crashes, closing, and results for futures cancelled meanwhile."""

from __future__ import annotations

import asyncio
import os
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
