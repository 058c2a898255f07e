"""Cases 40 and 41: the data directory runs out of space, or fsync fails.

The data directory of a real ``mox serve`` is a tmpfs of 64 MiB that the test mounts (as
root) and fills with a file. A message that does not fit must get a temporary reply
(``452 4.3.1`` or ``451 4.3.0``) and leave nothing behind, in the Maildir (SMTP) and in the
queue's SQLite database and segment files (submission); messages already queued stay queued;
the server keeps running, and once the file is removed the same messages go through without
a restart. fsync failures come from libfiu (``fiu-run -x``, Debian's fiu-utils), switched on
for the running server with ``fiu-ctrl``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mox_testpeers import wait_banner
from mox_testpeers.dnsserver import DNSServer
from mox_testpeers.lifecycle import PeerProcess
from mox_testpeers.moxserver import MoxServer
from mox_testpeers.sink import SmtpSink
from tests.faults.crashkit import body_for
from tests.security.smtpraw import Raw, message, stuffed, transaction, wait_for

DOMAINS = """\
[domains."local.test"]

[accounts.admin]
domain = "local.test"
[accounts.admin.destinations."admin@local.test"]

[accounts.u]
[accounts.u.destinations."u@local.test"]

[accounts.alice]
[accounts.alice.destinations."alice@local.test"]

[[routes]]
to_domain = ["ext.test"]
transport = "sink"
"""

STATIC = """\
[transports.sink]
kind = "smtp"
host = "sink.test"
port = @PORT@
no_starttls = true

