"""Memory with many idle SMTP connections: RSS of ``mox serve`` with 10,000 open sessions.

The server runs with RLIMIT_NOFILE raised to 65536 (set in the child before exec, like
``prlimit``/``ulimit -n``); this process raises its own limit too. Connections come from
several source addresses (127.0.0.2, 127.0.0.3, ...; 2,000 each) so that ephemeral ports
never run out. Each connection reads the 220 greeting and then, with ``--ehlo``, sends EHLO
and reads the reply (a session waiting for MAIL), then stays idle. RSS is VmRSS from
/proc/PID/status: before, after every 2,000 connections, after all are open (and again 2 s
later), and after they are closed. While all are open, one ordinary session (smtpload,
1 message) checks that the server still serves, and how fast.

    .venv/bin/python bench/idle.py [--connections 10000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path

from common import MoxBench, bench_dns, log, raise_nofile, rss_kb, smtpload

from mox_testpeers import make_private_dir

PER_SOURCE = 2000


async def open_idle(port: int, n: int, ehlo: bool, pid: int, rss_steps: list) -> list:
    conns: list = []
    sem = asyncio.Semaphore(200)  # connects in flight (the listen backlog is 1024)

    async def one(i: int) -> None:
        src = f"127.0.0.{2 + i // PER_SOURCE}"
        async with sem:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), 30)
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line.startswith(b"220"):
                raise RuntimeError(f"connection {i}: {line!r}")
            if ehlo:
                writer.write(b"EHLO idle.bench.test\r\n")
                while True:
                    line = await asyncio.wait_for(reader.readline(), 30)
                    if line[3:4] != b"-":
                        break
        conns.append((reader, writer))

    for start in range(0, n, PER_SOURCE):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + PER_SOURCE))))
        rss_steps.append((len(conns), rss_kb(pid)))
        log(f"{len(conns)} idle connections open, server RSS {rss_kb(pid) / 1024:.1f} MiB")
    return conns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--no-ehlo", dest="ehlo", action="store_false")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    raise_nofile(a.connections + 4096)
    base = make_private_dir("mox-bench-idle-")
    dns = bench_dns(stall_domains=["dest.test"])
    mox = MoxBench(base / "mox", dns.nameserver)
    out: dict = {"connections": a.connections, "ehlo": a.ehlo}
    try:
        mox.start(nofile=65536)
        smtpload(mox.smtp_port, sessions=1, messages=20, length=2048)  # warm: one code path run
        time.sleep(1)
        out["rss_before_kib"] = rss_kb(mox.pid)
        out["fd_limit_server"] = open(f"/proc/{mox.pid}/limits").read().split("Max open files")[1].split()[0]

        async def scenario() -> None:
            steps: list = []
            t0 = time.perf_counter()
            conns = await open_idle(mox.smtp_port, a.connections, a.ehlo, mox.pid, steps)
            out["open_seconds"] = round(time.perf_counter() - t0, 2)
            out["rss_steps_kib"] = steps
            out["rss_all_open_kib"] = rss_kb(mox.pid)
            await asyncio.sleep(2)
            out["rss_all_open_after_2s_kib"] = rss_kb(mox.pid)
            # while all are open: an ordinary session still works
            res = await asyncio.to_thread(smtpload, mox.smtp_port, sessions=1, messages=50, length=2048)
            out["session_latency_while_idle_ms"] = res["lat_ms"]
            out["server_fds"] = len(list(Path(f"/proc/{mox.pid}/fd").iterdir()))
            for _, w in conns:
                w.close()
            await asyncio.sleep(3)
            out["rss_after_close_kib"] = rss_kb(mox.pid)

        asyncio.run(scenario())
        per = (out["rss_all_open_kib"] - out["rss_before_kib"]) / a.connections
        out["kib_per_connection"] = round(per, 2)
        log(f"RSS before {out['rss_before_kib'] / 1024:.1f} MiB, with {a.connections} idle "
            f"{out['rss_all_open_kib'] / 1024:.1f} MiB ({per:.1f} KiB each), after close "
            f"{out['rss_after_close_kib'] / 1024:.1f} MiB")
    finally:
        mox.stop()
        dns.stop()
        shutil.rmtree(base, ignore_errors=True)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
