"""Delivery journal: 250 after one flush, Maildir files right after, replay after a crash."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import mox_core.store.journal as journal_mod
from mox_core.plugins import PluginHost
from mox_core.server import open_local_store
from mox_core.store import Delivery, MaildirStore, StorageError, mailbox_dir
from mox_core.store.journal import JournaledStore, JournalInUse, read_segment
from mox_core.testconfig import MINIMAL_DOMAINS, load

MSG = b"From: a@ext.test\r\nTo: u@local.test\r\nSubject: t\r\n\r\nhello\r\n.dot line\r\n"
PREFIX = b"Delivered-To: u@local.test\r\nReturn-Path: <a@ext.test>\r\n"

_real_writev = os.writev
_real_fdatasync = os.fdatasync


# ---------------------------------------------------------------------------------------------
# Helpers


def segs(jdir: Path) -> list[str]:
    return sorted(n for n in os.listdir(jdir) if n.endswith(".seg"))


def seg_name(seq: int) -> str:
    return f"{seq:016x}.seg"


def listing(md: Path) -> dict[str, list[str]]:
    out = {}
    for sub in ("tmp", "new", "cur"):
        out[sub] = sorted(os.listdir(md / sub)) if (md / sub).is_dir() else []
    return out


def break_new(root: Path) -> None:
    """Make the Maildir's ``new`` a regular file: every rename into it fails (ENOTDIR), even
    as root, where permission bits would not stop anything."""
    for sub in ("tmp", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    new = root / "new"
    if new.is_dir():
        new.rmdir()
    new.write_bytes(b"")


def fix_new(root: Path) -> None:
    (root / "new").unlink()
    (root / "new").mkdir()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll for a background effect (Maildir writes happen after deliver() returned)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def deliver(store: JournaledStore, deliveries: Sequence[Delivery]) -> list[Path]:
    return await asyncio.wait_for(store.deliver(deliveries), 10)


def frame(header: dict[str, Any], data: bytes = b"") -> bytes:
    """A journal record built by hand from the documented format."""
    head = json.dumps(header).encode()
    crc = zlib.crc32(data, zlib.crc32(head))
    return struct.pack("<4sIII", b"MXJ1", len(head), len(data), crc) + head + data


class RefusingStore:
    """A Maildir store that takes nothing (as one shutting down): records stay in the journal,
    so a test can build leftover segments without touching any Maildir."""

    stats = None

    def submit(self, deliveries: Any, callback: Any) -> None:
        raise StorageError.local_error(step="closed", detail="refusing")

    def close(self) -> None:
        pass


def leftover(jdir: Path, *batches: Sequence[Delivery], first_seq: int = 1) -> list[list[Path]]:
    """Journal ``batches`` (one deliver() each) into segment ``first_seq`` and stop without
    writing any Maildir file."""
    if first_seq > 1:  # an empty segment is removed at open(), but numbering goes on after it
        jdir.mkdir(parents=True, exist_ok=True)
        (jdir / seg_name(first_seq - 1)).write_bytes(b"")

    async def run() -> list[list[Path]]:
        store = JournaledStore(jdir, maildir_store=RefusingStore())  # type: ignore[arg-type]
        store.open()
        try:
            return [await deliver(store, b) for b in batches]
        finally:
            await store.aclose()

    return asyncio.run(run()) if not _in_loop() else _run_in_thread(run)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_in_thread(coro_fn: Callable[[], Any]) -> Any:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = asyncio.run(coro_fn())
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
async def journal(tmp_path: Path) -> Any:
    store = JournaledStore(tmp_path / "journal")
    store.open()
    yield store
    await store.aclose()


# ---------------------------------------------------------------------------------------------
# Delivering


async def test_file_appears_in_new_with_prefix_and_message(tmp_path: Path, journal: JournaledStore) -> None:
    root = tmp_path / "u"
    [path] = await deliver(journal, [Delivery(root, MSG, prefix=PREFIX)])
    assert path.parent == root / "new"
    await until(path.exists)
    assert path.read_bytes() == PREFIX + MSG
    assert listing(root) == {"tmp": [], "new": [path.name], "cur": []}


async def test_one_message_to_several_mailboxes_is_one_record(tmp_path: Path, journal: JournaledStore) -> None:
    root, other = tmp_path / "u", tmp_path / "v"
    prefixes = [b"Delivered-To: u@local.test\r\n", b"Delivered-To: u+a@local.test\r\n", b"Delivered-To: v@l\r\n"]
    deliveries = [
        Delivery(root, MSG, prefix=prefixes[0]),
        Delivery(root, MSG, prefix=prefixes[1], mailbox="Archive"),
        Delivery(other, MSG, prefix=prefixes[2]),
    ]
    paths = await deliver(journal, deliveries)
    assert [p.parent for p in paths] == [root / "new", root / ".Archive" / "new", other / "new"]
    assert len({p.name for p in paths}) == 3

    records, _done, _end = read_segment(str(tmp_path / "journal" / seg_name(1)), 1)
    assert len(records) == 1
    [rec] = records
    assert [d.prefix for d in rec.deliveries] == prefixes
    assert [d.mailbox for d in rec.deliveries] == ["Inbox", "Archive", "Inbox"]
    assert all(d.message == MSG for d in rec.deliveries)
    # the names chosen at journaling time are those of the returned paths
    assert [mailbox_dir(d.root, d.mailbox) / "new" / d.name for d in rec.deliveries] == paths

    await until(lambda: all(p.exists() for p in paths))
    for p, prefix in zip(paths, prefixes, strict=True):
        assert p.read_bytes() == prefix + MSG
    assert listing(root / ".Archive")["tmp"] == [] and listing(root)["tmp"] == []


async def test_different_messages_in_one_delivery_are_separate_records(
    tmp_path: Path, journal: JournaledStore
) -> None:
    root = tmp_path / "u"
    other_msg = MSG + b"second\r\n"
    paths = await deliver(journal, [Delivery(root, MSG), Delivery(root, other_msg)])
    records, _, _ = read_segment(str(tmp_path / "journal" / seg_name(1)), 1)
    assert [[d.message for d in r.deliveries] for r in records] == [[MSG], [other_msg]]
    await until(lambda: all(p.exists() for p in paths))
    assert [p.read_bytes() for p in paths] == [MSG, other_msg]


async def test_deliver_before_open_or_after_close_is_refused(tmp_path: Path) -> None:
    store = JournaledStore(tmp_path / "journal")
    with pytest.raises(StorageError) as ei:
        await store.deliver([Delivery(tmp_path / "u", MSG)])
    assert ei.value.code == 451
    store.open()
    await store.aclose()
    with pytest.raises(StorageError):
        await store.deliver([Delivery(tmp_path / "u", MSG)])
    assert not (tmp_path / "u" / "new").exists() or listing(tmp_path / "u")["new"] == []


async def test_deliver_returns_only_after_the_journal_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, bool]] = []
    holder: dict[str, asyncio.Task[list[Path]]] = {}

    def fdatasync(fd: int) -> None:
        if threading.current_thread().name.startswith("journal") and "task" in holder:
            time.sleep(0.05)  # a premature return would surely show up meanwhile
            _real_fdatasync(fd)
            events.append(("fdatasync", holder["task"].done()))
        else:
            _real_fdatasync(fd)

    monkeypatch.setattr(journal_mod.os, "fdatasync", fdatasync)
    store = JournaledStore(tmp_path / "journal")
    store.open()
    try:
        holder["task"] = asyncio.create_task(store.deliver([Delivery(tmp_path / "u", MSG)]))
        [p] = await asyncio.wait_for(holder["task"], 10)
        events.append(("returned", True))
        assert events[:2] == [("fdatasync", False), ("returned", True)]
        await until(p.exists)
    finally:
        await store.aclose()


async def test_50_concurrent_deliveries_all_land_and_close_leaves_only_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushes: list[int] = []

    def fdatasync(fd: int) -> None:
        if threading.current_thread().name.startswith("journal"):
            flushes.append(fd)
            if len(flushes) == 1:
                time.sleep(0.02)  # a slow first flush: the others queue up behind it
        _real_fdatasync(fd)

    monkeypatch.setattr(journal_mod.os, "fdatasync", fdatasync)
    jdir = tmp_path / "journal"
    store = JournaledStore(jdir)
    assert store.open() == 0
    roots = [tmp_path / f"u{i % 5}" for i in range(50)]
    bodies = [MSG + b"n=%d\r\n" % i for i in range(50)]
    results = await asyncio.wait_for(asyncio.gather(*(
        store.deliver([Delivery(r, b, prefix=b"X-N: %d\r\n" % i)])
        for i, (r, b) in enumerate(zip(roots, bodies, strict=True))
    )), 20)
    paths = [p for [p] in results]
    assert len(set(paths)) == 50
    await until(lambda: all(p.exists() for p in paths))
    for i, p in enumerate(paths):
        assert p.parent == roots[i] / "new"
        assert p.read_bytes() == b"X-N: %d\r\n" % i + bodies[i]
    assert sum(len(listing(tmp_path / f"u{k}")["new"]) for k in range(5)) == 50
    assert 1 <= len(flushes) <= 3  # group commit: the messages share the journal's flushes
    await store.aclose()
    assert os.listdir(jdir) == ["lock"]


# ---------------------------------------------------------------------------------------------
# Crash and replay


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from mox_core.store import Delivery
    from mox_core.store.journal import JournaledStore

    jdir, root = sys.argv[1], sys.argv[2]
    msg, msg2 = bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])

    async def main():
        store = JournaledStore(jdir)
        store.open()
        paths = await store.deliver([
            Delivery(root, msg, prefix=b"X-To: inbox\\r\\n"),
            Delivery(root, msg, prefix=b"X-To: archive\\r\\n", mailbox="Archive"),
        ])
        paths += await store.deliver([Delivery(root, msg2)])
        for p in paths:
            print("ACK", p, flush=True)
        print("DONE", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_sigkill_after_ack_then_replay_delivers_exactly_once(tmp_path: Path) -> None:
    jdir, root = tmp_path / "journal", tmp_path / "u"
    break_new(root)
    msg2 = MSG + b"second\r\n"
    cmd = [sys.executable, "-c", CHILD, str(jdir), str(root), MSG.hex(), msg2.hex()]
    acked: list[Path] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        try:
            for line in child.stdout:  # log lines may be interleaved
                if line.startswith("ACK "):
                    acked.append(Path(line[4:].rstrip("\n")))
                elif line.startswith("DONE"):
                    break
            assert len(acked) == 3, "child stopped before deliver() returned"
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == -signal.SIGKILL
    assert segs(jdir) == [seg_name(1)]
    assert not (root / ".Archive" / "new").exists() or listing(root / ".Archive")["new"] == []

    fix_new(root)

    async def replay() -> int:
        store = JournaledStore(jdir)
        n = store.open()
        assert store.replayed == n
        await until(lambda: all(p.exists() for p in acked))
        await store.aclose()
        return n

    assert asyncio.run(replay()) == 2
    inbox, archive, second = acked
    assert inbox.parent == root / "new" and archive.parent == root / ".Archive" / "new"
    assert inbox.read_bytes() == b"X-To: inbox\r\n" + MSG
    assert archive.read_bytes() == b"X-To: archive\r\n" + MSG
    assert second.read_bytes() == msg2
    assert listing(root) == {"tmp": [], "new": sorted([inbox.name, second.name]), "cur": []}
    assert listing(root / ".Archive") == {"tmp": [], "new": [archive.name], "cur": []}
    assert os.listdir(jdir) == ["lock"]


async def test_replay_skips_files_already_in_new_or_cur_and_replaces_partial_tmp(tmp_path: Path) -> None:
    jdir, root = tmp_path / "journal", tmp_path / "u"
    msgs = [MSG + b"%d\r\n" % i for i in range(4)]
    [[in_new], [in_cur], [in_tmp], [both_inbox, both_archive]] = leftover(
        jdir,
        [Delivery(root, msgs[0])],
        [Delivery(root, msgs[1])],
        [Delivery(root, msgs[2], prefix=PREFIX)],
        [Delivery(root, msgs[3], prefix=b"X-A: 1\r\n"), Delivery(root, msgs[3], prefix=b"X-A: 2\r\n", mailbox="Archive")],
    )
    assert not root.exists()  # nothing written yet
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True)
    in_new.write_bytes(b"moved here by hand 0")
    (root / "cur" / f"{in_cur.name}:2,S").write_bytes(b"read by the user 1")
    (root / "tmp" / in_tmp.name).write_bytes((PREFIX + msgs[2])[:10])
    both_inbox.write_bytes(b"already there 3")

    store = JournaledStore(jdir)
    assert store.open() == 4
    await until(lambda: in_tmp.exists() and both_archive.exists())
    await store.aclose()

    assert in_new.read_bytes() == b"moved here by hand 0"
    assert (root / "cur" / f"{in_cur.name}:2,S").read_bytes() == b"read by the user 1"
    assert in_tmp.read_bytes() == PREFIX + msgs[2]
    assert both_inbox.read_bytes() == b"already there 3"
    assert both_archive.read_bytes() == b"X-A: 2\r\n" + msgs[3]
    assert listing(root) == {
        "tmp": [], "new": sorted([in_new.name, in_tmp.name, both_inbox.name]), "cur": [f"{in_cur.name}:2,S"],
    }
    assert listing(root / ".Archive") == {"tmp": [], "new": [both_archive.name], "cur": []}
    assert os.listdir(jdir) == ["lock"]


def _truncated(valid: bytes) -> bytes:
    return valid[: len(valid) // 2]


def _bad_crc(valid: bytes) -> bytes:
    return valid[:-1] + bytes([valid[-1] ^ 0xFF])


TAILS = {
    "garbage": lambda valid: b"\x00garbage\xff" * 7,
    "truncated_record": _truncated,
    "bad_crc": _bad_crc,
    "short_frame": lambda valid: valid[:9],
}


@pytest.mark.parametrize("tail", list(TAILS))
async def test_torn_tail_is_ignored_and_cut_off(tmp_path: Path, tail: str) -> None:
    jdir = tmp_path / "journal"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    [[pa], [pb]] = leftover(jdir, [Delivery(a, MSG + b"a\r\n")], [Delivery(b, MSG + b"b\r\n")])
    seg = jdir / seg_name(1)
    records, done, end = read_segment(str(seg), 1)
    assert len(records) == 2 and not done and end == seg.stat().st_size
    # a torn tail, and behind it a record that checks out but must not count any more
    name_c = "1.M1P1Q1.host,S=%d" % len(MSG)
    valid_c = frame({"seg": 1, "d": [[str(c), "Inbox", name_c, ""]]}, MSG)
    with open(seg, "ab") as f:
        f.write(TAILS[tail](valid_c) + valid_c)

    break_new(b)  # b's record fails again on replay: its segment stays for us to read
    store = JournaledStore(jdir)
    assert store.open() == 2
    await until(pa.exists)
    await store.aclose()
    assert pa.read_bytes() == MSG + b"a\r\n"

    records2, done2, end2 = read_segment(str(seg), 1)
    assert [r.offset for r in records2] == [r.offset for r in records]
    assert done2 == {records[0].offset}  # the mark written after the cut is found
    assert end2 == seg.stat().st_size  # nothing left of the tail

    fix_new(b)
    store = JournaledStore(jdir)
    assert store.open() == 1
    await until(pb.exists)
    await store.aclose()
    assert pb.read_bytes() == MSG + b"b\r\n"
    assert listing(a)["new"] == [pa.name] and listing(b)["new"] == [pb.name]
    assert not c.exists()
    assert os.listdir(jdir) == ["lock"]


def test_read_segment_stops_at_a_record_of_another_segment(tmp_path: Path) -> None:
    path = tmp_path / "x.seg"
    first = frame({"seg": 7, "d": [["/r", "Inbox", "n1", "P: 1\r\n"]]}, MSG)
    done = frame({"seg": 7, "done": [0]})
    alien = frame({"seg": 8, "d": [["/r", "Inbox", "n2", ""]]}, MSG)
    path.write_bytes(first + done + alien + first)
    records, marks, end = read_segment(str(path), 7)
    assert [(r.offset, [d.name for d in r.deliveries]) for r in records] == [(0, ["n1"])]
    assert records[0].deliveries[0].prefix == b"P: 1\r\n" and records[0].deliveries[0].message == MSG
    assert marks == {0}
    assert end == len(first) + len(done)


# ---------------------------------------------------------------------------------------------
# Locking


async def test_second_store_on_a_directory_in_use_raises_journal_in_use(
    tmp_path: Path, journal: JournaledStore
) -> None:
    other = JournaledStore(tmp_path / "journal", lock_wait=0)
    with pytest.raises(JournalInUse):
        other.open()
    other.close()
    # adopting a directory that is in use is refused the same way
    third = JournaledStore(tmp_path / "journal-3", lock_wait=0)
    with pytest.raises(JournalInUse):
        third.open(adopt=[tmp_path / "journal"])
    third.close()
    # and the running store is unaffected
    [p] = await deliver(journal, [Delivery(tmp_path / "u", MSG)])
    await until(p.exists)


def test_open_gives_up_after_lock_wait(tmp_path: Path) -> None:
    first = JournaledStore(tmp_path / "journal")
    first.open()
    try:
        other = JournaledStore(tmp_path / "journal", lock_wait=0.3)
        t0 = time.monotonic()
        with pytest.raises(JournalInUse):
            other.open()
        assert 0.3 <= time.monotonic() - t0 < 3
        other.close()
    finally:
        first.close()


def test_open_waits_for_a_lock_released_within_lock_wait(tmp_path: Path) -> None:
    first = JournaledStore(tmp_path / "journal")
    first.open()
    timer = threading.Timer(0.2, first.close)  # a previous process still exiting
    timer.start()
    second = JournaledStore(tmp_path / "journal", lock_wait=5)
    try:
        t0 = time.monotonic()
        assert second.open() == 0
        assert time.monotonic() - t0 >= 0.15
    finally:
        timer.join()
        second.close()


async def test_directory_is_free_again_after_close(tmp_path: Path) -> None:
    first = JournaledStore(tmp_path / "journal")
    first.open()
    await first.aclose()
    second = JournaledStore(tmp_path / "journal")
    assert second.open() == 0
    await second.aclose()


# ---------------------------------------------------------------------------------------------
# Journal write failures


@pytest.mark.parametrize(("err", "code"), [(errno.ENOSPC, 452), (errno.EIO, 451)], ids=["ENOSPC", "EIO"])
async def test_failed_journal_write_is_refused_and_never_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, code: int
) -> None:
    jdir, root = tmp_path / "journal", tmp_path / "u"
    fired: list[int] = []

    def writev(fd: int, bufs: Any) -> int:
        if not fired and threading.current_thread().name.startswith("journal"):
            fired.append(fd)
            os.write(fd, bytes(bufs[0])[:7])  # a part reaches the file first
            raise OSError(err, os.strerror(err))
        return _real_writev(fd, bufs)

    monkeypatch.setattr(journal_mod.os, "writev", writev)
    store = JournaledStore(jdir)
    store.open()
    with pytest.raises(StorageError) as ei:
        await deliver(store, [Delivery(root, MSG + b"lost\r\n")])
    assert ei.value.code == code
    assert fired

    [p] = await deliver(store, [Delivery(root, MSG)])
    await until(p.exists)
    seg = jdir / seg_name(1)
    # the partial write was cut away: the second record sits at the start, and its done mark
    # right after it is found
    await until(lambda: bool(read_segment(str(seg), 1)[1]))
    records, done, end = read_segment(str(seg), 1)
    assert [r.offset for r in records] == [0] and done == {0}
    assert [d.message for d in records[0].deliveries] == [MSG]
    assert end == seg.stat().st_size
    await store.aclose()
    assert listing(root)["new"] == [p.name] and p.read_bytes() == MSG
    assert os.listdir(jdir) == ["lock"]

    again = JournaledStore(jdir)
    assert again.open() == 0
    await again.aclose()
    assert listing(root) == {"tmp": [], "new": [p.name], "cur": []}


@pytest.mark.parametrize(("err", "code"), [(errno.ENOSPC, 452), (errno.EIO, 451)], ids=["ENOSPC", "EIO"])
async def test_failed_journal_flush_is_refused_and_next_delivery_uses_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, code: int
) -> None:
    jdir, root = tmp_path / "journal", tmp_path / "u"
    fired: list[int] = []

    def fdatasync(fd: int) -> None:
        if not fired and threading.current_thread().name.startswith("journal"):
            fired.append(fd)
            raise OSError(err, os.strerror(err))
        _real_fdatasync(fd)

    monkeypatch.setattr(journal_mod.os, "fdatasync", fdatasync)
    store = JournaledStore(jdir)
    store.open()
    assert segs(jdir) == [seg_name(1)]
    with pytest.raises(StorageError) as ei:
        await deliver(store, [Delivery(root, MSG + b"lost\r\n")])
    assert ei.value.code == code
    assert fired

    [p] = await deliver(store, [Delivery(root, MSG)])
    await until(p.exists)
    assert seg_name(1) not in segs(jdir)  # the segment whose flush failed is given up
    assert segs(jdir) == [seg_name(2)]
    records, _, _ = read_segment(str(jdir / seg_name(2)), 2)
    assert [[d.message for d in r.deliveries] for r in records] == [[MSG]]
    await store.aclose()
    assert os.listdir(jdir) == ["lock"]

    again = JournaledStore(jdir)
    assert again.open() == 0
    await again.aclose()
    assert listing(root) == {"tmp": [], "new": [p.name], "cur": []}


# ---------------------------------------------------------------------------------------------
# Maildir failures after the 250


async def test_failed_maildir_write_is_retried_without_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "RETRY_DELAYS", (0.01, 0.02))
    jdir, root = tmp_path / "journal", tmp_path / "u"
    break_new(root)
    store = JournaledStore(jdir)
    store.open()
    try:
        [p] = await deliver(store, [Delivery(root, MSG, prefix=PREFIX)])  # in the journal: accepted
        await asyncio.sleep(0.1)  # several attempts fail meanwhile
        assert not p.exists()
        records, done, _ = read_segment(str(jdir / seg_name(1)), 1)
        assert len(records) == 1 and not done
        fix_new(root)
        await until(p.exists)
        assert p.read_bytes() == PREFIX + MSG
        await until(lambda: read_segment(str(jdir / seg_name(1)), 1)[1] == {0})
    finally:
        await store.aclose()
    assert listing(root) == {"tmp": [], "new": [p.name], "cur": []}
    assert os.listdir(jdir) == ["lock"]


async def test_close_keeps_records_waiting_for_a_retry(tmp_path: Path) -> None:
    jdir, root = tmp_path / "journal", tmp_path / "u"
    break_new(root)
    store = JournaledStore(jdir)
    store.open()
    [p] = await deliver(store, [Delivery(root, MSG)])
    t0 = time.monotonic()
    await store.aclose()  # the retry (10 s away) is not waited for
    assert time.monotonic() - t0 < 5
    assert segs(jdir) == [seg_name(1)]
    fix_new(root)
    store = JournaledStore(jdir)
    assert store.open() == 1
    await until(p.exists)
    await store.aclose()
    assert p.read_bytes() == MSG and os.listdir(jdir) == ["lock"]


# ---------------------------------------------------------------------------------------------
# Segments


async def test_full_segments_are_removed_once_their_records_are_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "RETRY_DELAYS", (0.02,))
    jdir, root = tmp_path / "journal", tmp_path / "u"
    break_new(root)
    store = JournaledStore(jdir, segment_max=4096)
    store.open()
    try:
        bodies = [MSG + bytes([65 + i]) * 100_000 for i in range(3)]
        paths = [(await deliver(store, [Delivery(root, b)]))[0] for b in bodies]
        # one 100 KB record fills a segment: three full ones (kept, their files are not
        # written yet) and the next, empty
        await until(lambda: segs(jdir) == [seg_name(i) for i in (1, 2, 3, 4)])
        for i, body in enumerate(bodies, 1):
            [rec], done, _ = read_segment(str(jdir / seg_name(i)), i)
            assert rec.deliveries[0].message == body and not done
        fix_new(root)
        await until(lambda: all(p.exists() for p in paths) and segs(jdir) == [seg_name(4)])
        assert [p.read_bytes() for p in paths] == bodies

        more = [MSG + bytes([97 + i]) * 100_000 for i in range(10)]
        results = await asyncio.wait_for(asyncio.gather(*(store.deliver([Delivery(root, b)]) for b in more)), 20)
        more_paths = [p for [p] in results]
        await until(lambda: all(p.exists() for p in more_paths) and len(segs(jdir)) == 1)
        assert int(segs(jdir)[0][:-4], 16) > 4
        assert [p.read_bytes() for p in more_paths] == more
    finally:
        await store.aclose()
    assert os.listdir(jdir) == ["lock"]
    assert len(listing(root)["new"]) == 13


# ---------------------------------------------------------------------------------------------
# open_local_store (mox serve)


def _config(tmp_path: Path, journal_on: bool) -> Any:
    static = textwrap.dedent(
        f"""\
        hostname = "mail.example.org"
        data_dir = "data"
        delivery_journal = {"true" if journal_on else "false"}

        [postmaster]
        account = "admin"
        """
    )
    return load(tmp_path / "cfg", static, MINIMAL_DOMAINS, host=PluginHost.load(autoload=False), base=False)


async def test_open_local_store_adopts_journals_of_processes_gone(tmp_path: Path) -> None:
    config = _config(tmp_path, journal_on=True)
    top = config.data_dir / "journal"
    root = config.data_dir / "accounts" / "admin" / "Maildir"
    [[gone]] = leftover(top / "worker-3", [Delivery(root, MSG + b"gone\r\n")])
    [[running]] = leftover(top / "worker-1", [Delivery(root, MSG + b"running\r\n")])

    store = await open_local_store(config, "main", others=["worker-0", "worker-1"])
    try:
        assert isinstance(store, JournaledStore)
        assert store.dir == os.fspath(top / "main")
        await until(gone.exists)
        assert gone.read_bytes() == MSG + b"gone\r\n"
        intruder = JournaledStore(top / "worker-3", lock_wait=0)
        with pytest.raises(JournalInUse):  # held while the store runs
            intruder.open()
        intruder.close()
        [p] = await deliver(store, [Delivery(root, MSG)])
        await until(p.exists)
    finally:
        await store.aclose()
    assert os.listdir(top / "worker-3") == ["lock"]
    assert os.listdir(top / "main") == ["lock"]
    # a running worker's journal is its own: not replayed, not touched
    assert not running.exists()
    assert segs(top / "worker-1") == [seg_name(1)]
    assert listing(root)["new"] == sorted([gone.name, p.name])


async def test_open_local_store_without_others_adopts_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, journal_on=True)
    top = config.data_dir / "journal"
    root = config.data_dir / "accounts" / "admin" / "Maildir"
    [[other]] = leftover(top / "worker-2", [Delivery(root, MSG)])
    store = await open_local_store(config, "worker-0")
    await store.aclose()
    assert not other.exists() and segs(top / "worker-2") == [seg_name(1)]


async def test_open_local_store_own_and_adopted_leftovers_are_all_cleared(tmp_path: Path) -> None:
    # both journals' first segment is 0000000000000001.seg
    config = _config(tmp_path, journal_on=True)
    top = config.data_dir / "journal"
    root = config.data_dir / "accounts" / "admin" / "Maildir"
    [[own]] = leftover(top / "main", [Delivery(root, MSG + b"own\r\n")])
    [[adopted]] = leftover(top / "worker-3", [Delivery(root, MSG + b"adopted\r\n")])
    store = await open_local_store(config, "main", others=[])
    assert store.replayed == 2
    await until(lambda: own.exists() and adopted.exists())
    await store.aclose()
    assert own.read_bytes() == MSG + b"own\r\n" and adopted.read_bytes() == MSG + b"adopted\r\n"
    assert os.listdir(top / "worker-3") == ["lock"]
    assert os.listdir(top / "main") == ["lock"]


async def test_open_local_store_with_journal_off_writes_out_leftovers(tmp_path: Path) -> None:
    config = _config(tmp_path, journal_on=False)
    top = config.data_dir / "journal"
    root = config.data_dir / "accounts" / "admin" / "Maildir"
    [[own]] = leftover(top / "main", [Delivery(root, MSG + b"own\r\n")])
    # (another segment number than main's: see the test above for equal ones)
    [[adopted]] = leftover(top / "worker-5", [Delivery(root, MSG + b"adopted\r\n")], first_seq=2)
    store = await open_local_store(config, "main", others=[])
    try:
        assert type(store) is MaildirStore
        # written before the plain store is handed out
        assert own.read_bytes() == MSG + b"own\r\n"
        assert adopted.read_bytes() == MSG + b"adopted\r\n"
        assert segs(top / "main") == [] and segs(top / "worker-5") == []
        [p] = await asyncio.wait_for(store.deliver([Delivery(root, MSG)]), 10)
        assert p.read_bytes() == MSG  # in new/ once deliver() returns: no journal
    finally:
        await store.aclose()
    assert listing(root)["new"] == sorted([own.name, adopted.name, p.name])


async def test_open_local_store_with_journal_off_and_no_leftover_makes_no_journal(tmp_path: Path) -> None:
    config = _config(tmp_path, journal_on=False)
    store = await open_local_store(config, "main", others=[])
    try:
        assert type(store) is MaildirStore
    finally:
        await store.aclose()
    assert not (config.data_dir / "journal").exists()
