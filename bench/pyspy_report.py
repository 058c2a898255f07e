"""Summarise a py-spy ``--format raw`` (collapsed stacks) profile: per thread, top functions
by self samples and by inclusive samples.

    python bench/pyspy_report.py PROFILE.txt [--top 20] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

# file names are shown relative to these: installed packages, the standard library, this checkout
_PREFIXES = ("site-packages/", "/lib/python3.", str(Path(__file__).resolve().parent.parent) + "/")

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    for marker in _PREFIXES:
        if marker in f:
            f = f.split(marker, 1)[1]
            if marker == "/lib/python3.":  # "11/asyncio/events.py" -> "asyncio/events.py"
                f = f.split("/", 1)[-1]
    return f"{m.group('func')} ({f})"


def parse(path: str) -> dict[str, collections.Counter]:
    """{"thread label": Counter}; keys "self:<fn>" and "incl:<fn>"; "total" counts samples."""
    threads: dict[str, dict[str, collections.Counter]] = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        # py-spy --threads: the root is "thread (TID): NAME"; label threads by name without digits
        # py-spy --subprocesses: "process PID:\"COMMAND\"" comes first; SMTP workers get their own label
        proc = ""
        if frames and frames[0].startswith("process "):
            proc = "worker " if "smtp-worker" in frames[0] else ""
            frames = frames[1:]
        label = "?"
        if frames and frames[0].startswith("thread ("):
            name = frames[0].split(":", 1)[1].strip() if ":" in frames[0] else frames[0]
            label = proc + {"MainThread": "MainThread (event loop)"}.get(name, re.sub(r"[-_]?\d+$", "", name))
        py = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not py:
            continue
        t = threads.setdefault(label, {"self": collections.Counter(), "incl": collections.Counter(),
                                       "total": collections.Counter()})
        t["total"]["samples"] += n
        t["self"][_short(py[-1])] += n
        for fn in {_short(f) for f in py}:
            t["incl"][fn] += n
    return threads


def report(path: str, top: int = 20, wall_samples: int | None = None) -> dict:
    """``wall_samples`` (duration x rate): also give each thread's busy share of wall time."""
    threads = parse(path)
    grand = sum(t["total"]["samples"] for t in threads.values()) or 1
    out = {}
    for label, t in sorted(threads.items(), key=lambda kv: -kv[1]["total"]["samples"]):
        total = t["total"]["samples"] or 1
        out[label] = {
            "share_of_all_samples": round(total / grand, 3),
            "samples": total,
            "busy_share_of_wall": round(total / wall_samples, 3) if wall_samples else None,
            "self": [(fn, round(n / total, 3)) for fn, n in t["self"].most_common(top)],
            "inclusive": [(fn, round(n / total, 3)) for fn, n in t["incl"].most_common(top)],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rep = report(a.profile, a.top)
    if a.json:
        print(json.dumps(rep, indent=1))
        return
    for label, r in rep.items():
        print(f"== {label}: {r['share_of_all_samples']:.0%} of samples ({r['samples']})")
        print("   self:")
        for fn, share in r["self"]:
            print(f"   {share:6.1%}  {fn}")
        print("   inclusive:")
        for fn, share in r["inclusive"]:
            print(f"   {share:6.1%}  {fn}")


if __name__ == "__main__":
    main()
