"""Policy for the SMTP and submission listeners: the aiosmtpd handler.

The protocol layer (:mod:`mox_core.smtpserver.protocol`) parses commands and reads DATA; this
module decides: which recipients are ours (no open relay), who may send as whom, what goes
into the Maildir and with which trace headers, and what goes to the outgoing queue. The reply
to DATA is 250 only once the message is durably stored (fsynced and renamed into place).
"""

from __future__ import annotations

import asyncio
import email.policy
import functools
import itertools
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from typing import TYPE_CHECKING

import dns.resolver
import structlog

from mox_core import afterreply
from mox_core.accounts.addresses import AddressNotFound, Resolved, is_local_domain, lookup, split_address
from mox_core.checks import authres
from mox_core.config.holder import ConfigHolder
from mox_core.localserve.special import TIMEOUT_SECONDS, SpecialReply, special_reply
from mox_core.metrics import ServiceMetrics
from mox_core.outgoing import dkimsign
from mox_core.outgoing.ratelimit import RateLimited
from mox_core.smtp import codes
from mox_core.smtp.domain import to_ascii, to_unicode
from mox_core.smtpserver import headers
from mox_core.smtpserver.fromheader import lean_from_address
from mox_core.smtpserver.headers import header_section
from mox_core.smtpserver.interfaces import MessageStore, OutgoingQueue, RateLimitToken, SubmissionRateLimits
from mox_core.store import Delivery, StorageError

if TYPE_CHECKING:
    from aiosmtpd.smtp import Envelope, Session

    from mox_core.smtpserver.protocol import MoxSMTP

log = structlog.get_logger(component="smtpserver")

MAX_HOPS = 100
# DKIM signing of a larger message runs in a thread (hashing releases the GIL); smaller ones
# take well under a millisecond (dkimsign.py), less than the hand-off to a thread and back.
SIGN_IN_THREAD_ABOVE = 256 * 1024
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_ids = itertools.count(1)


_date_cache: tuple[int, str] = (0, "")


