"""Crash loop: SIGKILL the whole ``mox serve`` process group at random moments under load,
again and again, and prove that no acknowledged message was lost (RFC 5321 §6.1: a 250 to
DATA takes responsibility for the message; cases 37 and 38 of the catalogue, many times over).

While the server runs:

* clients send over SMTP (to a local Maildir) and over submission (through the queue, a
  route and an ``smtp`` transport to Postfix's smtp-sink): messages of 1 KB to 1 MB, each
  with a unique Message-ID, remembered once its 250 arrives; a client whose try fails
  (connection refused, reset, no reply) sends the same message again, as an MTA would;
* a config writer (mox's own ``DomainsWriter``, as ``mox config account add|rm`` uses it)
  adds and removes accounts in ``domains.toml`` in a loop, in the server's process group so
  the same SIGKILL hits it mid-write;
* the queue delivers to the sink, so kills also land between the sink's 250 and the queue's
  own bookkeeping.

After every kill, ``domains.toml`` must parse and validate, and be one of the versions the
writer made (every account it added complete, or absent). At the end the server runs until
the clients' last messages got their 250 and the queue is empty; then every acknowledged
message must be in the Maildir or at the sink, byte for byte (no truncation), nothing may
be there that was never acknowledged, and duplicates are counted and printed, not hidden.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
import tomllib

import pytest

from mox_testpeers.dnsserver import DNSServer
from mox_testpeers.sink import SmtpSink
from tests.faults.crashkit import DOMAINS, STATIC, Client, GroupMox, message_id_of

KILLS = int(os.environ.get("MOX_CRASH_KILLS", "50"))

# Adds account cw-N (with two addresses) and removes the oldest, forever; one write per
# change. Runs in the server's process group: the SIGKILL of the group ends it too.
WRITER = r"""
import itertools, sys
from pathlib import Path
from mox_core.config import edits
from mox_core.config.generation import Generation
from mox_core.config.holder import ConfigHolder
from mox_core.config.loader import load_config
from mox_core.config.writer import DomainsWriter
from mox_core.plugins.host import PluginHost

cfg = load_config(Path(sys.argv[1]), PluginHost.load())
writer = DomainsWriter(ConfigHolder(cfg), Generation(cfg.data_dir))
start = int(sys.argv[2])
for n in itertools.count(start):
    def add(doc, n=n):
        edits.add_account(doc, f"cw-{n}", f"cw-{n}@local.test")
        edits.add_address(doc, f"cw-{n}", f"cw-{n}-b@local.test")
    writer.change(add)
    if n - start >= 3:
        writer.change(lambda doc, n=n: edits.remove_account(doc, f"cw-{n - 3}"))
