"""The control socket: ``<data_dir>/ctl``, how ``mox`` commands talk to a running ``mox serve``.

Why a socket (mox ``ctl.go``): admin commands such as ``mox queue kick`` must change the state
the running server holds and wake its scheduler, and the server is the only writer of its
queue. The socket file is mode 0600 (only the user mox runs as, and root, may connect): that
file permission is the authentication.

Protocol: one JSON object per line each way. Request ``{"command": "queue.list", "args":
{...}}``, response ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "text"}``.
A connection may carry several requests, answered in order. Binary results (``queue.dump``)
are base64 inside the JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from mox_core.errors import MoxError

__all__ = ["CtlError", "CtlServer", "CtlUnavailable", "call", "socket_path"]

log = structlog.get_logger(component="ctl")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 1 << 20


class CtlUnavailable(MoxError):
    """No server is listening on the ctl socket (not running, or a stale socket file)."""


class CtlError(MoxError):
    """The server refused or failed the request; the message is the server's."""


def socket_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "ctl"


class CtlServer:
    """Serve ``handlers`` (command name -> async function of the args) on a unix socket.

    The socket is bound under a temporary name, chmod 0600, then renamed into place, so there
    is no moment at which other users could connect. A leftover socket file from a crashed
    server is replaced; a live server on the same path is an error.
    """

    def __init__(self, path: str | os.PathLike[str], handlers: Mapping[str, Handler]) -> None:
        self.path = Path(path)
        self.handlers: dict[str, Handler] = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.handlers.setdefault("ping", _ping)
        if self.path.exists():
            if _alive(self.path):
                raise MoxError(f"{self.path}: another mox is running (ctl socket answers)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
        log.info("ctl_listening", path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # line over the limit
                    await _send(writer, {"ok": False, "error": "request too large"})
                    return
                if not line:
                    return
                await _send(writer, await self._handle(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            command = req["command"]
            args = req.get("args") or {}
            if not isinstance(command, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "bad request: want {\"command\": str, \"args\": object}"}
        handler = self.handlers.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}"}
        try:
            result = await handler(args)
        except MoxError as exc:
            return {"ok": False, "error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad arguments for {command}: {exc}"}
        except Exception as exc:
            log.exception("ctl_command_failed", command=command)
            return {"ok": False, "error": f"{command} failed: {type(exc).__name__}: {exc}"}
        log.info("ctl_command", command=command)
        return {"ok": True, "result": result}


async def _ping(args: dict[str, Any]) -> str:
    return "pong"


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _alive(path: Path) -> bool:
    try:
        call(path, "ping", timeout=2.0)
    except CtlUnavailable:
        return False
    except CtlError:
        return True
    return True


def call(path: str | os.PathLike[str], command: str, args: dict[str, Any] | None = None,
         *, timeout: float = 60.0) -> Any:
    """Send one request and return its result (blocking; for CLI commands).

    Raises :class:`CtlUnavailable` when nothing listens on ``path``, :class:`CtlError` when
    the server answered with an error.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise CtlUnavailable(f"{path}: no server listening ({exc.strerror})") from None
        sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
        with sock.makefile("rb") as f:
            line = f.readline()
    except TimeoutError:
        raise CtlError(f"{path}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise CtlError(f"{path}: {exc}") from None
    finally:
        sock.close()
    if not line:
        raise CtlError(f"{path}: server closed the connection without an answer")
    resp = json.loads(line)
    if not resp.get("ok"):
        raise CtlError(str(resp.get("error", "unknown error")))
    return resp.get("result")
