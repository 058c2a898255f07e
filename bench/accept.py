"""Acceptance benchmark: messages per second accepted durably, mox vs Postfix, one run.

Targets, all on 127.0.0.1, all started by this script:

* ``smtp-sink``    Postfix's smtp-sink: answers every command and keeps nothing, the ceiling
                   of what the client and the loopback can do (the issue's first row).
* ``postfix``      Postfix (stock settings), from mynetworks, delivered to discard(8) after
                   its queue; cleanup fsyncs the queue file before the 250.
* ``mox-maildir``  ``mox serve``, SMTP listener, local recipient: durable delivery into the
                   account's Maildir (file fsync, rename into new/, new/ fsync) before 250;
                   SPF check of the sender (one TXT lookup to a loopback DNS responder).
* ``postfix-auth`` Postfix, second smtpd listener that relays only after AUTH CRAM-MD5
                   (Cyrus sasldb), remote recipient, discard after the queue.
* ``mox-queue``    ``mox serve``, submission listener (no TLS on loopback), AUTH CRAM-MD5,
                   remote recipient: durable add to the outgoing queue (message file fsync,
                   dir fsync, SQLite WAL commit with synchronous=FULL that also counts the rate limits).

``postfix`` and ``mox-maildir`` are driven by smtp-source (Debian's postfix package): a new
connection per message, HELO, one recipient, no pipelining. smtp-source cannot AUTH, so
``postfix-auth`` and ``mox-queue`` are driven by bench/smtpload.c, which runs the same session
plus EHLO and AUTH CRAM-MD5. Ratios: mox-maildir/postfix and mox-queue/postfix-auth.

Cases: 1 conn 2 KB, 1 conn 100 KB, 20 conns 2 KB, 20 conns 100 KB. Every round runs every
case on every target (target order rotated per round); the figure is the median of the rounds.
"Session latency": smtpload, one connection, one 2 KB message per session, HELO, no AUTH, the
whole session from connect to the reply to QUIT (p50 of each round, median of the rounds).

    .venv/bin/python bench/accept.py [--rounds 5] [--scale 1.0] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import (
    ACCOUNT_ADDR,
    PASSWORD,
    REMOTE_RCPT,
    MoxBench,
    PostfixBench,
    bench_dns,
    cpu_seconds,
    dkim_signed_messages,
    log,
    median,
    rotate,
    smtp_source,
    smtpload,
    variant_mox,
)

from mox_testpeers import make_private_dir
from mox_testpeers.sink import SmtpSink

# label, sessions, body bytes, messages per measurement at --scale 1 (about 1.5-4 s each)
CASES = [
    ("1 conn, 2 KB", 1, 2 * 1024, 600),
    ("1 conn, 100 KB", 1, 100 * 1024, 300),
    ("20 conns, 2 KB", 20, 2 * 1024, 1500),
    ("20 conns, 100 KB", 20, 100 * 1024, 600),
]
TARGETS = ["smtp-sink", "postfix", "mox-maildir", "postfix-auth", "mox-queue"]
PAIRS = [("mox-maildir", "postfix"), ("mox-queue", "postfix-auth"), ("smtp-sink", "postfix")]


class Bench:
    """The peers plus one ``mox serve`` per variant: "mox" is the project as installed; a
    variant ``NAME=DIR`` runs ``mox serve`` with PYTHONPATH=DIR (a patched copy of the
    project, for experiments), as targets ``NAME-maildir`` and ``NAME-queue``."""

    def __init__(self, base: Path, log_level: str = "info", variants: dict[str, str] | None = None,
                 dkim_signed_incoming: bool = False):
        self.base = base
        # --dkim-signed-incoming: smtp-source sends DKIM-signed messages (key in the bench DNS)
        self.message_files: dict[int, Path] = {}
        records = []
        if dkim_signed_incoming:
            base.mkdir(parents=True, exist_ok=True)
            self.message_files, record = dkim_signed_messages([c[2] for c in CASES] + [2048], base)
            records.append(record)
        self.dns = bench_dns(records, stall_domains=["dest.test"])
        self.moxes: dict[str, MoxBench] = {}
        self.pf = PostfixBench("accept", base=base)
        self.sink = SmtpSink(dump=False, backlog=256)
        try:  # a target that fails to start must not leave the others running
            self.sink.start()
            self.pf.start()
            self._start_moxes(base, log_level, variants)
        except BaseException:
            self.close()
            raise

    def _start_moxes(self, base: Path, log_level: str, variants: dict[str, str] | None) -> None:
        self.moxes["mox"] = MoxBench(base / "mox", self.dns.nameserver, log_level=log_level)
        self.moxes["mox"].start()
        for name, spec in (variants or {}).items():
            self.moxes[name] = variant_mox(base / f"mox-{name}", self.dns.nameserver, spec,
                                           log_level=log_level)
            self.moxes[name].start()

    @property
    def mox(self) -> MoxBench:
        return self.moxes["mox"]

    def close(self) -> None:
        for f in (*(m.stop for m in self.moxes.values()), self.pf.stop, self.sink.cleanup, self.dns.stop):
            try:
                f()
            except Exception as exc:  # keep stopping the others
                log("stop failed:", exc)

    def run(self, target: str, sessions: int, length: int, messages: int) -> dict:
        """One measurement; for mox targets also the server's CPU time per message."""
        inst, _, kind = target.rpartition("-")
        pid = self.moxes[inst].pid if inst in self.moxes else None
        cpu0 = cpu_seconds(pid) if pid else 0.0
        res = self._run(target, sessions, length, messages)
        if pid:
            res["cpu_ms_per_msg"] = (cpu_seconds(pid) - cpu0) * 1000 / res["messages"]
        return res

    def _run(self, target: str, sessions: int, length: int, messages: int) -> dict:
        inst, _, kind = target.rpartition("-")
        file = self.message_files.get(length)
        if target == "postfix":
            res = smtp_source(self.pf.port, sessions=sessions, messages=messages, length=length, message_file=file)
        elif target == "smtp-sink":
            res = smtp_source(self.sink.port, sessions=sessions, messages=messages, length=length, message_file=file)
        elif target == "postfix-auth":
            res = smtpload(self.pf.sasl_port, sessions=sessions, messages=messages, length=length,
                           sender=ACCOUNT_ADDR, rcpt=REMOTE_RCPT, auth=("bench", PASSWORD))
        elif kind == "maildir":
            res = smtp_source(self.moxes[inst].smtp_port, sessions=sessions, messages=messages, length=length,
                              message_file=file)
        elif kind == "queue":
            res = smtpload(self.moxes[inst].submission_port, sessions=sessions, messages=messages,
                           length=length, sender=ACCOUNT_ADDR, rcpt=REMOTE_RCPT, auth=(ACCOUNT_ADDR, PASSWORD))
        else:
            raise ValueError(target)
        if target.startswith("postfix"):
            self.settle_postfix()
        return res

    def settle_postfix(self, timeout: float = 60) -> None:
        """Postfix discards after the 250: let its queue drain before the next measurement."""
        deadline = time.monotonic() + timeout
        while self.pf.queue_count() and time.monotonic() < deadline:
            time.sleep(0.05)

    def latency(self, target: str, messages: int) -> dict:
        port = self.pf.port if target == "postfix" else self.moxes[target.rpartition("-")[0]].smtp_port
        res = smtpload(port, sessions=1, messages=messages, length=2048)
        if target == "postfix":
            self.settle_postfix()
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    ap.add_argument("--cases", default="all", help="comma list of case indexes (0-3) or all")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--log-level", default="info", help="mox log_level (default info, as shipped)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--base", type=Path, default=None, help="directory for spools (default mkdtemp)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[,log=LEVEL][,workers=N][,loop=asyncio][,dkim=rsa|ed25519][,pin=false]",
                    help="also run mox serve with PYTHONPATH=DIR (and/or another log_level) as targets "
                         "NAME-maildir, NAME-queue")
    ap.add_argument("--no-latency", dest="latency", action="store_false")
    ap.add_argument("--dkim-signed-incoming", action="store_true",
                    help="smtp-source sends DKIM-signed messages (mox verifies them; Postfix does not)")
    a = ap.parse_args()
    cases = CASES if a.cases == "all" else [CASES[int(i)] for i in a.cases.split(",")]
    variants = dict(v.split("=", 1) for v in a.variant)
    targets = a.targets.split(",")
    for name, spec in variants.items():
        # DKIM signs submissions only: a signing variant's Maildir path is mox's
        if f"{name}-maildir" not in targets and "mox-maildir" in targets and "dkim=" not in spec:
            targets.append(f"{name}-maildir")
        if f"{name}-queue" not in targets and "mox-queue" in targets:
            targets.append(f"{name}-queue")
    base = a.base or make_private_dir("mox-bench-accept-")
    bench = Bench(base, a.log_level, variants, a.dkim_signed_incoming)
    PAIRS.extend((f"{n}-{k}", b) for n in variants for k, b in (("maildir", "postfix"), ("queue", "postfix-auth"))
                 if f"{n}-{k}" in targets)
    PAIRS.extend((f"{n}-{k}", f"mox-{k}") for n in variants for k in ("maildir", "queue") if f"{n}-{k}" in targets)
    results: dict = {"rounds": a.rounds, "scale": a.scale, "cases": {}, "latency": {}}
    try:
        log("warm-up")
        for t in targets:
            bench.run(t, 4, 2048, 100)
        for rnd in range(a.rounds):
            for label, sessions, length, count in cases:
                n = max(20, int(count * a.scale))
                for t in rotate(targets, rnd):
                    res = bench.run(t, sessions, length, n)
                    results["cases"].setdefault(label, {}).setdefault(t, []).append(res["rate"])
                    if "cpu_ms_per_msg" in res:
                        results.setdefault("cpu", {}).setdefault(label, {}).setdefault(t, []).append(
                            res["cpu_ms_per_msg"])
                    log(f"round {rnd + 1} {label:17} {t:13} {res['rate']:8.1f} msg/s"
                        + (f"  server CPU {res['cpu_ms_per_msg']:.2f} ms/msg" if "cpu_ms_per_msg" in res else ""))
            lat_targets = ["postfix"] + [t for t in targets if t.endswith("-maildir")] if a.latency else []
            for t in rotate(lat_targets, rnd) if lat_targets else []:
                res = bench.latency(t, max(50, int(300 * a.scale)))
                results["latency"].setdefault(t, []).append(res["lat_ms"])
                log(f"round {rnd + 1} session latency {t:13} p50 {res['lat_ms']['p50']:.3f} ms "
                    f"p90 {res['lat_ms']['p90']:.3f} ms")
            if a.out:
                a.out.write_text(json.dumps(summarise(results), indent=1))
    finally:
        bench.close()
        if not a.keep and a.base is None:
            shutil.rmtree(base, ignore_errors=True)
    summary = summarise(results)
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1))
    print(table(summary))


