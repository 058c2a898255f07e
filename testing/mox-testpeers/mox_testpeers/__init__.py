"""Real network peers for the tests and benchmarks of mox, all on 127.0.0.0/8.

Nothing here talks to anything outside the loopback network, and nothing uses the system
resolver. The drivers, one module each (imported lazily by the pytest plugin,
:mod:`mox_testpeers.pytest_plugin`, whose fixtures start them):

* :mod:`.dnsserver` -- authoritative DNS server (dnspython) with programmable failures;
* :mod:`.sink`      -- Postfix ``smtp-sink`` with fault injection and message dumps;
* :mod:`.postfix`   -- private Postfix instances: SASL submission smarthost, plain MX;
* :mod:`.socks`     -- SOCKS5 proxies: dante-server and microsocks;
* :mod:`.moxserver` -- ``mox serve`` as a real server process with a generated config.

:mod:`.lifecycle` holds what they all do the same way (start a process, wait until it is
ready, stop it; retry on another address). This module holds the small stdlib-only helpers
they share. A missing program raises :class:`MissingToolError` naming the Debian package; the
pytest plugin turns that into a test *failure* (never a skip), since CI installs every package.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = [
    "DEBIAN_PACKAGES",
    "MissingToolError",
    "PeerError",
    "SCRIPTS_DIR",
    "free_loopback_host",
    "free_port",
    "is_addr_in_use",
    "make_private_dir",
    "port_is_free",
    "remove_private_dir",
    "require_file",
    "require_root",
    "require_tool",
    "Reservation",
    "register_peer",
    "reserve",
    "run",
    "stop_process",
    "unregister_peer",
    "wait_banner",
    "wait_for",
    "wait_port",
]

SCRIPTS_DIR = Path(__file__).with_name("scripts")

#: Every Debian package the peers (and tests/test_testpeers.py) need.
DEBIAN_PACKAGES = (
    "postfix",  # postfix, postconf, smtp-sink
    "sasl2-bin",  # saslpasswd2
    "libsasl2-modules",  # SCRAM, CRAM-MD5, PLAIN, LOGIN plugins for Cyrus SASL
    "libsasl2-modules-db",  # sasldb auxprop plugin (a dependency of libsasl2-2)
    "openssl",  # throwaway CA and certificates, `openssl passwd -6`
    "dante-server",  # danted
    "microsocks",  # microsocks
    "libpam-pwdfile",  # pam_pwdfile.so for dante's username/password method
    "swaks",  # used by tests
    "pebble",  # the ACME test CA (pebble.py)
    "nginx",  # reverse proxy in front of mox (quickstart's configuration)
    "caddy",  # the same, validated
)


class PeerError(RuntimeError):
    """A test peer could not be started or did not behave."""


class MissingToolError(PeerError):
    """A program or file a peer needs is not installed."""

    def __init__(self, what: str, package: str):
        self.what = what
        self.package = package
        super().__init__(
            f"{what} not found: install the Debian package {package!r} "
            f"(apt-get install --no-install-recommends {package})"
        )


_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/lib/postfix/sbin")


def require_tool(name: str, package: str) -> str:
    """Return the absolute path of program *name*, or raise :class:`MissingToolError`.

    Looks in $PATH and in the sbin directories (which a non-login $PATH may lack).
    """
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise MissingToolError(f"program {name!r}", package)


def require_file(candidates: list[str] | tuple[str, ...], package: str, what: str) -> str:
    """Return the first existing path of *candidates* (globs allowed) or raise."""
    import glob

    for pattern in candidates:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    raise MissingToolError(what, package)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PeerError(f"{what} must run as root (it binds privileged ports / drops privileges)")


def run(args: list[str], *, input: bytes | None = None, timeout: float = 30, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing output; raise :class:`PeerError` with its output on failure."""
    proc = subprocess.run(args, input=input, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        out = proc.stdout.decode(errors="replace").strip()
        raise PeerError(f"command failed (exit {proc.returncode}): {' '.join(args)}\n{out}")
    return proc


# --------------------------------------------------------------------------------------------
# ports and addresses


def port_is_free(host: str, port: int, *, udp: bool = False) -> bool:
    """True if nothing *listens* on host:port (TIME_WAIT leftovers do not count)."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# Ports handed out for listeners, below Linux's default ephemeral range (32768-60999): a port
# the kernel chose by bind(0) is one it also gives to outgoing connections as their source
# port, and a test that makes thousands of connections would take a reserved port before its
# server listens on it (EADDRINUSE, or a refused connection to a server that never started).
_FREE_PORTS = (20000, 32767)


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on *host*, outside the ephemeral range (prefer :func:`reserve`)."""
    for _ in range(200):
        port = random.randint(*_FREE_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


def free_loopback_host(port: int = 25, *, prefer: str = "127.0.0.2",
                       exclude: set[str] | None = None) -> str:
    """A 127.0.0.x address (x in 2..254) where nothing listens on *port* (prefer :func:`reserve`).

    *prefer* is tried first; after that the addresses are tried in random order, so that
    concurrent test processes rarely race for the same address.
    """
    return reserve(None, port, prefer_host=prefer, exclude=exclude, hold=False).host


_LOCK_DIR = Path(tempfile.gettempdir()) / "mox-testpeers-locks"


class Reservation:
    """An address:port this process intends to listen on.

    Postfix and smtp-sink set SO_REUSEPORT on their listeners, so a second instance on the same
    address:port does *not* fail with EADDRINUSE: both run and the kernel spreads connections
    between them. Peers therefore (1) check with a plain bind that nobody listens there and
    (2) hold an flock on a per-address lock file (under /tmp/mox-testpeers-locks) for as long
    as they run, so concurrent test processes never pick the same address:port.
    """

    def __init__(self, host: str, port: int, fd: int | None, path: Path | None = None):
        self.host = host
        self.port = port
        self._fd = fd
        self._path = path

    def release(self) -> None:
        if self._fd is not None:
            if self._path is not None:
                # unlink while still holding the lock; a waiter that then gets the lock sees that
                # the path no longer names its inode and starts over (see _lock)
                with contextlib.suppress(OSError):
                    os.unlink(self._path)
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __repr__(self) -> str:
        return f"<Reservation {self.host}:{self.port}>"


def _lock(host: str, port: int) -> tuple[int, Path] | None:
    import fcntl

    if not _LOCK_DIR.is_dir():
        _LOCK_DIR.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(_LOCK_DIR, 0o1777)
    path = _LOCK_DIR / f"{host}-{port}.lock"
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, path
        os.close(fd)  # the holder released and unlinked it meanwhile: try again
    return None


def reserve(host: str | None = "127.0.0.1", port: int | None = None, *, prefer_host: str = "127.0.0.2",
            exclude: set[str] | None = None, hold: bool = True) -> Reservation:
    """Reserve host:port for a peer about to listen there.

    host None: 127.0.0.2 (*prefer_host*) if free, else a random free 127.0.0.x (x in 2..254).
    port None (or 0): a free port (:func:`free_port`).
    An explicitly given host *and* port that is in use raises :class:`PeerError`.
    """
    exclude = exclude or set()
    if host:
        hosts = [host]
    else:
        hosts = [f"127.0.0.{i}" for i in range(2, 255)]
        random.shuffle(hosts)
        if prefer_host:
            hosts.insert(0, prefer_host)
        hosts = [h for h in hosts if h not in exclude]
    for h in hosts:
        for _ in range(1 if port else 50):
            p = port or free_port(h)
            if not port_is_free(h, p):
                continue
            if not hold:
                return Reservation(h, p, None)
            locked = _lock(h, p)
            if locked is None:
                continue
            res = Reservation(h, p, *locked)
            if not port_is_free(h, p):  # someone bound it between check and lock
                res.release()
                continue
            return res
    if host and port:
        raise PeerError(f"{host}:{port} is in use (another listener, or another test peer holds it)")
    raise PeerError(f"no free address for host={host!r} port={port!r}")


def is_addr_in_use(text: str) -> bool:
    t = text.lower()
    return "address already in use" in t or f"errno {errno.EADDRINUSE}" in t or "eaddrinuse" in t


# --------------------------------------------------------------------------------------------
# readiness


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll *predicate* until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until a TCP connect to host:port succeeds (closes the probe connection at once)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"process exited with status {proc.returncode} before {host}:{port} was ready")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout:g}s")
        time.sleep(0.02)


