"""Shared pieces of the benchmarks: peers (Postfix, smtp-sink, DNS), ``mox serve`` instances,
the load generators (smtp-source, smtpload) and small measuring helpers.

Everything listens on 127.0.0.0/8 only; every run is bounded in count and in time. Private
directories are ``mkdtemp`` under /tmp with mode 755 (Postfix daemons and smtp-sink run as
``postfix``/``nobody`` and must traverse them). Must run as root (Postfix, smtp-sink -u).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mox_testpeers import free_port, make_private_dir, wait_banner
from mox_testpeers.lifecycle import PeerProcess
from mox_testpeers.postfix import backdate_config, postfix_command, postfix_running

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable

SENDER = "sender@src.bench.test"  # SPF: v=spf1 ip4:127.0.0.0/8 -all (one TXT lookup per message)
LOCAL_RCPT = "rcpt@bench.test"  # a local mox account / Postfix discards everything
ACCOUNT_ADDR = "bench@bench.test"  # mox submission login, MAIL FROM and From:
PASSWORD = "bench-pw"
REMOTE_RCPT = "rcpt@dest.test"  # queue case: a remote recipient


# ------------------------------------------------------------------------------------------
# small helpers


def log(*args: object) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``mox serve`` and its SMTP worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def nofile_limit(n: int) -> tuple[int, int]:
    """The (soft, hard) RLIMIT_NOFILE to ask for: n, or as close as this sandbox allows (root
    without CAP_SYS_RESOURCE cannot raise the hard limit, which is 20000 here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(n, soft)
    return (want, max(hard, want)) if _can_raise_hard() else (min(want, hard), hard)


def _can_raise_hard() -> bool:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))
    except (ValueError, OSError):
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # lowering back is always allowed
    return True


def raise_nofile(n: int = 65536) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE towards n; returns the limits now in force."""
    lim = nofile_limit(n)
    resource.setrlimit(resource.RLIMIT_NOFILE, lim)
    return lim


def cpu_seconds(pid: int, *, exited_children: bool = False) -> float:
    """utime + stime of a process and its descendants (all threads), from /proc/PID/stat; with
    ``exited_children`` also what their children that have exited used (cutime + cstime,
    counted once a child is waited for): Postfix's smtpd, cleanup and trivial-rewrite processes
    come and go under its master."""
    last = 15 if exited_children else 13
    ticks = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:last])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds_all(pid: int) -> float:
    """:func:`cpu_seconds` with the children that have exited."""
    return cpu_seconds(pid, exited_children=True)


def rotate(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


# ------------------------------------------------------------------------------------------
# load generators


def smtp_source_path() -> str:
    for p in (shutil.which("smtp-source"), "/usr/sbin/smtp-source"):
        if p and os.path.exists(p):
            return p
    raise SystemExit("smtp-source not found: apt-get install postfix")


def smtp_source(port: int, *, sessions: int, messages: int, length: int, sender: str = SENDER,
                rcpt: str = LOCAL_RCPT, host: str = "127.0.0.1", timeout: float = 300,
                message_file: Path | None = None) -> dict:
    """Run smtp-source (new connection per message, HELO, one recipient); wall time and rate.
    ``message_file``: send that message (LF line endings; smtp-source sends CRLF) instead of
    smtp-source's own of ``length`` bytes."""
    payload = ["-F", str(message_file)] if message_file else ["-l", str(length)]
    args = [smtp_source_path(), "-s", str(sessions), "-m", str(messages), *payload,
            "-f", sender, "-t", rcpt, "-M", "client.bench.test", f"{host}:{port}"]
    t0 = time.perf_counter()
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({p.returncode}): {' '.join(args)}\n"
                           f"{p.stdout.decode(errors='replace')[-2000:]}")
    return {"messages": messages, "elapsed": elapsed, "rate": messages / elapsed}


_SMTPLOAD: str | None = None


