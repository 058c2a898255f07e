"""Micro-benchmark: durable Maildir deliveries/s, group-commit store vs a naive baseline.

Baseline: ``await asyncio.to_thread(write + fsync + rename + dir fsync)`` per message: a thread
hand-off and two flushes for every message, nothing shared between concurrent deliveries.
Store: :class:`mox_core.store.MaildirStore` (group commit). Both do the
same durable work per message (same names, same ``writev`` of a Delivered-To prefix plus the
body, four recipient Maildirs), in one run, interleaved, median of ``--rounds``. The machine is
noisy, so only the ratio column means something.

Spools are not deleted between measurements: after mass deletes ext4 makes file creation
slower for minutes (without a journal, allocating an inode searches past every inode of its
group freed in the last minutes), which would punish whichever variant runs next.

    .venv/bin/python bench/maildir_write.py [--rounds 5] [--seconds 1.0] [--writers 4[,1,...]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mox_core.store import Delivery, Maildir, MaildirStore, unique_name
from mox_core.store.maildir import fsync_dir

SIZES = {"2KB": 2 * 1024, "100KB": 100 * 1024}
CONCURRENCY = (1, 20)
RECIPIENTS = 4

Deliver = Callable[[int], Awaitable[object]]


def naive_write(md: Maildir, prefix: bytes, body: bytes) -> Path:
    """The obvious durable write, one message at a time, no batching."""
    name = unique_name(len(prefix) + len(body))
    tmp, new = os.path.join(md.tmp, name), os.path.join(md.new, name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.writev(fd, (prefix, body))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, new)
    fsync_dir(md.new)
    return Path(new)


def make_body(size: int) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    head = b"From: a@ext.test\r\nTo: u@local.test\r\nSubject: bench\r\n\r\n"
    return (head + line * (size // len(line) + 1))[:size]


async def measure(deliver: Deliver, concurrency: int, seconds: float) -> float:
    """Deliveries per second with ``concurrency`` clients, each awaiting one delivery at a time."""
    count = 0
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal count
        n = i
        while time.perf_counter() < deadline:
            await deliver(n)
            n += concurrency
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return count / (time.perf_counter() - start)


async def run(rounds: int, seconds: float, writer_counts: list[int], base: Path) -> None:
    stores = {f"w{w}": MaildirStore(writers=w) for w in writer_counts}
    variants = ["naive", *stores]
    results: dict[tuple[str, int, str], list[float]] = {}
    batch_sizes: dict[tuple[str, int, str], list[float]] = {}
    roots = {v: [base / v / f"u{r}" for r in range(RECIPIENTS)] for v in variants}
    mds = {v: [Maildir(p) for p in ps] for v, ps in roots.items()}
    for v in variants:
        for md in mds[v]:
            md.ensure()
    prefixes = [b"Delivered-To: u%d@local.test\r\n" % r for r in range(RECIPIENTS)]
    bodies = {label: make_body(size) for label, size in SIZES.items()}

    def naive(body: bytes) -> Deliver:
        async def deliver(n: int) -> object:
            r = n % RECIPIENTS
            return await asyncio.to_thread(naive_write, mds["naive"][r], prefixes[r], body)

        return deliver

    def grouped(v: str, body: bytes) -> Deliver:
        async def deliver(n: int) -> object:
            r = n % RECIPIENTS
            return await stores[v].deliver([Delivery(roots[v][r], body, prefix=prefixes[r])])

        return deliver

    for rnd in range(rounds):
        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]  # rotate
        for label, body in bodies.items():
            for conc in CONCURRENCY:
                for v in order:
                    fn = naive(body) if v == "naive" else grouped(v, body)
                    st = stores.get(v)
                    before = (st.stats.batches, st.stats.deliveries) if st else (0, 0)
                    results.setdefault((label, conc, v), []).append(await measure(fn, conc, seconds))
                    if st:
                        nb, nd = st.stats.batches - before[0], st.stats.deliveries - before[1]
                        batch_sizes.setdefault((label, conc, v), []).append(nd / max(nb, 1))
    for st in stores.values():
        await st.aclose()

    print(f"median of {rounds} rounds x {seconds:.1f}s, {RECIPIENTS} recipient Maildirs")
    print("wN = MaildirStore(writers=N); ratio = wN/naive; batch = deliveries per group commit")
    header = f"{'case':<16}{'naive/s':>9}"
    for v in stores:
        header += f"{v + '/s':>9}{'ratio':>7}{'batch':>7}"
    print(header)
    for label in SIZES:
        for conc in CONCURRENCY:
            base_rate = statistics.median(results[(label, conc, "naive")])
            line = f"{f'{conc:>2} conc, {label}':<16}{base_rate:>9.0f}"
            for v in stores:
                rate = statistics.median(results[(label, conc, v)])
                batch = statistics.median(batch_sizes[(label, conc, v)])
                line += f"{rate:>9.0f}{rate / base_rate:>6.2f}x{batch:>7.1f}"
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="duration of each measurement")
    ap.add_argument(
        "--writers", default="4", help="writer threads of the store; a comma list compares several"
    )
    ap.add_argument("--dir", type=Path, default=None, help="spool directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="do not delete the spool afterwards")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="mox-bench-maildir-"))
    try:
        asyncio.run(run(args.rounds, args.seconds, [int(w) for w in args.writers.split(",")], base))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