def wait_banner(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> bytes:
    """Wait for an SMTP ``220`` greeting on host:port; send QUIT; return the greeting line."""
    deadline = time.monotonic() + timeout
    last = b""
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"process exited with status {proc.returncode} before {host}:{port} "
                            f"sent its 220 greeting")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(2)
                buf = b""
                while b"\n" not in buf:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    buf += chunk
                last = buf
                if buf.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return buf.split(b"\r\n", 1)[0]
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no SMTP 220 greeting from {host}:{port} after {timeout:g}s "
                               f"(last read: {last!r})")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# private directories


def make_private_dir(prefix: str) -> Path:
    """``mkdtemp`` under /tmp with mode 755.

    Postfix daemons run as ``postfix``, virtual(8) and smtp-sink as ``nobody``: they all must be
    able to traverse the path, which pytest's ``tmp_path`` (under a 0700 directory) does not allow.
    """
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return Path(d)


def remove_private_dir(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0, *, kill_timeout: float | None = None) -> None:
    """SIGTERM the process (by its PID), then SIGKILL if it does not exit within *timeout*
    seconds, and wait *kill_timeout* (default: *timeout*) for that."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout if kill_timeout is None else kill_timeout)


# --------------------------------------------------------------------------------------------
# last-resort cleanup: peers still running when the interpreter exits are stopped

import atexit  # noqa: E402

_live_peers: set = set()


def register_peer(peer) -> None:
    """Remember a started peer (anything with ``.stop()``) so that it is stopped at exit."""
    _live_peers.add(peer)


def unregister_peer(peer) -> None:
    _live_peers.discard(peer)


@atexit.register
def _stop_leftover_peers() -> None:
    for peer in list(_live_peers):
        try:
            getattr(peer, "cleanup", peer.stop)()
        except Exception:
            pass
