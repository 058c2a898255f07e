"""DKIM both ways: mox against Postfix with the OpenDKIM milter, and both without DKIM.

Two directions, each in the four cases of accept.py (1 and 20 connections, 2 KB and 100 KB),
all targets in the same interleaved rounds (order rotated per round), median of the rounds:

``verify``: incoming mail signed by another domain (``src.bench.example``; RSA-2048 selector
``rsa`` or Ed25519 selector ``ed``; signed by dkimpy, relaxed/relaxed, five header fields; a
text body), sent by smtp-source (HELO, new connection per message) to

* ``postfix``              Postfix without a milter (it verifies nothing), the reference;
* ``postfix+opendkim-ALG`` Postfix's listener through an OpenDKIM verifier (``Mode v``, keys
                           from the benchmark's DNS responder), messages signed with ALG;
* ``mox``                  ``mox serve``'s SMTP listener, the same messages without signature;
* ``mox-ALG``              mox with the messages signed with ALG, which it verifies.

``sign``: submissions with AUTH CRAM-MD5 (smtpload), remote recipient, to

* ``postfix``              Postfix's AUTH listener without a milter, the reference;
* ``postfix+opendkim-ALG`` the same through an OpenDKIM signer for the sender's domain
                           (``rsa.bench.test`` or ``ed.bench.test``);
* ``mox``                  mox's submission listener, sender in ``bench.test``, which does not sign;
* ``mox-ALG``              sender in the domain that signs with ALG.

The same RSA-2048 key and the same Ed25519 key sign everywhere (incoming messages, OpenDKIM,
mox). Postfix discards after its queue (the measurement waits until its queue is empty); mox
delivers into the Maildir (verify) or queues (sign; delivery held, as in accept.py) before
its 250. Every target's server CPU (user + system of every process: Postfix's master and
all its children, plus the OpenDKIM milter; ``mox serve`` and its workers) is read from
/proc before and after each measurement and reported per message (= seconds per 1,000).

``--variant NAME=DIR`` adds ``NAME``, ``NAME-rsa``, ``NAME-ed25519`` in both directions: a
``mox serve`` with PYTHONPATH=DIR (a copy of another commit's ``mox_core``), for A/B runs.

Before measuring, each path is checked once: OpenDKIM's check listeners log the header the
milter added (``milter_header_checks``, WARN), mox's Maildir copy says ``dkim=pass`` for the
selector, and mox's queued message carries a DKIM-Signature that dkimpy verifies.

    .venv/bin/python bench/dkimcost.py [--rounds 5] [--scale 1] [--directions verify,sign]
        [--algorithms rsa,ed25519] [--cases 0,1,2,3] [--targets postfix,opendkim,mox] [--variant NAME=DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from common import (
    ACCOUNT_ADDR,
    PASSWORD,
    REMOTE_RCPT,
    MoxBench,
    bench_dns,
    cpu_seconds_all,
    log,
    rotate,
    smtp_source,
    smtpload,
)
from dkimmsg import INCOMING_DOMAIN, INCOMING_SENDER, Keys, check_queued_signature, incoming_messages, newest_maildir
from dkimreport import summarise, table
from opendkim import OpenDKIM, PostfixMilters, opendkim_version

from mox_testpeers import make_private_dir

CASES = [
    ("1 conn, 2 KB", 1, 2 * 1024, 600),
    ("1 conn, 100 KB", 1, 100 * 1024, 300),
    ("20 conns, 2 KB", 20, 2 * 1024, 1500),
    ("20 conns, 100 KB", 20, 100 * 1024, 600),
]
ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
SIGN_DOMAINS = {"": "bench.test", "rsa": "rsa.bench.test", "ed25519": "ed.bench.test"}
SELECTORS = {"rsa": "rsa", "ed25519": "ed"}


def mox_domains(keys: Keys) -> str:
    """domains.toml additions: a domain signing with each key, its address in account bench."""
    out = []
    for alg, domain in SIGN_DOMAINS.items():
        if not alg:
            continue
        sel = SELECTORS[alg]
        out.append(f'[domains."{domain}"]\n[domains."{domain}".dkim]\nsign = ["{sel}"]\n'
                   f'[domains."{domain}".dkim.selectors.{sel}]\nprivate_key_file = "{keys.files[alg]}"\n')
    out += [f'[accounts.bench.destinations."bench@{d}"]\n' for a, d in SIGN_DOMAINS.items() if a]
    return "\n" + "\n".join(out)


class Bench:
    def __init__(self, base: Path, algorithms: list[str], variants: dict[str, str], unix: bool = False):
        self.base = base
        self.unix = unix
        self.algorithms = algorithms
        self.keys = Keys(base / "keys")
        self.unsigned, self.signed = incoming_messages([c[2] for c in CASES] + [2048], base, self.keys)
        records = [(INCOMING_DOMAIN, "TXT", "v=spf1 ip4:127.0.0.0/8 -all")]
        for alg in ALGORITHMS:
            for domain in (INCOMING_DOMAIN, SIGN_DOMAINS[alg]):
                records.append((f"{SELECTORS[alg]}._domainkey.{domain}", "TXT", self.keys.record(alg)))
        self.dns = bench_dns(records, stall_domains=["dest.test"])
        self.opendkim: dict[str, OpenDKIM] = {}
        self.moxes: dict[str, MoxBench] = {}
        self.pf: PostfixMilters | None = None
        try:
            self._start(variants)
        except BaseException:
            self.close()
            raise

    def _start(self, variants: dict[str, str]) -> None:
        self.opendkim["verify"] = OpenDKIM(self.base, "verify", "v", nameserver=self.dns.nameserver,
                                          unix=self.unix).start()
        milters = {}
        for alg in self.algorithms:
            self.opendkim[f"sign-{alg}"] = OpenDKIM(
                self.base, f"sign-{alg}", "s", domain=SIGN_DOMAINS[alg], selector=SELECTORS[alg],
                key_file=self.keys.files[alg], algorithm=ALGORITHMS[alg], unix=self.unix).start()
            milters[f"verify-{alg}"] = (False, self.opendkim["verify"].milter, "verify")
            milters[f"sign-{alg}"] = (True, self.opendkim[f"sign-{alg}"].milter, "sign")
        self.pf = PostfixMilters(milters, base=self.base).start()
        for name, path in {"mox": "", **variants}.items():
            mox = MoxBench(self.base / f"mox-{name}", self.dns.nameserver, domains_extra=mox_domains(self.keys))
            if path:
                mox.default_env["PYTHONPATH"] = str(Path(path).resolve())
            self.moxes[name] = mox.start()

    def close(self) -> None:
        stops = [m.stop for m in self.moxes.values()] + [o.stop for o in self.opendkim.values()]
        stops += [self.pf.stop] if self.pf else []
        for f in (*stops, self.dns.stop):
            try:
                f()
            except Exception as exc:  # keep stopping the others
                log("stop failed:", exc)

    # -- one measurement ----------------------------------------------------------------------

    def _milter(self, direction: str, alg: str) -> OpenDKIM | None:
        if not alg:
            return None
        return self.opendkim["verify" if direction == "verify" else f"sign-{alg}"]

    def run(self, direction: str, target: str, sessions: int, length: int, messages: int,
            check_port: bool = False) -> dict:
        """Send ``messages``; the rate, and the server CPU per message (ms)."""
        inst, _, alg = target.partition("-")
        if inst == "postfix+opendkim":
            inst = "postfix"
        elif inst == "postfix":
            alg = ""
        pids = [self.pf.master_pid] if inst == "postfix" else [self.moxes[inst].pid]
        milter = self._milter(direction, alg) if inst == "postfix" else None
        if milter:
            pids.append(milter.pid)
        warnings = self.pf.milter_warnings() if milter else 0
        cpu0 = sum(cpu_seconds_all(p) for p in pids)
        res = self._send(direction, inst, alg, sessions, length, messages, check_port)
        if inst == "postfix":
            self.settle_postfix()
        res["cpu_ms_per_msg"] = (sum(cpu_seconds_all(p) for p in pids) - cpu0) * 1000 / res["messages"]
        if milter and (not milter.running or self.pf.milter_warnings() > warnings):
            raise RuntimeError(f"OpenDKIM failed during {direction} {target}: see {self.pf.dir}/maillog")
        return res

    def _send(self, direction: str, inst: str, alg: str, sessions: int, length: int, messages: int,
              check_port: bool) -> dict:
        pf = self.pf
        if direction == "verify":
            if inst == "postfix":
                ports = pf.check_ports if check_port else pf.ports
                port = ports[f"verify-{alg}"] if alg else pf.port
                file = self.signed[alg or "rsa"][length]
            else:
                port = self.moxes[inst].smtp_port
                file = self.signed[alg][length] if alg else self.unsigned[length]
            return smtp_source(port, sessions=sessions, messages=messages, length=length, message_file=file,
                               sender=INCOMING_SENDER)
        sender = f"bench@{SIGN_DOMAINS[alg]}"
        if inst == "postfix":
            ports = pf.check_ports if check_port else pf.ports
            port = ports[f"sign-{alg}"] if alg else pf.sasl_port
            auth = ("bench", PASSWORD)
        else:
            port, auth = self.moxes[inst].submission_port, (ACCOUNT_ADDR, PASSWORD)
        return smtpload(port, sessions=sessions, messages=messages, length=length, sender=sender,
                        rcpt=REMOTE_RCPT, auth=auth)

    def settle_postfix(self, timeout: float = 60) -> None:
        """Postfix discards after the 250: let its queue drain before the next measurement."""
        deadline = time.monotonic() + timeout
        while self.pf.queue_count() and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- the checks before measuring ----------------------------------------------------------

    def check(self, directions: list[str]) -> None:
        """Each target does what it is measured for (see the module docstring)."""
        for direction in directions:
            for alg in self.algorithms:
                before = self.pf.check_count(direction)
                self.run(direction, f"postfix+opendkim-{alg}", 1, 2048, 3, check_port=True)
                got = self.pf.check_count(direction) - before
                if got != 3:
                    raise RuntimeError(f"OpenDKIM {direction} {alg}: {got} of 3 messages checked; "
                                       f"see {self.pf.dir}/maillog")
                for name, mox in self.moxes.items():
                    self.run(direction, f"{name}-{alg}", 1, 2048, 1)
                    if direction == "verify":
                        head = newest_maildir(mox).split(b"\r\n\r\n", 1)[0]
                        want = f"dkim=pass header.d={INCOMING_DOMAIN} header.s={SELECTORS[alg]}".encode()
                        if want not in head:
                            raise RuntimeError(f"{name} did not verify the {alg} signature: {head[:600]!r}")
                    else:
                        check_queued_signature(mox, ALGORITHMS[alg], self.keys)
            log(f"checked {direction}: OpenDKIM and mox " + ", ".join(self.algorithms))


def targets_for(direction: str, algorithms: list[str], moxes: list[str], which: list[str]) -> list[str]:
    out = []
    if "postfix" in which:
        out.append("postfix")
    if "opendkim" in which:
        out += [f"postfix+opendkim-{a}" for a in algorithms]
    for m in moxes:
        if m != "mox" or "mox" in which:
            out += [m] + [f"{m}-{a}" for a in algorithms]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    ap.add_argument("--cases", default="all", help="comma list of case indexes (0-3) or all")
    ap.add_argument("--directions", default="verify,sign")
    ap.add_argument("--algorithms", default="rsa,ed25519")
    ap.add_argument("--targets", default="postfix,opendkim,mox", help="which of postfix, opendkim, mox")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--milter-socket", default="unix", choices=["inet", "unix"],
                    help="OpenDKIM on inet:PORT@127.0.0.1 or on a unix socket")
    ap.add_argument("--keep", action="store_true", help="keep the spools and logs (printed at the end)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the checks before measuring (experiments with variants that do not sign or verify)")
    a = ap.parse_args()
    cases = CASES if a.cases == "all" else [CASES[int(i)] for i in a.cases.split(",")]
    directions, algorithms = a.directions.split(","), a.algorithms.split(",")
    variants = dict(v.split("=", 1) for v in a.variant)
    base = make_private_dir("mox-bench-dkim-")
    results: dict = {"rounds": a.rounds, "scale": a.scale, "loadavg": [], "opendkim": opendkim_version(),
                     "directions": {}, "cpu": {}}
    bench = Bench(base, algorithms, variants, a.milter_socket == "unix")
    moxes = list(bench.moxes)
    try:
        log("warm-up")
        for d in directions:
            for t in targets_for(d, algorithms, moxes, a.targets.split(",")):
                bench.run(d, t, 4, 2048, 100)
        if not a.no_check:
            bench.check(directions)
        for rnd in range(a.rounds):
            results["loadavg"].append([round(x, 2) for x in os.getloadavg()])
            for d in directions:
                targets = targets_for(d, algorithms, moxes, a.targets.split(","))
                for label, sessions, length, count in cases:
                    n = max(20, int(count * a.scale))
                    for t in rotate(targets, rnd):
                        res = bench.run(d, t, sessions, length, n)
                        results["directions"].setdefault(d, {}).setdefault(label, {}).setdefault(t, []).append(res["rate"])
                        results["cpu"].setdefault(d, {}).setdefault(label, {}).setdefault(t, []).append(
                            res["cpu_ms_per_msg"])
                        log(f"round {rnd + 1} {d:6} {label:17} {t:26} {res['rate']:8.1f} msg/s"
                            f"  server CPU {res['cpu_ms_per_msg']:.2f} ms/msg")
            if a.out:
                a.out.write_text(json.dumps(summarise(results, variants), indent=1))
        results["loadavg"].append([round(x, 2) for x in os.getloadavg()])
    finally:
        bench.close()
        if a.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    summary = summarise(results, variants)
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1))
    print(table(summary))


if __name__ == "__main__":
    main()
