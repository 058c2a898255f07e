"""The admin pages' password: one password, kept as a salted scrypt hash
(:class:`mox_core.accounts.passwords.PasswordHash`) in the file ``adminpasswd`` beside
``mox.toml``, mode 0600. ``mox setadminpassword`` writes it; the admin pages check a login
with :func:`check_admin_password`, which reads the file at every call, so a new password
applies at once in a running server. Without the file no password is right.
"""

from __future__ import annotations

import json
from pathlib import Path

from mox_core.accounts.passwords import PasswordHash, verify_password
from mox_core.privatefile import write_private

__all__ = ["ADMIN_PASSWORD_FILE", "admin_password_path", "check_admin_password", "set_admin_password"]

ADMIN_PASSWORD_FILE = "adminpasswd"


def admin_password_path(config_dir: Path) -> Path:
    return Path(config_dir) / ADMIN_PASSWORD_FILE


def set_admin_password(config_dir: Path, password: str) -> Path:
    """Store a new salted hash of ``password``, atomically (written to a temporary file of
    mode 0600, fsynced, renamed over the old one)."""
    if not password:
        raise ValueError("empty password")
    path = admin_password_path(config_dir)
    write_private(path, json.dumps(PasswordHash.make(password).to_dict()).encode() + b"\n")
    return path


def check_admin_password(config_dir: Path, password: str) -> bool:
    """Whether ``password`` is the admin password. Costs one scrypt run also when no
    password is set (or the file is unreadable), so the timing says nothing. Slow on
    purpose: call it off the event loop."""
    try:
        stored = PasswordHash.from_dict(json.loads(admin_password_path(config_dir).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        verify_password(None, password)
        return False
    return stored.verify(password)
