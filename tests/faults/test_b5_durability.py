"""Cases 37-39: a crash during DATA, a crash right after the 250, and the order of the
durable writes against the 250 (strace of a real ``mox serve``). Cases 40-41 (a full disk,
failing fsync) are in test_disk_full.py; the crash loop (test_crash_loop.py) repeats 37 and
38 fifty times under load.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import sys
import time

import pytest

from mox_testpeers import wait_banner
from mox_testpeers.dnsserver import DNSServer
from mox_testpeers.lifecycle import PeerProcess
from mox_testpeers.moxserver import MoxServer
from mox_testpeers.sink import SmtpSink
from tests.faults.crashkit import DOMAINS, STATIC, GroupMox, body_for
from tests.security.smtpraw import Raw, client_tls, message, stuffed, transaction, wait_for


@pytest.fixture
def world(tmp_path):
    dns = DNSServer().start()
    sink = SmtpSink(host="127.0.0.1", port=None).start()
    dns.add("sink.test", "A", "127.0.0.1")
    made = []

    def make(cls=GroupMox, static_top: str = ""):
        mox = cls(tmp_path / f"mox{len(made)}", domains=DOMAINS, nameserver=dns.nameserver, static_top=static_top,
                  static_extra=STATIC.replace("@PORT@", str(sink.port)))
        made.append(mox)
        mox.set_password("alice", "alice-pw")
        return mox.start()

    yield make, sink
    for mox in made:
        mox.stop()
    sink.cleanup()
    dns.stop()


def _submission(mox) -> Raw:
    c = Raw(mox.submission_port)
    c.ehlo()
    c.starttls()
    c.ehlo()
    assert c.login("alice@local.test", "alice-pw").startswith("235")
    return c


@pytest.mark.parametrize("service", ["smtp", "submission"])
def test_b37_crash_during_data_keeps_nothing_and_the_retry_lands_once(world, service):
    make, sink = world
    mox = make()
    data = message("half", "alice@local.test", "x@ext.test", body_for(37, 1 << 20))
    c = Raw(mox.smtp_port) if service == "smtp" else _submission(mox)
    with c:
        if service == "smtp":
            c.ehlo()
            transaction(c)
        else:
            transaction(c, "<alice@local.test>", ("<x@ext.test>",))
        c.send(stuffed(data)[:-200])  # all but the end: the server is still reading
        mox.kill_group()
        with pytest.raises((EOFError, ConnectionResetError)):
            c.reply()
    mox.start()
    assert mox.messages("u") == [] and "(none)" in mox.mox("queue", "list").stdout
    tmp = mox.maildir("u") / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
    # the client tries again: exactly one copy
    if service == "smtp":
        with smtplib.SMTP("127.0.0.1", mox.smtp_port, timeout=20) as s:
            s.sendmail("a@ext.test", ["u@local.test"], data)
        msgs = wait_for(lambda: mox.messages("u"), what="the retried message")
        assert len(msgs) == 1 and msgs[0].endswith(data)
    else:
        with smtplib.SMTP("127.0.0.1", mox.submission_port, timeout=20) as s:
            s.starttls(context=client_tls())
            s.login("alice@local.test", "alice-pw")
            s.sendmail("alice@local.test", ["x@ext.test"], data)
        [m] = sink.wait_for_messages(1, timeout=20)
        assert m.data.endswith(data.replace(b"\r\n", b"\n"))
        wait_for(lambda: "(none)" in mox.mox("queue", "list").stdout, what="the queue to drain")
        assert sink.count == 1


@pytest.mark.parametrize("service", ["smtp", "submission"])
def test_b38_crash_right_after_the_250_loses_nothing(world, service):
    make, sink = world
    port = sink.port
    sink.stop()  # the next hop is down while the server crashes
    mox = make()
    data = message("acked", "alice@local.test", "x@ext.test", body_for(38, 300_000))
    c = Raw(mox.smtp_port) if service == "smtp" else _submission(mox)
    with c:
        if service == "smtp":
            c.ehlo()
            transaction(c)
        else:
            transaction(c, "<alice@local.test>", ("<x@ext.test>",))
        assert c.cmd(stuffed(data)).startswith("250")
        mox.kill_group()  # the instant the 250 arrived
    back = SmtpSink(host="127.0.0.1", port=port).start()
    try:
        mox.start()
        if service == "smtp":
            [raw] = mox.messages("u")
            assert raw.endswith(data)
        else:
            msgs = back.wait_for_messages(1, timeout=20)
            assert len(msgs) >= 1 and msgs[0].data.endswith(data.replace(b"\r\n", b"\n"))
    finally:
        back.cleanup()


class _TracedProcess(PeerProcess):
    """strace and the ``mox serve`` it runs, in a session of their own. strace detaches from
    its tracees when it gets SIGTERM, so stopping it alone would leave mox running: the
    whole group gets SIGTERM, then SIGKILL if anything is left after 10 s."""

    def stop(self) -> None:
        if self.proc is None:
            return
        group = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        super().stop()
        deadline = time.monotonic() + 10
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(group, 0)  # ProcessLookupError once none is left
                time.sleep(0.1)
            os.killpg(group, signal.SIGKILL)


class StracedMox(MoxServer):
    """``mox serve`` (one process: smtp_workers = 1) under strace, recording the syscalls that
    make data durable or visible, and the writes to sockets."""

    def _launch(self, timeout: float) -> None:
        strace = shutil.which("strace")
        if strace is None:
            pytest.fail("strace not found: install the Debian package strace (scripts/install does)", pytrace=False)
        self.trace = self.directory / "trace.txt"
        calls = "openat,open,fsync,fdatasync,rename,renameat,renameat2,link,linkat,write,sendto,sendmsg,writev,close"
        self.process = _TracedProcess([strace, "-f", "-qq", "-e", f"trace={calls}", "-s", "64", "-o", str(self.trace),
                                       sys.executable, "-m", "mox_core", "--config", str(self.config_path), "serve"],
                                      log_file=self.log_path, stop_timeout=10, start_new_session=True)
        self.process.start(lambda proc: wait_banner(self.host, self.smtp_port, timeout=timeout * 3, proc=proc))


_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")


def _events(trace: str):
    """(line number, syscall, arguments, result) of each completed call, fds resolved per
    process to the paths they were opened with."""
    paths: dict[tuple[str, int], str] = {}
    out = []
    for n, line in enumerate(trace.splitlines()):
        m = _CALL.match(line)
        if m is None:
            continue
        pid, call, args, result = m.group(1), m.group(2), m.group(3), int(m.group(4))
        if call in ("openat", "open") and result >= 0:
            paths[(pid, result)] = args.split('"')[1]
        fd_path = None
        first = args.split(",")[0].strip()
        if first.isdigit():
            fd_path = paths.get((pid, int(first)))
        out.append((n, call, args, result, fd_path))
    return out


def test_b39_fsync_and_rename_come_before_the_250(world):
    make, _ = world
    mox = make(StracedMox, static_top="smtp_workers = 1\n")
    with Raw(mox.smtp_port, timeout=30) as c:
        c.ehlo()
        transaction(c)
        assert c.cmd(stuffed(message("traced"))).startswith("250")
    mox.stop()
    events = _events(mox.trace.read_text(errors="replace"))
    [reply] = [n for n, call, args, res, _ in events if call in ("write", "sendto", "sendmsg", "writev")
               and "250 2.0.0 message queued" in args]
    renames = [(n, args) for n, call, args, res, _ in events if call.startswith("rename") and "/Maildir/new/" in args
               and res == 0]
    assert renames, "no rename into Maildir/new"
    rename_line = max(n for n, _ in renames if n < reply)
    tmp_name = renames[-1][1].split('"')[1]
    file_syncs = [n for n, call, _, res, path in events if call in ("fsync", "fdatasync") and path == tmp_name]
    dir_syncs = [n for n, call, _, res, path in events if call in ("fsync", "fdatasync")
                 and path and path.rstrip("/").endswith("/Maildir/new")]
    assert file_syncs and min(file_syncs) < rename_line, "the message file is fsynced before its rename"
    assert [n for n in dir_syncs if rename_line < n < reply], "new/ is fsynced after the rename, before the 250"
    print(f"\nstrace: file fsync line {min(file_syncs)}, rename {rename_line}, "
          f"dir fsync {min(n for n in dir_syncs if n > rename_line)}, 250 written {reply}")

