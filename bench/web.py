"""Web server benchmark: mox's web handlers (``static``, ``forward``) against nginx, one run.

Targets, all on 127.0.0.1, all started by this script:

* ``mox``       ``mox serve`` with a plain-HTTP web port (``webserver_http`` of the listener,
                ``rate_limit_disabled = true`` so that the per-IP request limit never answers
                429) and two web handlers for www.bench.test in domains.toml: ``forward`` for
                ``^/proxy/`` to the backend, then ``static`` for everything else from the
                benchmark's directory. Everything else as shipped: one web process (uvicorn,
                httptools), ``[http]`` defaults, log level info (no access-log line per
                request: that line is at debug).
* ``nginx``     nginx with Debian's settings (``worker_processes auto``, i.e. one worker per
                CPU, ``worker_connections 768``, ``sendfile on``, ``tcp_nopush on``, ``gzip
                on``, mime.types) minus the access log (mox writes none either), serving the
                same directory and proxying ``/proxy/`` to the same backend with keep-alive
                (``proxy_http_version 1.1``, ``Connection ""``, ``keepalive 64``: mox's
                forward keeps its backend connections open too) and the same request headers
                mox's forward sets (Host passed on, X-Forwarded-For/-Host/-Proto).
* ``nginx-1w``  the same with ``worker_processes 1``: as many processes as mox's web server.

The backend of the proxy case is one more nginx (one worker, ``keepalive_requests`` high),
answering every GET with a fixed 1 KB body from its config (``return 200``): the same
process for every proxy, so the proxies differ only in themselves, and fast enough in C not
to be what limits either of them. Its CPU is counted for neither proxy (it is reported
apart, per 1,000 requests, as a check that each proxy made it do the same work).

Cases: a static file of 1 KB and one of 100 KB, and a GET of 1 KB through the proxy; each
with 1 and 50 connections (HTTP/1.1 keep-alive, plain HTTP on loopback), driven by ``wrk``
(one thread, ``-d`` seconds, a Lua ``done()`` that prints requests, bytes, errors and the
latency percentiles as JSON). A measurement is valid only when wrk saw no socket error
(connect, read, write, timeout), no status >= 400 and at least the body's size per response
(a redirect or a short answer would be cheaper than the file); an invalid one is logged, kept
in the JSON and left out of the medians and of that round's ratio. Before the rounds every
target answers each path once with 200 and the expected body, and runs each path 1 s under
load (warm-up, not recorded).

Every round runs every case on every target, target order rotated per round; figures are
medians of the valid rounds: requests/s, wrk's p50 and p99 latency, the mean latency of every
request (connections / requests per second: each connection has one request outstanding at a
time), and server CPU (user + system from /proc/PID/stat) per 1,000 requests: mox's web
process, nginx's worker processes.

wrk's percentiles are of a sample: every ~10 ms it takes a fixed number of random draws from
the latencies recorded in that interval, so an interval holding one stalled request weighs as
much as one holding a thousand quick ones. A stall of 40 ms in one request of 3,000 can so be
wrk's p99. The mean from the request rate counts each request once.

    .venv/bin/python bench/web.py [--rounds 3] [--duration 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import string
import subprocess
import sys
import textwrap
from pathlib import Path

from common import MoxBench, bench_dns, log, median, process_tree, rotate

from mox_testpeers import free_port, make_private_dir, require_tool, wait_for, wait_port
from mox_testpeers.lifecycle import PeerProcess

HOST = "www.bench.test"  # the web handlers' domain; wrk sends it as Host
# label, path, body size (bytes)
PATHS = [
    ("static 1 KB", "/1k.txt", 1024),
    ("static 100 KB", "/100k.txt", 100 * 1024),
    ("forward 1 KB", "/proxy/1k", 1024),
]
CONNECTIONS = [1, 50]
TARGETS = ["mox", "nginx", "nginx-1w"]
PEERS = ["nginx", "nginx-1w"]  # ratios mox / each

# wrk's done() callback: one JSON line after its own report (latency in microseconds)
WRK_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


def body_text(size: int, seed: int, lines: bool = True) -> str:
    """``size`` bytes of letters, digits, ``+`` and ``/`` (nothing that nginx's ``return``
    would read as a variable or an escape), in lines of 76 or (``lines`` false) one line."""
    rnd = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "+/"
    text = "".join(rnd.choice(alphabet) for _ in range(size))
    if lines:
        text = "".join(text[i:i + 75] + "\n" for i in range(0, size, 75))
    return text[:size]


# ------------------------------------------------------------------------------------------
# servers


class Nginx:
    """A private nginx under ``base`` (``-p`` prefix: pid, logs and temp files there, no
    system path), in the foreground (``daemon off``) so the process started is the master."""

    def __init__(self, base: Path, name: str, http_block: str, workers: str = "1"):
        self.name = name
        self.dir = base
        for d in ("logs", "tmp"):
            (base / d).mkdir(parents=True, exist_ok=True)
        head = [f"worker_processes {workers};", f"pid logs/{name}.pid;", f"error_log logs/{name}-error.log warn;"]
        if os.geteuid() == 0:  # as root, the workers would run as nobody unless told otherwise
            head.append("user root root;")
        head.append("events { worker_connections 768; }")
        temp = [f"{kind}_temp_path tmp/{name}-{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
        self.conf = base / f"{name}.conf"
        self.conf.write_text("\n".join(head) + "\nhttp {\n" + textwrap.indent(
            "\n".join([*temp, "server_tokens off;"]) + "\n" + http_block, "    ") + "}\n")
        self.args = ["nginx", "-p", f"{base}/", "-c", str(self.conf), "-e", f"{base}/logs/{name}-error.log"]
        self.process: PeerProcess | None = None

    def start(self, port: int) -> Nginx:
        p = subprocess.run([*self.args, "-t", "-q"], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"nginx {self.name}: bad config {self.conf}: {p.stderr}")
        self.process = PeerProcess([*self.args, "-g", "daemon off;"], log_file=self.dir / "logs" / f"{self.name}.out")
        self.process.start(lambda proc: wait_port("127.0.0.1", port, timeout=10, proc=proc))
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def workers(self) -> list[int]:
        """The worker processes (the master only reads its config and waits)."""
        return [p for p in process_tree(self.pid) if p != self.pid]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()  # SIGTERM: nginx's fast shutdown
        self.process = None


def backend_http(port: int, body: str) -> str:
    return textwrap.dedent(f"""\
        access_log off;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
        server {{
            listen 127.0.0.1:{port} backlog=1024;
            default_type text/plain;
            location / {{ return 200 "{body}"; }}
        }}
        """)


def nginx_http(port: int, www: Path, backend_port: int) -> str:
    """Debian's http block (sendfile, tcp_nopush, types_hash_max_size, mime.types, gzip)
    without the access log, a server for the static files and the proxy."""
    return textwrap.dedent(f"""\
        sendfile on;
        tcp_nopush on;
        types_hash_max_size 2048;
        include /etc/nginx/mime.types;
        default_type application/octet-stream;
        access_log off;
        gzip on;
        upstream backend {{
            server 127.0.0.1:{backend_port};
            keepalive 64;
        }}
        server {{
            listen 127.0.0.1:{port};
            server_name {HOST};
            root {www};
            location / {{ }}
            location /proxy/ {{
                proxy_pass http://backend;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Host $http_host;
                proxy_set_header X-Forwarded-For $remote_addr;
                proxy_set_header X-Forwarded-Host $http_host;
                proxy_set_header X-Forwarded-Proto $scheme;
            }}
        }}
        """)


def mox_web(directory: Path, nameserver: str, port: int, www: Path, backend_port: int) -> MoxBench:
    static = textwrap.dedent(f"""
        [listeners.bench.webserver_http]
        enabled = true
        port = {port}
        rate_limit_disabled = true
        """)
    domains = textwrap.dedent(f"""
        [[web_handlers]]
        kind = "forward"
        domain = "{HOST}"
        path_regexp = "^/proxy/"
        dont_redirect_plaintext = true
        url = "http://127.0.0.1:{backend_port}/"

        [[web_handlers]]
        kind = "static"
        domain = "{HOST}"
        dont_redirect_plaintext = true
        root = "{www}"
        """)
    return MoxBench(directory, nameserver, static_extra=static, domains_extra=domains)


def web_process(mox: MoxBench) -> int:
    """The pid of mox's web process (``mox web-worker``, a child of ``mox serve``)."""
    for p in process_tree(mox.pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"web-worker" in f.read().split(b"\0"):
                    return p
        except OSError:
            pass
    raise RuntimeError("mox serve has no web process")


def cpu_of(pids: list[int]) -> float:
    """utime + stime, seconds, of exactly these processes (all their threads)."""
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers={"Host": HOST})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class Bench:
    def __init__(self, base: Path, targets: list[str]):
        self.base = base
        self.www = base / "www"
        self.www.mkdir(parents=True, exist_ok=True)
        self.bodies = {}
        for _label, path, size in PATHS:
            if not path.startswith("/proxy/"):
                self.bodies[path] = body_text(size, size).encode()
                (self.www / path.lstrip("/")).write_bytes(self.bodies[path])
        backend_body = body_text(1024, 1, lines=False)
        self.bodies["/proxy/1k"] = backend_body.encode()
        self.lua = base / "report.lua"
        self.lua.write_text(WRK_LUA)
        self.ports: dict[str, int] = {}
        self.nginxes: dict[str, Nginx] = {}
        self.mox: MoxBench | None = None
        self.dns = bench_dns()  # mox serve's resolver; nothing here should need it
        try:
            self.backend_port = free_port()
            self.backend = Nginx(base / "backend", "backend", backend_http(self.backend_port, backend_body))
            self.backend.start(self.backend_port)
            for t in targets:
                self.ports[t] = free_port()
                if t == "mox":
                    self.mox = mox_web(base / "mox", self.dns.nameserver, self.ports[t], self.www, self.backend_port)
                    self.mox.start()
                    wait_port("127.0.0.1", self.ports[t], timeout=30, proc=self.mox.proc)
                elif t.startswith("nginx"):
                    workers = "1" if t == "nginx-1w" else "auto"
                    self.nginxes[t] = Nginx(base / t, t, nginx_http(self.ports[t], self.www, self.backend_port),
                                            workers).start(self.ports[t])
                else:
                    raise ValueError(f"unknown target {t}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        stops = [n.stop for n in self.nginxes.values()]
        if self.mox is not None:
            stops.append(self.mox.stop)
        if hasattr(self, "backend"):
            stops.append(self.backend.stop)
        for f in (*stops, self.dns.stop):
            try:
                f()
            except Exception as exc:  # keep stopping the others
                log("stop failed:", exc)

    def server_pids(self, target: str) -> list[int]:
        if target == "mox":
            assert self.mox is not None
            return [web_process(self.mox)]
        return self.nginxes[target].workers()

    def check(self, target: str) -> None:
        """Every path answers 200 with the expected body (not a redirect, not an error page)."""
        for _label, path, _size in PATHS:
            status, body = get(self.ports[target], path)
            if status != 200 or body != self.bodies[path]:
                raise RuntimeError(f"{target} {path}: status {status}, {len(body)} bytes: {body[:200]!r}")

    def run(self, target: str, path: str, connections: int, duration: float) -> dict:
        pids = self.server_pids(target)
        backend = self.backend.workers()
        cpu0, b0 = cpu_of(pids), cpu_of(backend)
        res = wrk(self.ports[target], path, connections, duration, self.lua)
        cpu1, b1 = cpu_of(pids), cpu_of(backend)
        n = max(res["requests"], 1)
        res["connections"] = connections
        res["rate"] = res["requests"] / (res["duration_us"] / 1e6)
        res["cpu_ms_per_1000"] = (cpu1 - cpu0) * 1e6 / n
        res["backend_cpu_ms_per_1000"] = (b1 - b0) * 1e6 / n
        problems = [f"{k} errors {res[k]}" for k in ("connect", "read", "write", "status", "timeout") if res[k]]
        if res["bytes"] / n < len(self.bodies[path]):
            problems.append(f"{res['bytes'] / n:.0f} bytes per response, body is {len(self.bodies[path])}")
        if res["requests"] == 0:
            problems.append("no requests")
        res["problems"] = problems
        return res


def wrk(port: int, path: str, connections: int, duration: float, lua: Path) -> dict:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "-H", f"Host: {HOST}",
            "-s", str(lua), f"http://127.0.0.1:{port}{path}"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    for line in p.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON "):])
    raise RuntimeError(f"wrk failed ({p.returncode}): {' '.join(args)}\n{p.stdout}\n{p.stderr}")


# ------------------------------------------------------------------------------------------
# results


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def machine_info() -> dict:
    def out(*cmd: str) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return (p.stdout + p.stderr).strip()

    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("uvicorn", "httptools", "uvloop", "httpx"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed: say so
            versions[mod] = None
    root = Path(__file__).resolve().parent.parent
    commit = out("git", "-C", str(root), "rev-parse", "--short", "HEAD")
    dirty = out("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "python": platform.python_version(), "loadavg": loadavg(),
        "nginx": out("nginx", "-v").rpartition("/")[2], "wrk": out("wrk", "-v").splitlines()[0].split()[1],
        **versions, "commit": commit + ("+changes" if dirty else ""),
    }


def case_label(label: str, connections: int) -> str:
    return f"{label}, {connections} conn" + ("s" if connections > 1 else "")


def summarise(raw: dict) -> dict:
    """Medians of the valid runs; ratios mox / peer of the medians and per round (a round whose
    mox or peer run is invalid has no ratio)."""
    out = {k: raw[k] for k in ("rounds", "duration_s", "connections", "machine", "invalid")}
    out["cases"] = {}
    for label, per in raw["cases"].items():
        row: dict = {}
        for t, runs in per.items():
            ok = [r for r in runs if r is not None and not r["problems"]]
            row[t] = {
                "median": median([r["rate"] for r in ok]),
                "runs": [round(r["rate"], 1) if r and not r["problems"] else None for r in runs],
                "p50_ms": median([r["p50_us"] / 1e3 for r in ok]),
                "p99_ms": median([r["p99_us"] / 1e3 for r in ok]),
                # every request's latency counted once: connections / (requests/s) (Little's law)
                "mean_ms": median([r["connections"] / r["rate"] * 1e3 for r in ok]),
                "wrk_mean_ms": median([r["mean_us"] / 1e3 for r in ok]),
                "p50_runs_ms": [round(r["p50_us"] / 1e3, 3) if r and not r["problems"] else None for r in runs],
                "p99_runs_ms": [round(r["p99_us"] / 1e3, 3) if r and not r["problems"] else None for r in runs],
                "cpu_ms_per_1000": median([r["cpu_ms_per_1000"] for r in ok]),
                "cpu_runs": [round(r["cpu_ms_per_1000"], 1) if r and not r["problems"] else None for r in runs],
                "backend_cpu_ms_per_1000": median([r["backend_cpu_ms_per_1000"] for r in ok]),
                "bytes_per_response": median([r["bytes"] / r["requests"] for r in ok]),
            }
        if "mox" in per:
            for peer in PEERS:
                if peer not in per:
                    continue
                row[f"mox/{peer}"] = row["mox"]["median"] / row[peer]["median"]
                rounds = []
                for a, b in zip(per["mox"], per[peer], strict=False):
                    good = a and b and not a["problems"] and not b["problems"]
                    rounds.append(round(a["rate"] / b["rate"], 3) if good else None)
                row[f"mox/{peer} per round"] = rounds
                row[f"mox/{peer} p50"] = row["mox"]["p50_ms"] / row[peer]["p50_ms"]
                row[f"mox/{peer} p99"] = row["mox"]["p99_ms"] / row[peer]["p99_ms"]
                row[f"mox/{peer} mean"] = row["mox"]["mean_ms"] / row[peer]["mean_ms"]
        out["cases"][label] = row
    return out


def _ratio(x: float) -> str:
    return f"{x:.3f}" if x < 0.1 else f"{x:.2f}"


def _spread(xs: list[float | None]) -> str:
    v = [x for x in xs if x is not None]
    return f"{_ratio(min(v))}-{_ratio(max(v))}" if v else "-"


def table(s: dict) -> str:
    """Markdown tables of a summary (web.json)."""
    cases = s["cases"]
    targets = [t for t in TARGETS if any(t in row for row in cases.values())]
    peers = [p for p in PEERS if p in targets and "mox" in targets]
    lines = [f"median of {s['rounds']} interleaved rounds, wrk -t1, {s['duration_s']:g} s per measurement; "
             "requests/s; ratio = mox / nginx (higher is better for mox), rounds = lowest-highest "
             "per-round ratio", ""]
    head = "| case | " + " | ".join(f"{t} req/s" for t in targets)
    head += "".join(f" | mox/{p} | rounds" for p in peers) + " |"
    lines += [head, "|" + "---|" * (1 + len(targets) + 2 * len(peers))]
    for label, row in cases.items():
        cells = [f"{row[t]['median']:,.0f}" if t in row else "-" for t in targets]
        for p in peers:
            cells += [f"**{_ratio(row[f'mox/{p}'])}x**", _spread(row[f"mox/{p} per round"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "latency in ms: p50 / p99 of wrk (sampled per time interval, so a rare stall weighs "
              "more than its share of requests) / mean over every request (connections / requests per s); "
              "server CPU per 1,000 requests in ms (mox's web process, nginx's workers; user + system)", ""]
    head = "| case | " + " | ".join(f"{t} p50 / p99 / mean" for t in targets) + " | " + " | ".join(
        f"{t} CPU" for t in targets) + " |"
    lines += [head, "|" + "---|" * (1 + 2 * len(targets))]
    for label, row in cases.items():
        lat = [f"{row[t]['p50_ms']:.3f} / {row[t]['p99_ms']:.2f} / {row[t]['mean_ms']:.3f}" if t in row else "-"
               for t in targets]
        cpu = [f"{row[t]['cpu_ms_per_1000']:.1f}" if t in row else "-" for t in targets]
        lines.append(f"| {label} | " + " | ".join(lat + cpu) + " |")
    fwd = [(label, row) for label, row in cases.items() if label.startswith("forward")]
    if fwd:
        lines += ["", "backend (nginx, fixed 1 KB) CPU per 1,000 proxied requests, ms: " + "; ".join(
            f"{label}: " + ", ".join(f"{t} {row[t]['backend_cpu_ms_per_1000']:.1f}" for t in targets if t in row)
            for label, row in fwd)]
    if s.get("invalid"):
        lines += ["", f"invalid measurements (left out): {len(s['invalid'])}: " + "; ".join(
            f"round {i['round']} {i['case']} {i['target']}: {', '.join(i['problems'])}" for i in s["invalid"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk measurement")
    ap.add_argument("--connections", default=",".join(map(str, CONNECTIONS)), help="comma list")
    ap.add_argument("--cases", default="all", help="comma list of path indexes (0 static 1 KB, 1 static "
                    "100 KB, 2 forward) or all")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--base", type=Path, default=None, help="directory for the servers (default mkdtemp)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    require_tool("nginx", "nginx")
    require_tool("wrk", "wrk")
    paths = PATHS if a.cases == "all" else [PATHS[int(i)] for i in a.cases.split(",")]
    conns = [int(c) for c in a.connections.split(",")]
    targets = a.targets.split(",")
    base = a.base or make_private_dir("mox-bench-web-")
    base.mkdir(parents=True, exist_ok=True)
    raw: dict = {"rounds": a.rounds, "duration_s": a.duration, "connections": conns, "machine": machine_info(),
                 "cases": {}, "invalid": []}
    bench = Bench(base, targets)
    try:
        for t in targets:
            wait_for(lambda t=t: _answers(bench, t), timeout=30, what=f"{t} answering")
            bench.check(t)
        log("warm-up")
        for t in targets:
            for _label, path, _size in paths:
                bench.run(t, path, max(conns), 1)
        for rnd in range(a.rounds):
            for label, path, _size in paths:
                for c in conns:
                    case = case_label(label, c)
                    for t in rotate(targets, rnd):
                        res = bench.run(t, path, c, a.duration)
                        raw["cases"].setdefault(case, {}).setdefault(t, []).append(res)
                        if res["problems"]:
                            raw["invalid"].append({"round": rnd + 1, "case": case, "target": t,
                                                   "problems": res["problems"]})
                        log(f"round {rnd + 1} {case:26} {t:9} {res['rate']:9.0f} req/s  p50 {res['p50_us'] / 1e3:7.3f} "
                            f"p99 {res['p99_us'] / 1e3:7.3f} ms  CPU {res['cpu_ms_per_1000']:6.1f} ms/1000"
                            + (f"  INVALID: {', '.join(res['problems'])}" if res["problems"] else ""))
            if a.out:
                a.out.write_text(json.dumps(summarise(raw), indent=1))
        raw["machine"]["loadavg_end"] = loadavg()
    finally:
        bench.close()
        if not a.keep and a.base is None:
            shutil.rmtree(base, ignore_errors=True)
    summary = summarise(raw)
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1))
    print(table(summary))


def _answers(bench: Bench, target: str) -> bool:
    try:
        return get(bench.ports[target], PATHS[0][1])[0] != 0
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
