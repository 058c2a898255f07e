"""The Maildir primitives of ``mox_core.store.maildir`` one by one: storage error replies
(RFC 5321 §4.2.3, RFC 3463), file names, Maildir++ folder names, durable directory creation,
complete writes, the layout and the cleaning of tmp/. Expected values are written out. The
group commit built on them: tests/test_store_maildir.py."""

from __future__ import annotations

import errno
import os
import re
import stat

import pytest

from mox_core.store import maildir as md
from mox_core.store.maildir import (
    INBOX,
    Maildir,
    StorageError,
    fsync_dir,
    mailbox_dir,
    mkdir_durable,
    unique_name,
    unlink_quiet,
    write_file,
)


@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:
    """Paths fsynced (through os.fsync), in order."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------------------------
# storage errors


def test_storage_error_replies():
    assert (md.CODE_INSUFFICIENT_STORAGE, md.ENHANCED_INSUFFICIENT_STORAGE) == (452, "4.3.1")
    assert (md.CODE_LOCAL_ERROR, md.ENHANCED_LOCAL_ERROR) == (451, "4.3.0")
    full = StorageError.from_oserror(OSError(errno.ENOSPC, "No space left on device"), step="write")
    assert (full.code, full.enhanced_code, full.text, full.errno, full.step) == (
        452, "4.3.1", "insufficient system storage", errno.ENOSPC, "write")
    assert full.reply == "452 4.3.1 insufficient system storage"
    assert str(full) == "452 4.3.1 insufficient system storage (write: [Errno 28] No space left on device)"
    assert full.detail == "[Errno 28] No space left on device" and full.permanent is False
    quota = StorageError.from_oserror(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert (quota.code, quota.enhanced_code, quota.step) == (452, "4.3.1", "")
    other = StorageError.from_oserror(OSError(errno.EIO, "Input/output error"), step="fsync")
    assert (other.code, other.enhanced_code, other.text, other.errno) == (451, "4.3.0", "local error in processing",
                                                                          errno.EIO)
    assert str(other) == "451 4.3.0 local error in processing (fsync: [Errno 5] Input/output error)"
    plain = StorageError.local_error()
    assert str(plain) == "451 4.3.0 local error in processing" and plain.reply == str(plain)
    assert (plain.errno, plain.step, plain.detail) == (None, "", "")
    assert str(StorageError.local_error(detail="gone")) == "451 4.3.0 local error in processing (: gone)"
    made = StorageError(451, "4.3.0", "main process gone")  # as the hand-off builds one
    assert (made.step, made.detail, made.errno, str(made)) == ("", "", None, "451 4.3.0 main process gone")


# --------------------------------------------------------------------------------------------
# names


NAME = re.compile(r"^(\d+)\.M(\d{1,6})P(\d+)Q(\d+)\.([^/:,]+)(,S=(\d+))?$")


def test_unique_name_format():
    a, b = unique_name(), unique_name(1234)
    ma, mb = NAME.match(a), NAME.match(b)
    assert ma and mb, (a, b)
    assert int(ma.group(3)) == os.getpid()
    assert int(mb.group(4)) == int(ma.group(4)) + 1  # the sequence counts up
    assert ma.group(6) is None and mb.group(7) == "1234"
    assert unique_name(0).endswith(",S=0")
    assert 0 <= int(ma.group(2)) < 1_000_000


def test_unique_name_starts_with_the_time_in_seconds_and_microseconds(monkeypatch):
    monkeypatch.setattr(md.time, "time_ns", lambda: 1_796_000_000_123_456_789)
    m = NAME.match(unique_name())
    assert m and (m.group(1), m.group(2)) == ("1796000000", "123456")


def test_host_part_of_names_escapes_slash_colon_and_comma(monkeypatch):
    monkeypatch.setattr(md.socket, "gethostname", lambda: "a/b:c,d")
    assert md._host_for_names() == "a\\057b\\072c\\054d"
    monkeypatch.setattr(md.socket, "gethostname", lambda: "")
    assert md._host_for_names() == "localhost"


@pytest.mark.parametrize("mailbox, rel", [
    ("Inbox", ""),
    ("INBOX", ""),
    ("inbox", ""),
    ("Archive", ".Archive"),
    ("Archive/2024", ".Archive.2024"),
    ("Lists/mox/dev", ".Lists.mox.dev"),
])
def test_mailbox_dir(tmp_path, mailbox, rel):
    assert mailbox_dir(tmp_path, mailbox) == (tmp_path / rel if rel else tmp_path)
    assert INBOX == "Inbox" and mailbox_dir(tmp_path) == tmp_path


@pytest.mark.parametrize("mailbox", ["a.b", "", "/a", "a/", "a//b", "a\0b", "."])
def test_mailbox_dir_refuses_names_maildir_plus_plus_cannot_hold(tmp_path, mailbox):
    with pytest.raises(ValueError, match=f"^mailbox name {re.escape(repr(mailbox))} cannot be stored as a "
                                         "Maildir\\+\\+ folder$"):
        mailbox_dir(tmp_path, mailbox)


# --------------------------------------------------------------------------------------------
# durable primitives


def test_fsync_dir(tmp_path, fsyncs):
    fsync_dir(str(tmp_path))
    assert fsyncs == [str(tmp_path)]
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_text("x")
        fsync_dir(str(tmp_path / "f"))


def test_mkdir_durable_creates_parents_and_fsyncs_each_parent(tmp_path, fsyncs):
    target = tmp_path / "a" / "b" / "c"
    assert mkdir_durable(str(target)) is True
    assert target.is_dir() and all(mode(p) == 0o700 for p in (tmp_path / "a", tmp_path / "a" / "b", target))
    assert fsyncs == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    fsyncs.clear()
    assert mkdir_durable(str(target)) is False and fsyncs == []


def test_mkdir_durable_relative_path(tmp_path, fsyncs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mkdir_durable("rel") is True
    assert (tmp_path / "rel").is_dir() and fsyncs == [str(tmp_path)]


def test_mkdir_durable_on_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError) as exc:
        mkdir_durable(str(tmp_path / "f"))
    assert exc.value.errno == errno.ENOTDIR and exc.value.filename == str(tmp_path / "f")
    assert exc.value.strerror == "exists and is not a directory"


def test_mkdir_durable_when_another_creates_it_meanwhile(tmp_path, monkeypatch, fsyncs):
    """The parent was missing; by the time it exists, someone else made the directory."""
    target = str(tmp_path / "p" / "d")
    real_mkdir = os.mkdir

    def racing_mkdir(path, mode=0o777):
        if path == target and os.path.isdir(os.path.dirname(target)) and not os.path.exists(target):
            real_mkdir(path, mode)  # the other process
            raise FileExistsError(errno.EEXIST, "exists", path)
        return real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    assert mkdir_durable(target) is False
    assert fsyncs == [str(tmp_path)]  # the new parent's own parent only


def test_write_file(tmp_path, fsyncs):
    path = str(tmp_path / "m")
    write_file(path, b"Return-Path: <a@b>\r\n", b"body\r\n")
    assert (tmp_path / "m").read_bytes() == b"Return-Path: <a@b>\r\nbody\r\n"
    assert mode(path) == 0o600 and fsyncs == [path]
    with pytest.raises(FileExistsError):
        write_file(path, b"", b"again")
    assert (tmp_path / "m").read_bytes() == b"Return-Path: <a@b>\r\nbody\r\n"  # untouched
    write_file(str(tmp_path / "n"), b"", b"only body")
    assert (tmp_path / "n").read_bytes() == b"only body"


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write

    def short_writev(fd, buffers):
        return real_write(fd, bytes(buffers[0])[:3])  # 3 bytes of the prefix only

    def short_write(fd, data):
        return real_write(fd, bytes(data)[:4])

    monkeypatch.setattr(os, "writev", short_writev)
    monkeypatch.setattr(os, "write", short_write)
    write_file(str(tmp_path / "m"), b"PREFIX:", b"0123456789")
    assert (tmp_path / "m").read_bytes() == b"PREFIX:0123456789"
    write_file(str(tmp_path / "n"), b"", b"abcdefghij")
    assert (tmp_path / "n").read_bytes() == b"abcdefghij"


def test_writes_of_one_byte_each_are_progress(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "writev", lambda fd, buffers: real_write(fd, bytes(buffers[0])[:1]))
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:1]))
    write_file(str(tmp_path / "m"), b"P:", b"body")
    assert (tmp_path / "m").read_bytes() == b"P:body"


def test_a_write_without_progress_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    real_write = os.write
    calls = []

    def stuck(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data)[:2]) if len(calls) == 1 else 0

    monkeypatch.setattr(os, "write", stuck)
    with pytest.raises(OSError) as exc:
        write_file(str(tmp_path / "m"), b"", b"0123456789")
    assert exc.value.errno == errno.EIO and exc.value.strerror == "write made no progress"
    assert calls == [10, 8] and not (tmp_path / "m").exists()


def test_a_failing_fsync_leaves_no_file(tmp_path, monkeypatch):
    def failing(fd):
        raise OSError(errno.EIO, "fsync failed")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="fsync failed"):
        write_file(str(tmp_path / "m"), b"a", b"b")
    assert list(tmp_path.iterdir()) == []


def test_unlink_quiet(tmp_path):
    (tmp_path / "f").write_text("x")
    assert unlink_quiet(str(tmp_path / "f")) is True and not (tmp_path / "f").exists()
    assert unlink_quiet(str(tmp_path / "f")) is False


# --------------------------------------------------------------------------------------------
# layout


def test_maildir_paths(tmp_path):
    m = Maildir(tmp_path / "u")
    root = str(tmp_path / "u")
    assert (m.path, m.tmp, m.new, m.cur, m.subfolder, m.dev) == (
        root, root + "/tmp", root + "/new", root + "/cur", False, None)
    assert repr(m) == f"Maildir({root!r})"
    inbox, sub = Maildir.for_mailbox(root, "INBOX"), Maildir.for_mailbox(root, "Lists/dev")
    assert (inbox.path, inbox.subfolder) == (root, False)
    assert (sub.path, sub.subfolder) == (root + "/.Lists.dev", True)
    assert Maildir.for_mailbox(root).path == root


def test_ensure_creates_the_layout_durably(tmp_path, fsyncs):
    m = Maildir(tmp_path / "u")
    m.ensure()
    for d in ("", "tmp", "new", "cur"):
        assert mode(tmp_path / "u" / d) == 0o700
    assert not (tmp_path / "u" / "maildirfolder").exists()
    assert fsyncs == [str(tmp_path), str(tmp_path / "u")]
    assert m.dev == os.stat(tmp_path / "u" / "tmp").st_dev
    fsyncs.clear()
    Maildir(tmp_path / "u").ensure()  # nothing to create: nothing to fsync
    assert fsyncs == []
    os.rmdir(tmp_path / "u" / "cur")
    Maildir(tmp_path / "u").ensure()  # one missing: the directory is fsynced again
    assert (tmp_path / "u" / "cur").is_dir() and fsyncs == [str(tmp_path / "u")]


def test_ensure_a_subfolder_creates_the_account_maildir_and_the_marker(tmp_path, fsyncs):
    sub = Maildir.for_mailbox(tmp_path / "u", "Archive")
    sub.ensure()
    folder = tmp_path / "u" / ".Archive"
    assert {p.name for p in (tmp_path / "u").iterdir()} == {"tmp", "new", "cur", ".Archive"}
    assert {p.name for p in folder.iterdir()} == {"tmp", "new", "cur", "maildirfolder"}
    assert mode(folder / "maildirfolder") == 0o600 and (folder / "maildirfolder").read_bytes() == b""
    assert fsyncs == [str(tmp_path), str(tmp_path / "u"), str(tmp_path / "u"), str(folder)]
    fsyncs.clear()
    os.unlink(folder / "maildirfolder")
    Maildir.for_mailbox(tmp_path / "u", "Archive").ensure()  # only the marker was missing
    assert (folder / "maildirfolder").exists() and fsyncs == [str(folder)]
    fsyncs.clear()
    Maildir.for_mailbox(tmp_path / "u", "Archive").ensure()  # complete: the marker is not made again
    assert fsyncs == []


def test_clean_tmp_removes_old_files_only(tmp_path):
    m = Maildir(tmp_path / "u")
    assert m.clean_tmp() == 0  # no tmp/ yet
    m.ensure()
    now = 2_000_000_000.0
    old, edge, fresh = (tmp_path / "u" / "tmp" / n for n in ("old", "edge", "fresh"))
    for p, age in ((old, 36 * 3600 + 1), (edge, 36 * 3600), (fresh, 10)):
        p.write_text("x")
        os.utime(p, (now - age, now - age))
    (tmp_path / "u" / "tmp" / "dir").mkdir()
    os.utime(tmp_path / "u" / "tmp" / "dir", (now - 10**6, now - 10**6))
    os.symlink(old, tmp_path / "u" / "tmp" / "link")
    os.utime(tmp_path / "u" / "tmp" / "link", (now - 10**6, now - 10**6), follow_symlinks=False)
    assert m.clean_tmp(now=now) == 1
    assert sorted(p.name for p in (tmp_path / "u" / "tmp").iterdir()) == ["dir", "edge", "fresh", "link"]
    assert m.clean_tmp(older_than=5, now=now) == 2  # edge and fresh
    assert sorted(p.name for p in (tmp_path / "u" / "tmp").iterdir()) == ["dir", "link"]


def test_clean_tmp_default_is_36_hours_before_now(tmp_path):
    import time

    m = Maildir(tmp_path / "u")
    m.ensure()
    old, fresh = tmp_path / "u" / "tmp" / "old", tmp_path / "u" / "tmp" / "fresh"
    for p, age in ((old, 36 * 3600 + 60), (fresh, 36 * 3600 - 60)):
        p.write_text("x")
        os.utime(p, (time.time() - age, time.time() - age))
    assert m.clean_tmp() == 1 and not old.exists() and fresh.exists()


def test_clean_tmp_a_file_gone_meanwhile(tmp_path, monkeypatch):
    m = Maildir(tmp_path / "u")
    m.ensure()
    for n in ("a", "b"):
        (tmp_path / "u" / "tmp" / n).write_text("x")
        os.utime(tmp_path / "u" / "tmp" / n, (0, 0))
    real_unlink = os.unlink
    gone: list[str] = []

    def unlink(path):
        real_unlink(path)
        if not gone:  # the first one, in whatever order scandir lists them, went meanwhile
            gone.append(path)
            raise FileNotFoundError(errno.ENOENT, "gone", path)

    monkeypatch.setattr(os, "unlink", unlink)
    assert m.clean_tmp() == 1  # one went by someone else, the other by us: cleaning went on
    assert len(gone) == 1 and os.listdir(tmp_path / "u" / "tmp") == []


# --------------------------------------------------------------------------------------------
# owners


@pytest.mark.parametrize("owner", [(5000, 5001), (1, 0), (0, 1)], ids=["mail-user", "uid-1", "gid-1"])
def test_as_root_what_is_created_takes_the_owner_of_its_directory(tmp_path, owner):
    """Running as root, directories take their parent's owner and files the Maildir's, so a
    Maildir the mail user owns stays readable by Dovecot running as that user; a directory
    root owns keeps what is made in it root's. Not as root everything is ours: no owner."""
    if os.geteuid() != 0:
        assert md.owner_of(str(tmp_path)) is None
        return
    os.chown(tmp_path, *owner)
    assert md.owner_of(str(tmp_path)) == owner
    sub = Maildir.for_mailbox(tmp_path / "alice" / "Maildir", "Archive")
    sub.ensure()
    made = [tmp_path / "alice", tmp_path / "alice" / "Maildir", *(tmp_path / "alice" / "Maildir").iterdir(),
            *(tmp_path / "alice" / "Maildir" / ".Archive").iterdir()]
    assert len(made) == 2 + 4 + 4
    assert {p.name: (p.stat().st_uid, p.stat().st_gid) for p in made} == {p.name: owner for p in made}
    assert sub.owner == owner
    write_file(os.path.join(sub.tmp, "m"), b"", b"x", owner=sub.owner)
    assert (os.stat(os.path.join(sub.tmp, "m")).st_uid, os.stat(os.path.join(sub.tmp, "m")).st_gid) == owner
    root_owned = tmp_path / "root-owned"
    root_owned.mkdir()
    os.chown(root_owned, 0, 0)
    assert md.owner_of(str(root_owned)) is None
    m = Maildir(root_owned / "bob")
    m.ensure()
    assert m.owner is None and os.stat(root_owned / "bob" / "new").st_uid == 0
