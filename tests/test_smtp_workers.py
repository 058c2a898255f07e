"""Incoming SMTP served by worker processes (``smtp_workers``), with a real ``mox serve``.

The main process binds one socket per worker on the SMTP port (SO_REUSEPORT) and keeps them,
so a worker that dies is replaced on the same socket and the connections waiting in its
backlog are still served; the workers die with the main process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import ssl
import threading
from pathlib import Path

import pytest

from mox_core.queue import partition_of
from mox_core.server.workers import KICK_INTERVAL, SMTPWorkers, _read_channel, worker_count, worker_cpus
from mox_testpeers import wait_for

DOMAINS = """
[domains."example.org"]

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
[accounts.alice.destinations."alice@example.org"]
"""


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out.extend(int(c) for c in f.read().split())
    return out


def worker_pids(server) -> list[int]:
    pids = []
    for pid in children(server.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"smtp-worker" in f.read():
                    pids.append(pid)
        except FileNotFoundError:
            pass
    return sorted(pids)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def ready_workers(server, n: int = 2) -> list[int]:
    """Pids of the ``n`` workers, once each has said it serves its sockets."""
    wait_for(lambda: len(log_events(server, "smtp_worker_started")) >= n, timeout=20, what="workers ready")
    return wait_for(lambda: len(worker_pids(server)) == n and worker_pids(server), timeout=20, what="workers")


def send(server, n: int, subject: str) -> None:
    for i in range(n):
        with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as c:
            c.sendmail("sender@elsewhere.example", ["alice@example.org"],
                       f"From: sender@elsewhere.example\r\nSubject: {subject} {i}\r\n\r\nhi\r\n")


def log_events(server, event: str) -> list[dict]:
    out = []
    for line in server.log_text().splitlines():
        if f'"{event}"' in line:
            out.append(json.loads(line))
    return out


@pytest.fixture
def mox2(mox_server_factory):
    return mox_server_factory(DOMAINS, static_top="smtp_workers = 2\n")


def on_cpu(cpu: int, fn, *args):
    """``fn(*args)`` in a thread pinned to ``cpu``: on loopback its connections arrive on that
    CPU, so the worker of that CPU serves them."""
    out = []

    def run():
        os.sched_setaffinity(0, {cpu})  # this thread only
        out.append(fn(*args))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out, "the pinned thread failed"
    return out[0]


def send_from_cpu(server, cpu: int, n: int, subject: str) -> None:
    on_cpu(cpu, send, server, n, subject)


def two_cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    assert len(cpus) == 2, "steering by CPU needs a machine with 2 CPUs to be tested"
    return cpus


def test_connections_go_to_the_worker_of_their_cpu(mox2):
    pids = ready_workers(mox2)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    assert len(cpus) == 2, "steering by CPU needs a machine with 2 CPUs to be tested"
    send_from_cpu(mox2, cpus[0], 10, "first cpu")
    first = {e.get("worker") for e in log_events(mox2, "message_accepted")}
    send_from_cpu(mox2, cpus[1], 10, "second cpu")
    assert len(mox2.wait_for_messages("alice", 20)) == 20
    accepted = log_events(mox2, "message_accepted")
    assert len(accepted) == 20
    # One client's connections keep to one warm worker; clients on both CPUs use both.
    assert first == {cpus[0] % 2}
    assert {e.get("worker") for e in accepted} == {0, 1}
    assert worker_pids(mox2) == pids


def allowed_cpus(pid: int) -> set[int]:
    """The union of the CPU affinities of every thread of ``pid``: one CPU only if every
    thread is pinned to it."""
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        out |= os.sched_getaffinity(int(task))
    return out


def test_each_worker_runs_on_the_cpu_whose_connections_it_serves(mox2):
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) == 2, "pinning one worker per CPU needs a machine with 2 CPUs to be tested"
    ready_workers(mox2)
    started = {e["worker"]: e for e in log_events(mox2, "smtp_worker_started")}
    assert {i: started[i]["cpu"] for i in (0, 1)} == {c % 2: c for c in cpus}
    for i in (0, 1):  # every thread, including those started later (queue, Maildir writers)
        assert allowed_cpus(started[i]["pid"]) == {started[i]["cpu"]}
    send_from_cpu(mox2, cpus[1], 3, "pinned")
    assert {e.get("worker") for e in log_events(mox2, "message_accepted")} == {cpus[1] % 2}
    assert allowed_cpus(mox2.proc.pid) == set(cpus)  # the main process is not pinned


def test_workers_are_not_pinned_when_turned_off_or_not_one_per_cpu(mox_server_factory):
    server = mox_server_factory(DOMAINS, static_top="smtp_workers = 2\npin_smtp_workers = false\n")
    pids = ready_workers(server)
    assert all(allowed_cpus(p) == os.sched_getaffinity(0) for p in pids)
    assert all("cpu" not in e for e in log_events(server, "smtp_worker_started"))
    assert worker_cpus(3, {0, 1}) is None  # more workers than CPUs
    assert worker_cpus(2, {0, 2}) is None  # both CPUs steer to worker 0
    assert worker_cpus(2, {1, 2}) == [2, 1] and worker_cpus(2, {4, 5}) == [4, 5]


def test_killed_worker_is_replaced_and_its_backlog_still_served(mox2):
    pids = ready_workers(mox2)
    os.kill(pids[0], signal.SIGKILL)
    # Sent right away: connections hashed to the dead worker's socket wait in its backlog
    # (the main process keeps the socket) until the replacement serves them.
    send(mox2, 20, "after kill")
    assert len(mox2.wait_for_messages("alice", 20)) == 20
    new = wait_for(lambda: len(worker_pids(mox2)) == 2 and worker_pids(mox2), timeout=20, what="replacement")
    assert pids[0] not in new and pids[1] in new
    exited = log_events(mox2, "smtp_worker_exited")
    assert [e["pid"] for e in exited] == [pids[0]]
    # the replacement runs on its predecessor's CPU, the one its sockets get connections from
    replacement = [p for p in new if p not in pids]

    def started() -> dict | None:  # the process runs before it logs that it is ready
        by_pid = {e["pid"]: e for e in log_events(mox2, "smtp_worker_started")}
        return by_pid if replacement[0] in by_pid else None

    by_pid = wait_for(started, timeout=20, what="the replacement's smtp_worker_started")
    assert by_pid[replacement[0]]["cpu"] == by_pid[pids[0]]["cpu"]
    assert allowed_cpus(replacement[0]) == {by_pid[pids[0]]["cpu"]}


def test_workers_die_with_a_crashed_main_process(mox2):
    pids = ready_workers(mox2)
    mox2.kill()
    wait_for(lambda: not any(alive(p) for p in pids), timeout=20, what="workers to exit")
    # Nothing keeps the port: a plain bind (no SO_REUSEPORT) succeeds (the kernel may take a
    # moment to drop the dead workers' sockets).
    def port_free():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((mox2.host, mox2.smtp_port))
            except OSError:
                return False
            return True

    wait_for(port_free, timeout=10, what="the SMTP port to be free")
    mox2.start()
    send(mox2, 2, "after restart")
    assert len(mox2.wait_for_messages("alice", 2)) == 2


def test_sigterm_stops_main_and_workers(mox2):
    pids = ready_workers(mox2)
    mox2.proc.terminate()
    assert mox2.proc.wait(20) == 0
    assert not any(alive(p) for p in pids)
    assert len(log_events(mox2, "smtp_worker_stopped")) == 2


def test_port_in_use_stops_the_start_with_the_listener_named(mox_server_factory):
    server = mox_server_factory(DOMAINS, static_top="smtp_workers = 2\n", start=False)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind((server.host, server.smtp_port))
        busy.listen(1)
        proc = server.mox("serve", check=False)
    assert proc.returncode != 0
    assert f"listener local: smtp on {server.host}:{server.smtp_port}: Address already in use" in (
        proc.stdout + proc.stderr)


def test_one_worker_means_the_main_process_serves_smtp_and_submission(mox_server_factory):
    server = mox_server_factory(DOMAINS, static_top="smtp_workers = 1\n", passwords={"alice": "pw"})
    send(server, 1, "in main")
    assert len(server.wait_for_messages("alice", 1)) == 1
    assert submit_to(server, ["admin@example.org"], "submitted in main")[0] == 250
    assert len(server.wait_for_messages("admin", 1)) == 1
    assert worker_pids(server) == []
    accepted = log_events(server, "message_accepted")
    assert [e["service"] for e in accepted] == ["smtp", "submission"]
    assert not any("worker" in e for e in accepted)


OUTBOUND_STATIC = """
[testing]
allow_private_targets = true
"""


def submit(server, to: str, subject: str) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(server.host, server.submission_port, timeout=30) as c:
        c.starttls(context=ctx)
        c.login("alice@example.org", "pw")
        c.sendmail("alice@example.org", [to],
                   f"From: alice@example.org\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhi\r\n")


def test_workers_deliver_the_queue_each_domain_in_one_worker(mox_server_factory, dns_server,
                                                             smtp_sink_factory):
    """Submissions are served by the workers and queued by the main process; the queue's
    deliveries run in the workers, each recipient domain always in the same one (its limit of
    deliveries in flight holds), woken by the main process when a message for one of its
    domains is queued."""
    sink = smtp_sink_factory()
    domains = ["a.example", "b.example", "c.example", "d.example"]
    assert {partition_of(d, 2) for d in domains} == {0, 1}
    for d in domains:
        dns_server.add(d, "MX", f"10 mx.{d}.")
        dns_server.add(f"mx.{d}", "A", sink.host)
    server = mox_server_factory(DOMAINS, static_extra=OUTBOUND_STATIC, nameserver=dns_server.nameserver,
                                passwords={"alice": "pw"}, static_top="smtp_workers = 2\n")
    ready_workers(server)
    for round_ in range(2):
        for d in domains:
            submit(server, f"bob@{d}", f"round {round_}")
    got = sink.wait_for_messages(8, timeout=30)
    assert sorted(m.rcpt_to[0] for m in got) == sorted(f"bob@{d}" for d in domains for _ in range(2))
    delivered = wait_for(lambda: len(log_events(server, "delivery_delivered")) == 8
                         and log_events(server, "delivery_delivered"), timeout=10, what="log lines")
    attempts = log_events(server, "delivery_attempt")
    assert len(attempts) == 8
    assert {(a["domain"], a.get("worker")) for a in attempts} == {(d, partition_of(d, 2)) for d in domains}
    # one line per accepted submission, with the queue ids the deliveries then name
    accepted = log_events(server, "message_accepted")
    assert [(e["service"], e["account"], len(e["queue_ids"])) for e in accepted] == [("submission", "alice", 1)] * 8
    assert all("worker" in e for e in accepted)
    assert sorted(i for e in accepted for i in e["queue_ids"]) == sorted(i for a in attempts for i in a["msg_ids"])
    assert log_events(server, "queue_added") == []
    assert all("worker" in e for e in delivered)
    started = log_events(server, "queue_started")
    assert sorted(e.get("partition") for e in started) == ["1/2", "2/2"]
    assert all(e["concurrency"] == 10 for e in started)  # [queue] concurrency, per worker


def test_a_killed_workers_domains_are_delivered_by_its_replacement(mox_server_factory, dns_server,
                                                                   smtp_sink_factory):
    """Messages queued for a worker's domains while it is dead wait for the replacement,
    which looks at the whole queue when it starts."""
    sink = smtp_sink_factory()
    for d in ("a.example", "b.example"):
        dns_server.add(d, "MX", f"10 mx.{d}.")
        dns_server.add(f"mx.{d}", "A", sink.host)
    assert partition_of("a.example", 2) == 0 and partition_of("b.example", 2) == 1
    server = mox_server_factory(DOMAINS, static_extra=OUTBOUND_STATIC, nameserver=dns_server.nameserver,
                                passwords={"alice": "pw"}, static_top="smtp_workers = 2\n")
    ready_workers(server)
    first = {e["worker"]: e["pid"] for e in log_events(server, "smtp_worker_started")}
    os.kill(first[0], signal.SIGKILL)
    submit(server, "bob@a.example", "while its worker is dead")
    submit(server, "carol@b.example", "to the other worker")
    got = sink.wait_for_messages(2, timeout=30)
    assert sorted(m.rcpt_to[0] for m in got) == ["bob@a.example", "carol@b.example"]
    [attempt] = [e for e in log_events(server, "delivery_attempt") if e["domain"] == "a.example"]
    started = log_events(server, "smtp_worker_started")
    assert attempt["worker"] == 0 and len(started) == 3 and started[-1]["pid"] != first[0]


def test_queue_kick_reaches_the_worker_that_delivers(mox_server_factory, dns_server, smtp_sink_factory):
    """`mox queue kick` goes to the main process (ctl socket); it wakes the workers, and the
    message deferred for an hour goes out now."""
    sink = smtp_sink_factory(reject_4xx="RCPT", soft_reply="451 4.7.1 greylisted, try later")
    dns_server.add("a.example", "MX", "10 mx.a.example.")
    dns_server.add("mx.a.example", "A", sink.host)
    server = mox_server_factory(DOMAINS, static_extra=OUTBOUND_STATIC + "\n[queue]\nretry_intervals = [3600.0]\n",
                                nameserver=dns_server.nameserver, passwords={"alice": "pw"},
                                static_top="smtp_workers = 2\n")
    ready_workers(server)
    submit(server, "bob@a.example", "deferred")
    wait_for(lambda: log_events(server, "delivery_deferred"), timeout=20, what="first attempt deferred")
    sink.stop()
    good = smtp_sink_factory(host=sink.host, port=sink.port)
    server.mox("queue", "kick")
    [msg] = good.wait_for_messages(1, timeout=20)
    assert msg.message["Subject"] == "deferred"
    assert [e["worker"] for e in log_events(server, "delivery_delivered")] == [partition_of("a.example", 2)]


LIMITED = DOMAINS.replace('[accounts.alice]\n', '[accounts.alice]\nmax_outgoing_messages_per_day = 6\n')


def submit_to(server, rcpts: list[str], subject: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(server.host, server.submission_port, timeout=30) as c:
        c.starttls(context=ctx)
        c.login("alice@example.org", "pw")
        c.mail("alice@example.org")
        for r in rcpts:
            c.rcpt(r)
        return c.data(f"From: alice@example.org\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())


def test_submissions_on_both_workers_share_the_queue_and_the_rate_limits(mox_server_factory, dns_server,
                                                                        smtp_sink_factory):
    """Each worker serves the submissions arriving on its CPU; the main process queues them
    with their local copies, and the account's limit of messages per day (one per recipient,
    as in mox) counts those of both workers together."""
    sink = smtp_sink_factory()
    dns_server.add("a.example", "MX", "10 mx.a.example.")
    dns_server.add("mx.a.example", "A", sink.host)
    server = mox_server_factory(LIMITED, static_extra=OUTBOUND_STATIC, nameserver=dns_server.nameserver,
                                passwords={"alice": "pw"}, static_top="smtp_workers = 2\n")
    ready_workers(server)
    cpus = two_cpus()
    replies = [on_cpu(cpus[i % 2], submit_to, server, ["admin@example.org", "bob@a.example"], f"n{i}")
               for i in range(4)]
    assert [code for code, _ in replies] == [250, 250, 250, 451], replies
    assert replies[3][1] == (b"4.7.1 max number of messages (6) over past 24h reached, "
                             b"try increasing per-account setting max_outgoing_messages_per_day")
    accepted = log_events(server, "message_accepted")
    assert sorted(e["worker"] for e in accepted) == sorted(c % 2 for c in cpus[:2] + cpus[:1])
    # the local copies, durable with the queued messages
    local = server.wait_for_messages("admin", 3)
    assert all(b"Delivered-To: admin@example.org" in m for m in local)
    got = sink.wait_for_messages(3, timeout=30)
    assert sorted(m.message["Subject"] for m in got) == ["n0", "n1", "n2"]
    assert sorted(i for e in accepted for i in e["queue_ids"]) == sorted(
        i for a in log_events(server, "delivery_attempt") for i in a["msg_ids"])


def test_failed_logins_on_different_workers_count_together(mox_server_factory):
    """10 failed logins per client address and minute, whichever worker serves them: five
    on each worker, then both refuse the address."""
    server = mox_server_factory(DOMAINS, passwords={"alice": "pw"}, static_top="smtp_workers = 2\n")
    ready_workers(server)
    cpus = two_cpus()

    def login(password: str) -> int:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with smtplib.SMTP(server.host, server.submission_port, timeout=30) as c:
                c.starttls(context=ctx)
                c.ehlo()
                c.user, c.password = "alice@example.org", password
                code, _ = c.auth("PLAIN", c.auth_plain)
                return code
        except smtplib.SMTPResponseException as exc:  # 535, or 421 and the connection closed
            return exc.smtp_code
        except smtplib.SMTPServerDisconnected:
            return 421

    codes = [on_cpu(cpus[i % 2], login, "wrong") for i in range(10)]
    assert codes == [535] * 10
    failed = log_events(server, "auth_failed")
    assert sorted(e["worker"] for e in failed) == sorted([cpus[0] % 2] * 5 + [cpus[1] % 2] * 5)
    # neither worker saw 10 failures itself; the main process counted them for both
    assert [on_cpu(c, login, "pw") for c in cpus] == [421, 421]
    assert {e["worker"] for e in log_events(server, "auth_throttled")} == {0, 1}


def workers_writing_to(lines: dict[int, list[bytes]]) -> tuple[SMTPWorkers, list[str], list[str]]:
    """Two workers whose pipes write into ``lines``; domains of worker 0 and of worker 1."""
    workers = SMTPWorkers(Path("mox.toml"), [], 2)

    class Channel:  # the main process's end of a worker's pipe
        def __init__(self, index: int) -> None:
            self.index = index

        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            lines[self.index].append(data)

    workers._channels = [Channel(0), Channel(1)]
    names = ("a.example", "b.example", "c.example", "d.example")
    return (workers, [d for d in names if partition_of(d, 2) == 0],
            [d for d in names if partition_of(d, 2) == 1])


async def test_kicks_name_their_domains_to_the_worker_that_delivers_them():
    """After a submission the main process tells the worker which of its domains got mail, so
    a worker whose deliveries to them are all at their limit skips its pass (kick_for)."""
    lines: dict[int, list[bytes]] = {0: [], 1: []}
    workers, zero, one = workers_writing_to(lines)
    workers.wake([zero[0], one[0], zero[1]])
    workers.wake(None)  # an admin change: every worker looks at everything
    assert lines == {0: [f"kick {zero[0]} {zero[1]}\n".encode(), b"kick\n"],
                     1: [f"kick {one[0]}\n".encode(), b"kick\n"]}
    # 1,000 recipient domains in one submission: no line the worker could not read
    lines[0].clear(), lines[1].clear()
    await asyncio.sleep(KICK_INTERVAL * 2)
    many = [f"{'d' * 60}{i}.example" for i in range(1000)]
    workers.wake(many)
    assert lines == {0: [b"kick\n"], 1: [b"kick\n"]}


async def test_kicks_for_a_burst_of_submissions_go_together():
    """A worker is kicked for new messages at most every KICK_INTERVAL: the first message
    after a quiet spell at once, the domains of those after it in one line at the end of the
    interval; an admin kick goes to every worker at once and takes what was waiting."""
    lines: dict[int, list[bytes]] = {0: [], 1: []}
    workers, zero, one = workers_writing_to(lines)
    workers.wake([zero[0]])
    workers.wake([zero[1]])
    workers.wake([zero[0]])
    workers.wake([one[0]])  # the other worker's first: at once
    assert lines == {0: [f"kick {zero[0]}\n".encode()], 1: [f"kick {one[0]}\n".encode()]}
    await asyncio.sleep(KICK_INTERVAL * 3)
    assert lines == {0: [f"kick {zero[0]}\n".encode(), f"kick {zero[1]} {zero[0]}\n".encode()],
                     1: [f"kick {one[0]}\n".encode()]}

    lines[0].clear(), lines[1].clear()
    await asyncio.sleep(KICK_INTERVAL * 2)
    workers.wake([zero[1]])
    workers.wake([zero[0]])  # waits for the interval ...
    workers.wake(None)  # ... and goes with the admin kick
    await asyncio.sleep(KICK_INTERVAL * 3)
    assert lines == {0: [f"kick {zero[1]}\n".encode(), b"kick\n"], 1: [b"kick\n"]}
    assert workers._kick_timer == [None, None]


async def test_worker_turns_kick_lines_into_scheduler_calls():
    calls: list[list[str] | None] = []

    class Scheduler:
        def kick(self) -> None:
            calls.append(None)

        def kick_for(self, domains: list[str]) -> None:
            calls.append(list(domains))

    ours, theirs = socket.socketpair()
    stop = asyncio.Event()
    task = asyncio.create_task(_read_channel(theirs, stop, Scheduler()))
    ours.sendall("kick a.example bücher.example\nkick\nsomething new\n".encode())
    ours.sendall(b"kick " + b"x" * 100_000 + b"\nkick b.example\n")  # too long: a plain kick
    async with asyncio.timeout(10):  # the last line read: every line before it was too
        while len(calls) < 4:
            await asyncio.sleep(0.005)
    assert not stop.is_set()
    ours.close()  # the main process is gone: the worker stops
    await asyncio.wait_for(stop.wait(), 5)
    await task
    assert calls == [["a.example", "bücher.example"], None, None, ["b.example"]]


def test_worker_count_auto_is_one_per_usable_cpu():
    assert worker_count(3) == 3
    assert worker_count(0) == max(1, min(len(os.sched_getaffinity(0)), 8))
