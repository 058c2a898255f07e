"""Run every benchmark in sequence and print one summary (markdown) for RESULTS.md.

Each part is its own script (see README.md) and writes JSON into --out (default
bench/results/); this only runs them one after the other (never two at once: the machine has
2 cores) and formats the figures.

    .venv/bin/python bench/run.py [--quick] [--parts machine,accept,dkim,phases,outbound,idle,queue,web,profile]

``--quick`` (about 6 minutes) is for checking that everything works: 1 round, fewer
messages, queue sizes up to 100,000, 2 s web measurements. The full run takes 30-35 minutes
(the web part about 5, DKIM against Postfix + OpenDKIM about 12).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PARTS = ["machine", "accept", "dkim", "phases", "outbound", "idle", "queue", "web", "profile"]


def run_part(name: str, args: list[str], out: Path) -> None:
    cmd = [sys.executable, str(BENCH / args[0]), *args[1:]]
    print(f"\n$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL if name != "profile" else None, cwd=BENCH.parent)
    print(f"[{name}: exit {p.returncode} after {time.monotonic() - t0:.0f} s]", file=sys.stderr, flush=True)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed")


def summary(out: Path) -> str:
    lines = []

    def load(name: str) -> dict | None:
        p = out / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    m = load("machine")
    if m:
        lines += ["## Machine", "",
                  f"{m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB, kernel {m['kernel']}, "
                  f"{m['fs_tmp']} ({m['root_mount']}), Python {m['python']}, Postfix {m['postfix']}, "
                  f"load average at start {' '.join(m['loadavg'])}.",
                  f"Durable 2 KB write (create, write, fsync, rename, dir fsync): median "
                  f"{m['fsync_2KB']['median_ms']} ms (file fsync alone {m['fsync_2KB']['file_fsync_median_ms']} ms); "
                  f"100 KB: {m['fsync_100KB']['median_ms']} ms.", ""]
    a = load("accept")
    if a:
        from accept import table
        lines += ["## Acceptance", "", table(a), ""]
    d = load("dkim")
    if d:
        from dkimreport import table as dkim_table
        lines += ["## DKIM both ways: mox against Postfix and Postfix + OpenDKIM", "", dkim_table(d), ""]
    ph = load("phases")
    if ph:
        from phases import tables
        lines += ["## One session, step by step", "", tables(ph)]
    o = load("outbound")
    if o:
        lines += ["## Outbound (smtp transport to smtp-sink)", "",
                  f"{o['messages']} messages, median of {o['rounds']} rounds", "",
                  "| target | msgs/s | ratio to Postfix | mox CPU ms/msg | runs |", "|---|---|---|---|---|"]
        for t, r in o["targets"].items():
            ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "1"
            cpu = f"{r['cpu_ms_per_msg']:.2f}" if "cpu_ms_per_msg" in r else "-"
            lines.append(f"| {t} | {r['median']:.0f} | {ratio} | {cpu} | {r['runs']} |")
        lines.append("")
    i = load("idle")
    if i:
        lines += ["## Idle connections", "",
                  f"{i['connections']} idle connections: server RSS {i['rss_before_kib'] / 1024:.1f} MiB before, "
                  f"{i['rss_all_open_kib'] / 1024:.1f} MiB with all open ({i['kib_per_connection']} KiB each), "
                  f"{i['rss_after_close_kib'] / 1024:.1f} MiB after closing; a new session while all were "
                  f"open: p50 {i['session_latency_while_idle_ms']['p50']} ms.", ""]
    q = load("queue")
    if q:
        lines += ["## Queue scale", "",
                  "| rows | shape | open s | pick us | pick (9 busy) us | next_due us | attempt us | add ms | add x20 /s | DB MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n, shapes in q["store"].items():
            for shape, r in shapes.items():
                lines.append(f"| {int(n):,} | {shape} | {r['open_s']} | {r['pick']['median_us']} | "
                             f"{r['pick_busy']['median_us']} | {r['next_due']['median_us']} | "
                             f"{r['attempt']['median_us']} | {r['add_sequential_ms']} | "
                             f"{r['add_20_concurrent_per_s']} | {r['db_mib']} |")
        lines += ["", "| records in 24 h window | rate limit in_window() us |", "|---|---|"]
        for n, r in q["ratelimit"].items():
            lines.append(f"| {int(n):,} | {r['in_window']['median_us']} |")
        if q.get("e2e"):
            lines += ["", "| queued | mox serve start s | queue accept 1 conn /s | 20 conns /s |", "|---|---|---|---|"]
            for n, r in q["e2e"].items():
                lines.append(f"| {int(n):,} | {r['start_s']} | {r['queue_accept_1conn_per_s']} | "
                             f"{r['queue_accept_20conn_per_s']} |")
        lines.append("")
    w = load("web")
    if w:
        from web import table as web_table
        lines += ["## Web server (mox's static and forward handlers vs nginx)", "", web_table(w), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--summary-only", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    q = a.quick
    cmds = {
        "machine": ["machine.py", "--out", str(a.out / "machine.json")],
        # "one": the same code with smtp_workers = 1 (one process), measured in the same rounds
        "accept": ["accept.py", "--rounds", "1" if q else "5", "--scale", "0.3" if q else "1",
                   "--variant", "one=,workers=1", "--out", str(a.out / "accept.json")],
        # DKIM both ways (signed incoming mail verified, submissions signed; RSA-2048 and
        # Ed25519): mox, Postfix without DKIM and Postfix with the OpenDKIM milter
        "dkim": ["dkimcost.py", "--rounds", "1" if q else "5", "--scale", "0.3" if q else "1",
                 "--out", str(a.out / "dkim.json")],
        "phases": ["phases.py", "--rounds", "1" if q else "6", "--sessions", "30" if q else "100",
                   "--out", str(a.out / "phases.json")],
        # "unpinned": the workers not pinned to their CPUs (pin_smtp_workers = false)
        "outbound": ["outbound.py", "--rounds", "1" if q else "3", "--messages", "300" if q else "3000",
                     "--variant", "one=,workers=1", "--variant", "unpinned=,pin=false",
                     "--out", str(a.out / "outbound.json")],
        "idle": ["idle.py", "--connections", "10000", "--out", str(a.out / "idle.json")],
        "queue": ["queue_scale.py", "--sizes", "1000,10000,100000" if q else "1000,10000,100000,1000000",
                  "--e2e", "--out", str(a.out / "queue.json")],
        # mox's web handlers (static, forward) against nginx, wrk at 1 and 50 connections
        "web": ["web.py", "--rounds", "1" if q else "3", "--duration", "2" if q else "5",
                "--out", str(a.out / "web.json")],
        "profile": ["profile.py", "--seconds", "4" if q else "8", "--out", str(a.out)],
    }
    if not a.summary_only:
        for part in a.parts.split(","):
            run_part(part, cmds[part], a.out)
    sys.path.insert(0, str(BENCH))
    print(summary(a.out))


if __name__ == "__main__":
    main()
