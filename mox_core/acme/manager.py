"""The ACME client of ``mox serve``'s main process: keeps a certificate for every host name
that needs one (:func:`mox_core.acme.names.wanted_names`), obtains what is missing, renews
what has passed two thirds of its lifetime, and retries failures after 1 minute, doubling up to
6 hours. A failure is logged with what to fix; the listeners keep serving the previous
certificate (or the temporary self-signed one) meanwhile.

New files are picked up by every process at its next TLS handshake
(:mod:`mox_core.server.tls`). ``mox acme renew`` asks for a renewal now, over the ctl socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from mox_core.acme.client import ACMEClient, ObtainError
from mox_core.acme.names import Wanted, wanted_names
from mox_core.acme.store import cert_info, cert_path, ensure_certificate, write_private
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.errors import MoxError

__all__ = ["RENEW_FRACTION", "ACMEManager", "status_rows"]

log = structlog.get_logger(component="acme")
T = TypeVar("T")

RENEW_FRACTION = 2 / 3  # renew when this part of a certificate's lifetime has passed
RETRY_FIRST = 60.0
RETRY_MAX = 6 * 3600.0
RECHECK = 60.0  # look at the config (new domains) and the files at least this often


@dataclass
class _Failure:
    count: int
    retry_at: float
    error: str
    hint: str


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a daemon thread: an order in progress never holds up a shutdown (the
    default executor is waited for when the event loop ends)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not fut.done():
            setter(value)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(deliver, fut.set_exception, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, fut.set_result, result)

    threading.Thread(target=work, name="acme", daemon=True).start()
    return await fut


class ACMEManager:
    """Obtains and renews the ACME certificates of the listeners, in the background."""

    def __init__(self, holder: ConfigHolder) -> None:
        self.holder = holder
        self._clients: dict[str, ACMEClient] = {}
        self._failures: dict[str, _Failure] = {}
        self._forced: set[str] = set()
        self._last: dict[str, str] = {}
        self._waiters: list[tuple[set[str], asyncio.Future[dict[str, str]]]] = []
        self._wake = asyncio.Event()

    def prepare(self) -> None:
        """A certificate file for every name before the listeners start: the temporary
        self-signed one where the CA's has not arrived yet."""
        cfg = self.holder.get()
        for w in wanted_names(cfg):
            ensure_certificate(cfg.data_dir, w.name)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the certificates current until ``stop``."""
        while not stop.is_set():
            self._wake.clear()  # a request arriving during this round wakes the next one at once
            cfg = self.holder.get()
            wanted = wanted_names(cfg)
            next_at = time.time() + RECHECK
            for w in wanted:
                due = self._due(cfg, w)
                if due <= time.time():
                    await self._renew(cfg, w)
                    if stop.is_set():
                        return
                    due = self._due(cfg, w)
                next_at = min(next_at, due)
            self._settle({w.name for w in wanted})
            stopped = asyncio.ensure_future(stop.wait())
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([stopped, woken], timeout=max(0.0, next_at - time.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                woken.cancel()

    def _due(self, cfg: Config, w: Wanted) -> float:
        """When ``w`` should be obtained or renewed next (0: now)."""
        if w.name in self._forced:
            return 0.0
        info = cert_info(ensure_certificate(cfg.data_dir, w.name))
        at = 0.0 if info is None or w.name not in info.names else info.renew_at(RENEW_FRACTION)
        failure = self._failures.get(w.name)
        return max(at, failure.retry_at) if failure is not None else at

    def _client(self, cfg: Config, provider: str) -> ACMEClient:
        client = self._clients.get(provider)
        if client is None:
            client = ACMEClient(provider, cfg.static.acme[provider], cfg.config_dir, cfg.data_dir)
            self._clients[provider] = client
        return client

    async def _renew(self, cfg: Config, w: Wanted) -> None:
        self._forced.discard(w.name)
        path = cert_path(cfg.data_dir, w.name)
        before = cert_info(path)
        log.info("acme_certificate_requesting", name=w.name, provider=w.provider, challenges=list(w.challenges))
        try:
            pem, challenge = await _in_thread(self._client(cfg, w.provider).obtain, w.name, w.challenges)
        except ObtainError as exc:
            self._failed(w, exc, serving_temporary=before is None or before.temporary)
            return
        write_private(path, pem)
        self._failures.pop(w.name, None)
        info = cert_info(path)
        assert info is not None
        self._last[w.name] = f"obtained, valid until {_iso(info.not_after)}"
        log.info("acme_certificate_obtained", name=w.name, provider=w.provider, challenge=challenge,
                 issuer=info.issuer, not_after=_iso(info.not_after),
                 renew_at=_iso(info.renew_at(RENEW_FRACTION)))
        self._settle(None, done=w.name)

    def _failed(self, w: Wanted, exc: ObtainError, *, serving_temporary: bool) -> None:
        previous = self._failures.get(w.name)
        count = previous.count + 1 if previous is not None else 1
        delay = min(RETRY_FIRST * 2 ** (count - 1), RETRY_MAX)
        self._failures[w.name] = _Failure(count, time.time() + delay, str(exc), exc.hint)
        self._last[w.name] = f"failed: {exc}" + (f" (fix: {exc.hint})" if exc.hint else "")
        log.error("acme_certificate_failed", name=w.name, provider=w.provider, error=str(exc),
                  fix=exc.hint or None, failures=count, retry_in=f"{delay:g}s",
                  serving="temporary self-signed certificate" if serving_temporary else "previous certificate")
        self._settle(None, done=w.name)

    # -- renew now (ctl) and status -------------------------------------------------------------

    def _settle(self, wanted: set[str] | None, done: str | None = None) -> None:
        """Answer the renewal requests that are complete (or whose names are not wanted)."""
        for pending, fut in list(self._waiters):
            if done is not None:
                pending.discard(done)
            if wanted is not None:
                pending &= wanted
            if not pending and not fut.done():
                fut.set_result({})
        self._waiters = [(p, f) for p, f in self._waiters if not f.done()]

    async def renew_now(self, names: list[str] | None = None) -> dict[str, str]:
        """Obtain new certificates for ``names`` (default: all) now; the outcome per name."""
        cfg = self.holder.get()
        wanted = {w.name for w in wanted_names(cfg)}
        targets = {n.lower().rstrip(".") for n in names} if names else set(wanted)
        unknown = sorted(targets - wanted)
        if unknown:
            raise MoxError(f"no ACME certificate for {', '.join(unknown)} (names: {', '.join(sorted(wanted))})")
        fut: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._waiters.append((set(targets), fut))
        self._forced |= targets
        self._wake.set()
        await fut
        return {n: self._last.get(n, "") for n in sorted(targets)}

    def status(self) -> list[dict[str, Any]]:
        return status_rows(self.holder.get(), self._failures)

    def ctl_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        async def renew(args: dict[str, Any]) -> Any:
            return await self.renew_now(args.get("names") or None)

        async def status(args: dict[str, Any]) -> Any:
            return self.status()

        return {"acme.renew": renew, "acme.status": status}


def status_rows(cfg: Config, failures: dict[str, _Failure] | None = None) -> list[dict[str, Any]]:
    """Per host name: provider, listener, the certificate's issuer and expiry, when it is
    renewed, and the last failure (known only to the running server)."""
    out = []
    for w in wanted_names(cfg):
        info = cert_info(cert_path(cfg.data_dir, w.name))
        failure = (failures or {}).get(w.name)
        out.append({
            "name": w.name, "provider": w.provider, "listener": w.listener,
            "issuer": info.issuer if info else None, "temporary": info.temporary if info else True,
            "not_after": _iso(info.not_after) if info else None,
            "renew_at": _iso(info.renew_at(RENEW_FRACTION)) if info and not info.temporary else "now",
            "error": failure.error if failure else None, "fix": failure.hint if failure else None,
            "retry_at": _iso(failure.retry_at) if failure else None,
        })
    return out