def _date_header_now() -> str:
    """RFC 5322 date of this second, local time zone; formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, format_datetime(datetime.fromtimestamp(now).astimezone()))
    return _date_cache[1]


@dataclass
class Recipient:
    address: str  # as given in RCPT TO (source route removed)
    resolved: Resolved | None  # None for a remote recipient (submission only)


@dataclass
class Transaction:
    """Per-envelope state of this handler (kept on the aiosmtpd Envelope)."""

    recipients: list[Recipient] = field(default_factory=list)
    simulated: list[str] = field(default_factory=list)  # mox localserve: failures asked for at DATA


def _tx(envelope: Envelope) -> Transaction:
    tx = getattr(envelope, "mox", None)
    if tx is None:
        tx = Transaction()
        envelope.mox = tx
    return tx


def _sender(envelope: Envelope) -> str:
    """The envelope sender, "" for the null sender (aiosmtpd keeps it as "<>")."""
    mail_from = envelope.mail_from or ""
    return "" if mail_from == "<>" else mail_from


def _canonical(address: str) -> str:
    """Recipient as rate limits count it: localpart as given, domain lower-case Unicode."""
    lp, domain = split_address(address)
    try:
        return f"{lp}@{to_unicode(domain)}"
    except ValueError:
        return address.lower()


async def _simulated(sr: SpecialReply) -> str:
    """The reply a localserve local part asks for (after an hour for a timeout)."""
    if sr.timeout:
        await asyncio.sleep(TIMEOUT_SECONDS)
    return sr.reply


def _strip_source_route(address: str) -> str:
    """``@a,@b:user@d`` -> ``user@d`` (RFC 5321 appendix C: accept, ignore the route)."""
    if address.startswith("@") and ":" in address:
        return address.split(":", 1)[1]
    return address


class Handler:
    """aiosmtpd handler for one listener service: ``smtp`` (incoming) or ``submission``.

    :param holder: the live config; read once per command, so reloads apply to the next one.
    :param store: the durable Maildir store (``deliver(list[Delivery])``).
    :param queue: the outgoing queue for remote recipients of submissions, or None while
        there is none: such recipients then get a temporary error, never accept-and-drop.
    """

    def __init__(self, holder: ConfigHolder, store: MessageStore, service: str, *,
                 resolver: dns.resolver.Resolver | None = None, queue: OutgoingQueue | None = None,
                 hostname: str | None = None, ratelimits: SubmissionRateLimits | None = None,
                 metrics: ServiceMetrics | None = None):
        assert service in ("smtp", "submission")
        self.metrics = metrics or ServiceMetrics("", service)
        self.holder = holder
        self.store = store
        self.service = service
        self.submission = service == "submission"
        self.resolver = resolver
        self.queue = queue
        self.ratelimits = ratelimits
        self.hostname = hostname or holder.get().static.hostname
        self._maildirs: dict[str, str] = {}  # account -> Maildir path (data_dir is static)

    # -- MAIL -----------------------------------------------------------------------------

    async def handle_MAIL(self, server: MoxSMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if _BAD_CHARS.search(address):
            return codes.BAD_SENDER_ADDRESS
        if not self._room_for(server.data_size_limit, mail_options):
            self.metrics.message("rejected", "storage")
            return codes.INSUFFICIENT_STORAGE
        local = self.holder.get().static.localserve
        if local is not None and local.simulate_failures and (sr := special_reply(address, "mail")) is not None:
            return await _simulated(sr)
        if self.submission:
            if not session.authenticated:
                self.metrics.message("rejected", "auth_required")
                return codes.AUTH_REQUIRED
            if address and address != "<>":
                account = self._account_of(session)
                try:
                    owner = lookup(self.holder.get(), _strip_source_route(address)).account
                except (AddressNotFound, ValueError):
                    owner = None
                if owner != account:
                    self.metrics.message("rejected", "sender_not_owned")
                    return codes.SENDER_NOT_OWNED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        tx = _tx(envelope)
        tx.recipients.clear()
        tx.simulated.clear()
        return codes.SENDER_OK

    def _room_for(self, size_limit: int | None, mail_options: list[str]) -> bool:
        """Whether the data directory's file system has the reserve free (mox.toml
        ``min_free_space``, default 1.5 x the size limit as Postfix's ``smtpd_check_queue``) and
        room for the SIZE the client declared (RFC 1870 §6.2)."""
        cfg = self.holder.get()
        reserve = cfg.static.min_free_space
        if reserve is None:
            reserve = (size_limit or 0) * 3 // 2
        declared = next((int(o[5:]) for o in mail_options if o.startswith("SIZE=") and o[5:].isdigit()), 0)
        if not reserve and not declared:
            return True
        try:
            fs = os.statvfs(cfg.data_dir)
        except OSError:  # the write will say what is wrong
            return True
        return fs.f_bavail * fs.f_frsize >= max(reserve, declared)

    # -- RCPT -----------------------------------------------------------------------------

    async def handle_RCPT(self, server: MoxSMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if _BAD_CHARS.search(address):
            return codes.BAD_RECIPIENT_ADDRESS
        if envelope.rcpt_tos and not self.submission and envelope.mail_from in ("<>", ""):
            return codes.NULL_SENDER_ONE_RECIPIENT  # a bounce has one recipient (as mox)
        cfg = self.holder.get()
        addr = _strip_source_route(address)
        try:
            lp, domain = split_address(addr)
        except ValueError:
            return codes.BAD_RECIPIENT_ADDRESS
        tx = _tx(envelope)
        localserve = cfg.static.localserve
        if localserve is not None and localserve.simulate_failures:
            if (sr := special_reply(addr, "rcpt")) is not None:
                return await _simulated(sr)
            if not self.submission and special_reply(addr, "data") is not None:
                tx.simulated.append(addr)
        local = bool(domain) and not domain.startswith("[") and is_local_domain(cfg, domain)
        if localserve is not None and not self.submission and not local:
            # mox localserve: incoming mail for any domain is ours, for its account
            return self._accept(tx, envelope, addr, rcpt_options, Resolved(localserve.account, "Inbox", addr, None, True))
        if not local and not (lp.lower() == "postmaster" and (not domain or domain.lower() == cfg.static.hostname)):
            if not self.submission:
                self.metrics.message("rejected", "relay_denied")
                return codes.RELAY_DENIED
            if not domain or "!" in lp or "%" in lp or domain.startswith("["):
                return codes.BAD_OUTGOING_RECIPIENT
            try:
                to_ascii(domain)
            except ValueError:
                return codes.BAD_RECIPIENT_DOMAIN
            if self.queue is None:
                return codes.QUEUE_UNAVAILABLE
            tx.recipients.append(Recipient(addr, None))
            envelope.rcpt_tos.append(addr)
            envelope.rcpt_options.extend(rcpt_options)
            return codes.RECIPIENT_OK
        try:
            resolved = lookup(cfg, addr)
        except AddressNotFound as exc:
            if localserve is not None and exc.reason == "address_not_found":
                return self._accept(tx, envelope, addr, rcpt_options,
                                    Resolved(localserve.account, "Inbox", addr, None, True))
            if exc.reason == "domain_disabled":
                self.metrics.message("rejected", "domain_disabled")
                return codes.RECIPIENT_DOMAIN_DISABLED
            self.metrics.message("rejected", "no_such_user")
            return codes.NO_SUCH_USER
        dest = resolved.destination
        if dest is not None and dest.smtp_error:
            code, _, text = dest.smtp_error.partition(" ")
            if code == "421":
                return codes.destination_deferred(text)
            return codes.destination_refused(text)
        return self._accept(tx, envelope, addr, rcpt_options, resolved)

    def _accept(self, tx: Transaction, envelope: Envelope, addr: str, rcpt_options: list[str],
                resolved: Resolved) -> str:
        tx.recipients.append(Recipient(addr, resolved))
        envelope.rcpt_tos.append(addr)
        envelope.rcpt_options.extend(rcpt_options)
        return codes.RECIPIENT_OK

    # -- DATA -----------------------------------------------------------------------------

    async def handle_DATA(self, server: MoxSMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.content if isinstance(envelope.content, bytes) else envelope.original_content
        tx = _tx(envelope)
        if tx.simulated:  # mox localserve: a recipient asked for a failure at the end of DATA
            sr = special_reply(tx.simulated[0], "data")
            if sr is not None:
                return await _simulated(sr)
        head = header_section(data)
        found = headers.scan(head, self.hostname)
        if found.received > MAX_HOPS:
            self.metrics.message("rejected", "too_many_hops")
            return codes.TOO_MANY_HOPS
        local = [r for r in tx.recipients if r.resolved is not None]
        remote = [r for r in tx.recipients if r.resolved is None]
        if found.delivered_to and any(r.address.lower() in found.delivered_to for r in local):
            self.metrics.message("rejected", "mail_loop")
            return codes.DELIVERED_TO_LOOP
        from_domain = ""
        account = None
        if self.submission:
            problem, from_domain = self._check_from(session, head)
            if problem:
                self.metrics.message("rejected", "from_header")
                return problem
            account = self._account_of(session)
        peer_ip = session.peer[0] if session.peer else "127.0.0.1"
        helo = session.host_name or ""
        msgid = f"{int(time.time())}.{os.getpid()}.{next(_ids)}"
        received = self._received(server, session, peer_ip, helo, msgid, account)
        extra = b""
        if not self.submission and self.resolver is not None:
            results = await authres.check(data, peer_ip, helo, _sender(envelope), self.resolver)
            extra = results.header(self.hostname, peer_ip)
        if found.drop:  # our authserv-id's Authentication-Results, Return-Path
            data = headers.without(data, found.drop)
        if self.submission and not (found.message_id and found.date):
            data = self._missing_headers(found) + data
        deliveries = []
        return_path = f"Return-Path: <{_sender(envelope)}>\r\n".encode()
        for r in local:
            prefix = return_path + f"Delivered-To: {r.address}\r\n".encode() + extra + received
            deliveries.append(Delivery(self._maildir(r.resolved), data, prefix, r.resolved.mailbox or "Inbox"))
        rate: RateLimitToken | None = None
        if account is not None and self.ratelimits is not None:
            rate = self.ratelimits.prepare(
                account, _sender(envelope), [_canonical(r.address) for r in tx.recipients], len(data))
        try:
            queue_ids = await self._store(envelope, account, from_domain, received, data, remote,
                                          deliveries, rate)
        except RateLimited as exc:
            self.metrics.message("rejected", "rate_limited")
            return exc.reply
        except StorageError as exc:
            self.metrics.message("rejected", "storage")
            log.error("delivery_storage_error", error=str(exc), code=exc.code)
            return exc.reply
        self.metrics.message("accepted", "queued" if queue_ids else "delivered")
        # one line per accepted message, written after the 250 (afterreply.py); for the queue
        # it is also the line of the add, with the ids `mox queue list` shows
        queued = {"account": account, "queue_ids": queue_ids} if queue_ids else {}
        afterreply.later(log.info, "message_accepted", service=self.service, msgid=msgid, size=len(data),
                         local=len(local), remote=len(remote), mail_from=envelope.mail_from, **queued)
        return codes.message_queued(msgid)

    async def _store(self, envelope: Envelope, account: str | None, from_domain: str, received: bytes,
                     data: bytes, remote: list[Recipient], deliveries: list[Delivery],
                     rate: RateLimitToken | None = None) -> list[int]:
        """Make the message durable: queue (with local copies) or local delivery only; the
        new queue ids. The queue checks and counts ``rate`` in the transaction that queues the
        message."""
        if remote:
            signature = b""
            if from_domain:
                sign = functools.partial(dkimsign.sign, self.holder.get(), from_domain, data)
                signature = await asyncio.to_thread(sign) if len(data) > SIGN_IN_THREAD_ABOVE else sign()
            smtputf8 = any(o.upper() == "SMTPUTF8" for o in envelope.mail_options)
            return await self.queue.add(
                account=account, mail_from=_sender(envelope),
                recipients=[r.address for r in remote], data=signature + received + data,
                local_deliveries=deliveries, smtputf8=smtputf8, rate_limit=rate, logged=True,
            )
        if deliveries and rate is not None and self.queue is not None:
            return await self.queue.add(account=account, mail_from=_sender(envelope), recipients=[],
                                        data=data, local_deliveries=deliveries, rate_limit=rate,
                                        logged=True)
        if deliveries:
            await self.store.deliver(deliveries)
        return []

    # -- helpers --------------------------------------------------------------------------

    def _account_of(self, session: Session) -> str | None:
        """The account of the authenticated login name (an address or the account name)."""
        from mox_core.accounts.db import account_for_login

        user = session.auth_data
        if isinstance(user, bytes):
            user = user.decode()
        if not isinstance(user, str):
            return None
        return account_for_login(self.holder.get(), user)

    def _check_from(self, session: Session, head: bytes) -> tuple[str | None, str]:
        """The message From must be one address of the authenticated account: (error, domain)."""
        addr = lean_from_address(head)
        if addr is None:
            msg = BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\r\n")
            froms = msg.get_all("From") or []
            if len(froms) != 1:
                return codes.FROM_NOT_ONE_HEADER, ""
            try:
                header = froms[0]
                addrs = list(header.addresses)
            except Exception:
                return codes.FROM_HEADER_BAD, ""
            if len(addrs) != 1 or header.defects or not addrs[0].addr_spec or "@" not in addrs[0].addr_spec:
                return codes.FROM_NOT_ONE_ADDRESS, ""
            addr = addrs[0].addr_spec
        try:
            owner = lookup(self.holder.get(), addr).account
        except (AddressNotFound, ValueError):
            owner = None
        if owner != self._account_of(session):
            return codes.FROM_NOT_OWNED, ""
        return None, split_address(addr)[1]

    def _missing_headers(self, found: headers.HeaderScan) -> bytes:
        """Message-ID and Date for a submission without them (RFC 6409 §8.2, §8.3), added
        before DKIM signing so the signature covers them."""
        out = b""
        if not found.message_id:
            out += f"Message-ID: <{secrets.token_urlsafe(18)}@{self.hostname}>\r\n".encode()
        if not found.date:
            out += f"Date: {_date_header_now()}\r\n".encode()
        return out

    def _received(self, server: MoxSMTP, session: Session, ip: str, helo: str, msgid: str,
                  account: str | None = None) -> bytes:
        """Our trace field (RFC 5321 §4.4), with the TLS version and cipher of a TLS session
        and the account of an authenticated one, in Postfix's words."""
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        transport = getattr(server, "transport", None)
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        comments = ""
        if tls is not None:
            proto += "S"
            cipher = tls.cipher()
            comments += f"\r\n\t(using {tls.version()} with cipher {cipher[0] if cipher else 'unknown'})"
        elif session.ssl is not None:
            proto += "S"
        if session.authenticated:
            proto += "A"
            if account:
                comments += f"\r\n\t(Authenticated sender: {account})"
        helo_clean = _BAD_CHARS.sub("", helo)[:255] or "unknown"
        when = _date_header_now()
        return (f"Received: from {helo_clean} ([{ip}]){comments}\r\n\tby {self.hostname} (mox) with {proto}"
                f"\r\n\tid {msgid}; {when}\r\n").encode("utf-8", "replace")

    def _maildir(self, resolved: Resolved) -> str:
        """The account's Maildir; remembered per account (path building shows in profiles)."""
        root = self._maildirs.get(resolved.account)
        if root is None:
            root = os.path.join(self.holder.get().data_dir, "accounts", resolved.account, "Maildir")
            if len(self._maildirs) > 10_000:
                self._maildirs.clear()
            self._maildirs[resolved.account] = root
        return root
