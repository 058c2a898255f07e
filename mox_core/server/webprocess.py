"""The main process's side of the web process (:mod:`mox_core.web.serve`): bind the web
ports of the listeners, start the process with them, start it again when it dies, tell it
to reload the config, stop it."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import structlog

from mox_core.errors import MoxError
from mox_core.server.children import spawn_child, stop_processes
from mox_core.web.ports import WebPort

__all__ = ["WebProcess", "bind_web_ports"]

log = structlog.get_logger(component="serve")

RESTART_DELAY = 1.0


def bind_web_ports(ports: list[WebPort]) -> dict[tuple[str, int], socket.socket]:
    """A listening socket for every IP and port; OSError naming the listener, the services
    and the address when one cannot be bound (all are closed then)."""
    out: dict[tuple[str, int], socket.socket] = {}
    try:
        for wp in ports:
            for ip in wp.ips:
                family = socket.AF_INET6 if ":" in ip else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                out[(ip, wp.port)] = sock
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((ip, wp.port))
                except OSError as exc:
                    what = ", ".join(f"{s}_{'https' if wp.tls and s != 'metrics' else 'http'}"
                                     for s in wp.services())
                    raise OSError(exc.errno, f"listener {wp.listener}: {what} on {ip}:{wp.port}: {exc.strerror}") from None
                sock.listen(1024)
                sock.setblocking(False)
    except OSError:
        for sock in out.values():
            sock.close()
        raise
    return out


class WebProcess:
    """One child process serving every web port."""

    def __init__(self, config_path: Path, ports: list[WebPort]) -> None:
        self.config_path = config_path
        self.ports = ports
        self._sockets: dict[tuple[str, int], socket.socket] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._channel: asyncio.StreamWriter | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    def bind(self) -> None:
        self._sockets = bind_web_ports(self.ports)

    async def start(self) -> None:
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch())

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        fds = [theirs.fileno()]
        cmd = [sys.executable, "-m", "mox_core", "--config", str(self.config_path), "web-worker",
               "--parent", str(os.getpid()), "--channel", str(theirs.fileno())]
        for (ip, port), sock in self._sockets.items():
            fds.append(sock.fileno())
            cmd += ["--socket", f"{sock.fileno()}:{port}:{ip}"]
        reader, writer = await asyncio.open_connection(sock=ours)
        self._channel = writer

        def started(proc: asyncio.subprocess.Process) -> None:
            self._proc = proc

        proc = await spawn_child(cmd, fds, reader, "web process", child_ends=(theirs,), started=started)
        log.info("web_process_started", pid=proc.pid, ports=sorted({wp.port for wp in self.ports}))

    async def _watch(self) -> None:
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            _process_exited(self._proc.pid)
            log.error("web_process_exited", pid=self._proc.pid, status=code, restart_in=RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)
            if self._stopping:
                return
            if self._channel is not None:
                self._channel.close()
            try:
                await self._spawn()
            except (MoxError, OSError) as exc:
                log.error("web_process_restart_failed", error=str(exc))

    def reload(self) -> None:
        """Have the web process read domains.toml now (it changed)."""
        if self._channel is not None and not self._channel.is_closing():
            self._channel.write(b"reload\n")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self._proc is not None:
            await stop_processes([self._proc], timeout)
        if self._channel is not None:
            self._channel.close()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def _process_exited(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from mox_core import metrics

        metrics.process_exited(pid)