def summarise(results: dict) -> dict:
    out = {"rounds": results["rounds"], "scale": results["scale"], "cases": {}, "latency": {},
           "cpu_ms_per_msg": {label: {t: round(median(v), 3) for t, v in per.items()}
                              for label, per in results.get("cpu", {}).items()}}
    for label, per in results["cases"].items():
        row = {t: {"median": median(v), "runs": [round(x, 1) for x in v]} for t, v in per.items()}
        for a, b in PAIRS:
            if a in per and b in per:
                row[f"{a}/{b}"] = median(per[a]) / median(per[b])
                # per-round ratios: each round's runs were back to back
                n = min(len(per[a]), len(per[b]))
                row[f"{a}/{b} per round"] = [round(per[a][i] / per[b][i], 2) for i in range(n)]
        out["cases"][label] = row
    for t, lats in results["latency"].items():
        out["latency"][t] = {k: median([x[k] for x in lats]) for k in ("p50", "p90", "p99", "mean")}
        out["latency"][t]["p50 runs"] = [round(x["p50"], 3) for x in lats]
    if "postfix" in out["latency"]:
        for t in list(out["latency"]):
            if t.endswith("-maildir"):
                name = "mox" if t == "mox-maildir" else t
                out["latency"][f"{name}/postfix p50"] = out["latency"][t]["p50"] / out["latency"]["postfix"]["p50"]
    return out


