"""In-process cost of storing into the outgoing queue: ``QueueStore.add`` timed alone.

No SMTP, no peers: each round starts a fresh process per code tree that opens a new queue in
``/var/tmp`` (the file system of the spools), adds ``--count`` messages of ``--size`` bytes
(``--concurrency`` at a time), and prints adds per second, p50 and mean latency, and the
process's CPU time per add. Code trees alternate within a round, so each comparison is made
in the same minutes of this shared machine.

    .venv/bin/python bench/queue_add.py --size 102400 --concurrency 10 . /tmp/base
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import PYTHON


async def measure(size: int, count: int, concurrency: int) -> dict:
    from mox_core.queue import QueueStore

    head = b"From: a@example.org\r\nSubject: x\r\nMessage-ID: <a@example.org>\r\n\r\n"
    data = head + b"x" * (size - len(head) - 2) + b"\r\n"
    d = tempfile.mkdtemp(dir="/var/tmp", prefix="mox-bench-add-")
    store = QueueStore(d)
    await store.open()
    lat: list[float] = []

    async def one() -> None:
        t = time.perf_counter()
        await store.add(account=None, mail_from="a@example.org", recipients=["b@dest.example"], data=data)
        lat.append(time.perf_counter() - t)

    try:
        for _ in range(20):  # warm up; a first segment is made meanwhile
            await one()
        await asyncio.sleep(0.5)
        lat.clear()
        cpu0, t0 = os.times(), time.perf_counter()

        async def adder(n: int) -> None:
            for _ in range(n):
                await one()

        await asyncio.gather(*(adder(count // concurrency) for _ in range(concurrency)))
        elapsed, cpu1 = time.perf_counter() - t0, os.times()
    finally:
        await store.close()
        shutil.rmtree(d, ignore_errors=True)
    n = len(lat)
    return {"per_s": round(n / elapsed, 1), "p50_ms": round(statistics.median(lat) * 1000, 3),
            "mean_ms": round(statistics.mean(lat) * 1000, 3),
            "cpu_ms": round((cpu1.user - cpu0.user + cpu1.system - cpu0.system) * 1000 / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="*", default=["."], help="directories holding a mox_core/ to compare")
    ap.add_argument("--size", type=int, default=102400)
    ap.add_argument("--count", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(asyncio.run(measure(a.size, a.count, a.concurrency))))
        return
    results: dict[str, list[dict]] = {}
    for rnd in range(a.rounds):
        for tree in a.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            out = subprocess.run([PYTHON, __file__, "--child", "--size", str(a.size), "--count", str(a.count),
                                  "--concurrency", str(a.concurrency)], env=env, check=True,
                                 capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results.setdefault(tree, []).append(res)
            print(f"round {rnd + 1} {tree:20} {res['per_s']:8.0f} adds/s  p50 {res['p50_ms']:.2f} ms  "
                  f"mean {res['mean_ms']:.2f} ms  CPU {res['cpu_ms']:.2f} ms/add", flush=True)
    for tree, runs in results.items():
        print(f"{tree:20} median {statistics.median(r['per_s'] for r in runs):8.0f} adds/s", file=sys.stderr)


if __name__ == "__main__":
    main()
