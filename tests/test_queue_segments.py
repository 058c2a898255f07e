"""Mid-sized queued messages in preallocated segment files (mox_core/queue/segments.py):
placement, reading, freeing and recycling, write failures, restart, compaction, crash."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mox_core.queue import FakeClock, Filter, Queue
from mox_core.queue import segments as seg
from tests.conftest import ROOT
from tests.plugins.queue_helpers import MSG, cfg, make_config, reset_script, running  # noqa: F401 (fixtures)
from tests.plugins.queue_scripted import SCRIPT

SMALL_SEGMENTS = 256 * 1024  # three 80 KB messages per segment


def mid(n: int, size: int = 80_000) -> bytes:
    """A message between SEGMENT_MIN and INLINE_MAX, different for each n."""
    return MSG + (f"{n:08d}" * (size // 8)).encode() + b"\r\n"


async def add(q: Queue, *rcpts: str, data: bytes) -> list[int]:
    return await q.add(account="alice", mail_from="alice@example.org", recipients=list(rcpts), data=data)


async def spare_ready(q: Queue) -> None:
    for _ in range(500):
        if q.store.segments.spares():
            return
        await asyncio.sleep(0.01)
    pytest.fail("no spare segment was made")


async def primed(q: Queue) -> None:
    """mid(0) into the index (no spare is ready for it), then wait until the first spare is."""
    await add(q, "x@d0.example", data=mid(0))
    await spare_ready(q)


async def fill(q: Queue, numbers: range) -> list[int]:
    """After :func:`primed`, mid(n) for each n, each once a spare is ready (so they fill
    segments in order); their ids."""
    await primed(q)
    ids = []
    for i in numbers:
        await spare_ready(q)
        ids += await add(q, f"r{i}@d{i}.example", data=mid(i))
    return ids


def rows_of(q: Queue, sql: str, *args):
    return q.store.db.execute(sql, args).fetchall()


def seg_dir(q: Queue):
    return q.store.segments.dir


async def opened(cfg, size: int = SMALL_SEGMENTS, **kw) -> Queue:
    q = Queue(cfg, clock=FakeClock(), **kw)
    q.store.segments.size = size
    q.store.segment_batch_min = 1  # a lone message too (by default only batches)
    await q.open()
    return q


async def test_a_lone_mid_sized_message_stays_in_the_index_and_a_batch_goes_into_a_segment(cfg):
    """One message alone: one fsync (the commit) is faster than the segment's sync in a
    second thread beside it; several in one batch share one sync."""
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        assert q.store.segment_batch_min == seg.SEGMENT_BATCH_MIN == 2
        await primed(q)
        [lone] = await add(q, "a@d1.example", data=mid(1))
        assert (await q.store.get(lone)).file == f"db/{lone}"
        batch = await asyncio.gather(*(add(q, f"r{i}@d{i}.example", data=mid(i)) for i in range(2, 5)))
        files = [(await q.store.get(i)).file for [i] in batch]
        assert files == [f"seg/{i}" for [i] in batch]
        assert [await q.store.read_message(f) for f in files] == [mid(i) for i in range(2, 5)]
    finally:
        await q.close()


async def test_a_mid_sized_message_goes_into_a_segment_once_a_spare_is_ready(cfg):
    q = await opened(cfg)
    try:
        # none ready yet: the first goes into the index, and no submission waits for a spare
        [first] = await add(q, "a@d1.example", data=mid(1))
        assert (await q.store.get(first)).file == f"db/{first}"
        await spare_ready(q)
        assert os.path.getsize(seg_dir(q) / q.store.segments.spares()[0]) == SMALL_SEGMENTS
        ids = await add(q, "b@d2.example", "c@d3.example", data=mid(2))
        rows = await q.list_messages(Filter(ids=tuple(ids)))
        assert {m.file for m in rows} == {f"seg/{ids[0]}"}  # one copy for both recipients
        assert rows_of(q, "SELECT base_id FROM msg_data") == [(first,)]
        [(sid, offset, length)] = rows_of(q, "SELECT segment, offset, length FROM msg_seg")
        assert (offset, length) == (0, len(mid(2)))
        assert rows_of(q, "SELECT id, live, sealed FROM segment") == [(sid, 1, None)]
        assert await q.store.read_message(rows[0].file) == mid(2)
        with open(seg_dir(q) / str(sid), "rb") as f:
            assert f.read(length) == mid(2)
        # small messages and large ones are stored as before
        [small] = await add(q, "d@d4.example", data=MSG)
        assert (await q.store.get(small)).file == f"db/{small}"
        q.store.inline_max = 20_000
        [large] = await add(q, "e@d5.example", data=mid(3, 30_000))
        assert (await q.store.get(large)).file.startswith(f"{large >> 13}/")
    finally:
        await q.close()


async def test_a_segment_message_is_acknowledged_only_once_data_and_rows_are_durable(cfg, monkeypatch):
    """pwritev (the data is readable) before the rows are inserted; fdatasync in a writer
    thread while they commit; add() returns after both."""
    q = await opened(cfg)
    await add(q, "a@d1.example", data=mid(1))
    await spare_ready(q)
    events: list[str] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd, bufs, offset):
        events.extend(f"pwritev {i}" for i in (2, 3) if any(f"{i:08d}".encode() * 4 in bytes(b) for b in bufs))
        return real_pwritev(fd, bufs, offset)

    def fdatasync(fd):
        time.sleep(0.05)  # a slow disk: the commit ends first
        real_fdatasync(fd)
        events.append("fdatasync returned")

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    q.store.db.set_trace_callback(
        lambda sql: events.append(sql.split("(")[0].strip()) if sql.startswith(("COMMIT", "INSERT INTO msg_seg")) else None)

    async def add_and_ack(i):
        await add(q, f"r{i}@d.example", data=mid(i))
        events.append(f"ack {i}")

    try:
        await asyncio.gather(*(add_and_ack(i) for i in range(2, 4)))
        # per message, whether the two adds were committed together or (on a busy machine) apart:
        # its data written, then rows inserted and committed, and its ack only after that commit
        # and after an fdatasync that began once the data was written
        for i in (2, 3):
            written = events.index(f"pwritev {i}")
            insert = events.index("INSERT INTO msg_seg", written)
            commit = events.index("COMMIT", insert)
            synced = events.index("fdatasync returned", written)
            assert commit < events.index(f"ack {i}") and synced < events.index(f"ack {i}"), events
    finally:
        q.store.db.set_trace_callback(None)
        monkeypatch.undo()
        await q.close()


async def test_a_full_segment_is_sealed_and_freed_with_its_last_message(cfg):
    q = await opened(cfg)
    try:
        ids = await fill(q, range(1, 5))  # three fit into the first segment, the fourth opens the second
        segs = rows_of(q, "SELECT id, live, sealed IS NOT NULL FROM segment ORDER BY id")
        assert [(live, sealed) for _, live, sealed in segs] == [(3, 1), (1, 0)]
        first = segs[0][0]
        for i, mid_id in enumerate(ids, 1):
            assert await q.store.read_message((await q.store.get(mid_id)).file) == mid(i)
        spares_before = len(q.store.segments.spares())
        await q.store.remove(ids[:2])
        assert rows_of(q, "SELECT live FROM segment WHERE id = ?", first) == [(1,)]
        assert (seg_dir(q) / str(first)).exists()
        await q.store.remove(ids[2:3])
        assert rows_of(q, "SELECT id FROM segment") == [(segs[1][0],)]  # the sealed one is freed
        assert not (seg_dir(q) / str(first)).exists()
        assert len(q.store.segments.spares()) == min(spares_before + 1, seg.SPARE_SEGMENTS)
        # the active one stays while a process appends to it, even when empty
        await q.store.remove(ids[3:])
        assert rows_of(q, "SELECT live, sealed FROM segment") == [(0, None)]
    finally:
        await q.close()


async def test_a_recycled_spare_is_used_again_without_zeros(cfg):
    q = await opened(cfg)
    try:
        ids = await fill(q, range(1, 8))
        await q.store.remove(ids)  # frees the two full segments
        assert len(q.store.segments.spares()) == seg.SPARE_SEGMENTS
        made = q.store.segments.made
        for i in range(8, 13):  # two more into the active segment, three into a recycled one
            await add(q, f"r{i}@d.example", data=mid(i))
        assert rows_of(q, "SELECT live FROM segment ORDER BY id") == [(2,), (3,)]
        assert q.store.segments.made == made  # no new file written with zeros
        assert len(os.listdir(seg_dir(q))) == 2 + 1
    finally:
        await q.close()


@pytest.mark.parametrize("call", ["pwritev", "fdatasync"])
async def test_a_failed_segment_write_leaves_the_message_in_the_index(cfg, monkeypatch, call):
    """pwritev fails: the message goes into the index instead. fdatasync fails (its rows are
    committed by then): it is copied into the index before it is acknowledged."""
    q = await opened(cfg)
    try:
        await primed(q)

        def broken(*args):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, call, broken)
        [mid_id] = await add(q, "a@d1.example", data=mid(1))
        monkeypatch.undo()
        m = await q.store.get(mid_id)
        assert m.file == f"db/{mid_id}" and await q.store.read_message(m.file) == mid(1)
        # the segment written to is not used again: sealed, and freed (nothing in it)
        assert rows_of(q, "SELECT COUNT(*) FROM msg_seg") == [(0,)]
        assert rows_of(q, "SELECT COUNT(*) FROM segment WHERE sealed IS NULL") == [(0,)]
    finally:
        await q.close()


async def test_damaged_segment_data_is_never_delivered(cfg):
    q = await opened(cfg)
    try:
        await primed(q)
        [mid_id] = await add(q, "a@d1.example", data=mid(1))
        m = await q.store.get(mid_id)
        [(sid, offset)] = rows_of(q, "SELECT segment, offset FROM msg_seg")
        with open(seg_dir(q) / str(sid), "r+b") as f:
            f.seek(offset + 100)
            f.write(b"X")
        with pytest.raises(FileNotFoundError):
            await q.store.read_message(m.file)
        rows, data = await q.store.start_attempt([(mid_id, 2000.0, 8)], 1000.0, {})
        assert [r.id for r in rows] == [mid_id] and data is None  # left to read_message to report
    finally:
        await q.close()


async def test_start_attempt_brings_a_segment_message_along(cfg):
    q = await opened(cfg)
    try:
        await primed(q)
        [mid_id] = await add(q, "a@d1.example", data=mid(1))
        rows, data = await q.store.start_attempt([(mid_id, 2000.0, 8)], 1000.0, {})
        assert [r.id for r in rows] == [mid_id] and data == mid(1)
    finally:
        await q.close()


async def test_restart_seals_segments_and_removes_leftovers(cfg):
    q = await opened(cfg)
    await primed(q)
    [kept] = await add(q, "a@d1.example", data=mid(1))
    [gone] = await add(q, "b@d2.example", data=mid(2))
    # what a crash leaves: a spare being made, a segment file whose row went, an empty
    # active segment of a process that died
    (seg_dir(q) / "tmp-1-2").write_bytes(b"\0" * 10)
    (seg_dir(q) / "999").write_bytes(b"\0" * 10)
    q.store.db.execute("INSERT INTO segment(id, live) VALUES (998, 0)")
    (seg_dir(q) / "998").write_bytes(b"\0" * 10)
    q.store.segments.active = None  # as if killed: nobody sealed it
    await q.store.remove([gone])
    await q.close()

    q = await opened(cfg)
    try:
        names = os.listdir(seg_dir(q))
        assert "tmp-1-2" not in names and "999" not in names and "998" not in names
        assert rows_of(q, "SELECT live, sealed IS NOT NULL FROM segment") == [(1, 1)]
        m = await q.store.get(kept)
        assert await q.store.read_message(m.file) == mid(1)
        await q.store.remove([kept])
        assert rows_of(q, "SELECT COUNT(*) FROM segment") == [(0,)]
    finally:
        await q.close()


async def test_startup_removes_unacknowledged_messages_whose_data_did_not_reach_the_disk(cfg):
    """A crash while a batch's sync ran (its rows already committed): in a segment still
    appended to, a message whose bytes do not match its CRC was never acknowledged."""
    q = await opened(cfg)
    await primed(q)
    [good] = await add(q, "a@d1.example", data=mid(1))
    [lost] = await add(q, "b@d2.example", data=mid(2))
    [(sid, offset)] = rows_of(q, "SELECT segment, offset FROM msg_seg WHERE base_id = ?", lost)
    with open(seg_dir(q) / str(sid), "r+b") as f:  # what the disk has after the crash
        f.seek(offset)
        f.write(bytes(len(mid(2))))
    q.store.segments.active = None  # killed: nobody sealed it
    await q.close()

    q = await opened(cfg)
    try:
        ids = sorted(m.id for m in await q.list_messages())
        assert lost not in ids and good in ids
        assert await q.store.read_message((await q.store.get(good)).file) == mid(1)
        assert rows_of(q, "SELECT live, sealed IS NOT NULL FROM segment") == [(1, 1)]
    finally:
        await q.close()


async def test_old_sealed_segments_have_their_few_messages_moved_into_the_index(cfg):
    q = await opened(cfg)
    try:
        ids = await fill(q, range(1, 5))
        [(first,)] = rows_of(q, "SELECT id FROM segment WHERE sealed IS NOT NULL")
        before = await q.store.get(ids[1])
        await q.store.remove([ids[0], ids[2]])
        ck = q.store.checkpointer
        db = q.store.db
        await asyncio.to_thread(ck.compact, db)
        assert ck.compacted == 0  # sealed just now: left to drain
        db.execute("UPDATE segment SET sealed = sealed - ?", (seg.COMPACT_AFTER + 1,))
        await asyncio.to_thread(ck.compact, db)
        assert ck.compacted == 1
        m = await q.store.get(ids[1])
        assert m.file == f"db/{ids[1]}" and await q.store.read_message(m.file) == mid(2)
        assert rows_of(q, "SELECT id FROM segment WHERE id = ?", first) == []
        assert not (seg_dir(q) / str(first)).exists()
        # a reader that took the row before the move still gets the message
        assert before.file == f"seg/{ids[1]}" and await q.store.read_message(before.file) == mid(2)
        # the active segment is not touched
        assert await q.store.read_message((await q.store.get(ids[3])).file) == mid(4)
    finally:
        await q.close()


async def test_segment_messages_are_delivered_and_their_segment_freed(cfg):
    async with running(cfg) as q:
        q.store.segments.size = SMALL_SEGMENTS
        q.store.segment_batch_min = 1
        await add(q, "x@d0.example", data=mid(0))
        for i in range(1, 7):
            await spare_ready(q)
            await add(q, f"r{i}@d{i}.example", f"s{i}@e{i}.example", data=mid(i))
        await q.scheduler.settle()
        assert await q.list_messages() == []
        got = {c.recipients[0]: c.data for c in SCRIPT.calls}
        for i in range(1, 7):
            assert got[f"r{i}@d{i}.example"] == got[f"s{i}@e{i}.example"] == mid(i)
        # only the segment still appended to is left; the files of the freed ones became
        # spares or went (none lingers until the next start's orphan sweep)
        [(active, live, sealed)] = q.store.db.execute("SELECT id, live, sealed FROM segment").fetchall()
        assert (live, sealed) == (0, None)
        assert [n for n in os.listdir(seg_dir(q)) if not n.startswith("spare-")] == [str(active)]


async def test_two_processes_adding_to_one_queue_append_to_segments_of_their_own(cfg):
    """mox serve's main process and a worker (a store opened without the lock) both store
    batches: each takes its own spare and segment; every message reads back in both, and a
    worker's closing seals its segment."""
    main = await opened(cfg, size=1 << 20)
    worker = Queue(cfg, clock=FakeClock())
    worker.store.segments.size = 1 << 20
    await worker.open(lock=False)
    try:
        await primed(main)
        stores = [main, worker] * 2
        got: list[tuple[Queue, int, int]] = []  # store, id, n
        for first in (1, 5):  # the first round leaves one store without a spare
            ids = await asyncio.gather(*(add(q, f"r{n}@d{n}.example", data=mid(n))
                                         for n, q in enumerate(stores, first)))
            got += [(q, i, n) for (n, q), [i] in zip(enumerate(stores, first), ids, strict=True)]
            await spare_ready(main)
        segments_of = {id(main): set(), id(worker): set()}
        for q, mid_id, n in got:
            m = await main.store.get(mid_id)
            assert await main.store.read_message(m.file) == mid(n)
            assert await worker.store.read_message(m.file) == mid(n)
            segments_of[id(q)] |= {r[0] for r in rows_of(main, "SELECT segment FROM msg_seg WHERE base_id = ?", mid_id)}
        assert segments_of[id(main)] and segments_of[id(worker)]
        assert not segments_of[id(main)] & segments_of[id(worker)]
        [wid] = segments_of[id(worker)]
        assert rows_of(main, "SELECT sealed FROM segment WHERE id = ?", wid) == [(None,)]
        await worker.close()
        assert rows_of(main, "SELECT sealed IS NOT NULL FROM segment WHERE id = ?", wid) == [(1,)]
    finally:
        await main.close()