def smtpload_path() -> str:
    """Compile bench/smtpload.c once (cached by source hash) under /tmp/mox-bench-bin/."""
    global _SMTPLOAD
    if _SMTPLOAD:
        return _SMTPLOAD
    src = BENCH / "smtpload.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out_dir = Path("/tmp/mox-bench-bin")
    out_dir.mkdir(exist_ok=True)
    exe = out_dir / f"smtpload-{digest}"
    if not exe.exists():
        cc = shutil.which("gcc") or shutil.which("cc")
        if not cc:
            raise SystemExit("no C compiler: apt-get install gcc libssl-dev")
        p = subprocess.run([cc, "-O2", "-pthread", "-o", str(exe) + ".tmp", str(src), "-lcrypto"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"building smtpload failed (apt-get install gcc libssl-dev):\n{p.stderr}")
        os.rename(str(exe) + ".tmp", exe)
    _SMTPLOAD = str(exe)
    return _SMTPLOAD


def smtpload(port: int, *, sessions: int, messages: int, length: int, sender: str = SENDER,
             rcpt: str = LOCAL_RCPT, auth: tuple[str, str] | None = None, ehlo: bool = False,
             host: str = "127.0.0.1", max_seconds: float = 120, timeout: float = 300) -> dict:
    """Run bench/smtpload (smtp-source-like, optional AUTH CRAM-MD5, per-session latency)."""
    args = [smtpload_path(), "-s", str(sessions), "-m", str(messages), "-l", str(length),
            "-f", sender, "-t", rcpt, "-D", str(max_seconds)]
    if auth:
        args += ["-a", f"{auth[0]}:{auth[1]}"]
    if ehlo:
        args.append("-e")
    args.append(f"{host}:{port}")
    p = subprocess.run(args, capture_output=True, timeout=timeout)
    try:
        res = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"smtpload: {p.stdout!r} {p.stderr!r}") from None
    if res["errors"] or res["messages"] < messages:
        raise RuntimeError(f"smtpload: {res['errors']} errors, {res['messages']}/{messages} ok, "
                           f"first: {res['first_error']} ({' '.join(args)})")
    return res


# ------------------------------------------------------------------------------------------
# DNS on loopback (a subprocess, so that it competes with nothing in the bench process)


