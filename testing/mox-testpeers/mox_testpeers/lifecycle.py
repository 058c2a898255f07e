"""Starting and stopping a peer, written once for every driver.

* :class:`PeerProcess` -- one child process: started with its output in a log file, waited
  for until a readiness check passes, stopped with SIGTERM and, if it does not exit in time,
  SIGKILL. Used by smtp-sink, the SOCKS5 proxies, ``mox serve`` and the benchmarks' processes.
* :class:`Peer` -- the life of a peer around it: a start that tries again when another process
  took the address between choosing and binding it, a stop that gives the address back, a
  cleanup that also removes the peer's private directory, use as a context manager, and a
  last-resort stop at interpreter exit. Subclasses say how one attempt launches and how it is
  halted. Used by smtp-sink, the SOCKS5 proxies, Postfix, ``mox serve`` and the DNS server.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import (
    PeerError,
    Reservation,
    is_addr_in_use,
    register_peer,
    remove_private_dir,
    reserve,
    stop_process,
    unregister_peer,
)

__all__ = ["Peer", "PeerProcess"]


class PeerProcess:
    """A peer's child process.

    args: the command. log_file: stdout and stderr are appended to it (otherwise pass
    ``stdout=``/``stderr=`` among *popen*, e.g. a pipe). stop_timeout: seconds between SIGTERM
    and SIGKILL; kill_timeout: seconds to wait after SIGKILL (default: stop_timeout). Other
    keyword arguments go to :class:`subprocess.Popen` (env, cwd, preexec_fn, ...). Standard
    input is /dev/null.
    """

    def __init__(self, args: list[str], *, log_file: Path | None = None, stop_timeout: float = 5.0,
                 kill_timeout: float | None = None, **popen: Any):
        self.args = [str(a) for a in args]
        self.log_file = log_file
        self.stop_timeout = stop_timeout
        self.kill_timeout = stop_timeout if kill_timeout is None else kill_timeout
        self.popen = popen
        self.proc: subprocess.Popen | None = None

    def start(self, ready: Callable[[subprocess.Popen], Any] | None = None) -> Any:
        """Start the process, then call ``ready(proc)``, which returns once the process is ready
        and raises (:class:`PeerError`, :class:`TimeoutError`) when it is not. Whatever it
        raises stops the process before it propagates. Returns what *ready* returned."""
        if self.log_file is not None:
            with open(self.log_file, "ab") as log:  # the child keeps its own copy of the descriptor
                self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, **self.popen)
        else:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, **self.popen)
        if ready is None:
            return None
        try:
            return ready(self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, wait up to stop_timeout; then SIGKILL and wait up to kill_timeout."""
        if self.proc is not None:
            stop_process(self.proc, self.stop_timeout, kill_timeout=self.kill_timeout)

    def kill(self) -> None:
        """SIGKILL at once, as a crash: the process runs no cleanup."""
        if self.running:
            self.proc.kill()
            self.proc.wait(self.kill_timeout)

    def log_text(self, start: int = 0) -> str:
        """The log file from byte *start* on ("" when there is none)."""
        if self.log_file is None:
            return ""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else f"pid {self.proc.pid}"
        return f"<PeerProcess {self.args[0]} {state}>"


class Peer:
    """Base of the peer drivers: the start/stop sequence, the subclass supplies the steps.

    :meth:`start` calls :meth:`_setup` once (check the tools, make the private directory), then
    per attempt :meth:`_begin_attempt` (choose the address, write the configuration; anything
    it raises ends the start) and :meth:`_launch` (start and wait until ready). When the launch
    raises :class:`PeerError` or :class:`TimeoutError`, :meth:`_failure_details` gathers what
    explains it (the log), :meth:`_halt` stops what runs, the reserved addresses are released,
    and when the details say the address was in use and attempts are left, :meth:`_reset_attempt`
    runs and the next attempt starts; otherwise :meth:`cleanup` runs and :class:`PeerError`
    is raised with the details.

    Subclasses call ``Peer.__init__`` and set :attr:`host`, :attr:`port` (for the messages) and
    :attr:`dir` (the private directory that :meth:`cleanup` removes, if any).
    """

    #: what kind of peer this is (smtp-sink, dante, smarthost, ...)
    kind = "peer"
    #: default seconds :meth:`start` waits for the peer to become ready
    start_timeout = 10.0

    #: the address the peer listens on (set by the subclass)
    host: str = ""
    port: int = 0

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.started = False
        self._reservations: list[Reservation] = []

    @property
    def description(self) -> str:
        """How the peer is named in messages."""
        return self.kind

    # ------------------------------------------------------------------ for subclasses

    def _start_tries(self) -> int:
        """How many attempts :meth:`start` makes (1 when the address is fixed)."""
        return 1

    def _setup(self) -> None:
        """Once per :meth:`start`, before the first attempt."""

    def _begin_attempt(self, used: set[str]) -> None:
        """Before each attempt: choose an address (*used*: hosts tried already), configure."""

    def _launch(self, timeout: float) -> None:  # pragma: no cover - abstract
        """Start the peer and return once it is ready; raise PeerError/TimeoutError if not."""
        raise NotImplementedError

    def _failure_details(self, error: BaseException) -> str:
        """What explains a failed launch (the error, the log); its "address in use" decides
        whether another attempt is made."""
        return str(error)

    def _halt(self) -> None:
        """Stop what a launch started (called after a failed launch and by :meth:`stop`)."""

    def _reset_attempt(self) -> None:
        """Before another attempt after an address in use."""

    def _reserve(self, host: str | None, port: int | None, **kw: Any) -> Reservation:
        """:func:`reserve` an address for this peer; released by :meth:`stop`."""
        res = reserve(host, port, **kw)
        self._reservations.append(res)
        return res

    # ------------------------------------------------------------------ the sequence

    def start(self, timeout: float | None = None):
        """Start the peer (see the class docstring); returns it."""
        timeout = self.start_timeout if timeout is None else timeout
        self._setup()
        tries = self._start_tries()
        used: set[str] = set()
        for attempt in range(tries):
            try:
                self._begin_attempt(used)
            except BaseException:
                self.cleanup()
                raise
            try:
                self._launch(timeout)
            except (PeerError, TimeoutError) as e:
                details = self._failure_details(e)
                self._halt()
                self._release()
                if is_addr_in_use(details) and attempt + 1 < tries:
                    self._reset_attempt()
                    continue
                where = f" on {self.host}:{self.port}" if self.host and self.port else ""
                self.cleanup()
                raise PeerError(f"{self.description} did not start{where}: {details}") from None
            self.started = True
            register_peer(self)
            return self
        raise AssertionError("unreachable")

    def _release(self) -> None:
        for res in self._reservations:
            res.release()
        self._reservations.clear()

    def stop(self) -> None:
        """Stop the peer and give its address back; its private directory stays until
        :meth:`cleanup`."""
        self._halt()
        self._release()
        self.started = False
        unregister_peer(self)

    def cleanup(self) -> None:
        """:meth:`stop`, then remove the private directory."""
        self.stop()
        if self.dir is not None:
            remove_private_dir(self.dir)
            self.dir = None

    def __enter__(self):
        return self if self.started else self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
