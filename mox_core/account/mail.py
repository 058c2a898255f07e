"""The messages of an account's mailboxes as the account pages list and show them: the Inbox
(``<data_dir>/accounts/<account>/Maildir``, its ``new/`` and ``cur/``) and its Maildir++
folders (``.Lists``, ``.Archive.2024``: the mailboxes "Lists" and "Archive/2024", where
deliveries to a destination's ``mailbox`` go, :func:`mox_core.store.mailbox_dir`).

A message is named in URLs by its Maildir unique name: the file name without the ``:2,``
info part that readers add in ``cur/`` (see :mod:`mox_core.store.maildir`), so its URL stays
the same when a mail client marks it read. A name is only ever looked up among the entries of
the two directories (:meth:`Mailbox.find`): a name with ``/``, NUL or ``:``, a name starting
with ``.``, or one that is not there, is not found, so a request cannot reach any other file.
Likewise a mailbox is only one found among the account Maildir's folders (:func:`open_mailbox`).

Headers are decoded (RFC 2047 encoded words, RFC 6532 UTF-8) by :mod:`email`'s default
policy; the text shown is the message's text/plain part, else its text/html part converted to
plain text (:mod:`mox_core.account.htmltext`); HTML is never handed to the browser as HTML.
"""

from __future__ import annotations

import email.policy
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path

from mox_core.account.htmltext import html_to_text
from mox_core.store import INBOX

__all__ = ["MAX_VIEW", "Mailbox", "MessageView", "Summary", "mailboxes", "open_mailbox", "valid_id"]

MAX_VIEW = 25 * 1024 * 1024  # larger messages: headers only on the page, download for the rest
_MAX_HEAD = 256 * 1024
_ID = re.compile(r"^[^./\x00:][^/\x00:]{0,254}$")
_MAIN_HEADERS = ("From", "Sender", "Reply-To", "To", "Cc", "Date", "Subject", "Message-ID")


def valid_id(msg_id: str) -> bool:
    """Whether ``msg_id`` can be a Maildir unique name (one path component, not hidden)."""
    return bool(_ID.match(msg_id))


@dataclass(frozen=True)
class Summary:
    id: str
    size: int
    received: float  # the file's modification time: when it was delivered
    date: datetime | None
    sender: str  # the From header, decoded
    sender_name: str  # its first address's display name ("" when none)
    sender_addr: str  # its first address
    subject: str
    seen: bool


@dataclass
class MessageView:
    id: str
    size: int
    received: float
    main: list[tuple[str, str]] = field(default_factory=list)  # decoded, for the summary
    headers: list[tuple[str, str]] = field(default_factory=list)  # every header, decoded
    subject: str = ""
    text: str | None = None
    html_source: str | None = None  # the HTML part's source, shown escaped
    parts: list[tuple[str, str, int]] = field(default_factory=list)  # content type, file name, size
    too_large: bool = False
    from_html: bool = False  # the text is the HTML part's, converted


def _decoded(msg: Message, name: str, raw: str) -> str:
    """A raw header value decoded to one line of text; a header the parser cannot make
    sense of is shown with its encoded words decoded as far as possible."""
    try:
        return " ".join(str(msg.policy.header_fetch_parse(name, raw)).split())
    except Exception:
        try:
            return " ".join(str(make_header(decode_header(raw))).split())
        except Exception:
            return " ".join(raw.split())


def header_text(msg: Message, name: str) -> str:
    """The first header ``name`` decoded ("" when absent)."""
    for k, v in msg.raw_items():
        if k.lower() == name.lower():
            return _decoded(msg, k, v)
    return ""


def _sender(msg: Message) -> tuple[str, str]:
    """Display name and address of the first From address."""
    try:
        addresses = msg["from"].addresses
        if addresses:
            return addresses[0].display_name, addresses[0].addr_spec
    except Exception:  # absent, or not parsable as addresses
        pass
    return "", header_text(msg, "from")


def _date(msg: Message) -> datetime | None:
    try:
        value = msg.get("date")
        return getattr(value, "datetime", None) if value is not None else None
    except Exception:
        return None


def mailboxes(root: Path) -> list[str]:
    """The mailboxes of the account Maildir at ``root``: "Inbox", then its Maildir++ folders
    (directories ``.A.B`` with a ``cur/`` or ``new/``, named "A/B") in name order."""
    folders = []
    try:
        it = os.scandir(root)
    except (FileNotFoundError, NotADirectoryError):
        return [INBOX]
    with it:
        for e in it:
            parts = e.name[1:].split(".")
            if (not e.name.startswith(".") or not all(parts) or not e.is_dir(follow_symlinks=False)
                    or not any(os.path.isdir(os.path.join(e.path, sub)) for sub in ("cur", "new"))):
                continue
            folders.append("/".join(parts))
    return [INBOX, *sorted(folders, key=lambda n: (n.casefold(), n))]


