"""Machine notes for RESULTS.md: CPUs, memory, kernel, filesystem, fsync cost, versions.

fsync cost: the durable write every acceptance pays, measured in a directory under /tmp
(same filesystem as the spools): create a 2 KB (and a 100 KB) file in tmp/, write, fsync,
close, rename into new/, fsync new/ -- median and p90 of 300.

    .venv/bin/python bench/machine.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import postfix_version

from mox_testpeers import make_private_dir


def fsync_cost(size: int, n: int = 300) -> dict:
    d = make_private_dir("mox-bench-fsync-")
    try:
        (d / "tmp").mkdir()
        (d / "new").mkdir()
        data = b"x" * size
        xs, only_fsync = [], []
        dfd = os.open(d / "new", os.O_RDONLY | os.O_DIRECTORY)
        for i in range(n):
            t0 = time.perf_counter()
            fd = os.open(d / "tmp" / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            t1 = time.perf_counter()
            os.fsync(fd)
            t2 = time.perf_counter()
            os.close(fd)
            os.rename(d / "tmp" / str(i), d / "new" / str(i))
            os.fsync(dfd)
            xs.append(time.perf_counter() - t0)
            only_fsync.append(t2 - t1)
        os.close(dfd)
        xs.sort()
        return {"size": size, "median_ms": round(statistics.median(xs) * 1e3, 3),
                "p90_ms": round(xs[int(n * 0.9)] * 1e3, 3),
                "file_fsync_median_ms": round(statistics.median(only_fsync) * 1e3, 3)}
    finally:
        shutil.rmtree(d, ignore_errors=True)  # small: 300 files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = open("/proc/meminfo").readline().split()[1]
    df = subprocess.run(["df", "-T", "/tmp"], capture_output=True, text=True).stdout.splitlines()[-1].split()
    mount = ""
    for line in open("/proc/mounts"):
        parts = line.split()
        if parts[1] == "/":
            mount = f"{parts[0]} {parts[2]} {parts[3]}"
    journal = ""
    dev = df[0]
    if shutil.which("dumpe2fs") and dev.startswith("/dev/"):
        p = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if line.startswith("Filesystem features:"):
                journal = "has_journal" if "has_journal" in line else "no journal"
    notes = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "fs_tmp": f"{df[1]} on {df[0]}",
        "root_mount": mount,
        "ext4_journal": journal,
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "python": sys.version.split()[0],
        "postfix": postfix_version(),
        "fsync_2KB": fsync_cost(2048),
        "fsync_100KB": fsync_cost(100 * 1024),
        "nofile": subprocess.run(["bash", "-c", "ulimit -Sn; ulimit -Hn"], capture_output=True,
                                 text=True).stdout.split(),
        "ip_local_port_range": open("/proc/sys/net/ipv4/ip_local_port_range").read().split(),
    }
    if a.out:
        a.out.write_text(json.dumps(notes, indent=1))
    print(json.dumps(notes, indent=1))


if __name__ == "__main__":
    main()
