"""Server-side login sessions of the web pages, in SQLite (``<data_dir>/web/sessions.db``).

A session is created only by a successful login (:meth:`SessionStore.create`), with a new
random 256-bit id: an id a browser brought along before the login is never promoted, so an
attacker who planted a cookie gains nothing (session fixation). The cookie carries the id;
the database keeps only its SHA-256, so a copy of the database does not hand out sessions.

Each session has its own random CSRF token (256 bits), which every form of its pages sends
back (:mod:`mox_core.webui.security`).

A session ends at logout (the row is deleted), after ``idle`` seconds without a request, or
``absolute`` seconds after the login, whatever happens in between; and every session of an
account or of the admin pages ends when its password is set anew, on the pages or with ``mox
setaccountpassword`` / ``mox setadminpassword`` (:func:`end_sessions`): whoever knew the old
password and logged in with it is out. Expired rows are deleted
when they are met and at each login. The file survives a restart of the web process; the
pages of several services (account, admin) share it, each session belonging to one service.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ABSOLUTE_TIMEOUT", "IDLE_TIMEOUT", "Session", "SessionStore", "end_sessions", "new_token"]

IDLE_TIMEOUT = 24 * 3600.0
ABSOLUTE_TIMEOUT = 7 * 24 * 3600.0
# last_seen is written at most this often per session: a page view is not a disk write
_TOUCH_EVERY = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    principal TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_principal ON sessions(service, principal);
CREATE INDEX IF NOT EXISTS sessions_last_seen ON sessions(last_seen);
"""


def new_token() -> str:
    """32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class Session:
    """A logged-in session: ``id`` is the cookie value (known only to the browser and to
    the request that carries it)."""

    id: str
    service: str
    principal: str  # the account name, or "admin"
    csrf: str
    created: float
    last_seen: float


class SessionStore:
    """The sessions of ``<data_dir>/web/sessions.db``; thread-safe, calls are quick."""

    def __init__(self, path: Path, *, idle: float = IDLE_TIMEOUT, absolute: float = ABSOLUTE_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.idle = idle
        self.absolute = absolute
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # a session lost in a crash: log in again
        self._conn.executescript(_SCHEMA)
        path.chmod(0o600)

    @classmethod
    def for_data_dir(cls, data_dir: Path, **kw: object) -> SessionStore:
        return cls(Path(data_dir) / "web" / "sessions.db", **kw)  # type: ignore[arg-type]

    def create(self, service: str, principal: str) -> Session:
        """A new session for ``principal``, logged in just now."""
        now = self._clock()
        session = Session(new_token(), service, principal, new_token(), now, now)
        with self._lock:
            self._prune(now)
            self._conn.execute(
                "INSERT INTO sessions(id_hash, service, principal, csrf, created, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
                (_hash(session.id), service, principal, session.csrf, now, now))
        return session

    def get(self, service: str, session_id: str | None) -> Session | None:
        """The live session of ``service`` with this id, else None (an expired one is
        deleted). Counts as activity for the idle timeout."""
        if not session_id or len(session_id) > 100:
            return None
        now = self._clock()
        key = _hash(session_id)
        with self._lock:
            row = self._conn.execute(
                "SELECT principal, csrf, created, last_seen FROM sessions WHERE id_hash = ? AND service = ?",
                (key, service)).fetchone()
            if row is None:
                return None
            principal, csrf, created, last_seen = row
            if now - last_seen > self.idle or now - created > self.absolute:
                self._conn.execute("DELETE FROM sessions WHERE id_hash = ?", (key,))
                return None
            if now - last_seen >= _TOUCH_EVERY:
                self._conn.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?", (now, key))
                last_seen = now
        return Session(session_id, service, principal, csrf, created, last_seen)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM sessions WHERE id_hash = ?", (_hash(session_id),))

    def delete_principal(self, service: str, principal: str, keep: str | None = None) -> int:
        """End every session of ``principal`` (but ``keep``, a session id); returns how many."""
        with self._lock:
            return self._conn.execute(
                "DELETE FROM sessions WHERE service = ? AND principal = ? AND id_hash != ?",
                (service, principal, _hash(keep) if keep else "")).rowcount

    def count(self, service: str, principal: str) -> int:
        with self._lock:
            (n,) = self._conn.execute("SELECT COUNT(*) FROM sessions WHERE service = ? AND principal = ?",
                                      (service, principal)).fetchone()
        return n

    def _prune(self, now: float) -> None:
        self._conn.execute("DELETE FROM sessions WHERE last_seen < ? OR created < ?",
                           (now - self.idle, now - self.absolute))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def end_sessions(data_dir: Path, service: str, principal: str) -> int:
    """End every session of ``principal`` on ``service`` ("account" or "admin"), as the
    commands that set a password do; how many there were. A running web process reads each
    session from the database at every request, so they end at once. No sessions file (no web
    page has had a login yet): nothing to end, and none is made."""
    path = Path(data_dir) / "web" / "sessions.db"
    if not path.exists():
        return 0
    store = SessionStore(path)
    try:
        return store.delete_principal(service, principal)
    finally:
        store.close()
