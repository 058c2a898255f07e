"""Profile the acceptance path of ``mox serve`` with py-spy (1 and 20 connections, 2 KB or --size).

Starts the same peers as accept.py, runs smtp-source against mox's SMTP listener (Maildir
delivery) while ``py-spy record --idle --threads --subprocesses --format raw`` samples the server, and
prints, per thread group, the functions with the most samples (self and inclusive). With
``--idle`` every thread is sampled at every tick, so a share is a share of wall time; idle
frames (``EpollSelector.select`` in the event loop, queue waits in worker threads) show how
much of the time a thread had nothing to do. Also ``--target queue`` (smtpload with AUTH into
the outgoing queue).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py [--seconds 8] [--rate 100] [--target maildir|queue] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

from accept import Bench
from common import BENCH, PYTHON, log
from pyspy_report import report

from mox_testpeers import make_private_dir

RAW_DIR = Path("/tmp/mox-bench-profiles")


def py_spy() -> str:
    exe = Path(PYTHON).with_name("py-spy")
    if not exe.exists():
        raise SystemExit("py-spy missing: .venv/bin/pip install py-spy")
    return str(exe)


def profile_case(bench: Bench, target: str, sessions: int, seconds: float, rate: int, out: Path,
                 size: int = 2048) -> dict:
    raw = RAW_DIR / f"pyspy-{target}-{sessions}conn-{size // 1024}KB.txt"  # raw profiles stay out of the tree
    spy = subprocess.Popen([py_spy(), "record", "--pid", str(bench.mox.pid), "--duration", str(int(seconds)),
                            "--rate", str(rate), "--idle", "--threads", "--subprocesses", "--nonblocking", "--format", "raw", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    results: list = []
    stop = threading.Event()

    def load() -> None:  # keep the server busy for the whole recording, in chunks
        while not stop.is_set():
            results.append(bench.run("mox-maildir" if target == "maildir" else "mox-queue",
                                     sessions, size, 200 if sessions == 1 else 600))

    th = threading.Thread(target=load)
    th.start()
    spy.wait(seconds + 30)
    stop.set()
    th.join()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {spy.stderr.read().decode()}")
    rep = report(str(raw), top=25)
    rep["_load"] = {"rate_under_profiler": round(sum(r["rate"] for r in results) / len(results), 1)}
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--target", default="maildir", choices=["maildir", "queue"])
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    RAW_DIR.mkdir(exist_ok=True)
    base = make_private_dir("mox-bench-profile-")
    bench = Bench(base)
    reports = {}
    try:
        bench.run(f"mox-{a.target}" if a.target == "queue" else "mox-maildir", 4, 2048, 100)
        for sessions in (1, 20):
            kb = f"{a.size // 1024} KB"
            log(f"profiling {a.target}, {sessions} conn(s), {kb}, {a.seconds:.0f} s")
            reports[f"{sessions} conn, {kb}"] = profile_case(bench, a.target, sessions, a.seconds, a.rate,
                                                             a.out, a.size)
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)
    (a.out / f"profile-{a.target}.json").write_text(json.dumps(reports, indent=1))
    for case, rep in reports.items():
        print(f"#### {case}  (mox {a.target}, {rep['_load']['rate_under_profiler']} msgs/s under py-spy)")
        for label, r in rep.items():
            if label.startswith("_"):
                continue
            print(f"== {label}: {r['samples']} samples")
            print("   self (share of this thread group's wall time):")
            for fn, share in r["self"][:15]:
                print(f"   {share:6.1%}  {fn}")
            print("   inclusive:")
            for fn, share in r["inclusive"][:25]:
                print(f"   {share:6.1%}  {fn}")


if __name__ == "__main__":
    main()