def open_mailbox(root: Path, name: str) -> Mailbox | None:
    """Mailbox ``name`` ("Inbox" in any letter case, or one of :func:`mailboxes`) of the
    account Maildir at ``root``; None if the account has no such mailbox."""
    if name.upper() == "INBOX":
        return Mailbox(root, INBOX)
    if name not in mailboxes(root):
        return None
    return Mailbox(Path(root) / ("." + name.replace("/", ".")), name)


class Mailbox:
    """The Maildir of one mailbox at ``root`` (which may not exist yet: then it is empty)."""

    def __init__(self, root: Path, name: str = INBOX) -> None:
        self.root = Path(root)
        self.name = name

    def _entries(self) -> list[tuple[float, str, str, int, bool]]:
        """(mtime, unique name, path, size, seen) of every message, newest first."""
        out = []
        for sub in ("new", "cur"):
            try:
                it = os.scandir(self.root / sub)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:  # moved from new/ to cur/ meanwhile
                        continue
                    base, _, info = e.name.partition(":")
                    seen = sub == "cur" and info.startswith("2,") and "S" in info[2:]
                    out.append((st.st_mtime, base, e.path, st.st_size, seen))
        out.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return out

    def page(self, number: int, per_page: int) -> tuple[list[Summary], int]:
        """Page ``number`` (from 1) of the messages, newest first, and the number of messages."""
        entries = self._entries()
        start = (number - 1) * per_page
        out = []
        for mtime, base, path, size, seen in entries[start:start + per_page]:
            msg = _read_head(path)
            if msg is None:
                continue
            name, addr = _sender(msg)
            out.append(Summary(base, size, mtime, _date(msg), header_text(msg, "from"), name, addr,
                               header_text(msg, "subject"), seen))
        return out, len(entries)

    def find(self, msg_id: str) -> Path | None:
        """The file of message ``msg_id`` in ``new/`` or ``cur/``, None if there is none."""
        if not valid_id(msg_id):
            return None
        for sub in ("new", "cur"):
            try:
                it = os.scandir(self.root / sub)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    if e.name.partition(":")[0] == msg_id and e.is_file(follow_symlinks=False):
                        return Path(e.path)
        return None

    def view(self, msg_id: str) -> MessageView | None:
        path = self.find(msg_id)
        if path is None:
            return None
        try:
            st = path.stat()
            with open(path, "rb") as f:
                too_large = st.st_size > MAX_VIEW
                msg = (BytesHeaderParser if too_large else BytesParser)(policy=email.policy.default).parse(f)
        except FileNotFoundError:
            return None
        return _view(msg_id, msg, st.st_size, st.st_mtime, too_large)


def _read_head(path: str) -> Message | None:
    try:
        with open(path, "rb") as f:
            head = f.read(_MAX_HEAD)
    except FileNotFoundError:
        return None
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = head.find(sep)
        if i >= 0:
            head = head[:i + len(sep)]
            break
    return BytesHeaderParser(policy=email.policy.default).parsebytes(head)


def _view(msg_id: str, msg: Message, size: int, mtime: float, too_large: bool) -> MessageView:
    view = MessageView(msg_id, size, mtime, too_large=too_large)
    view.subject = header_text(msg, "subject")
    for name in _MAIN_HEADERS:
        value = header_text(msg, name)
        if value:
            view.main.append((name, value))
    view.headers = [(k, _decoded(msg, k, v)) for k, v in msg.raw_items()]
    if too_large or not isinstance(msg, EmailMessage):
        return view
    text_part = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    if text_part is not None:
        view.text = _content(text_part)
    if html_part is not None:
        view.html_source = _content(html_part)
        if view.text is None:
            view.text = html_to_text(view.html_source)
            view.from_html = True
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        view.parts.append((part.get_content_type(), part.get_filename() or "", len(payload)))
    return view


def _content(part: Message) -> str:
    """A text part's content as text, its charset applied (an unknown or wrong charset:
    UTF-8 with replacement characters)."""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content
    except (LookupError, UnicodeError, AssertionError, KeyError):
        pass
    payload = part.get_payload(decode=True) or b""
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload)
