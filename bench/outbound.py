"""Outbound benchmark: N queued messages delivered to smtp-sink, mox's smtp transport vs Postfix.

* Postfix (stock settings, relayhost = [127.0.0.1]:SINK, no TLS): N messages are submitted
  with smtp-source and put on hold at acceptance (``check_client_access static:HOLD``). The
  clock starts at ``postsuper -H ALL`` + ``postqueue -f`` and stops when the queue directory
  is empty (every message delivered to the sink and its queue file removed).
* mox (``[transports.relay] kind = "smtp"`` to relay.bench.test:SINK, no STARTTLS, a global
  route sending everything through it, ``[queue]`` defaults): with the server stopped, N
  messages are added on hold through the queue API (``Queue.add(hold=True)``, the same
  durable path submissions use); the server is started, and the clock starts at ``queue.hold
  hold=false`` on the ctl socket (what ``mox queue unhold`` sends) and stops when the queue
  table is empty.
  Two recipient layouts: all N to one domain, and spread over 20 domains. mox delivers at
  most one message per recipient domain at a time (``[queue] concurrency`` = 10 in all);
  Postfix schedules per next hop (the relayhost), up to 20 parallel deliveries, and reuses
  connections.

The sink (smtp-sink, no dump files) is shared. 2 KB messages. Median of the rounds, targets
interleaved (order rotated per round).

    .venv/bin/python bench/outbound.py [--rounds 3] [--messages 2000] [--out FILE.json]

``--variant NAME=DIR`` (repeatable) measures one more ``mox serve`` run with ``PYTHONPATH=DIR``
(a copy of ``mox_core/`` and the transport plugin packages, e.g. of an older commit) as the
targets ``NAME-1-domain`` and ``NAME-20-domains`` in the same interleaved rounds, with ratios
to Postfix and to the unpatched ``mox``. Its server runs with the current directory set to its
own spool, so that ``python -m mox_core`` does not import the checkout's ``mox_core``.
A bare ``--variant DIR`` replaces the measured mox instead (the older form).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import (
    ACCOUNT_ADDR,
    MoxBench,
    PostfixBench,
    bench_dns,
    cpu_seconds,
    log,
    make_message,
    median,
    rotate,
    smtp_source,
    variant_mox,
)

from mox_testpeers import make_private_dir
from mox_testpeers.sink import SmtpSink

TARGETS = ["postfix", "mox-1-domain", "mox-20-domains"]


async def _add_held(config_path: Path, n: int, domains: int) -> None:
    from mox_core import logging as mox_logging
    from mox_core.config.loader import load_config
    from mox_core.plugins.host import PluginHost
    from mox_core.queue import Queue

    mox_logging.configure(json=False)  # mox's level filter; structlog's default prints all
    mox_logging.set_levels("warn")

    cfg = load_config(config_path, PluginHost.load())
    q = Queue(cfg)
    await q.open(lock=True)
    try:
        async def one(i: int) -> None:
            rcpt = f"rcpt{i}@d{i % domains}.dest.test" if domains > 1 else f"rcpt{i}@dest.test"
            await q.add(account="bench", mail_from=ACCOUNT_ADDR, recipients=[rcpt],
                        data=make_message(2048, to=rcpt, n=i), hold=True)

        for start in range(0, n, 200):  # concurrent adds are group-committed
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 200))))
    finally:
        await q.close()


def wait_until(pred, timeout: float, what: str, interval: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(interval)
    return time.perf_counter()


def run_postfix(pf: PostfixBench, n: int, timeout: float) -> dict:
    smtp_source(pf.port, sessions=10, messages=n, length=2048, sender=ACCOUNT_ADDR, rcpt="rcpt@dest.test")
    wait_until(lambda: pf.queue_count(("hold",)) >= n, 60, "messages on hold")
    conf = str(pf.conf)
    t0 = time.perf_counter()
    subprocess.run(["postsuper", "-c", conf, "-H", "ALL"], check=True, capture_output=True)
    subprocess.run(["postqueue", "-c", conf, "-f"], check=True, capture_output=True)
    t1 = wait_until(lambda: pf.queue_count() == 0, timeout, "postfix queue empty")
    return {"messages": n, "elapsed": t1 - t0, "rate": n / (t1 - t0)}


def run_mox(mox: MoxBench, n: int, domains: int, timeout: float, pyspy: Path | None = None,
            pyspy_idle: bool = True) -> dict:
    asyncio.run(_add_held(mox.config_path, n, domains))
    mox.start()
    spy = None
    try:
        assert mox.queue_count() == n
        if pyspy:  # profile the delivery phase (py-spy --idle: shares are of wall time)
            exe = str(Path(sys.executable).with_name("py-spy"))
            spy = subprocess.Popen([exe, "record", "--pid", str(mox.pid), "--rate", "100", "--subprocesses",
                                    "--nonblocking", *(["--idle"] if pyspy_idle else []),
                                    "--threads", "--format", "raw", "-o", str(pyspy)],
                                   stdout=subprocess.DEVNULL, stderr=open(f"{pyspy}.stderr", "wb"))
            time.sleep(1.0)
        cpu0 = cpu_seconds(mox.pid)
        t0 = time.perf_counter()
        mox.ctl("queue.hold", {"filter": {}, "hold": False})
        t1 = wait_until(lambda: mox.queue_count() == 0, timeout, "mox queue empty")
        return {"messages": n, "elapsed": t1 - t0, "rate": n / (t1 - t0),
                "cpu_ms_per_msg": (cpu_seconds(mox.pid) - cpu0) * 1000 / n}
    finally:
        if spy:
            spy.send_signal(signal.SIGINT)  # py-spy writes the profile on SIGINT
            spy.wait(30)
        mox.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=300, help="per measurement")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--pyspy-busy", dest="pyspy_idle", action="store_false",
                    help="sample only threads that run (shares of CPU, not of wall time)")
    ap.add_argument("--pyspy", type=Path, default=None, help="profile the last mox measurement of the last round into this file")
    ap.add_argument("--variant", action="append", default=[], metavar="[NAME=]DIR[,log=LEVEL][,workers=N][,loop=asyncio][,dkim=rsa|ed25519][,pin=false]",
                    help="NAME=SPEC: also measure mox serve with PYTHONPATH=DIR (empty: the project "
                         "as installed) and the options (common.variant_mox) as NAME-*; "
                         "DIR alone: run the measured mox with PYTHONPATH=DIR")
    a = ap.parse_args()
    targets = a.targets.split(",")
    named = dict(v.split("=", 1) for v in a.variant if "=" in v)
    replace = [v for v in a.variant if "=" not in v]
    for name in named:
        targets += [f"{name}-1-domain", f"{name}-20-domains"]
    base = a.base or make_private_dir("mox-bench-outbound-")
    sink = SmtpSink(dump=False, backlog=256).start()
    dns = bench_dns()
    pf = PostfixBench("relay", relay_port=sink.port, base=base).start()
    mox = MoxBench(base / "mox-out", dns.nameserver, relay_port=sink.port)
    if replace:
        mox.default_env = {"PYTHONPATH": replace[-1]}
    moxes = {"mox": mox}
    for name, spec in named.items():
        moxes[name] = variant_mox(base / f"{name}-out", dns.nameserver, spec, relay_port=sink.port)
    results: dict = {}
    cpu: dict = {}
    try:
        # warm-up: one small batch each (also proves both paths deliver)
        run_postfix(pf, 50, 60)
        for m in moxes.values():
            run_mox(m, 50, 1, 60)
        for rnd in range(a.rounds):
            for t in rotate(targets, rnd):
                if t == "postfix":
                    res = run_postfix(pf, a.messages, a.timeout)
                else:
                    name, _, layout = t.partition("-")
                    last = rnd == a.rounds - 1 and t == [x for x in targets if x != "postfix"][-1]
                    res = run_mox(moxes[name], a.messages, 20 if layout == "20-domains" else 1, a.timeout,
                                  a.pyspy if last else None, a.pyspy_idle)
                results.setdefault(t, []).append(res["rate"])
                if "cpu_ms_per_msg" in res:
                    cpu.setdefault(t, []).append(res["cpu_ms_per_msg"])
                log(f"round {rnd + 1} outbound {t:15} {res['rate']:8.1f} msg/s ({res['elapsed']:.2f} s)"
                    + (f" server CPU {res['cpu_ms_per_msg']:.2f} ms/msg" if "cpu_ms_per_msg" in res else ""))
    except subprocess.CalledProcessError as exc:
        log("command failed:", exc, exc.stderr)
        raise
    finally:
        for m in moxes.values():
            m.stop()
        pf.stop()
        dns.stop()
        sink.cleanup()
        if a.base is None:
            shutil.rmtree(base, ignore_errors=True)
    summary = {"rounds": a.rounds, "messages": a.messages,
               "targets": {t: {"median": median(v), "runs": [round(x, 1) for x in v]} for t, v in results.items()}}
    for t, v in cpu.items():
        summary["targets"][t]["cpu_ms_per_msg"] = round(median(v), 3)
    if "postfix" in results:
        for t in results:
            if t != "postfix":
                summary["targets"][t]["ratio"] = median(results[t]) / median(results["postfix"])
    for t in results:
        name, _, layout = t.partition("-")
        if name in named and f"mox-{layout}" in results:
            summary["targets"][t]["ratio_to_mox"] = median(results[t]) / median(results[f"mox-{layout}"])
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
