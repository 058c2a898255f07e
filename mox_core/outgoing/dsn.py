"""Delivery status notifications (RFC 3464) for mail our accounts sent, as mox's queue sends them.

Why delivered locally rather than queued: the sender is one of our accounts, so the report goes
straight into its Maildir with the durable store. That cannot bounce, cannot loop through the
queue, and needs no route. Mail from the null sender never gets a DSN (RFC 5321 §4.5.5), and
mail not submitted by a local account gets none either: we never send backscatter.

Layout of the report: ``multipart/report; report-type="delivery-status"`` with a human part, a
``message/delivery-status`` part (``message/global-delivery-status``, RFC 6533, when the
message used SMTPUTF8) and the original header (``text/rfc822-headers`` or
``message/global-headers``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import structlog

from mox_core.config.resolved import Config
from mox_core.store import INBOX, Delivery, MaildirStore

__all__ = ["DSNRecipient", "account_maildir", "compose", "deliver", "human_duration", "status_code"]

log = structlog.get_logger(component="queue.dsn")

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class DSNRecipient:
    """Per-recipient part of a report."""

    recipient: str
    enhanced_code: str | None = None  # from the remote reply, e.g. "5.1.1"
    code: int | None = None  # SMTP reply code, None for errors without a reply
    remote_host: str | None = None
    text: str = ""  # reply text or error message
    last_attempt: float | None = None

    def diagnostic(self) -> str | None:
        """``Diagnostic-Code`` value: the full SMTP reply on one line, when there was one."""
        if self.code is None:
            return None
        parts = [str(self.code)]
        if self.enhanced_code:
            parts.append(self.enhanced_code)
        if self.text:
            parts.append(_one_line(self.text))
        return "smtp; " + " ".join(parts)

    def error_line(self) -> str:
        d = self.diagnostic()
        return d[len("smtp; "):] if d else _one_line(self.text) or "unknown error"


def status_code(action: str, enhanced_code: str | None) -> str:
    """``Status``: the remote enhanced code with the class of ``action`` (mox: ``5.<secode>``).

    A message that fails after too many temporary errors reports e.g. ``5.3.0`` for a last
    ``4.3.0``: the class must agree with ``Action: failed`` (RFC 3464 §2.3.4).
    """
    cls = "5" if action == "failed" else "4"
    if enhanced_code and _ENHANCED.match(enhanced_code):
        return cls + enhanced_code[1:]
    return f"{cls}.0.0"


def human_duration(seconds: float) -> str:
    s = int(round(seconds))
    parts = []
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if s >= n:
            q, s = divmod(s, n)
            parts.append(f"{q} {unit}{'s' if q != 1 else ''}")
    return " ".join(parts) or "0 seconds"


def _one_line(text: str, limit: int = 900) -> str:
    """Reply lines joined by a space, cut so a header line stays under RFC 5322's 998."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def original_header(data: bytes) -> bytes:
    """The header section of ``data`` (CRLF line ends, without the blank line)."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[: end + 2]
    end = data.find(b"\n\n")
    head = data[: end + 1] if end >= 0 else data
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def compose(
    *,
    hostname: str,
    mail_from: str,
    action: str,
    recipients: Sequence[DSNRecipient],
    original: bytes,
    arrival: float,
    now: float,
    smtputf8: bool = False,
    original_message_id: str = "",
    retry_in: Sequence[float] = (),
    will_retry_until: float | None = None,
) -> bytes:
    """The report as bytes with CRLF line ends. ``action`` is ``failed`` or ``delayed``.

    A ``multipart/report`` (RFC 6522) of three parts: the text for people, the
    machine-readable status of each recipient (RFC 3464), and the original message's header.
    """
    if action not in ("failed", "delayed"):
        raise ValueError(f"bad DSN action {action!r}")
    utf8 = smtputf8 or not mail_from.isascii() or any(not r.recipient.isascii() for r in recipients)
    boundary = f"mox-dsn-{secrets.token_hex(12)}"
    subject, human = _human_part(action, recipients, retry_in)
    status = _status_part(hostname, action, recipients, arrival, utf8, will_retry_until)
    header = original_header(original)
    out = [
        f"From: <postmaster@{hostname}>",
        f"To: <{mail_from}>",
        f"Subject: {subject}",
        f"Message-Id: <{secrets.token_hex(16)}@{hostname}>",
    ]
    if original_message_id:
        out.append(f"References: {_one_line(original_message_id)}")
    out += [
        f"Date: {_date(now)}",
        "Auto-Submitted: auto-replied",  # RFC 3834: no auto-responder should answer this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type="delivery-status"; boundary="{boundary}"',
        "",
        "This is a MIME-formatted delivery status notification.",
        "",
    ]
    body = "\r\n".join(out).encode() + b"\r\n"
    body += _part(boundary, "text/plain; charset=utf-8", human.encode())
    body += _part(boundary, "message/global-delivery-status" if utf8 else "message/delivery-status",
                  status.encode())
    body += _part(boundary, "message/global-headers" if utf8 else "text/rfc822-headers", header)
    body += f"--{boundary}--\r\n".encode()
    return body


def _part(boundary: str, content_type: str, content: bytes) -> bytes:
    cte = "7bit" if content.isascii() else "8bit"
    return (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode() + content + b"\r\n"


def _human_part(action: str, recipients: Sequence[DSNRecipient], retry_in: Sequence[float]) -> tuple[str, str]:
    """The subject and the text for people."""
    addrs = "\r\n".join(f"\t{r.recipient}" for r in recipients)
    errors = "\r\n".join(f"\t{r.recipient}: {r.error_line()}" for r in recipients)
    if action == "failed":
        return "mail delivery failed", (
            f"Delivery has failed permanently for your email to:\r\n\r\n{addrs}\r\n\r\n"
            "No further deliveries will be attempted.\r\n\r\n"
            f"Error during the last delivery attempt:\r\n\r\n{errors}\r\n"
        )
    when = _join([f"in {human_duration(s)}" for s in retry_in]) if retry_in else "none"
    # mox's text lists the intervals shifted by one; ours lists the real ones.
    return "mail delivery delayed", (
        f"Delivery has been delayed of your email to:\r\n\r\n{addrs}\r\n\r\n"
        f"Next attempts to deliver: {when}.\r\n\r\n"
        f"Last error during delivery attempt:\r\n\r\n{errors}\r\n"
    )


def _status_part(hostname: str, action: str, recipients: Sequence[DSNRecipient], arrival: float,
                 utf8: bool, will_retry_until: float | None) -> str:
    """The per-message and per-recipient fields of RFC 3464 section 2."""
    status = [f"Reporting-MTA: dns; {hostname}", f"Arrival-Date: {_date(arrival)}", ""]
    for r in recipients:
        addr_type = "utf-8" if utf8 and not r.recipient.isascii() else "rfc822"
        status += [f"Final-Recipient: {addr_type}; {r.recipient}", f"Action: {action}",
                   f"Status: {status_code(action, r.enhanced_code)}"]
        if r.remote_host:
            status.append(f"Remote-MTA: dns; {r.remote_host}")
        diag = r.diagnostic()
        if diag:
            status.append(f"Diagnostic-Code: {diag}")
        if r.last_attempt is not None:
            status.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if action == "delayed" and will_retry_until is not None:
            status.append(f"Will-Retry-Until: {_date(will_retry_until)}")
        status.append("")
    return "\r\n".join(status)


def account_maildir(config: Config, account: str) -> Path:
    """The account's Maildir root; the same layout the SMTP server delivers into."""
    return config.data_dir / "accounts" / account / "Maildir"


async def deliver(
    config: Config, store: MaildirStore, *, account: str, mail_from: str, dsn: bytes
) -> Path:
    """Store ``dsn`` durably in the sender account's Inbox, or the postmaster's mailbox when
    that account no longer exists. Raises :class:`StorageError`."""
    mailbox = INBOX
    target = account
    if config.account(account) is None:
        target = config.static.postmaster.account
        mailbox = config.static.postmaster.mailbox
        log.info("dsn_to_postmaster", account=account, postmaster=target)
    # Return-Path: the null reverse-path of every DSN (RFC 5321 §4.5.5: no report about a
    # report). Delivered-To as the SMTP server writes it for every delivery (the bare address,
    # as Postfix does): the same form is what its loop check compares.
    prefix = ("Return-Path: <>\r\n"
              f"Delivered-To: {mail_from}\r\n").encode()
    [path] = await store.deliver(
        [Delivery(account_maildir(config, target), dsn, prefix, mailbox)]
    )
    return path