# --------------------------------------------------------------------------------------------
# crash safety

CRASH_SCRIPT = """
import asyncio, sys
from mox_core.config.loader import load_config
from mox_core.queue import Queue
from tests.plugins.queue_helpers import MSG, make_host

cfg = load_config(sys.argv[1], make_host())

def body(n):
    return MSG + (f"{n:08d}" * 5000).encode() + b"\\r\\n"

async def add_and_ack(q, n):
    await q.add(account="alice", mail_from="alice@example.org", recipients=[f"r{n}@d{n % 4}.example"],
                data=body(n))
    print("ack", n, flush=True)  # acknowledged: as the SMTP server would answer 250

async def main():
    q = Queue(cfg)
    q.store.segments.size = 256 * 1024
    q.store.segment_batch_min = 1
    await q.open()
    n = 0
    while True:
        await asyncio.gather(*(add_and_ack(q, n + k) for k in range(4)))
        n += 4

asyncio.run(main())
"""


def test_a_crash_loses_no_acknowledged_segment_message(tmp_path):
    cfg = make_config(tmp_path)
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(cfg.path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    acked: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(acked) < 120:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("ack "):
                acked.add(int(line.split()[1]))
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=10)
    assert len(acked) >= 120, err

    async def reopen():
        q = Queue(cfg, clock=FakeClock())
        await q.open()
        try:
            files = [m.file for m in await q.list_messages()]
            assert sum(f.startswith("seg/") for f in files) > 60  # most went into segments
            out = {}
            for m in await q.list_messages():
                out[int(m.recipient[1:].partition("@")[0])] = await q.store.read_message(m.file)
            return out
        finally:
            await q.close()

    stored = asyncio.run(reopen())
    assert acked <= set(stored)
    for n in acked:
        assert stored[n] == MSG + (f"{n:08d}" * 5000).encode() + b"\r\n"
