"""Local mail storage: durable, all-or-nothing delivery into Maildirs with group commit.

The SMTP server answers 250 only after ``await store.deliver(...)`` returned, i.e. after the
message's file was fsynced, renamed into ``new/`` and that directory fsynced; a
:class:`StorageError` carries the 451/452 reply to give instead.
"""

from mox_core.store.durable import (
    Delivery,
    MaildirCache,
    MaildirStore,
    StoreStats,
    commit_batch,
    deliver_sync,
)
from mox_core.store.maildir import INBOX, Maildir, StorageError, mailbox_dir, unique_name

__all__ = [
    "INBOX",
    "Delivery",
    "Maildir",
    "MaildirCache",
    "MaildirStore",
    "StorageError",
    "StoreStats",
    "commit_batch",
    "deliver_sync",
    "mailbox_dir",
    "unique_name",
]
