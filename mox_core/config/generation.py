"""A counter every process of ``mox serve`` reads to notice at once that mox rewrote
``domains.toml`` (the admin pages, ``mox config ...``).

Without it, a process notices a change within a second (:class:`ConfigHolder` looks at the
file's modification time at most once a second). When mox writes the file itself, the
change must apply to the very next SMTP command, delivery attempt or web request in every
process: the writer increments this counter after the rename, and :meth:`ConfigHolder.get`
compares it on every call, which is one read of shared memory (the counter is a file of
8 bytes in the data directory, mapped into each process).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

__all__ = ["Generation"]

_FORMAT = "<Q"


class Generation:
    """The counter in ``<data_dir>/config-generation``; created when missing."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / "config-generation"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def current(self) -> int:
        return struct.unpack_from(_FORMAT, self._map)[0]

    def bump(self) -> int:
        """Increment (writers hold the config write lock, so there is one at a time)."""
        n = self.current() + 1
        struct.pack_into(_FORMAT, self._map, 0, n)
        return n

    def close(self) -> None:
        self._map.close()