"""


def check_domains_file(path, base_accounts: set[str]) -> set[str]:
    """domains.toml is a whole version: it parses, mox's loader takes it, the base accounts
    are there and every writer account is complete. Returns the writer accounts in it."""
    data = path.read_bytes()
    doc = tomllib.loads(data.decode())
    accounts = doc["accounts"]
    assert base_accounts <= set(accounts), sorted(accounts)
    written = {name for name in accounts if name.startswith("cw-")}
    for name in written:
        assert set(accounts[name]["destinations"]) in ({f"{name}@local.test"},
                                                       {f"{name}@local.test", f"{name}-b@local.test"}), accounts[name]
    assert data.rstrip().endswith(b"]") or data.rstrip().endswith(b'"'), data[-200:]
    return written


@pytest.fixture
def peers(tmp_path):
    dns = DNSServer().start()
    sink = SmtpSink(host="127.0.0.1", port=None).start()
    dns.add("sink.test", "A", "127.0.0.1")
    mox = GroupMox(tmp_path / "mox", domains=DOMAINS, nameserver=dns.nameserver,
                   static_extra=STATIC.replace("@PORT@", str(sink.port)))
    mox.set_password("alice", "alice-pw")
    yield mox, sink
    mox.stop()
    sink.cleanup()
    dns.stop()


def test_b37_b38_sigkill_loop_loses_no_acknowledged_message(peers, tmp_path):
    mox, sink = peers
    rnd = random.Random(int(os.environ.get("MOX_CRASH_SEED", "1")))
    clients = [Client("smtp1", "inbound", mox.smtp_port, 11), Client("smtp2", "inbound", mox.smtp_port, 12),
               Client("sub1", "outbound", mox.submission_port, 13, "alice-pw"),
               Client("sub2", "outbound", mox.submission_port, 14, "alice-pw")]
    domains_path = mox.directory / "domains.toml"
    writer_log = tmp_path / "writer.log"
    base = {"admin", "u", "alice"}
    writer_start, file_checks, writer_accounts_seen = 0, 0, set()
    started = time.monotonic()

    mox.start()
    for c in clients:
        c.start()
    for _ in range(KILLS):
        with open(writer_log, "ab") as log:
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mox.config_path), str(writer_start)],
                                      stdout=log, stderr=subprocess.STDOUT, process_group=mox.pgid)
        time.sleep(rnd.uniform(0.15, 0.9))
        mox.kill_group()
        writer.wait(10)
        writer_accounts_seen |= check_domains_file(domains_path, base)
        file_checks += 1
        writer_start += 1000
        mox.start()
    loop_seconds = time.monotonic() - started
    # let every client get its last message acknowledged, then the queue drain
    for c in clients:
        c.finish()
    for c in clients:
        c.join(120)
        assert not c.is_alive(), f"{c.name} still has no 250 for its last message"
    deadline = time.monotonic() + 120
    while "(none)" not in mox.mox("queue", "list").stdout:
        assert time.monotonic() < deadline, mox.mox("queue", "list").stdout[-2000:]
        time.sleep(0.2)
    mox.stop()
    drain_seconds = time.monotonic() - started - loop_seconds

    # what arrived where
    maildir = mox.maildir("u")
    stored: dict[str, list[bytes]] = {}
    for p in list((maildir / "new").iterdir()) + list((maildir / "cur").glob("*")) if (maildir / "new").exists() else []:
        data = p.read_bytes()
        stored.setdefault(message_id_of(data) or f"(none) {p.name}", []).append(data)
    delivered: dict[str, list[bytes]] = {}
    for m in sink.messages():
        delivered.setdefault(message_id_of(m.data) or f"(none) {m.path.name}", []).append(m.data)

    sent = [s for c in clients for s in c.sent]
    acked = {s.msgid: s for s in sent if s.acked}
    missing, truncated, duplicates = [], [], 0
    for s in acked.values():
        copies = stored.get(s.msgid, []) if s.kind == "inbound" else delivered.get(s.msgid, [])
        if not copies:
            missing.append(s.msgid)
            continue
        duplicates += len(copies) - 1
        want, n = (s.sha_crlf, len(s.data)) if s.kind == "inbound" else (s.sha_lf, len(s.data.replace(b"\r\n", b"\n")))
        for copy in copies:
            if hashlib.sha256(copy[-n:]).hexdigest() != want:
                truncated.append((s.msgid, len(copy), n))
    phantom = [m for m in list(stored) + list(delivered) if m not in acked]
    inbound = [s for s in acked.values() if s.kind == "inbound"]
    outbound = [s for s in acked.values() if s.kind == "outbound"]
    writes = writer_log.read_text().count("\n")  # only tracebacks would write here
    leftover_tmp = list(domains_path.parent.glob(".domains.toml.*.tmp"))
    print(f"\ncrash loop: {KILLS} kills in {loop_seconds:.0f}s (then {drain_seconds:.0f}s to drain); accepted {len(acked)} "
          f"({len(inbound)} SMTP, {len(outbound)} submission; {sum(len(s.data) for s in acked.values()) >> 20} MiB), "
          f"stored {sum(len(v) for v in stored.values())}, delivered {sum(len(v) for v in delivered.values())}, "
          f"duplicates {duplicates}, missing {len(missing)}, truncated {len(truncated)}, never acknowledged {len(phantom)}, "
          f"failed tries {sum(c.failures for c in clients)}; domains.toml checked {file_checks}x, "
          f"writer accounts seen {len(writer_accounts_seen)}, leftover writer temp files {len(leftover_tmp)}")
    assert [e for c in clients for e in c.errors] == []
    assert missing == []
    assert truncated == []
    assert phantom == []
    assert len(inbound) > KILLS and len(outbound) > KILLS  # the load was real
    assert writer_accounts_seen, "the config writer never got a change in"
    assert writes == 0, writer_log.read_text()[-3000:]
    assert len(leftover_tmp) <= 1  # the next write removes what a killed writer left
