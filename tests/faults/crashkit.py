"""What the crash tests share: ``mox serve`` in a process group of its own (so that one
SIGKILL takes the main process, its SMTP workers and everything else it started, as a power
cut would), and load clients that remember every message the server acknowledged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import signal
import smtplib
import ssl
import threading
import time
from dataclasses import dataclass, field

from mox_testpeers import wait_banner
from mox_testpeers.lifecycle import PeerProcess
from mox_testpeers.moxserver import MoxServer

__all__ = ["DOMAINS", "STATIC", "GroupMox", "Client", "Sent", "body_for", "message_id_of"]

DOMAINS = """\
# the crash loop's domains; the writer adds and removes accounts cw-N below
[domains."local.test"]

[accounts.admin]
domain = "local.test"
[accounts.admin.destinations."admin@local.test"]

[accounts.u]
[accounts.u.destinations."u@local.test"]

[accounts.alice]
max_outgoing_messages_per_day = 1000000
max_first_time_recipients_per_day = 1000000
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



class GroupMox(MoxServer):
    """A MoxServer started as the leader of a new process group (in this session, so other
    processes can join the group)."""

    def _launch(self, timeout: float) -> None:
        import sys

        self.process = PeerProcess([sys.executable, "-m", "mox_core", "--config", str(self.config_path), "serve"],
                                   log_file=self.log_path, env={**os.environ, **self.env}, stop_timeout=10,
                                   process_group=0)
        self.process.start(lambda proc: wait_banner(self.host, self.smtp_port, timeout=timeout, proc=proc))

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def kill_group(self) -> None:
        """SIGKILL to every process of the group, then reap the main process."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.started = False

    def stop(self) -> None:
        super().stop()
        if self.proc is not None and _group_alive(self.proc.pid):
            self.kill_group()


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies left to init do not count)."""
    for stat in os.listdir("/proc"):
        if not stat.isdigit():
            continue
        try:
            with open(f"/proc/{stat}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def body_for(seed: int, size: int) -> bytes:
    """A deterministic CRLF body of about ``size`` bytes (no line starts with a dot)."""
    rnd = random.Random(seed)
    chunk = base64.b64encode(rnd.randbytes(57 * 64)).decode()
    lines = [chunk[i:i + 76] for i in range(0, len(chunk), 76)]
    out = bytearray()
    i = 0
    while len(out) < size:
        out += lines[i % len(lines)].encode() + b"\r\n"
        i += 1
    return bytes(out)


def message_id_of(data: bytes) -> str | None:
    """The Message-ID of a stored message (the first one in its header)."""
    head = data.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    for line in head.splitlines():
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode("ascii", "replace")
    return None


@dataclass
class Sent:
    msgid: str
    kind: str  # "inbound" (to the Maildir) or "outbound" (through the queue to the sink)
    data: bytes = field(repr=False)  # what was sent (CRLF, not dot-stuffed)
    tries: int = 0
    acked: bool = False

    @property
    def sha_crlf(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def sha_lf(self) -> str:
        return hashlib.sha256(self.data.replace(b"\r\n", b"\n")).hexdigest()


def pick_size(rnd: random.Random) -> int:
    """1 KB to 1 MB, most messages small (as mail is)."""
    r = rnd.random()
    if r < 0.7:
        return rnd.randint(1024, 16 * 1024)
    if r < 0.95:
        return rnd.randint(16 * 1024, 256 * 1024)
    return rnd.randint(256 * 1024, 1024 * 1024)


class Client(threading.Thread):
    """Sends messages one after the other, each until the server answers 250 to its data
    (retrying on any failure, as an MTA would), over sessions of several messages.

    kind "inbound": SMTP to ``u@local.test``; "outbound": submission as alice to
    ``x@ext.test``. ``sent`` keeps every message with its state; after :meth:`finish` the
    thread ends once its current message got its 250.
    """

    def __init__(self, name: str, kind: str, port: int, seed: int, password: str = "") -> None:
        super().__init__(name=name, daemon=True)
        self.kind, self.port, self.password = kind, port, password
        self.rnd = random.Random(seed)
        self.sent: list[Sent] = []
        self.errors: list[str] = []  # unexpected permanent replies
        self.failures = 0  # tries that ended without a 250
        self.max_tries = 400  # then the message is given up (an error: the test fails)
        self._finish = threading.Event()
        self._n = 0

    def finish(self) -> None:
        self._finish.set()

    def _new_message(self) -> Sent:
        self._n += 1
        msgid = f"<{self.name}.{self._n}.{time.time_ns()}@crash.test>"
        frm, to = ("alice@local.test", "x@ext.test") if self.kind == "outbound" else ("c@sender.test", "u@local.test")
        head = (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: crash {self.name} {self._n}\r\nMessage-ID: {msgid}\r\n"
                f"Date: Sun, 06 Dec 2026 12:00:00 +0000\r\n\r\n").encode()
        return Sent(msgid, self.kind, head + body_for(self.rnd.getrandbits(32), pick_size(self.rnd)))

    def _connect(self) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=20)
        if self.kind == "outbound":
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            s.starttls(context=ctx)
            s.login("alice@local.test", self.password)
        return s

    def run(self) -> None:
        session: smtplib.SMTP | None = None
        current: Sent | None = None
        while True:
            if current is None:
                if self._finish.is_set():
                    break
                current = self._new_message()
                self.sent.append(current)
            try:
                if session is None:
                    session = self._connect()
                current.tries += 1
                frm, to = ("alice@local.test", "x@ext.test") if self.kind == "outbound" else ("c@sender.test", "u@local.test")
                session.sendmail(frm, [to], current.data)
                current.acked = True
                current = None
            except smtplib.SMTPResponseException as exc:
                self.failures += 1
                if 500 <= exc.smtp_code < 600:
                    self.errors.append(f"{current.msgid}: {exc.smtp_code} {exc.smtp_error!r}")
                session = _drop(session)
                time.sleep(0.05)
            except smtplib.SMTPRecipientsRefused as exc:
                self.failures += 1
                for code, text in exc.recipients.values():
                    if 500 <= code < 600:
                        self.errors.append(f"{current.msgid}: RCPT {code} {text!r}")
                session = _drop(session)
                time.sleep(0.05)
            except (smtplib.SMTPException, OSError):
                self.failures += 1
                session = _drop(session)
                time.sleep(0.05)
            if current is not None and current.tries >= self.max_tries:
                self.errors.append(f"{current.msgid}: no 250 after {current.tries} tries")
                current = None
        _drop(session)


def _drop(session: smtplib.SMTP | None) -> None:
    if session is not None:
        try:
            session.close()
        except Exception:  # the connection is gone anyway
            pass
    return None