class DNSProc:
    """bench/dns_helper.py in its own process: records and failures from a JSON spec."""

    def __init__(self, records: list[tuple[str, str, str]], timeouts: list[tuple[str, str | None]] = ()):
        self.spec = {"records": [list(r) for r in records], "timeouts": [list(t) for t in timeouts]}
        self.process = PeerProcess([PYTHON, str(BENCH / "dns_helper.py"), json.dumps(self.spec)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.port = 0

    def start(self) -> DNSProc:
        def ready(proc: subprocess.Popen) -> int:  # the helper prints its port once it listens
            line = proc.stdout.readline().decode().strip()
            if not line.isdigit():
                raise RuntimeError(f"dns helper did not start: {line!r}")
            return int(line)

        self.port = self.process.start(ready)
        return self

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop()


def bench_dns(extra_records: list[tuple[str, str, str]] = (), stall_domains: list[str] = ()) -> DNSProc:
    records = [
        ("src.bench.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all"),
        ("bench.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all"),
        ("relay.bench.test", "A", "127.0.0.1"),
        *extra_records,
    ]
    return DNSProc(records, [(d, None) for d in stall_domains]).start()


# ------------------------------------------------------------------------------------------
# Postfix


MASTER_CF_COMMON = """\
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

QUEUE_SUBDIRS = ("incoming", "active", "deferred", "hold", "maildrop")


class PostfixBench:
    """A private Postfix 3.7 instance under a mkdtemp dir, stock settings except:

    role "accept": 127.0.0.1:port accepts from mynetworks (127.0.0.0/8); 127.0.0.1:sasl_port
        accepts relaying only after AUTH (Cyrus sasldb, CRAM-MD5, no TLS: like mox's
        submission listener in this benchmark). Everything is delivered by discard(8) after
        the queue (cleanup fsyncs the queue file before the 250, as always).
    role "relay": accepts from mynetworks and puts every message on hold
        (``check_client_access static:HOLD``); released messages go through smtp(8) to
        relayhost [127.0.0.1]:relay_port (the smtp-sink), no TLS, no DNS.
    """

    def __init__(self, role: str, *, relay_port: int | None = None, base: Path | None = None):
        assert role in ("accept", "relay")
        self.role = role
        self.relay_port = relay_port
        self.dir = make_private_dir(f"pf-bench-{role}-") if base is None else _private_subdir(base, f"pf-{role}")
        self.port = free_port()
        self.sasl_port = free_port() if role == "accept" else None

    @property
    def conf(self) -> Path:
        return self.dir / "conf"

    def configure(self) -> None:
        T = self.dir
        for d in ("conf/sasl", "queue", "data"):
            (T / d).mkdir(parents=True, exist_ok=True)
        os.chmod(T, 0o755)
        shutil.chown(T / "data", "postfix")
        main = textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {T}/queue
            data_directory = {T}/data
            mail_owner = postfix
            setgid_group = postdrop
            syslog_name = pf-bench-{self.port}
            maillog_file = {T}/maillog
            maillog_file_prefixes = {T}
            myhostname = pf.bench.test
            mydomain = bench.test
            myorigin = bench.test
            mydestination =
            inet_interfaces = loopback-only
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            smtp_dns_support_level = disabled
            smtpd_peername_lookup = no
            alias_maps =
            alias_database =
            biff = no
            smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject
            """)
        if self.role == "accept":
            main += textwrap.dedent(f"""\
                default_transport = discard:bench
                relay_transport = discard:bench
                local_transport = discard:bench
                virtual_transport = discard:bench
                smtpd_sasl_type = cyrus
                smtpd_sasl_path = smtpd
                cyrus_sasl_config_path = {T}/conf/sasl
                smtpd_sasl_local_domain = bench.test
                smtpd_sasl_security_options = noanonymous
                """)
            master = (f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
                      f"127.0.0.1:{self.sasl_port} inet n - n - - smtpd -o smtpd_sasl_auth_enable=yes"
                      f" -o mynetworks= -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n")
            (T / "conf/sasl/smtpd.conf").write_text(
                f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {T}/conf/sasl/sasldb2\n"
                "mech_list: CRAM-MD5\n")
            db = T / "conf/sasl/sasldb2"
            subprocess.run(["saslpasswd2", "-p", "-f", str(db), "-u", "bench.test", "-c", "bench"],
                           input=PASSWORD.encode() + b"\n", check=True)
            shutil.chown(db, "root", "postfix")
            os.chmod(db, 0o640)
        else:
            main += textwrap.dedent(f"""\
                relayhost = [127.0.0.1]:{self.relay_port}
                default_transport = smtp
                relay_transport = smtp
                smtp_tls_security_level = none
                smtpd_client_restrictions = check_client_access static:HOLD
                """)
            master = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        (T / "conf/main.cf").write_text(main)
        (T / "conf/master.cf").write_text(master + MASTER_CF_COMMON)
        backdate_config(T / "conf")

    def postfix(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        p = postfix_command(self.conf, *cmd, log_file=self.dir / "postfix-cmd.log")
        if check and p.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(cmd)} failed; see {self.dir}/maillog")
        return p

    def start(self) -> PostfixBench:
        self.configure()
        self.postfix("start")
        wait_banner("127.0.0.1", self.port, timeout=15)
        if self.sasl_port:
            wait_banner("127.0.0.1", self.sasl_port, timeout=15)
        return self

    def stop(self) -> None:
        if postfix_running(self.dir / "queue"):
            self.postfix("stop", check=False)

    def queue_count(self, subdirs: tuple[str, ...] = QUEUE_SUBDIRS) -> int:
        n = 0
        for sub in subdirs:
            for _dirpath, _dirs, files in os.walk(self.dir / "queue" / sub):
                n += len(files)
        return n

    def run_tool(self, *args: str) -> None:
        subprocess.run([*args, "-c", str(self.conf)] if args[0] == "postqueue" else list(args),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def _private_subdir(base: Path, name: str) -> Path:
    d = base / f"{name}-{os.getpid()}-{time.time_ns() % 10**9}"
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    return d


def postfix_version() -> str:
    p = subprocess.run(["postconf", "-d", "mail_version"], capture_output=True, text=True)
    return p.stdout.split("=")[-1].strip()


# ------------------------------------------------------------------------------------------
# mox serve


class MoxBench:
    """A ``mox serve`` process on loopback with a generated config (moxserver.py's layout).

    SMTP listener (no STARTTLS, as the Postfix peer) on ``smtp_port``; submission without TLS
    (``no_require_starttls``, loopback only) on ``submission_port``; account ``bench`` owns
    rcpt@ and bench@bench.test with rate limits raised so the benchmark never hits them.
    ``relay_port``: add transport ``relay`` (kind smtp, relay.bench.test:relay_port, no
    STARTTLS) and a global route sending everything through it. ``static_extra`` and
    ``domains_extra``: TOML appended to mox.toml and domains.toml (e.g. a web port of the
    listener ``bench`` and web handlers, for bench/web.py).
    """

    def __init__(self, directory: Path, nameserver: str, *, relay_port: int | None = None,
                 log_level: str = "info", queue_concurrency: int | None = None,
                 smtp_workers: int | None = None, dkim: str | None = None, pin: bool = True,
                 static_extra: str = "", domains_extra: str = ""):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.smtp_port = free_port()
        self.submission_port = free_port()
        self.process: PeerProcess | None = None
        self.default_env: dict[str, str] = {}  # e.g. PYTHONPATH of a patched copy (experiments)
        static = textwrap.dedent(f"""\
            hostname = "mox.bench.test"
            data_dir = "data"
            log_level = "{log_level}"

            [dns]
            nameservers = ["{nameserver}"]
            timeout = 5

            [postmaster]
            account = "bench"

            [listeners.bench]
            ips = ["127.0.0.1"]

            [listeners.bench.smtp]
            enabled = true
            port = {self.smtp_port}
            no_starttls = true

            [listeners.bench.submission]
            enabled = true
            port = {self.submission_port}
            no_require_starttls = true
            """)
        if smtp_workers is not None:
            static = f"smtp_workers = {smtp_workers}\n" + static
        if not pin:
            static = "pin_smtp_workers = false\n" + static
        if queue_concurrency:
            static += f"\n[queue]\nconcurrency = {queue_concurrency}\n"
        domains = textwrap.dedent("""\
            [domains."bench.test"]

            [accounts.bench]
            domain = "bench.test"
            max_outgoing_messages_per_day = 1000000000
            max_first_time_recipients_per_day = 1000000000

            [accounts.bench.destinations."rcpt@bench.test"]
            [accounts.bench.destinations."bench@bench.test"]
            """)
        if relay_port:
            static += textwrap.dedent(f"""
                [transports.relay]
                kind = "smtp"
                host = "relay.bench.test"
                port = {relay_port}
                no_starttls = true
                """)
            domains += '\n[[routes]]\ntransport = "relay"\n'
        if dkim:  # submissions from bench.test are DKIM-signed, as a mail domain's are
            write_dkim_key(self.dir / "dkim.pem", dkim)
            domains += textwrap.dedent("""
                [domains."bench.test".dkim]
                sign = ["bench"]
                [domains."bench.test".dkim.selectors.bench]
                private_key_file = "dkim.pem"
                """)
        (self.dir / "mox.toml").write_text(static + static_extra)
        (self.dir / "domains.toml").write_text(domains + domains_extra)
        self.mox("setaccountpassword", "bench", input=PASSWORD + "\n")

    @property
    def config_path(self) -> Path:
        return self.dir / "mox.toml"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def mox(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "mox_core", "--config", str(self.config_path), *args],
                              input=input, capture_output=True, text=True, check=True, timeout=120)

    def start(self, nofile: int | None = None, env: dict | None = None) -> MoxBench:
        lim = nofile_limit(nofile) if nofile else None

        def pre() -> None:  # like prlimit / ulimit -n in a wrapper shell
            if lim:
                resource.setrlimit(resource.RLIMIT_NOFILE, lim)

        def ready(proc: subprocess.Popen) -> None:
            wait_banner("127.0.0.1", self.smtp_port, timeout=30, proc=proc)
            wait_banner("127.0.0.1", self.submission_port, timeout=30, proc=proc)

        self.process = PeerProcess(
            [PYTHON, "-m", "mox_core", "--config", str(self.config_path), "serve"],
            log_file=self.dir / "mox.log", stop_timeout=30, kill_timeout=10, preexec_fn=pre, cwd=self.dir,
            # cwd: "python -m" puts the working directory first on sys.path, so started from
            # the repository root a --variant's PYTHONPATH copy of mox_core would be shadowed
            # by the checkout's (every variant measured the same code).
            env={**os.environ, **self.default_env, **(env or {})})
        self.process.start(ready)
        return self

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.proc if self.process is not None else None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None

    def queue_count(self) -> int:
        db = self.data_dir / "queue" / "index.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute("SELECT COUNT(*) FROM msg").fetchone()[0]
        finally:
            con.close()

    def ctl(self, command: str, args: dict) -> dict:
        """One request on the ctl socket (JSON line each way)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(str(self.data_dir / "ctl"))
            s.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        resp = json.loads(buf)
        if not resp.get("ok"):
            raise RuntimeError(f"ctl {command}: {resp}")
        return resp["result"]


DKIM_SELECTOR = "bench"  # of SENDER's domain, for --dkim-signed-incoming


def dkim_signed_messages(lengths: list[int], directory: Path) -> tuple[dict[int, Path], tuple[str, str, str]]:
    """Messages from SENDER with ``length`` bytes of body each, DKIM-signed (RSA-2048, relaxed,
    by dkimpy as another MTA would sign), as files for smtp-source ``-F``; and the TXT record
    of the key, for ``bench_dns``."""
    import base64

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    domain = SENDER.rpartition("@")[2]
    files = {}
    for length in lengths:
        message = make_message(length, frm=SENDER, to=LOCAL_RCPT)
        signed = dkim.sign(message, DKIM_SELECTOR.encode(), domain.encode(), pem,
                           canonicalize=(b"relaxed", b"relaxed"),
                           include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + message
        files[length] = directory / f"signed-{length}.eml"
        files[length].write_bytes(signed.replace(b"\r\n", b"\n"))
    record = (f"{DKIM_SELECTOR}._domainkey.{domain}", "TXT", "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())
    return files, record


def write_dkim_key(path: Path, kind: str) -> None:
    """A DKIM private key (PEM): ``rsa`` (2048 bits, what ``mox dkim gen`` makes) or ``ed25519``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = {"rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
           "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def variant_mox(directory: Path, nameserver: str, spec: str, *, log_level: str = "info",
                relay_port: int | None = None) -> MoxBench:
    """A ``mox serve`` for ``--variant NAME=SPEC``, SPEC being
    ``DIR[,log=LEVEL][,workers=N][,loop=asyncio][,dkim=rsa|ed25519][,pin=false]``: PYTHONPATH=DIR
    (empty: the project as installed), its log level, ``smtp_workers = N``, the standard event
    loop instead of uvloop, DKIM signing of the submissions with a key of that kind, workers
    not pinned to CPUs (``pin_smtp_workers = false``)."""
    path, *opts = spec.split(",")
    opt = dict(o.split("=", 1) for o in opts)
    mox = MoxBench(directory, nameserver, relay_port=relay_port, log_level=opt.get("log", log_level),
                   smtp_workers=int(opt["workers"]) if "workers" in opt else None, dkim=opt.get("dkim"),
                   pin=opt.get("pin", "true") != "false")
    if path:
        mox.default_env["PYTHONPATH"] = str(Path(path).resolve())
    if "loop" in opt:
        mox.default_env["MOX_EVENT_LOOP"] = opt["loop"]
    return mox


def make_message(length: int, frm: str = ACCOUNT_ADDR, to: str = REMOTE_RCPT, n: int = 0) -> bytes:
    """A message like smtpload's: five header lines, then length bytes of 78-'X' lines."""
    head = (f"From: <{frm}>\r\nTo: <{to}>\r\nDate: Thu, 26 Nov 2026 11:19:44 +0000\r\n"
            f"Message-Id: <{n}.{time.time_ns()}@bench.test>\r\nSubject: bench {n}\r\n\r\n").encode()
    line = b"X" * 78 + b"\r\n"
    body = (line * (length // len(line) + 1))[:length - 2] + b"\r\n"
    return head + body
