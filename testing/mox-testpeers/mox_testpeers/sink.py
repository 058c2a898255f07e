"""Postfix ``smtp-sink`` as a fault-injecting SMTP peer on loopback.

::

    sink = SmtpSink(reject_4xx="RCPT").start()        # free port on 127.0.0.1
    ...                                                # client sees 450 4.3.0 on every RCPT
    sink.stop()

    mx = SmtpSink(host=None, port=25).start()          # 127.0.0.2:25, or another free 127.0.0.x:25
    ... deliver ...
    [msg] = mx.messages()                              # parsed dump files
    msg.mail_from, msg.rcpt_to, msg.message["Subject"]

Every accepted transaction is dumped (``smtp-sink -d``) into ``sink.dump_dir``; the dump is
complete before the 250 after the final dot is sent. Faults apply to every command of that type
(use :mod:`.postfix` ``PostfixMX`` for per-recipient outcomes).

Differences from bare smtp-sink defaults, chosen so that the sink looks like an ordinary MX:
AUTH is not announced (``-a``; smtp-sink would answer AUTH with 250, not 235), nor are XCLIENT
and XFORWARD (``-C -F``). Pass ``advertise_auth=True``/``xclient=True``/``xforward=True`` to get
them back.

The dump is line based: line endings are LF and the client's dot-stuffing is removed, so it is
not byte exact. Use an aiosmtpd handler when a test needs the exact bytes.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import (
    MissingToolError,  # noqa: F401  (re-exported for callers)
    make_private_dir,
    require_tool,
    wait_banner,
    wait_for,
    wait_port,
)
from .lifecycle import Peer, PeerProcess

__all__ = ["SmtpSink", "SinkMessage", "parse_dump"]


def smtp_sink_path() -> str:
    return require_tool("smtp-sink", "postfix")


@dataclass
class SinkMessage:
    """One transaction as dumped by smtp-sink."""

    path: Path
    client_addr: str
    client_proto: str  # "SMTP", "ESMTP" or "LMTP"
    helo: str | None  # argument of the last HELO/EHLO, if any
    mail_args: str  # the whole MAIL FROM argument, e.g. "<a@example.org> BODY=8BITMIME"
    rcpt_args: list[str]  # one per RCPT command, in order, e.g. "<b@example.net> NOTIFY=NEVER"
    received: str  # the Received header smtp-sink added (unfolded)
    data: bytes  # the message as received (LF line endings, dot-stuffing removed)
    raw: bytes = field(repr=False)  # the whole dump file

    @property
    def mail_from(self) -> str:
        """The reverse path without angle brackets ("" for the null sender)."""
        return _path_of(self.mail_args)

    @property
    def mail_options(self) -> list[str]:
        return self.mail_args.split()[1:]

    @property
    def rcpt_to(self) -> list[str]:
        return [_path_of(a) for a in self.rcpt_args]

    @property
    def message(self) -> email.message.EmailMessage:
        return email.parser.BytesParser(policy=email.policy.default).parsebytes(self.data)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _path_of(args: str) -> str:
    first = args.split()[0] if args.split() else ""
    if first.startswith("<"):
        first = first[1:first.index(">")] if ">" in first else first[1:]
    return first


def parse_dump(path: Path | str) -> SinkMessage:
    """Parse one ``smtp-sink -d`` dump file."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    meta: dict[str, list[str]] = {}
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        key, _, value = lines[i].decode("utf-8", errors="replace").partition(": ")
        meta.setdefault(key, []).append(value)
        i += 1
    received = ""
    if i < len(lines) and lines[i].startswith(b"Received: "):
        parts = [lines[i][len(b"Received: "):].decode("utf-8", errors="replace")]
        i += 1
        while i < len(lines) and lines[i][:1] in (b"\t", b" "):
            parts.append(lines[i].strip().decode("utf-8", errors="replace"))
            i += 1
        received = " ".join(parts)
    data = b"\n".join(lines[i:])
    # the dump format ends every message with one extra empty line
    if data.endswith(b"\n\n"):
        data = data[:-1]
    elif data == b"\n":
        data = b""
    return SinkMessage(
        path=path,
        client_addr=(meta.get("X-Client-Addr") or [""])[0],
        client_proto=(meta.get("X-Client-Proto") or [""])[0],
        helo=(meta.get("X-Helo-Args") or [None])[0],
        mail_args=(meta.get("X-Mail-Args") or [""])[0],
        rcpt_args=meta.get("X-Rcpt-Args", []),
        received=received,
        data=data,
        raw=raw,
    )


