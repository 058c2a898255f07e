"""The write transaction of a batch of adds (mox_core/queue/commit.py): a local copy that
fails, a full disk at the insert, one commit per transaction, the SMTPUTF8 flag of a row, the
Maildirs known from earlier batches."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading

import pytest

from mox_core.queue import FakeClock, Queue
from mox_core.store import Delivery, StorageError
from tests.plugins.queue_helpers import MSG, cfg, queue_files  # noqa: F401 (fixtures)


async def opened(cfg) -> Queue:
    q = Queue(cfg, clock=FakeClock())
    q.store.inline_max = 0  # message files, to see which are left
    await q.open()
    return q


async def add(q: Queue, rcpt: str, **kw) -> list[int]:
    return await q.add(account="alice", mail_from="alice@example.org", recipients=[rcpt], data=MSG, **kw)


async def in_one_batch(q: Queue, *coros):
    """Run the adds ``coros`` so that they are committed in one batch: the queue-db thread is
    kept busy until each has queued its submission."""
    busy = threading.Event()
    q.store._executor.submit(busy.wait, 10)
    tasks = [asyncio.create_task(c) for c in coros]
    for _ in range(3):
        await asyncio.sleep(0)
    busy.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_failing_local_copy_fails_only_its_submission_and_the_others_are_kept_once(cfg, tmp_path):
    """The transaction is started over without the failed submission; the local copies of
    the others, already in their Maildirs, are not written a second time."""
    (tmp_path / "a-file").write_text("not a directory")
    bad = Delivery(tmp_path / "a-file" / "Maildir", MSG, b"X-Local: bad\r\n")
    root = tmp_path / "good" / "Maildir"
    good = Delivery(root, MSG, b"X-Local: good\r\n")
    q = await opened(cfg)
    try:
        before = q.store.commits
        results = await in_one_batch(q, add(q, "good@remote.example", local_deliveries=[good]),
                                     add(q, "bad@remote.example", local_deliveries=[bad]))
        assert isinstance(results[0], list) and len(results[0]) == 1, results
        assert isinstance(results[1], StorageError) and (results[1].code, results[1].enhanced_code) == (451, "4.3.0")
        assert (results[1].step, results[1].errno) == ("write", errno.ENOTDIR)  # the Maildir's error
        assert q.store.commits == before + 1
        [m] = await q.list_messages()
        assert (m.id, m.recipient) == (results[0][0], "good@remote.example")
        assert queue_files(cfg) == [m.file]
        [name] = os.listdir(root / "new")
        assert (root / "new" / name).read_bytes() == b"X-Local: good\r\n" + MSG
        assert os.listdir(root / "tmp") == []
    finally:
        await q.close()


async def test_a_full_disk_at_the_insert_is_452_for_that_submission(cfg, monkeypatch):
    q = await opened(cfg)

    def full(item):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(q.store, "_insert_rows", full)
    try:
        with pytest.raises(StorageError) as exc:
            await add(q, "a@remote.example")
        assert (exc.value.code, exc.value.enhanced_code) == (452, "4.3.1")
        monkeypatch.undo()
        assert await q.list_messages() == [] and queue_files(cfg) == []
    finally:
        await q.close()


async def test_each_batch_is_one_commit(cfg):
    q = await opened(cfg)
    try:
        before = q.store.commits
        await add(q, "a@remote.example")
        assert q.store.commits == before + 1
        await add(q, "b@remote.example")
        assert q.store.commits == before + 2
        await in_one_batch(q, add(q, "c@remote.example"), add(q, "d@remote.example"))
        assert q.store.commits == before + 3
    finally:
        await q.close()


async def test_a_non_ascii_address_marks_the_row_smtputf8(cfg):
    q = await opened(cfg)
    try:
        for mail_from, rcpt, flag in [
            ("alice@example.org", "plain@remote.example", False),
            ("alice@example.org", "zoë@remote.example", False),
            ("zoë@example.org", "sender@remote.example", False),
            ("alice@example.org", "flagged@remote.example", True),
        ]:
            await q.add(account="alice", mail_from=mail_from, recipients=[rcpt], data=MSG, smtputf8=flag)
        rows = {m.recipient: m.smtputf8 for m in await q.list_messages()}
        assert rows == {"plain@remote.example": False, "zoë@remote.example": True,
                        "sender@remote.example": True, "flagged@remote.example": True}
    finally:
        await q.close()


async def test_a_maildir_known_from_an_earlier_batch_is_not_created_again(cfg, tmp_path, monkeypatch):
    root = tmp_path / "local" / "Maildir"
    q = await opened(cfg)
    try:
        await add(q, "a@remote.example", local_deliveries=[Delivery(root, MSG, b"X-Local: 1\r\n")])
        made: list[str] = []
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kw):
            made.append(os.fspath(path))
            return real_mkdir(path, *args, **kw)

        monkeypatch.setattr(os, "mkdir", mkdir)
        await add(q, "b@remote.example", local_deliveries=[Delivery(root, MSG, b"X-Local: 2\r\n")])
        monkeypatch.undo()
        assert [p for p in made if p.startswith(str(root))] == []
        assert len(os.listdir(root / "new")) == 2
    finally:
        await q.close()