def table(s: dict) -> str:
    lines = [f"median of {s['rounds']} interleaved rounds (msgs/s; ratio = mox / Postfix; "
             "CPU = mox server CPU time per message, all threads)", "",
             "| case | smtp-sink (keeps nothing) | Postfix | mox Maildir | ratio | CPU ms/msg | Postfix AUTH | mox queue | ratio | CPU ms/msg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cpu = s.get("cpu_ms_per_msg", {})
    for label, row in s["cases"].items():
        def g(k: str, row: dict = row) -> str:
            return f"{row[k]['median']:.0f}" if k in row else "-"

        def r(k: str, row: dict = row) -> str:
            return f"{row[k]:.2f}x" if k in row else "-"

        def c(k: str, label: str = label) -> str:
            v = cpu.get(label, {}).get(k)
            return f"{v:.2f}" if v is not None else "-"

        lines.append(f"| {label} | {g('smtp-sink')} | {g('postfix')} | {g('mox-maildir')} | {r('mox-maildir/postfix')} | "
                     f"{c('mox-maildir')} | {g('postfix-auth')} | {g('mox-queue')} | "
                     f"{r('mox-queue/postfix-auth')} | {c('mox-queue')} |")
    main_keys = {"mox-maildir/postfix", "mox-queue/postfix-auth", "smtp-sink/postfix"}
    for label, row in s["cases"].items():
        extra = [f"{k} {v:.2f}x" for k, v in row.items()
                 if "/" in k and not k.endswith("per round") and k not in main_keys]
        extra += [f"{k} {v['median']:.0f}/s" for k, v in row.items()
                  if "/" not in k and k not in ("smtp-sink", "postfix", "postfix-auth", "mox-maildir", "mox-queue")]
        if extra:
            lines.append(f"- {label}: " + ", ".join(extra))
    lat = s["latency"]
    for k, v in lat.items():
        if k.endswith("/postfix p50") and k != "mox/postfix p50":
            lines.append(f"- session p50 {k}: {v:.2f}x")
    if "mox/postfix p50" in lat:
        lines += ["", "whole session, 1 conn, 2 KB (smtpload, HELO): "
                  f"Postfix p50 {lat['postfix']['p50']:.2f} ms, mox p50 {lat['mox-maildir']['p50']:.2f} ms, "
                  f"mox/Postfix {lat['mox/postfix p50']:.2f}x (lower is better)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