def _cmds(value: str | Iterable[str] | None) -> str | None:
    if value is None or value == "" or value == ():
        return None
    if isinstance(value, str):
        return value
    return ",".join(value)


class SmtpSink(Peer):
    """A running ``smtp-sink`` process.

    host: listen address; ``None`` picks 127.0.0.2 if nothing listens on *port* there, else
        another free 127.0.0.x (useful for port 25: tests then put ``sink.host`` in DNS).
    port: ``None`` (default) picks a free port. An explicit host and port that is busy raises
        :class:`PeerError` (smtp-sink sets SO_REUSEPORT and would otherwise silently share it).
    Fault options (command lists are "RCPT", "MAIL,RCPT" or ["MAIL", "RCPT"]; the commands are
    CONNECT, HELO, EHLO, LHLO, MAIL, RCPT, VRFY, DATA, "." (end of data), RSET, NOOP, QUIT):
        reject_4xx (-r): answer "450 4.3.0 Error: command failed" (or soft_reply);
        reject_5xx (-f): answer "500 5.3.0 Error: command failed" (or hard_reply);
        drop (-q): disconnect without replying;
        reply_421 (-Q): send "421 4.0.0 Server closing connection" and disconnect;
        soft_reply (-b) / hard_reply (-B): the 4xx / 5xx reply text, e.g. "451 4.7.1 Greylisted";
        delay (-W): {"rcpt": 2.0} (or ["rcpt:2", "mail:1:50"]): wait before answering;
        data_delay (-w): seconds before answering DATA;
        abort_after_data (-A): seconds after the 354, then a 550 reply, ignoring the data;
        max_messages (-M): exit after that many messages (exits on the final dot, no reply).
    Feature options: esmtp (-e), pipelining (-p), eightbitmime (-8), enhanced_status_codes (-E),
        dsn (-N), advertise_auth (not -a), xclient (not -C), xforward (not -F), lmtp (-L),
        hostname (-h), command_timeout (-t), extra_args (appended verbatim).
    """

    def __init__(self, host: str | None = "127.0.0.1", port: int | None = None, *,
                 reject_4xx=None, reject_5xx=None, drop=None, reply_421=None,
                 soft_reply: str | None = None, hard_reply: str | None = None,
                 delay: dict[str, float] | Iterable[str] | None = None,
                 data_delay: float | None = None, abort_after_data: float | None = None,
                 max_messages: int | None = None,
                 esmtp: bool = True, pipelining: bool = True, eightbitmime: bool = True,
                 enhanced_status_codes: bool = True, dsn: bool = True,
                 advertise_auth: bool = False, xclient: bool = False, xforward: bool = False,
                 lmtp: bool = False, hostname: str = "smtp-sink", command_timeout: int | None = None,
                 backlog: int = 64, dump: bool = True, extra_args: Iterable[str] = ()):
        super().__init__()
        self._want_host = host
        self._want_port = port
        self.host = host or ""
        self.port = port or 0
        self.hostname = hostname
        self.backlog = backlog
        self.dump = dump
        self.process: PeerProcess | None = None
        args: list[str] = []
        for flag, value in (("-r", reject_4xx), ("-f", reject_5xx), ("-q", drop), ("-Q", reply_421)):
            v = _cmds(value)
            if v:
                args += [flag, v]
        if soft_reply:
            args += ["-b", soft_reply]
        if hard_reply:
            args += ["-B", hard_reply]
        if isinstance(delay, dict):
            for cmd, secs in delay.items():
                args += ["-W", f"{cmd.lower()}:{_num(secs)}"]
        elif delay:
            for spec in ([delay] if isinstance(delay, str) else delay):
                args += ["-W", spec]
        if data_delay is not None:
            args += ["-w", _num(data_delay, allow_zero=True)]
        if abort_after_data is not None:
            args += ["-A", _num(abort_after_data, allow_zero=True)]
        if max_messages is not None:
            args += ["-M", str(max_messages)]
        for enabled, flag in ((esmtp, "-e"), (pipelining, "-p"), (eightbitmime, "-8"),
                              (enhanced_status_codes, "-E"), (dsn, "-N"), (advertise_auth, "-a"),
                              (xclient, "-C"), (xforward, "-F")):
            if not enabled:
                args.append(flag)
        if lmtp:
            args.append("-L")
        if command_timeout is not None:
            args += ["-t", str(command_timeout)]
        args += ["-h", hostname]
        args += list(extra_args)
        self.fault_args = args
        # with a fault on CONNECT there is no 220 greeting: readiness is a plain TCP connect
        fault_cmds = ",".join(_cmds(v) or "" for v in (drop, reply_421, reject_4xx, reject_5xx)).upper()
        self._no_banner = "CONNECT" in fault_cmds.replace(" ", ",").split(",") or any(
            a.lower().startswith("connect:") for a in args)

    # ------------------------------------------------------------------ lifecycle

    kind = "smtp-sink"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def dump_dir(self) -> Path:
        assert self.dir is not None
        return self.dir / "dump"

    @property
    def log_file(self) -> Path:
        assert self.dir is not None
        return self.dir / "smtp-sink.log"

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.proc if self.process is not None else None

    def _start_tries(self) -> int:
        return 1 if (self._want_port and self._want_host) else 10

    def _setup(self) -> None:
        self._exe = smtp_sink_path()
        if self.dir is None:
            self.dir = make_private_dir("smtp-sink-")
            self.dump_dir.mkdir()
            os.chmod(self.dump_dir, 0o777)  # smtp-sink writes as -u nobody

    def _begin_attempt(self, used: set[str]) -> None:
        res = self._reserve(self._want_host, self._want_port, exclude=used)
        self.host, self.port = res.host, res.port
        used.add(self.host)
        args = [self._exe]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += self.fault_args
        if self.dump:
            args += ["-d", f"{self.dump_dir}/%Y%m%d%H%M%S."]
        args += [f"{self.host}:{self.port}", str(self.backlog)]
        self.args = args

    def _launch(self, timeout: float) -> None:
        self.process = PeerProcess(self.args, log_file=self.log_file)
        if self._no_banner:  # a fault on CONNECT: no greeting, readiness is a TCP connect
            self.process.start(lambda proc: wait_port(self.host, self.port, timeout, proc=proc))
        else:
            self.process.start(lambda proc: wait_banner(self.host, self.port, timeout, proc=proc))

    def _failure_details(self, error: BaseException) -> str:
        log_text = self.log_file.read_text(errors="replace")
        return f"{error}\ncommand: {' '.join(self.args)}\nlog:\n{log_text}"

    def _reset_attempt(self) -> None:
        self.log_file.write_text("")

    def _halt(self) -> None:
        """SIGTERM smtp-sink (by PID); the dump directory stays until :meth:`cleanup`."""
        if self.process is not None:
            self.process.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    # ------------------------------------------------------------------ received mail

    def dump_files(self, include_partial: bool = False) -> list[Path]:
        """The dump files, oldest first.

        smtp-sink opens the dump at MAIL and writes it as the transaction goes on; it deletes
        it when the client disconnects before the final dot. Unless *include_partial*, only
        files of transactions that reached the final dot are returned (their dump ends with the
        format's empty line). That includes transactions then refused by a fault on "." (-f/-r/-q/-Q
        on "."): the dump cannot tell these apart.
        """
        if self.dir is None or not self.dump_dir.exists():
            return []
        out = []
        for p in self.dump_dir.rglob("*"):
            try:
                st = p.stat()
                if not p.is_file():
                    continue
                if not include_partial:
                    raw = p.read_bytes()
                    if b"\nReceived: " not in raw or not raw.endswith(b"\n\n"):
                        continue
            except FileNotFoundError:
                continue
            out.append((st.st_mtime_ns, p.name, p))
        return [p for _, _, p in sorted(out)]

    def messages(self) -> list[SinkMessage]:
        """Every dumped transaction that reached the final dot, oldest first."""
        out = []
        for p in self.dump_files():
            try:
                out.append(parse_dump(p))
            except FileNotFoundError:
                pass
        return out

    @property
    def count(self) -> int:
        """Number of dumped transactions that reached the final dot."""
        return len(self.dump_files())

    def wait_for_messages(self, n: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least *n* transactions were dumped; return all of them."""
        wait_for(lambda: self.count >= n, timeout, what=f"{n} message(s) at smtp-sink {self.host}:{self.port}")
        return self.messages()

    def clear(self) -> None:
        """Delete the dumps received so far."""
        for p in self.dump_files():
            p.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"<SmtpSink {self.host}:{self.port} args={self.fault_args!r}>"


def _num(x: float, *, allow_zero: bool = False) -> str:
    """smtp-sink takes whole seconds only (and -W rejects 0)."""
    if not float(x).is_integer() or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"smtp-sink delays are whole seconds{'' if allow_zero else ' >= 1'}, got {x!r}")
    return str(int(x))
