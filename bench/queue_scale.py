"""Queue scale: how picking the next due message, an attempt's bookkeeping and acceptance
(``QueueStore.add``) cost grow from 1,000 to 1,000,000 queued messages.

For each size N the queue database is filled with N rows by direct SQL (one transaction,
``synchronous=OFF`` while filling only; the schema's triggers maintain ``domain_due`` as in
normal operation). Rows are one recipient each, ``base_id = id``, attempts 0-7, and their
``file`` points at a message file that is not created (picking and bookkeeping never read
it; ``add()`` writes real files). Two shapes:

* ``spread``: recipients over 1,000 domains, 10 % of the rows due (next_attempt in the last
  hour), the rest deferred up to 8 hours ahead;
* ``one-domain``: every row for one domain, 10 % due (worst case for per-domain lookups).

Measured in-process on the store the server uses (:class:`mox_core.queue.QueueStore`),
calling its synchronous methods directly (what the single queue thread runs):

* ``open``: ``open(lock=True, cleanup=True)``, what ``mox serve`` does at start (includes the
  orphan scan, which reads every row's file name);
* ``pick``: ``_pick_sync(now, busy=set(), limit=10)``, the scheduler's query for up to 10
  due batches; ``pick busy``: the same with the 9 earliest due domains busy;
  ``next_due``: ``_next_due_sync``;
* ``attempt``: one delivery's bookkeeping: ``_start_sync`` (attempts+1, next_attempt, result;
  a commit) then ``_finish_sync`` removing the row (a commit) -- both with the real
  synchronous=FULL fsyncs;
* ``add``: ``await store.add()`` of a 2 KB message, one at a time (latency) and 20 at once
  (group commit, messages/s) -- the durable path behind the 250 of a submission;
* ``ratelimit``: the rate limiter's ``in_window`` count (run twice per submission, in the
  queue's write transaction) with N records of one account in the last 24 hours.
* ``e2e`` (``--e2e``): ``mox serve`` started on the ``spread`` queue with the due rows moved
  a day ahead (so that the scheduler stays idle): start-up time and smtpload's queue
  acceptance rate (AUTH, 1 and 20 connections, 2 KB) compared with an empty queue.

    .venv/bin/python bench/queue_scale.py [--sizes 1000,10000,100000,1000000] [--e2e] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import statistics
import time
from pathlib import Path

from common import ACCOUNT_ADDR, PASSWORD, REMOTE_RCPT, MoxBench, bench_dns, log, make_message, smtpload

from mox_core import logging as mox_logging
from mox_core.queue import QueueStore
from mox_core.queue.messagedata import FILES_PER_DIR_SHIFT
from mox_testpeers import make_private_dir

SIZES = [1_000, 10_000, 100_000, 1_000_000]
INSERT = ("INSERT INTO msg (id, base_id, account, mail_from, recipient, recipient_domain, queued, "
          "attempts, next_attempt, hold, size, file) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")


def fill(db_path: Path, n: int, shape: str, now: float, seed: int = 1) -> float:
    rnd = random.Random(seed)
    con = sqlite3.connect(db_path, isolation_level=None)
    con.execute("PRAGMA synchronous=OFF")
    t0 = time.perf_counter()
    con.execute("BEGIN")
    batch = []
    for i in range(1, n + 1):
        dom = "big.test" if shape == "one-domain" else f"d{i % 1000}.test"
        due = rnd.random() < 0.10
        nxt = now - rnd.uniform(0, 3600) if due else now + rnd.uniform(60, 28800)
        batch.append((i, i, "bench", ACCOUNT_ADDR, f"r{i}@{dom}", dom, now - 3600, rnd.randrange(8), nxt, 0,
                      2214, f"{i >> FILES_PER_DIR_SHIFT}/{i}"))
        if len(batch) == 20000:
            con.executemany(INSERT, batch)
            batch.clear()
    if batch:
        con.executemany(INSERT, batch)
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return time.perf_counter() - t0


def timed(fn, reps: int) -> dict:
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    xs.sort()
    return {"median_us": round(statistics.median(xs) * 1e6, 1), "p90_us": round(xs[int(len(xs) * 0.9)] * 1e6, 1)}


async def measure_store(data_dir: Path, n: int, shape: str) -> dict:
    out: dict = {}
    now = time.time()
    store = QueueStore(data_dir)
    await store.open(lock=True, cleanup=False)  # creates the schema
    await store.close()
    out["fill_s"] = round(fill(store.db_path, n, shape, now), 2)
    store = QueueStore(data_dir)
    t0 = time.perf_counter()
    await store.open(lock=True, cleanup=True)
    out["open_s"] = round(time.perf_counter() - t0, 3)
    try:
        db = store.db
        out["rows"] = db.execute("SELECT COUNT(*) FROM msg").fetchone()[0]
        out["due_domains"] = db.execute("SELECT COUNT(*) FROM domain_due WHERE next_attempt <= ?",
                                        (time.time(),)).fetchone()[0]
        out["pick"] = timed(lambda: store._pick_sync(time.time(), set(), 10), 200)
        busy = {d for (d,) in db.execute("SELECT domain FROM domain_due ORDER BY next_attempt LIMIT 9")}
        out["pick_busy"] = timed(lambda: store._pick_sync(time.time(), busy, 10), 200)
        out["next_due"] = timed(lambda: store._next_due_sync(busy), 200)
        picked = store._pick_sync(time.time(), set(), 10)
        out["pick_batches"] = len(picked)

        def attempt() -> None:
            [batch] = store._pick_sync(time.time(), set(), 1)
            t = time.time()
            rows = store._start_sync([(m.id, t + 450, 8) for m in batch], t,
                                     {"start": t, "text": "delivering...", "pending": True})
            store._finish_sync([m.id for m in rows], [])

        out["attempt"] = timed(attempt, 100)
        msg = make_message(2048)

        async def add_one() -> None:
            await store.add(account="bench", mail_from=ACCOUNT_ADDR, recipients=[REMOTE_RCPT], data=msg)

        lat = []
        for _ in range(100):
            t0 = time.perf_counter()
            await add_one()
            lat.append(time.perf_counter() - t0)
        out["add_sequential_ms"] = round(statistics.median(lat) * 1e3, 3)
        t0 = time.perf_counter()
        for _ in range(10):
            await asyncio.gather(*(add_one() for _ in range(20)))
        out["add_20_concurrent_per_s"] = round(200 / (time.perf_counter() - t0), 1)
        out["db_mib"] = round(sum(p.stat().st_size for p in store.dir.glob("index.db*")) / 2**20, 1)
    finally:
        await store.close()
    return out


def measure_ratelimit(base: Path, n: int) -> dict:
    from mox_core.builtin.rate_limiters import OutgoingLog

    # The tables live in the queue's index.db (filled directly here, then the per-minute
    # counts rebuilt from the records, as an import of old records does).
    path = base / f"ratelimit-{n}" / "index.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    lg = OutgoingLog()
    now = time.time()
    con = sqlite3.connect(path, isolation_level=None)
    lg.setup(con)
    con.execute("PRAGMA synchronous=OFF")
    con.execute("BEGIN")
    con.executemany("INSERT INTO outgoing(account, recipient, submitted, submission) VALUES (?,?,?,?)",
                    (("bench", f"r{i}@d{i % 1000}.test", now - (i % 80000), f"s{i}") for i in range(n)))
    lg.rebuild(con)
    con.execute("COMMIT")
    out = {"in_window": timed(lambda: lg.in_window(con, "bench", time.time()), 50)}
    con.close()
    return out


def e2e(mox: MoxBench, label: str) -> dict:
    t0 = time.perf_counter()
    mox.start()
    out = {"start_s": round(time.perf_counter() - t0, 2)}
    try:
        auth = (ACCOUNT_ADDR, PASSWORD)
        smtpload(mox.submission_port, sessions=1, messages=20, length=2048, sender=ACCOUNT_ADDR,
                 rcpt=REMOTE_RCPT, auth=auth)
        for s, m in ((1, 300), (20, 600)):
            rates = []
            for _ in range(3):
                rates.append(smtpload(mox.submission_port, sessions=s, messages=m, length=2048,
                                      sender=ACCOUNT_ADDR, rcpt=REMOTE_RCPT, auth=auth)["rate"])
            out[f"queue_accept_{s}conn_per_s"] = round(statistics.median(rates), 1)
        log(f"e2e {label}: {out}")
    finally:
        mox.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--shapes", default="spread,one-domain")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    mox_logging.set_levels("warn")
    sizes = [int(s) for s in a.sizes.split(",")]
    base = make_private_dir("mox-bench-qscale-")
    dns = bench_dns(stall_domains=["dest.test"]) if a.e2e else None
    result: dict = {"store": {}, "ratelimit": {}, "e2e": {}}
    try:
        if a.e2e:
            empty = MoxBench(base / "e2e-empty", dns.nameserver)
            result["e2e"]["0"] = e2e(empty, "empty queue")
        for n in sizes:
            for shape in a.shapes.split(","):
                d = base / f"{shape}-{n}"
                mox = MoxBench(d, dns.nameserver) if (a.e2e and shape == "spread") else None
                data_dir = mox.data_dir if mox else d / "data"
                r = asyncio.run(measure_store(data_dir, n, shape))
                result["store"].setdefault(str(n), {})[shape] = r
                log(f"{n:>9} {shape:10} fill {r['fill_s']}s open {r['open_s']}s pick {r['pick']['median_us']}us "
                    f"pick-busy {r['pick_busy']['median_us']}us next_due {r['next_due']['median_us']}us "
                    f"attempt {r['attempt']['median_us']}us add {r['add_sequential_ms']}ms "
                    f"add20 {r['add_20_concurrent_per_s']}/s db {r['db_mib']}MiB")
                if mox:
                    con = sqlite3.connect(mox.data_dir / "queue" / "index.db", isolation_level=None)
                    con.execute("UPDATE msg SET next_attempt = next_attempt + 86400 WHERE next_attempt <= ?",
                                (time.time() + 60,))
                    con.close()
                    result["e2e"][str(n)] = e2e(mox, f"{n} queued")
                shutil.rmtree(d, ignore_errors=True)
            result["ratelimit"][str(n)] = measure_ratelimit(base, n)
            log(f"{n:>9} ratelimit in_window {result['ratelimit'][str(n)]['in_window']['median_us']}us")
    finally:
        if dns:
            dns.stop()
        shutil.rmtree(base, ignore_errors=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
