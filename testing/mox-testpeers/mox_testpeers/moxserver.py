"""``mox serve`` as a test peer: a real server process on loopback with a generated config.

Tests talk to it as users do (smtplib, swaks), kill it with SIGKILL and start it again on the
same data directory. DNS comes from the test's loopback DNS server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import free_port, run, wait_banner

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


@dataclass
class MoxServer:
    """A ``mox serve`` process. Ports: ``smtp_port``, ``submission_port``, ``submissions_port``."""

    directory: Path
    static_extra: str = ""
    domains: str = ""
    static_top: str = ""  # top-level mox.toml keys (before any table), e.g. "smtp_workers = 2"
    nameserver: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
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

    def start(self, timeout: float = 15.0) -> MoxServer:
        """Start ``mox serve``; when another process took one of the free ports between
        choosing and binding it, choose new ports and try again (at most 3 times)."""
        for attempt in range(3):
            self.log = open(self.log_path, "ab")
            start_of_log = self.log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mox_core", "--config", str(self.config_path), "serve"],
                stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            )
            try:
                wait_banner(self.host, self.smtp_port, timeout=timeout, proc=self.proc)
                return self
            except Exception:
                self.stop()
                text = self.log_text()
                if "already in use" in text[start_of_log:] and attempt < 2:
                    self.smtp_port, self.submission_port, self.submissions_port = free_port(), free_port(), free_port()
                    self.write_config()
                    continue
                raise RuntimeError(f"mox serve did not start:\n{text}") from None
        raise AssertionError("unreachable")

    def kill(self) -> None:
        """SIGKILL, as a crash: no cleanup runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log", None):
            self.log.close()

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
