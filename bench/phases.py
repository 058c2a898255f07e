"""Where one connection's time goes: the latency of each SMTP step, mox vs Postfix, one run.

accept.py gives msgs/s; at one connection that is 1 / (time of one session), and a difference
there does not say which step costs it. This script runs sessions one at a time (a new
connection each, like smtp-source -s 1) and times every reply as the client sees it:
connect to 220, EHLO/HELO, AUTH (submission: the CRAM-MD5 challenge and the answer), MAIL,
RCPT, DATA to 354, the message to 250, QUIT to 221. Targets as in accept.py: ``postfix`` and
``mox-maildir`` (incoming, HELO, local recipient), ``postfix-auth`` and ``mox-queue``
(submission with AUTH CRAM-MD5, remote recipient, outgoing queue), plus ``--variant`` copies.
Rounds are interleaved (order rotated), the medians per step are over all sessions of a
target. The client is the same Python code for every target, so its own cost cancels out of
the differences.

    .venv/bin/python bench/phases.py [--rounds 8] [--sessions 100] [--size 2048] [--variant base=DIR]

It found, on 2026-12-03: a submission's QUIT took 240 us with two workers against 124 us in
one process (the worker woken for a pass per queued message; fixed: kicks name their
domains), and the 250 after a Maildir delivery's data is 2.4 ms where Postfix's is 0.9 ms,
its queue file being created at RCPT (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import itertools
import json
import shutil
import socket
import statistics
import time
from pathlib import Path

from accept import Bench
from common import ACCOUNT_ADDR, LOCAL_RCPT, PASSWORD, REMOTE_RCPT, SENDER, log, make_message, rotate

from mox_testpeers import make_private_dir

INCOMING = ["connect/220", "HELO", "MAIL", "RCPT", "DATA/354", "data/250", "QUIT"]
SUBMISSION = ["connect/220", "EHLO", "AUTH/334", "AUTH/235", "MAIL", "RCPT", "DATA/354", "data/250", "QUIT"]


def session(port: int, message: bytes, auth: tuple[str, str] | None) -> list[float]:
    """One SMTP session on a new connection; the seconds from each command to its reply."""
    marks = [time.perf_counter()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        last = b""

        def reply(expect: bytes) -> None:
            nonlocal last
            while (line := f.readline())[3:4] == b"-":
                pass
            marks.append(time.perf_counter())
            if not line.startswith(expect):
                raise RuntimeError(f"expected {expect!r}, got {line!r}")
            last = line

        def cmd(line: bytes, expect: bytes) -> None:
            s.sendall(line)
            reply(expect)

        reply(b"220")
        if auth:
            user, password = auth
            cmd(b"EHLO client.bench.test\r\n", b"250")
            cmd(b"AUTH CRAM-MD5\r\n", b"334")
            digest = hmac.new(password.encode(), base64.b64decode(last[4:].strip()), hashlib.md5).hexdigest()
            cmd(base64.b64encode(f"{user} {digest}".encode()) + b"\r\n", b"235")
            sender, rcpt = ACCOUNT_ADDR, REMOTE_RCPT
        else:
            cmd(b"HELO client.bench.test\r\n", b"250")
            sender, rcpt = SENDER, LOCAL_RCPT
        cmd(f"MAIL FROM:<{sender}>\r\n".encode(), b"250")
        cmd(f"RCPT TO:<{rcpt}>\r\n".encode(), b"250")
        cmd(b"DATA\r\n", b"354")
        cmd(message + b".\r\n", b"250")
        cmd(b"QUIT\r\n", b"221")
        f.close()
    return [b - a for a, b in itertools.pairwise(marks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--sessions", type=int, default=100, help="sessions per target and round")
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes")
    ap.add_argument("--targets", default="postfix,mox-maildir,postfix-auth,mox-queue")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[,log=LEVEL][,workers=N][,loop=asyncio][,dkim=rsa|ed25519][,pin=false]",
                    help="also run mox serve from DIR (see accept.py) as NAME-maildir, NAME-queue")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    variants = dict(v.split("=", 1) for v in a.variant)
    targets = a.targets.split(",")
    for name in variants:
        targets += [f"{name}-{kind}" for kind in ("maildir", "queue") if f"mox-{kind}" in targets]
    base = make_private_dir("mox-bench-phases-")
    bench = Bench(base, variants=variants)
    message = make_message(a.size, frm=ACCOUNT_ADDR)

    def endpoint(target: str) -> tuple[int, tuple[str, str] | None]:
        if target == "postfix":
            return bench.pf.port, None
        if target == "postfix-auth":
            return bench.pf.sasl_port, ("bench", PASSWORD)
        inst, _, kind = target.rpartition("-")
        mox = bench.moxes[inst]
        return (mox.smtp_port, None) if kind == "maildir" else (mox.submission_port, (ACCOUNT_ADDR, PASSWORD))

    times: dict[str, list[list[float]]] = {t: [] for t in targets}
    try:
        for t in targets:  # warm-up
            port, auth = endpoint(t)
            for _ in range(20):
                session(port, message, auth)
        for rnd in range(a.rounds):
            for t in rotate(targets, rnd):
                port, auth = endpoint(t)
                times[t] += [session(port, message, auth) for _ in range(a.sessions)]
                if t.startswith("postfix"):
                    bench.settle_postfix()
            log(f"round {rnd + 1} of {a.rounds}")
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)

    summary: dict = {"size": a.size, "rounds": a.rounds, "sessions_per_round": a.sessions, "targets": {}}
    for t, rows in times.items():
        names = SUBMISSION if endpoint_kind(t) == "queue" else INCOMING
        steps = {n: round(statistics.median(col) * 1e6) for n, col in zip(names, zip(*rows, strict=False), strict=False)}
        means = {n: round(statistics.fmean(col) * 1e6) for n, col in zip(names, zip(*rows, strict=False), strict=False)}
        sessions = sorted(map(sum, rows))
        # p50 says where a typical session's time goes; the mean (what msgs/s at one connection
        # is the inverse of) and p90 show the slow tail
        summary["targets"][t] = {"p50_us": steps, "mean_us": means,
                                 "session_p50_us": round(statistics.median(sessions) * 1e6),
                                 "session_mean_us": round(statistics.fmean(sessions) * 1e6),
                                 "session_p90_us": round(sessions[int(len(sessions) * 0.9)] * 1e6)}
    print(tables(summary))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1))


def tables(summary: dict) -> str:
    """Markdown: the steps of each kind of session, Postfix first."""
    lines = []
    targets = list(summary["targets"])
    for kind, ref in (("maildir", "postfix"), ("queue", "postfix-auth")):
        group = [ref] + [t for t in targets if t != ref and not t.startswith("postfix") and endpoint_kind(t) == kind]
        if ref not in summary["targets"] or len(group) < 2:
            continue
        names = SUBMISSION if kind == "queue" else INCOMING
        lines += [f"{kind}: p50 microseconds per step, {summary['size']} bytes, "
                  f"{summary['rounds']} x {summary['sessions_per_round']} sessions each", "",
                  "| target | " + " | ".join(names) + " | session | session mean | session p90 |",
                  "|---" * (len(names) + 4) + "|"]
        for t in group:
            r = summary["targets"][t]
            lines.append(f"| {t} | " + " | ".join(str(r["p50_us"][n]) for n in names)
                         + f" | {r['session_p50_us']} | {r.get('session_mean_us', '-')} | {r.get('session_p90_us', '-')} |")
        lines.append("")
    return "\n".join(lines)


def endpoint_kind(target: str) -> str:
    if target.startswith("postfix"):
        return "queue" if target == "postfix-auth" else "maildir"
    return target.rpartition("-")[2]


if __name__ == "__main__":
    main()