[queue]
retry_intervals = [0.5]
max_attempts = 1000
"""

FS_SIZE = 64 << 20


class SmallDisk:
    """A tmpfs mounted at ``path`` for the test (root only), and a filler file on it."""

    def __init__(self, path: Path, size: int = FS_SIZE) -> None:
        if os.geteuid() != 0:
            pytest.fail("the disk-full tests mount a tmpfs and must run as root (CI does)", pytrace=False)
        if shutil.which("mount") is None:
            pytest.fail("mount not found: install the Debian package util-linux", pytrace=False)
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
        self.path = path
        self.filler = path / "filler"

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 32 * 1024) -> None:
        """Take all free space but ``leave`` bytes."""
        with open(self.filler, "ab") as f:
            while (room := self.free() - leave) > 0:
                try:
                    f.write(b"\0" * min(room, 4 << 20))
                    f.flush()
                except OSError:
                    break

    def release(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


class FiuMox(MoxServer):
    """``mox serve`` under ``fiu-run -x`` (libfiu's POSIX wrappers, remote control on)."""

    def _launch(self, timeout: float) -> None:
        fiu_run = shutil.which("fiu-run")
        if fiu_run is None:
            pytest.fail("fiu-run not found: install the Debian package fiu-utils (scripts/install does)",
                        pytrace=False)
        self.process = PeerProcess([fiu_run, "-x", sys.executable, "-m", "mox_core", "--config",
                                    str(self.config_path), "serve"], log_file=self.log_path,
                                   env={**os.environ, **self.env}, stop_timeout=10)
        self.process.start(lambda proc: wait_banner(self.host, self.smtp_port, timeout=timeout, proc=proc))

    def fiu(self, command: str) -> None:
        subprocess.run(["fiu-ctrl", "-c", command, str(self.proc.pid)], check=True, timeout=10)


@pytest.fixture
def world(tmp_path):
    """DNS, the sink (``sink.test``), and a factory for mox with its data on a small disk."""
    dns = DNSServer().start()
    sink = SmtpSink(host="127.0.0.1", port=None).start()
    dns.add("sink.test", "A", "127.0.0.1")
    made: list = []

    def make(cls=MoxServer, small_disk: bool = True, min_free_space: int | None = 0):
        """``min_free_space`` 0 (the check at MAIL off) lets the cases of 41 reach the writes
        that fail; None leaves mox's default."""
        directory = tmp_path / f"mox{len(made)}"
        disk = SmallDisk(directory / "data") if small_disk else None
        top = "smtp_workers = 1\n" + (f"min_free_space = {min_free_space}\n" if min_free_space is not None else "")
        mox = cls(directory, domains=DOMAINS, nameserver=dns.nameserver, static_top=top,
                  static_extra=STATIC.replace("@PORT@", str(sink.port)))
        made.append((mox, disk))
        mox.set_password("alice", "alice-pw")
        mox.start()
        return mox, disk

    yield make, sink
    for mox, disk in made:
        mox.stop()
        if disk is not None:
            disk.unmount()
    sink.cleanup()
    dns.stop()


def submit_raw(mox, data: bytes, to: str = "x@ext.test") -> str:
    with Raw(mox.submission_port) as c:
        c.ehlo()
        c.starttls()
        c.ehlo()
        assert c.login("alice@local.test", "alice-pw").startswith("235")
        transaction(c, "<alice@local.test>", (f"<{to}>",))
        reply = c.cmd(stuffed(data))
        assert c.cmd("NOOP").startswith("250")  # the session survives the failure
        return reply


def smtp_raw(mox, data: bytes) -> str:
    with Raw(mox.smtp_port) as c:
        c.ehlo()
        transaction(c)
        reply = c.cmd(stuffed(data))
        assert c.cmd("NOOP").startswith("250")
        return reply


def maildir_files(mox, account: str = "u") -> dict[str, list[str]]:
    md = mox.maildir(account)
    return {sub: sorted(p.name for p in (md / sub).iterdir()) if (md / sub).exists() else [] for sub in ("new", "tmp")}


TEMPORARY = ("452 4.3.1", "451 4.3.0")


def test_b41_full_disk_gives_452_keeps_running_and_recovers_by_itself(world):
    make, sink = world
    mox, disk = make()
    pid = mox.proc.pid
    assert smtp_raw(mox, message("before")).startswith("250")
    assert submit_raw(mox, message("queued-before", "alice@local.test", "x@ext.test")).startswith("250")
    sink.wait_for_messages(1)
    big_in = message("big-in", body=body_for(1, 300_000))
    big_out = message("big-out", "alice@local.test", "x@ext.test", body_for(2, 300_000))
    mid_out = message("mid-out", "alice@local.test", "x@ext.test", body_for(3, 40_000))  # a segment's size
    disk.fill()
    for data, send in ((big_in, smtp_raw), (big_out, submit_raw)):
        reply = send(mox, data)
        assert reply.startswith(TEMPORARY), reply
    # A message of segment size may still fit: segment files are preallocated (32 MiB). If it
    # was accepted it must arrive whole like any other.
    mid_reply = submit_raw(mox, mid_out)
    assert mid_reply.startswith((*TEMPORARY, "250")), mid_reply
    assert maildir_files(mox)["tmp"] == [] and len(maildir_files(mox)["new"]) == 1  # nothing half written
    queued = mox.mox("queue", "list").stdout
    assert "(none)" in queued or mid_reply.startswith("250"), queued  # nothing else queued
    assert mox.proc.poll() is None and mox.proc.pid == pid
    # Not a byte left. A small message may still fit where space is already allocated (the
    # SQLite database and its journal, a segment): a 250 then means it is stored whole.
    tiny_in, tiny_out = message("tiny-in"), message("tiny-out", "alice@local.test", "x@ext.test")
    disk.fill(leave=0)
    tiny_in_reply = smtp_raw(mox, tiny_in)
    disk.fill(leave=0)
    tiny_out_reply = submit_raw(mox, tiny_out)
    assert tiny_in_reply.startswith((*TEMPORARY, "250")) and tiny_out_reply.startswith((*TEMPORARY, "250"))
    assert maildir_files(mox)["tmp"] == []

    disk.release()  # space returns: the same messages go through, no restart
    assert smtp_raw(mox, big_in).startswith("250")
    assert submit_raw(mox, big_out).startswith("250")
    if not mid_reply.startswith("250"):
        assert submit_raw(mox, mid_out).startswith("250")
    print(f"\nfull disk: 300 KB SMTP and submission refused temporarily, 40 KB submission: {mid_reply[:9]}")
    stored = wait_for(lambda: [m for m in mox.messages("u") if b"big-in" in m], what="big-in stored")
    assert stored[0].endswith(big_in)
    tiny_stored = [m for m in mox.messages("u") if b"tiny-in" in m]
    assert len(tiny_stored) == (1 if tiny_in_reply.startswith("250") else 0)
    assert all(m.endswith(tiny_in) for m in tiny_stored)
    outs = [big_out, mid_out] + ([tiny_out] if tiny_out_reply.startswith("250") else [])
    msgs = sink.wait_for_messages(1 + len(outs), timeout=30)
    for data in outs:
        assert [m for m in msgs if m.data.endswith(data.replace(b"\r\n", b"\n"))], "not delivered whole"
    if not tiny_out_reply.startswith("250"):
        assert not [m for m in msgs if b"tiny-out" in m.data]
    assert mox.proc.pid == pid
    print(f"no space at all: small SMTP {tiny_in_reply[:9]}, small submission {tiny_out_reply[:9]}")


def test_b41_queued_messages_survive_a_full_disk_during_delivery(world):
    make, sink = world
    port = sink.port
    sink.stop()  # the relay is down: messages wait in the queue
    mox, disk = make()
    sent = [message(f"wait-{i}", "alice@local.test", "x@ext.test", body_for(10 + i, size))
            for i, size in enumerate((2_000, 30_000, 60_000, 120_000, 300_000))]
    for data in sent:
        assert submit_raw(mox, data).startswith("250")
    wait_for(lambda: "error" in mox.mox("queue", "list").stdout or "attempt" in mox.mox("queue", "list").stdout,
             what="a failed attempt")
    disk.fill(leave=0)
    back = SmtpSink(host="127.0.0.1", port=port).start()  # the relay returns while the disk is full
    try:
        mox.mox("queue", "kick", check=False)
        back.wait_for_messages(len(sent), timeout=30)
        disk.release()
        wait_for(lambda: "(none)" in mox.mox("queue", "list").stdout, timeout=30, what="the queue to drain")
        got = back.messages()
        for data in sent:
            copies = [m for m in got if m.data.endswith(data.replace(b"\r\n", b"\n"))]
            assert copies, f"lost: {data[:120]!r}"
        print(f"\nqueue through a full disk: {len(sent)} queued, {len(got)} delivered "
              f"({len(got) - len(sent)} duplicates)")
        assert mox.proc.poll() is None
    finally:
        back.cleanup()


def test_b40_disk_nearly_full_at_mail_gives_452(world):
    """With less free than ``min_free_space`` (8 MiB here), MAIL gets 452 4.3.1 before any data
    is sent; so does a SIZE= larger than what is free; once space returns, MAIL is accepted
    again without a restart."""
    make, _ = world
    mox, disk = make(min_free_space=8 << 20)
    with Raw(mox.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("250")
        assert c.cmd("RSET").startswith("250")
        assert c.cmd(f"MAIL FROM:<a@ext.test> SIZE={disk.free() + (1 << 20)}").startswith("452 4.3.1")
        disk.fill(leave=1 << 20)  # 1 MiB left
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("452 4.3.1")
    with Raw(mox.submission_port) as c:
        c.ehlo()
        c.starttls()
        c.ehlo()
        assert c.login("alice@local.test", "alice-pw").startswith("235")
        assert c.cmd("MAIL FROM:<alice@local.test>").startswith("452 4.3.1")
    disk.release()
    with Raw(mox.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("250")


def test_b40_the_default_reserve_is_one_and_a_half_times_the_size_limit(world):
    """mox's default, as Postfix: 1.5 x smtp_max_message_size (100 MiB) = 150 MiB must be free,
    which a 64 MiB disk never has, even empty."""
    make, _ = world
    mox, disk = make(min_free_space=None)
    assert disk.free() > 60 << 20
    with Raw(mox.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@ext.test>").startswith("452 4.3.1")


def _until_refused(send, mox, name: str) -> int:
    """fiu-ctrl returns before the server applied its command: send small messages until one
    is refused; returns how many were accepted meanwhile."""
    for i in range(200):
        if not send(mox, message(f"{name}-{i}", "alice@local.test", "x@ext.test")).startswith("250"):
            return i
    raise AssertionError("the fault never took effect")


def _until_accepted(send, mox, name: str) -> None:
    for i in range(200):
        if send(mox, message(f"{name}-{i}", "alice@local.test", "x@ext.test")).startswith("250"):
            return
    raise AssertionError("the server did not recover")


def test_b41_fsync_error_on_the_maildir_is_451_never_250(world):
    make, _ = world
    mox, _ = make(FiuMox, small_disk=False)
    mox.fiu("enable name=posix/io/sync/fsync,failinfo=5")  # EIO from now on
    try:
        accepted = _until_refused(smtp_raw, mox, "probe")
        for data in (message("eio-1", body=body_for(4, 50_000)), message("eio-2")):
            reply = smtp_raw(mox, data)
            assert reply.startswith(TEMPORARY), reply
    finally:
        mox.fiu("disable name=posix/io/sync/fsync")
    _until_accepted(smtp_raw, mox, "after")
    msgs = wait_for(lambda: len(mox.messages("u")) >= accepted + 1 and mox.messages("u"), what="the messages")
    assert len(msgs) == accepted + 1 and not any(b"eio-" in m for m in msgs)
    assert maildir_files(mox)["tmp"] == []
    assert mox.proc.poll() is None


def test_b41_fdatasync_error_on_the_queue_database_is_451_never_250(world):
    make, sink = world
    mox, _ = make(FiuMox, small_disk=False)
    mox.fiu("enable name=posix/io/sync/fdatasync,failinfo=5")  # SQLite's commits fail with EIO
    try:
        accepted = _until_refused(submit_raw, mox, "probe")
        for data in (message("eio-1", "alice@local.test", "x@ext.test", body_for(4, 50_000)),
                     message("eio-2", "alice@local.test", "x@ext.test")):
            reply = submit_raw(mox, data)
            assert reply.startswith(TEMPORARY), reply
    finally:
        mox.fiu("disable name=posix/io/sync/fdatasync")
    _until_accepted(submit_raw, mox, "after")
    msgs = sink.wait_for_messages(accepted + 1, timeout=30)
    wait_for(lambda: "(none)" in mox.mox("queue", "list").stdout, what="the queue to drain")
    assert len(sink.messages()) == accepted + 1 and not any(b"eio-" in m.data for m in msgs)
    assert mox.proc.poll() is None
