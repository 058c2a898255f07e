"""Changing ``domains.toml`` from mox itself (the admin pages, ``mox config account add``
and friends), keeping the file's comments, order and layout (tomlkit).

One change (:meth:`DomainsWriter.change`):

1. under an exclusive lock (``domains.toml.lock``), read the file; when the caller loaded it
   at another version (its SHA-256), refuse with :class:`StaleConfig`: two administrators
   saving from stale pages cannot overwrite each other;
2. apply the edit to the parsed document, and validate the whole result with the same code
   as ``mox config check``; on any problem raise :class:`ConfigError` and write nothing;
3. write it beside the file, fsync, rename over it, fsync the directory: the file is always
   either the old or the new one, also after a crash;
4. install the new config in this process and bump the config generation, so every other
   process of ``mox serve`` uses it for its very next command, attempt or request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tomlkit
from tomlkit import TOMLDocument

from mox_core.config.domains import validate_dynamic
from mox_core.config.generation import Generation
from mox_core.config.holder import ConfigHolder
from mox_core.config.resolved import Config
from mox_core.errors import ConfigError, ConfigProblem, MoxError

__all__ = ["DomainsFile", "DomainsWriter", "StaleConfig", "version_of"]


class StaleConfig(MoxError):
    """domains.toml changed since the caller read it."""

    def __init__(self) -> None:
        super().__init__("domains.toml was changed since you loaded it; nothing was written, load it again")


def version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DomainsFile:
    """The file as read: its parsed document and its version."""

    doc: TOMLDocument
    version: str


class DomainsWriter:
    """Writes the domains.toml of ``holder``'s config. ``generation``: the counter the other
    processes watch (None when there are none, e.g. in tests of one process)."""

    def __init__(self, holder: ConfigHolder, generation: Generation | None = None) -> None:
        self.holder = holder
        self.generation = generation

    @property
    def path(self) -> Path:
        return self.holder.get().domains_path

    def read(self) -> DomainsFile:
        data = self.path.read_bytes()
        return DomainsFile(tomlkit.parse(data.decode("utf-8")), version_of(data))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def change(self, edit: Callable[[TOMLDocument], object], *, version: str | None = None) -> Config:
        """Apply ``edit`` to the document and write it (see the module docstring); returns the
        new config. ``version``: the version the caller's edit is based on (None: any)."""
        with self._locked():
            data = self.path.read_bytes()
            if version is not None and version_of(data) != version:
                raise StaleConfig()
            doc = tomlkit.parse(data.decode("utf-8"))
            edit(doc)
            text = tomlkit.dumps(doc)
            cfg = self.holder.get()
            dynamic = self._validate(cfg, text)
            self._write(text.encode("utf-8"))
            dynamic.mtime = self.path.stat().st_mtime
            new = cfg.with_dynamic(dynamic)
            if self.generation is not None:
                self.generation.bump()
            self.holder.replace(new)  # (it takes note of the bump: no reload of our own write)
            return new

    def _validate(self, cfg: Config, text: str):  # -> Dynamic
        file = str(self.path)
        problems: list[ConfigProblem] = []
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # an edit that produced bad TOML: a bug
            raise ConfigError([ConfigProblem(file, "", f"invalid TOML: {exc}")]) from None
        dyn = validate_dynamic(raw, file, 0.0, cfg.static, set(cfg.transports), cfg.plugins, problems)
        if problems or dyn is None:
            raise ConfigError(problems)
        return dyn

    def _write(self, data: bytes) -> None:
        path = self.path
        # Under the lock no other writer is between its temp file and its rename: a temp file
        # here is what a writer killed mid-write left behind.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(OSError):
                os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
