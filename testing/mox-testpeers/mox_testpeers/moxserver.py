"""``mox serve`` as a test peer: a real server process on loopback with a generated config.

Tests talk to it as users do (smtplib, swaks), kill it with SIGKILL and start it again on the
same data directory. DNS comes from the test's loopback DNS server. The mox it runs is the
``mox_core`` of this interpreter (``python -m mox_core``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import free_port, run, wait_banner
from .lifecycle import Peer, PeerProcess

_CERT_CACHE: dict[str, tuple[Path, Path]] = {}


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (made once per process)."""
    if "cert" not in _CERT_CACHE:
        base = Path(os.environ.get("TMPDIR", "/tmp")) / f"mox-test-cert-{os.getpid()}"
        base.mkdir(exist_ok=True)
        cert, key = base / "cert.pem", base / "key.pem"
        if not cert.exists():
            run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-days", "30", "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost,DNS:mail.example.org,IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(cert)])
        _CERT_CACHE["cert"] = (cert, key)
    return _CERT_CACHE["cert"]


@dataclass(eq=False)  # compared (and hashed, as a registered peer) by identity
class MoxServer(Peer):
    """A ``mox serve`` process. Ports: ``smtp_port``, ``submission_port``, ``submissions_port``."""

    kind = "mox serve"
    start_timeout = 15.0

    directory: Path
    static_extra: str = ""
    domains: str = ""
    static_top: str = ""  # top-level mox.toml keys (before any table), e.g. "smtp_workers = 2"
    nameserver: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        Peer.__init__(self)
        self.process: PeerProcess | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.smtp_port = free_port()
        self.submission_port = free_port()
        self.submissions_port = free_port()
        self.cert, self.key = self_signed_cert(self.directory)
        self.log_path = self.directory / "mox.log"
        self.write_config()

    @property
    def config_path(self) -> Path:
        return self.directory / "mox.toml"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def write_config(self) -> None:
        dns = f'nameservers = ["{self.nameserver}"]\ntimeout = 2\n' if self.nameserver else "nameservers = []\n"
        static = textwrap.dedent(self.static_top) + textwrap.dedent(f"""\
            hostname = "mail.example.org"
            data_dir = "data"
            log_level = "debug"

            [dns]
            {dns}
            [postmaster]
            account = "admin"

            [listeners.local]
            ips = ["{self.host}"]

            [listeners.local.tls]
            cert_file = "{self.cert}"
            key_file = "{self.key}"

            [listeners.local.smtp]
            enabled = true
            port = {self.smtp_port}

            [listeners.local.submission]
            enabled = true
            port = {self.submission_port}

            [listeners.local.submissions]
            enabled = true
            port = {self.submissions_port}
            """)
        self.config_path.write_text(static + "\n" + textwrap.dedent(self.static_extra))
        (self.directory / "domains.toml").write_text(textwrap.dedent(self.domains))

    def mox(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mox_core", "--config", str(self.config_path), *args],
                              input=input, capture_output=True, text=True, check=check, timeout=60,
                              env={**os.environ, **self.env})

    def set_password(self, account: str, password: str) -> None:
        self.mox("setaccountpassword", account, input=password + "\n")

    @property
    def port(self) -> int:
        """The SMTP port (the one :meth:`start` waits on)."""
        return self.smtp_port

    @property
    def proc(self) -> subprocess.Popen | None:
        """The ``mox serve`` main process."""
        return self.process.proc if self.process is not None else None

    def _start_tries(self) -> int:
        # another process may take one of the free ports between choosing and binding it
        return 3

    def _begin_attempt(self, used: set[str]) -> None:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0

    def _launch(self, timeout: float) -> None:
        self.process = PeerProcess([sys.executable, "-m", "mox_core", "--config", str(self.config_path), "serve"],
                                   log_file=self.log_path, env={**os.environ, **self.env}, stop_timeout=10)
        self.process.start(lambda proc: wait_banner(self.host, self.smtp_port, timeout=timeout, proc=proc))

    def _failure_details(self, error: BaseException) -> str:
        return f"{error}\nlog:\n{self.process.log_text(self._log_start)}"

    def _reset_attempt(self) -> None:
        self.smtp_port, self.submission_port, self.submissions_port = free_port(), free_port(), free_port()
        self.write_config()

    def _halt(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        """SIGKILL, as a crash: no cleanup runs."""
        if self.process is not None:
            self.process.kill()
        self.started = False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def maildir(self, account: str, mailbox: str = "") -> Path:
        root = self.data_dir / "accounts" / account / "Maildir"
        return root / f".{mailbox}" if mailbox else root

    def messages(self, account: str, mailbox: str = "") -> list[bytes]:
        new = self.maildir(account, mailbox) / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def wait_for_messages(self, account: str, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.messages(account)
            if len(msgs) >= n:
                return msgs
            time.sleep(0.02)
        raise TimeoutError(f"{account}: {len(self.messages(account))} messages, expected {n}")
