"""MAIL and RCPT: the commands that build the envelope, and the parsing of their paths.

Mixed into :class:`mox_core.smtpserver.protocol.MoxSMTP` (whose ``__init__`` sets the state
these methods use); the replies, their order and the values handed to the handler's
``handle_MAIL``/``handle_RCPT`` hooks are aiosmtpd's, only faster to compute.

This is on every message's path: one regex for a ``<local@domain>`` path made of atext (nearly
all of them) where aiosmtpd builds a ``typing.Protocol`` class and runs the ``email`` header
parser per command; anything else still goes through that parser, so the result is the same
(tests/test_smtp_protocol.py compares the two on 20,000 random paths).
"""

from __future__ import annotations

import re
from email._header_value_parser import get_addr_spec, get_angle_addr
from typing import TYPE_CHECKING

from aiosmtpd.smtp import MISSING, syntax

from mox_core.smtp import codes

if TYPE_CHECKING:
    from aiosmtpd.smtp import Envelope, Session

__all__ = ["MailRcptCommands"]

# RFC 5321 §4.1.2 Dot-string / atext (ASCII). Addresses made only of these match the fast
# path; for them the email package returns exactly the text between the brackets.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_FAST_ADDRESS = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})>")

# RFC 5321 §4.5.3.1.2: a domain is at most 255 octets. §4.5.3.1.1 says 64 for a local-part,
# but asks servers to impose no limit where they can, and SRS and VERP senders exceed 64: the
# hard limit is mox's, 128 (codes.ADDRESS_TOO_LONG_*).
MAX_DOMAIN = 255
MAX_LOCAL_PART = 128


class MailRcptCommands:
    """``smtp_MAIL``, ``smtp_RCPT`` and their parsing (``_getaddr`` also serves aiosmtpd's
    inherited ``smtp_VRFY``)."""

    # Set by MoxSMTP.__init__ and aiosmtpd's connection_made; listed for the reader.
    session: Session
    envelope: Envelope
    enable_SMTPUTF8: bool
    data_size_limit: int | None
    max_recipients: int
    local_part_limit: int  # aiosmtpd's class attribute: 0, no limit

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Parse ``<address> params`` as aiosmtpd does, fast for plain dot-atom addresses."""
        if not arg:
            return "", ""
        m = _FAST_ADDRESS.match(arg)
        if m is not None:
            rest = arg[m.end():]
            if rest and (rest[0] not in " \t" or "(" in rest):
                return self._getaddr_slow(arg)  # a comment or odd spacing: let email decide
            addr, rest = m.group(1), rest.lstrip()  # email's get_cfws strips the same way
        elif arg.startswith("<>"):
            return "<>", arg[2:]  # email keeps the text after "<>" unstripped
        else:
            return self._getaddr_slow(arg)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def _getaddr_slow(self, arg: str) -> tuple[str | None, str | None]:
        try:
            if arg.lstrip().startswith("<"):
                address, rest = get_angle_addr(arg)
            else:
                address, rest = get_addr_spec(arg)
            addr = address.addr_spec
        except Exception:  # HeaderParseError, and IndexError for input like "<"
            return None, None
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def _syntax_error(self, keyword: str) -> str:
        if keyword == "FROM:":
            return codes.MAIL_SYNTAX_EXTENDED if self.session.extended_smtp else codes.MAIL_SYNTAX
        return codes.RCPT_SYNTAX_EXTENDED if self.session.extended_smtp else codes.RCPT_SYNTAX

    def _parse_path(self, arg: str | None, keyword: str) -> tuple[str, list[str]] | str:
        """MAIL/RCPT argument (``FROM:<addr> params``): the address and the options as
        aiosmtpd gives them to hooks (upper case); or the error reply."""
        arg = self._strip_command_keyword(keyword, arg) if arg is not None else None
        if arg is None:
            return self._syntax_error(keyword)
        address, rest = self._getaddr(arg)
        if address is None:
            return codes.MALFORMED_ADDRESS
        if not address or (not self.session.extended_smtp and rest):
            return self._syntax_error(keyword)
        if len(address) > MAX_LOCAL_PART:  # octets, as UTF-8 (RFC 6531 §3.3)
            local, _, domain = address.encode(errors="replace").rpartition(b"@")
            if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
                return codes.ADDRESS_TOO_LONG_SENDER if keyword == "FROM:" else codes.ADDRESS_TOO_LONG_RECIPIENT
        return address, rest.upper().split() if rest else []

    def _parse_params(self, options: list[str], keyword: str) -> dict[str, str | bool] | str:
        """RFC 5321 §4.1.2 esmtp-params as a dict; or the error reply (501)."""
        params: dict[str, str | bool] = {}
        for word in options:
            key, eq, value = word.partition("=")
            if not key.isalnum() or (eq and not value):
                return self._syntax_error(keyword)
            if key in params:
                return codes.DUPLICATE_PARAMETER
            params[key] = value if eq else True
        return params

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        envelope = self.envelope
        if not self.session.host_name:
            await self.push(codes.HELO_FIRST)
            return
        parsed = self._parse_path(arg, "FROM:")
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        if envelope.mail_from:
            await self.push(codes.NESTED_MAIL)
            return
        address, mail_options = parsed
        params = self._parse_params(mail_options, "FROM:")
        if isinstance(params, str):
            await self.push(params)
            return
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            await self.push(codes.BAD_BODY)
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if smtputf8 is not True and smtputf8 is not False:
            await self.push(codes.SMTPUTF8_WITH_ARGUMENT)
            return
        if smtputf8 and not self.enable_SMTPUTF8:
            await self.push(codes.SMTPUTF8_DISABLED)
            return
        if not smtputf8 and not address.isascii():
            await self.push(codes.SMTPUTF8_REQUIRED)
            return
        envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size is not None:
            if size is True or not (size.isascii() and size.isdigit()):
                await self.push(self._syntax_error("FROM:"))
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                await self.push(codes.SIZE_TOO_BIG)
                return
        if params:
            await self.push(codes.MAIL_PARAMETERS_UNKNOWN)
            return
        status = await self._call_handler_hook("MAIL", address, mail_options)
        if status is MISSING:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            status = codes.DEFAULT_OK
        await self.push(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        if not self.session.host_name:
            await self.push(codes.HELO_FIRST)
            return
        if not envelope.mail_from:
            await self.push(codes.NEED_MAIL)
            return
        if len(envelope.rcpt_tos) >= self.max_recipients:
            await self.push(codes.TOO_MANY_RECIPIENTS)
            return
        parsed = self._parse_path(arg, "TO:")
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, rcpt_options = parsed
        params = self._parse_params(rcpt_options, "TO:")
        if isinstance(params, str):
            await self.push(params)
            return
        if not envelope.smtp_utf8 and not address.isascii():
            await self.push(codes.SMTPUTF8_REQUIRED)
            return
        if params:  # no RCPT parameters are supported
            await self.push(codes.RCPT_PARAMETERS_UNKNOWN)
            return
        status = await self._call_handler_hook("RCPT", address, rcpt_options)
        if status is MISSING:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            status = codes.DEFAULT_OK
        await self.push(status)
