"""Maildir layout, file names and the durable single-file primitives.

Why Maildir: Dovecot, mutt, Courier and friends read it directly, it needs no locking, and a
delivery becomes visible by one atomic ``rename()`` from ``tmp/`` into ``new/``, so a reader
never sees a partial message (https://cr.yp.to/proto/maildir.html).

This module is synchronous and knows nothing about batching; :mod:`mox_core.store.durable`
builds group commit on top of it. Everything here raises plain :class:`OSError`; the caller
turns that into a :class:`StorageError` with :meth:`StorageError.from_oserror`, because only
the caller knows which files of a multi-recipient delivery must be rolled back.

Durability: a file is fsynced before it is renamed, and the directory it was renamed into is
fsynced before anyone is told. Directories we create are fsynced in their parent, or a crash
could lose a whole freshly created Maildir with acknowledged mail in it.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from pathlib import Path

from mox_core.errors import MoxError

__all__ = [
    "CODE_INSUFFICIENT_STORAGE",
    "CODE_LOCAL_ERROR",
    "ENHANCED_INSUFFICIENT_STORAGE",
    "ENHANCED_LOCAL_ERROR",
    "INBOX",
    "Maildir",
    "StorageError",
    "fsync_dir",
    "mailbox_dir",
    "mkdir_durable",
    "unique_name",
    "unlink_quiet",
    "write_file",
]

# ---------------------------------------------------------------------------------------------
# SMTP replies for storage failures

# RFC 5321 §4.2.3: "452 Requested action not taken: insufficient system storage".
CODE_INSUFFICIENT_STORAGE = 452
# RFC 3463 §3.4: X.3.1 "Mail system full".
ENHANCED_INSUFFICIENT_STORAGE = "4.3.1"
# RFC 5321 §4.2.3: "451 Requested action aborted: local error in processing".
CODE_LOCAL_ERROR = 451
# RFC 3463 §3.4: X.3.0 "Other or undefined mail system status".
ENHANCED_LOCAL_ERROR = "4.3.0"

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageError(MoxError):
    """A delivery could not be made durable; nothing of it is visible in any ``new/``.

    Carries the SMTP reply to give instead of 250 (451 or 452). Always
    temporary: the client keeps the message and retries. ``errno`` and ``step`` are for the
    log only; the reply text deliberately leaves out paths and strerror.
    """

    permanent = False

    def __init__(
        self,
        code: int,
        enhanced_code: str,
        text: str,
        *,
        errno: int | None = None,
        step: str = "",
        detail: str = "",
    ) -> None:
        self.code = code
        self.enhanced_code = enhanced_code
        self.text = text
        self.errno = errno
        self.step = step
        self.detail = detail
        extra = f" ({step}: {detail})" if step or detail else ""
        super().__init__(f"{code} {enhanced_code} {text}{extra}")

    @property
    def reply(self) -> str:
        """The reply line without CRLF, e.g. ``"452 4.3.1 insufficient system storage"``."""
        return f"{self.code} {self.enhanced_code} {self.text}"

    @classmethod
    def from_oserror(cls, exc: OSError, step: str = "") -> StorageError:
        """Map an OS error: out of space or quota -> 452 4.3.1, anything else -> 451 4.3.0."""
        if exc.errno in _NO_SPACE:
            return cls(
                CODE_INSUFFICIENT_STORAGE,
                ENHANCED_INSUFFICIENT_STORAGE,
                "insufficient system storage",
                errno=exc.errno,
                step=step,
                detail=str(exc),
            )
        return cls.local_error(step=step, detail=str(exc), errno=exc.errno)

    @classmethod
    def local_error(cls, *, step: str = "", detail: str = "", errno: int | None = None) -> StorageError:
        """``451 4.3.0 local error in processing``."""
        return cls(
            CODE_LOCAL_ERROR,
            ENHANCED_LOCAL_ERROR,
            "local error in processing",
            errno=errno,
            step=step,
            detail=detail,
        )


# ---------------------------------------------------------------------------------------------
# Names

INBOX = "Inbox"


def _host_for_names() -> str:
    # The Maildir spec replaces "/" and ":" (and we also ",", which starts the ",S=" field)
    # so that the name stays one path component and parsable.
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


_HOST = _host_for_names()
# next() on itertools.count is atomic under the GIL, so writer threads share it safely.
_SEQ = itertools.count()


def unique_name(size: int | None = None) -> str:
    """A Maildir file name unique across time, processes and threads on this host.

    Format ``<sec>.M<usec>P<pid>Q<seq>.<host>[,S=<size>]`` as written by Dovecot and qmail's
    modern variant. ``,S=`` is the exact file size; Dovecot uses it to skip a ``stat()``. The
    pid is read on every call so a forked child does not reuse its parent's names.
    """
    sec, usec = divmod(time.time_ns() // 1000, 1_000_000)
    name = f"{sec}.M{usec}P{os.getpid()}Q{next(_SEQ)}.{_HOST}"
    if size is not None:
        name += f",S={size}"
    return name


def mailbox_dir(root: str | os.PathLike[str], mailbox: str = INBOX) -> Path:
    """The Maildir directory of ``mailbox`` in the account Maildir at ``root``.

    "Inbox" (any case, as IMAP's INBOX) is ``root`` itself. Others are Maildir++ subfolders:
    ``"Archive/2024"`` -> ``root/.Archive.2024``, the layout Courier and Dovecot's default
    maildir layout use. "." is Maildir++'s separator, so names containing it are refused
    rather than silently nested.
    """
    if mailbox.upper() == "INBOX":
        return Path(root)
    parts = mailbox.split("/")
    for part in parts:
        if not part or "." in part or "\0" in part:
            raise ValueError(f"mailbox name {mailbox!r} cannot be stored as a Maildir++ folder")
    return Path(root) / ("." + ".".join(parts))


# ---------------------------------------------------------------------------------------------
# Durable primitives


def fsync_dir(path: str) -> None:
    """fsync a directory, making the entries created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Running as root, what mox creates in a Maildir takes the owner of the directory it is created
# in: a directory its parent's, a message file its Maildir's. So a Maildir that a mail user owns
# (the one Dovecot reads it as; Dovecot never reads mail as root) stays that user's, as Postfix's
# virtual(8) writes as the mailbox's owner. Not running as root: everything is ours anyway.
_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def owner_of(path: str) -> tuple[int, int] | None:
    """(uid, gid) that files created in directory ``path`` get, when not ours as root."""
    if not _AS_ROOT:
        return None
    st = os.stat(path)
    return (st.st_uid, st.st_gid) if (st.st_uid, st.st_gid) != (0, 0) else None


def _inherit_owner(path: str) -> None:
    owner = owner_of(os.path.dirname(path) or ".")
    if owner is not None:
        os.chown(path, *owner)


def mkdir_durable(path: str) -> bool:
    """Create ``path`` (and missing parents) with mode 0700, fsyncing each changed parent.

    Returns whether ``path`` was created. 0700 because mail is private, and Maildir readers
    (Dovecot) run as the mail user anyway.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", path) from None
        return False
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not parent or parent == path:
            raise
        mkdir_durable(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # created concurrently: someone else fsyncs the parent
            return False
    if _AS_ROOT:
        _inherit_owner(path)
    fsync_dir(os.path.dirname(path) or ".")
    return True


def _write_all(fd: int, prefix: bytes, body: bytes) -> None:
    """Write ``prefix + body`` without concatenating them (the body may be large).

    One ``writev`` normally does it. A short write happens near a quota or size limit or
    above 2 GiB per call; the rest is then written piecewise, and a write that makes no
    progress becomes EIO instead of a busy loop.
    """
    total = len(prefix) + len(body)
    n = os.writev(fd, (prefix, body)) if prefix else os.write(fd, body)
    if n == total:
        return
    pview, bview = memoryview(prefix), memoryview(body)
    plen = len(prefix)
    while n < total:
        chunk = pview[n:] if n < plen else bview[n - plen :]
        w = os.write(fd, chunk)
        if w <= 0:
            raise OSError(errno.EIO, "write made no progress")
        n += w


def write_file(path: str, prefix: bytes, body: bytes, owner: tuple[int, int] | None = None) -> None:
    """Create ``path`` exclusively (0600, owned by ``owner`` if given), write ``prefix + body``,
    fsync and close it.

    On any error the file is removed before the error propagates, so ``tmp/`` does not
    collect partial files (the 36 h cleanup is only a backstop for crashes). A failed close
    counts as failure too: on NFS it is where write errors surface.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            _write_all(fd, prefix, body)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        unlink_quiet(path)
        raise


def unlink_quiet(path: str) -> bool:
    """Best-effort unlink for rollback paths; returns whether something was removed."""
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Layout


class Maildir:
    """One Maildir directory: ``<path>/{tmp,new,cur}``.

    Paths are kept as ``str`` because the writer builds several per delivery and ``pathlib``
    joins cost more than the syscalls they feed on a fast disk. ``dev`` (the device of
    ``tmp/``) is known after :meth:`ensure` and decides whether a hard link can stand in for
    a second copy.
    """

    __slots__ = ("cur", "dev", "new", "owner", "path", "subfolder", "tmp")

    def __init__(self, path: str | os.PathLike[str], *, subfolder: bool = False) -> None:
        self.path = os.fspath(path)
        self.tmp = os.path.join(self.path, "tmp")
        self.new = os.path.join(self.path, "new")
        self.cur = os.path.join(self.path, "cur")
        self.subfolder = subfolder
        self.dev: int | None = None
        self.owner: tuple[int, int] | None = None  # see owner_of()

    @classmethod
    def for_mailbox(cls, root: str | os.PathLike[str], mailbox: str = INBOX) -> Maildir:
        """The Maildir of ``mailbox`` under the account Maildir ``root`` (see :func:`mailbox_dir`)."""
        path = mailbox_dir(root, mailbox)
        return cls(path, subfolder=path != Path(root))

    def __repr__(self) -> str:
        return f"Maildir({self.path!r})"

    def ensure(self) -> None:
        """Create the directories if missing (mode 0700), durably; idempotent.

        A Maildir++ subfolder also gets its ``maildirfolder`` marker file (Courier/Dovecot
        use it to recognise a folder) and its account Maildir is created too.
        """
        if self.subfolder:
            Maildir(os.path.dirname(self.path)).ensure()
        mkdir_durable(self.path)
        changed = False
        self.owner = owner_of(self.path)
        for sub in (self.tmp, self.new, self.cur):
            try:
                os.mkdir(sub, 0o700)
                changed = True
            except FileExistsError:
                continue
            if self.owner is not None:
                os.chown(sub, *self.owner)
        if self.subfolder:
            marker = os.path.join(self.path, "maildirfolder")
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                pass
            else:
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                os.close(fd)
                changed = True
        if changed:
            fsync_dir(self.path)
        self.dev = os.stat(self.tmp).st_dev

    def clean_tmp(self, older_than: float = 36 * 3600, now: float | None = None) -> int:
        """Remove files in ``tmp/`` not modified for ``older_than`` seconds; return the count.

        What a crash mid-write leaves behind. 36 hours is the Maildir spec's number: long
        enough that no live delivery can still be writing the file.
        """
        limit = (time.time() if now is None else now) - older_than
        removed = 0
        try:
            entries = list(os.scandir(self.tmp))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
