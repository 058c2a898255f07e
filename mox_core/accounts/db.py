"""Account state in SQLite: the stored credentials of each account's password.

Only derived credentials are stored (salted hash, SCRAM keys, CRAM-MD5 HMAC states; see
:mod:`mox_core.accounts.passwords`), never the password. ``mox setaccountpassword`` writes here, and a
running server sees the change at the next login because every lookup reads the database.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from mox_core.accounts.addresses import AddressNotFound, lookup
from mox_core.accounts.passwords import StoredCredentials, make_credentials
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    account TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


def db_path(config: Config) -> Path:
    return config.data_dir / "accounts.db"


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_SCHEMA)
    return conn


def account_for_login(config: Config, username: str) -> str | None:
    """The account a login name belongs to: an account's address (not a catch-all) or its name."""
    if "@" in username:
        try:
            resolved = lookup(config, username)
        except (AddressNotFound, ValueError):
            return None
        if resolved.catchall or resolved.destination is None:
            return None
        return resolved.account
    return username if username in config.dynamic.model.accounts else None


def set_password(config: Config, account: str, password: str) -> None:
    if account not in config.dynamic.model.accounts:
        raise KeyError(f"no account {account!r} in {config.domains_path}")
    creds = make_credentials(password)
    conn = _connect(db_path(config))
    try:
        conn.execute(
            "INSERT INTO credentials(account, data, updated) VALUES(?, ?, ?) "
            "ON CONFLICT(account) DO UPDATE SET data = excluded.data, updated = excluded.updated",
            (account, json.dumps(creds.to_dict()), time.time()),
        )
    finally:
        conn.close()


class AccountCredentials:
    """The :class:`mox_core.accounts.sasl.CredentialStore` of the submission listeners."""

    def __init__(self, holder: ConfigHolder):
        self.holder = holder
        self._conn = _connect(db_path(holder.get()))
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[str, StoredCredentials]] = {}

    def lookup(self, username: str) -> StoredCredentials | None:
        account = account_for_login(self.holder.get(), username)
        if account is None:
            return None
        with self._lock:
            row = self._conn.execute("SELECT data FROM credentials WHERE account = ?", (account,)).fetchone()
        if row is None:
            return None
        # Parsed once per stored value: a login costs the query, not the JSON and key decoding
        # (a password change stores a new value, which is parsed again).
        cached = self._parsed.get(account)
        if cached is not None and cached[0] == row[0]:
            return cached[1]
        creds = StoredCredentials.from_dict(json.loads(row[0]))
        if len(self._parsed) > 10_000:
            self._parsed.clear()
        self._parsed[account] = (row[0], creds)
        return creds

    def close(self) -> None:
        self._conn.close()
