"""SMTP replies mox-core sends, as complete reply lines (code, enhanced code, text).

They are plain strings because aiosmtpd handlers return plain status strings: a policy object
can return these constants from ``handle_MAIL``/``handle_RCPT``/``handle_DATA`` and tests compare
replies against them. Enhanced codes are from RFC 3463 (registry: RFC 5248) unless a comment
names another RFC. Texts are short and lower case, like mox's. A reply with a variable part is
a small function here.

Sections: the protocol layer's own replies (limits, smuggling, TLS, AUTH); the policy's
(:mod:`mox_core.smtpserver.handler`: senders, recipients, messages); and the replies worded as
aiosmtpd words them, which carry no enhanced codes.
"""

from __future__ import annotations

__all__ = [
    "ADDRESS_TOO_LONG_RECIPIENT",
    "ADDRESS_TOO_LONG_SENDER",
    "AUTH_ABORTED",
    "AUTH_ALREADY_DONE",
    "AUTH_BAD_BASE64",
    "AUTH_BAD_CREDENTIALS",
    "AUTH_DURING_MAIL",
    "AUTH_ENCRYPTION_REQUIRED",
    "AUTH_NOT_ENABLED",
    "AUTH_NOT_RECOGNIZED",
    "AUTH_REQUIRED",
    "AUTH_SUCCESS",
    "AUTH_SYNTAX",
    "AUTH_THROTTLED",
    "AUTH_UNKNOWN_MECHANISM",
    "BAD_BODY",
    "BAD_LINE_ENDING_IN_DATA",
    "BAD_OUTGOING_RECIPIENT",
    "BAD_RECIPIENT_ADDRESS",
    "BAD_RECIPIENT_DOMAIN",
    "BAD_SENDER_ADDRESS",
    "BAD_SYNTAX",
    "BAD_UTF8",
    "COMMAND_CONTROL_CHARS",
    "DATA_SYNTAX",
    "DEFAULT_OK",
    "DELIVERED_TO_LOOP",
    "DUPLICATE_PARAMETER",
    "EHLO_FIRST",
    "EHLO_SYNTAX",
    "FROM_HEADER_BAD",
    "FROM_NOT_ONE_ADDRESS",
    "FROM_NOT_ONE_HEADER",
    "FROM_NOT_OWNED",
    "HELO_FIRST",
    "IDLE_TIMEOUT",
    "IMPROPER_PIPELINING",
    "INSUFFICIENT_STORAGE",
    "INTERNAL_ERROR",
    "LINE_TOO_LONG",
    "MAIL_PARAMETERS_UNKNOWN",
    "MAIL_SYNTAX",
    "MAIL_SYNTAX_EXTENDED",
    "MALFORMED_ADDRESS",
    "MESSAGE_TOO_BIG",
    "MUST_STARTTLS",
    "NEED_MAIL",
    "NEED_RCPT",
    "NESTED_MAIL",
    "NO_SUCH_USER",
    "NULL_SENDER_ONE_RECIPIENT",
    "NUL_IN_DATA",
    "QUEUE_UNAVAILABLE",
    "RCPT_PARAMETERS_UNKNOWN",
    "RCPT_SYNTAX",
    "RCPT_SYNTAX_EXTENDED",
    "RECIPIENT_DOMAIN_DISABLED",
    "RECIPIENT_OK",
    "RELAY_DENIED",
    "SECURITY_REFUSED",
    "SENDER_NOT_OWNED",
    "SENDER_OK",
    "SIZE_TOO_BIG",
    "SMTPUTF8_DISABLED",
    "SMTPUTF8_REQUIRED",
    "SMTPUTF8_WITH_ARGUMENT",
    "STARTTLS_AFTER_AUTH",
    "START_DATA",
    "STRICT_ASCII",
    "TLS_ALREADY_ACTIVE",
    "TOO_MANY_HOPS",
    "TOO_MANY_RECIPIENTS",
    "TOO_MANY_SESSIONS",
    "TOO_MANY_UNRECOGNIZED",
    "auth_challenge",
    "destination_deferred",
    "destination_refused",
    "greeting",
    "message_queued",
    "split",
    "unrecognized_command",
]


def split(reply: str) -> tuple[int, str, str]:
    """``"451 4.3.0 text"`` -> ``(451, "4.3.0", "text")``: a reply with an enhanced code in the
    parts :class:`mox_core.store.StorageError` takes."""
    code, enhanced, text = reply.split(" ", 2)
    return int(code), enhanced, text


# ---- protocol: limits, smuggling, TLS -----------------------------------------------------

# Generic temporary failure for unexpected errors in a policy object (mox: queue errors give
# 451 4.3.0). RFC 5321 §4.2.2 (451 local error), RFC 3463 X.3.0 (mail system, other).
INTERNAL_ERROR = "451 4.3.0 internal error, try again later"

# RFC 5321 §4.1.5/§4.5.3.1.4 (command line at most 512 octets, 500 = line too long),
# RFC 3463 X.5.2 (syntax error).
LINE_TOO_LONG = "500 5.5.2 line too long"

# Bare CR, NUL or other control characters inside a command line: refused so that none can
# reach a header we write (a CR in the HELO name would start a new header line after our
# Received). RFC 5321 §2.3.8, §4.2.2 (501 syntax error in parameters), RFC 3463 X.5.2.
COMMAND_CONTROL_CHARS = "501 5.5.2 control characters not allowed in command"

# Invalid UTF-8 in a command line when SMTPUTF8 is on: refused rather than decoded with
# replacement characters into an address (Postfix answers "bad UTF-8 syntax" too).
# RFC 6531 §3.3, RFC 3463 X.5.2.
BAD_UTF8 = "500 5.5.2 invalid UTF-8 in command"

# A MAIL parameter given twice (mox answers 501). RFC 5321 §4.1.1.11, RFC 3463 X.5.4
# (invalid command arguments).
DUPLICATE_PARAMETER = "501 5.5.4 duplicate parameter"

# RFC 3207 §4: commands other than NOOP, EHLO, STARTTLS, QUIT before TLS when TLS is required.
MUST_STARTTLS = "530 5.7.0 must issue a STARTTLS command first"

# RFC 3207 §4.2: a second STARTTLS inside TLS (Postfix 554, mox 503). RFC 3463 X.5.1.
TLS_ALREADY_ACTIVE = "503 5.5.1 TLS already active"

# STARTTLS after a successful AUTH would keep an identity established in the clear (mox refuses).
STARTTLS_AFTER_AUTH = "503 5.5.1 STARTTLS not allowed after AUTH"

# RFC 1870 §6.1 (SIZE parameter over the fixed limit => 552), RFC 3463 X.3.4
# (message too big for system).
SIZE_TOO_BIG = "552 5.3.4 message size exceeds fixed maximum message size"

# Less free space on the data directory's file system than the server keeps in reserve
# (mox.toml min_free_space), or than the SIZE the client declared: refused at MAIL, before any
# data is sent, as Postfix does. RFC 5321 §4.2.3 (452 insufficient system storage), RFC 1870
# §6.2, RFC 3463 X.3.1 (mail system full).
INSUFFICIENT_STORAGE = "452 4.3.1 insufficient system storage, try again later"

# Message data larger than the limit, answered after the final dot. RFC 5321 §4.5.3.1.10
# (552 for too much mail data), RFC 3463 X.3.4.
MESSAGE_TOO_BIG = "552 5.3.4 message too big"

# RFC 5321 §4.5.3.1.10 (recipients buffer: 452, at least 100 must be accepted),
# RFC 3463 X.5.3 (too many recipients).
TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients"

# Port 25: a message with the null reverse-path (a bounce, RFC 5321 §4.5.5) has one recipient;
# more is backscatter spam. As mox. RFC 3463 X.5.3 (too many recipients).
NULL_SENDER_ONE_RECIPIENT = "452 4.5.3 only one recipient for a message with the null sender"

# Bare CR or bare LF anywhere in message data, which includes every SMTP smuggling form
# (\n.\n, \n.\r\n, \r\n.\n, \r.\r, ...). RFC 5321 §2.3.8 (CR and LF only as CRLF) and §4.1.4.
# RFC 3463 X.6.0 (other media error): X.6.0 is used rather than an unregistered detail code.
BAD_LINE_ENDING_IN_DATA = "554 5.6.0 bare carriage return or linefeed in message"

# NUL in message data. RFC 5322 §3.5/§2.3 and RFC 6152 §3 (8bit data has no NUL); we do not
# offer BINARYMIME. A NUL next to the final dot is an SMTP smuggling form against servers
# that strip NULs (".\0" or "\0." on a line of its own). RFC 3463 X.6.0.
NUL_IN_DATA = "554 5.6.0 NUL character in message"

# A client that sent commands it had to hold back: before our greeting, after DATA in the same
# group, or ahead at all after HELO (not EHLO); the connection is then closed. RFC 2920 §3.1
# (DATA, EHLO ... only as the last command of a group; pipelining only after EHLO offered it),
# RFC 5321 §4.3.1 and §3.1 (a client waits for the greeting; 554 in place of it), RFC 3463
# X.5.0 (other protocol status). Postfix's smtpd_forbid_unauth_pipelining answers alike.
IMPROPER_PIPELINING = "554 5.5.0 smtp protocol synchronization error: improper command pipelining"

# Idle timeout: RFC 5321 §4.5.3.2 (server timeout at least 5 minutes, then 421),
# RFC 3463 X.4.2 (bad connection).
IDLE_TIMEOUT = "421 4.4.2 idle timeout, closing connection"

# One client address has as many sessions open as the listener allows
# (``smtp_max_sessions_per_ip``; Postfix: "421 4.7.0 ... too many connections from ...").
# RFC 5321 §3.8 (421: service not available, closing the channel), RFC 3463 X.7.0.
TOO_MANY_SESSIONS = "421 4.7.0 too many connections from your address, try again later"

# ---- AUTH (RFC 4954) ----------------------------------------------------------------------

# RFC 4954 §6: 235 2.7.0 Authentication Succeeded.
AUTH_SUCCESS = "235 2.7.0 authentication successful"

# RFC 4954 §6: 535 5.7.8 Authentication credentials invalid. Same text for unknown users and
# wrong passwords so the reply is no user-existence oracle (mox: "bad user/pass").
AUTH_BAD_CREDENTIALS = "535 5.7.8 bad user/pass"

# RFC 4954 §6: 538 5.7.11 Encryption required for requested authentication mechanism.
AUTH_ENCRYPTION_REQUIRED = "538 5.7.11 encryption required for requested authentication mechanism"

# RFC 4954 §4: the client cancelled with "*", the server MUST reply 501.
AUTH_ABORTED = "501 5.0.0 authentication cancelled"

# RFC 4954 §4: a response that is not valid base64 gets 501 with enhanced code 5.5.2.
AUTH_BAD_BASE64 = "501 5.5.2 malformed base64 or authentication data"

# RFC 4954 §4 syntax: "AUTH" SP sasl-mech [SP initial-response]; RFC 3463 X.5.4.
AUTH_SYNTAX = "501 5.5.4 syntax: AUTH mechanism [initial-response]"

# RFC 4954 §4: 504 5.5.4 for an unknown mechanism.
AUTH_UNKNOWN_MECHANISM = "504 5.5.4 unrecognized authentication type"

# RFC 4954 §4: AUTH after a successful AUTH => 503.
AUTH_ALREADY_DONE = "503 5.5.1 already authenticated"

# RFC 4954 §4: "The AUTH command is not permitted during a mail transaction" => 503.
AUTH_DURING_MAIL = "503 5.5.1 no AUTH during mail transaction"

# AUTH on a listener without a credential store. RFC 5321 §4.2.4 (502 not implemented).
AUTH_NOT_ENABLED = "502 5.5.1 authentication not enabled"

# Too many failed logins from this IP in the last minute (10, as mox allows; mox also answers
# 421 4.7.0 and closes). RFC 5321 §3.8 (421 closes the channel), RFC 3463 X.7.0 (security,
# other).
AUTH_THROTTLED = "421 4.7.0 too many authentication failures"

# ---- policy: senders, recipients, messages (smtpserver/handler.py) ------------------------

# RFC 5321 §4.2.2 (501 syntax error in parameters), RFC 3463 X.1.7 (bad sender's mailbox
# address syntax): control characters in the MAIL FROM address.
BAD_SENDER_ADDRESS = "501 5.1.7 bad sender address"

# RFC 4954 §6: 530 5.7.0 Authentication required (MAIL on submission before AUTH).
AUTH_REQUIRED = "530 5.7.0 authentication required"

# RFC 6409 §6.1: an MSA may refuse a MAIL FROM the authenticated user may not use, with 550
# and 5.7.1 (delivery not authorized).
SENDER_NOT_OWNED = "550 5.7.1 mail from address must belong to the authenticated account"

# RFC 5321 §4.1.1.2 (250 for an accepted MAIL), RFC 3463 X.1.0 (other address status).
SENDER_OK = "250 2.1.0 sender ok"

# RFC 5321 §4.2.2 (501), RFC 3463 X.1.3 (bad destination mailbox address syntax).
BAD_RECIPIENT_ADDRESS = "501 5.1.3 bad recipient address"

# Not one of our domains on the incoming SMTP service: no open relay. RFC 5321 §3.6 (a server
# need not relay; it refuses with 550 at RCPT), RFC 3463 X.7.1 (delivery not authorized).
RELAY_DENIED = "550 5.7.1 relaying not permitted"

# A remote recipient of a submission we will not send to: no domain, a domain literal, or a
# "%" or "!" route in the local part. RFC 3463 X.1.3.
BAD_OUTGOING_RECIPIENT = "550 5.1.3 bad recipient address for outgoing mail"

# A remote recipient's domain that is no valid IDNA name. RFC 3463 X.1.3.
BAD_RECIPIENT_DOMAIN = "501 5.1.3 bad recipient domain"

# A remote recipient while there is no outgoing queue, or a worker process whose link to the
# main process (which queues) is gone: temporary, never accept-and-drop. RFC 5321 §4.2.2
# (451 local error), RFC 3463 X.3.0. Also the reply of server/handoff.py.
QUEUE_UNAVAILABLE = "451 4.3.0 outgoing queue not available, try again later"

# RFC 5321 §4.1.1.3 (250 for an accepted RCPT), RFC 3463 X.1.5 (destination address valid).
RECIPIENT_OK = "250 2.1.5 recipient ok"

# The recipient's domain is disabled in the configuration. RFC 5321 §4.2.2 (450 mailbox
# unavailable, temporary), RFC 3463 X.2.1 (mailbox disabled).
RECIPIENT_DOMAIN_DISABLED = "450 4.2.1 recipient domain temporarily disabled"

# RFC 5321 §4.2.2 (550 mailbox unavailable), RFC 3463 X.1.1 (bad destination mailbox address).
NO_SUCH_USER = "550 5.1.1 no such user"


def destination_deferred(text: str) -> str:
    """A destination's configured ``smtp_error`` with code 421: temporary (RFC 3463 X.3.0)."""
    return f"451 4.3.0 {text or 'error processing'}"


def destination_refused(text: str) -> str:
    """A destination's configured ``smtp_error`` with any other code: permanent, as an unknown
    user (RFC 3463 X.1.1)."""
    return f"550 5.1.1 {text or 'no such user(s)'}"


# More than MAX_HOPS Received header fields: a mail loop. RFC 5321 §6.3 (loop detection by
# counting Received header fields), RFC 3463 X.4.6 (routing loop detected).
TOO_MANY_HOPS = "554 5.4.6 too many hops"

# The message already carries a Delivered-To field naming the recipient it is being delivered
# to: it went round (Postfix's local delivery refuses it alike, "mail forwarding loop").
# RFC 5321 §6.3 (loop detection), RFC 3463 X.4.6 (routing loop detected).
DELIVERED_TO_LOOP = "554 5.4.6 mail forwarding loop: message was already delivered to this recipient"

# The From check of submissions. RFC 5322 §3.6 (exactly one From field), RFC 6409 §6.3 (an MSA
# may refuse a message inconsistent with the submitting user's rights: 550 with 5.7.1).
FROM_NOT_ONE_HEADER = "550 5.7.1 message must have exactly one From header"
FROM_HEADER_BAD = "550 5.7.1 bad From header"
FROM_NOT_ONE_ADDRESS = "550 5.7.1 From header must have exactly one valid address"
FROM_NOT_OWNED = "550 5.7.1 From address must belong to the authenticated account"


def message_queued(msgid: str) -> str:
    """The reply to DATA once the message is durable. RFC 5321 §4.1.1.4 (250 after the final
    dot), RFC 3463 X.0.0; the id is the one in the Received header and the log."""
    return f"250 2.0.0 message queued as {msgid}"


# ---- worded as aiosmtpd words them ---------------------------------------------------------
# MoxSMTP answers these as aiosmtpd's own SMTP class does, so a client sees the same protocol
# from both (tests/test_smtp_protocol.py compares transcripts of the two byte for byte). Most
# carry no enhanced code: aiosmtpd gives none.


def greeting(hostname: str, ident: str) -> str:
    """RFC 5321 §3.1: the 220 greeting, the server's name first."""
    return f"220 {hostname} {ident}"


# aiosmtpd's 250 when no handler hook answers MAIL, RCPT or DATA itself (mox's Handler always
# answers with its own: SENDER_OK, RECIPIENT_OK, message_queued).
DEFAULT_OK = "250 OK"

# An empty command line, or a command verb that is not ASCII. RFC 5321 §4.2.2 (500).
BAD_SYNTAX = "500 Error: bad syntax"

# A non-ASCII argument while SMTPUTF8 is off. RFC 6531 §3.3 (UTF-8 only once negotiated).
STRICT_ASCII = "500 Error: strict ASCII mode"

# Any command but QUIT after the handler's STARTTLS hook refused the TLS session.
SECURITY_REFUSED = "554 Command refused due to lack of security"

# The fifth unknown command on a connection; the connection is then closed.
TOO_MANY_UNRECOGNIZED = "502 5.5.1 Too many unrecognized commands, goodbye."


def unrecognized_command(command: str) -> str:
    """RFC 5321 §4.2.4: 500 for a command the server does not know."""
    return f'500 Error: command "{command}" not recognized'


# RFC 5321 §4.1.1.1: EHLO takes a domain or address literal.
EHLO_SYNTAX = "501 Syntax: EHLO hostname"

# MAIL or RCPT without a usable path; the extended form after EHLO (RFC 5321 §4.1.1.2 and
# §4.1.1.3: the paths may be followed by parameters).
MAIL_SYNTAX = "501 Syntax: MAIL FROM: <address>"
MAIL_SYNTAX_EXTENDED = MAIL_SYNTAX + " [SP <mail-parameters>]"
RCPT_SYNTAX = "501 Syntax: RCPT TO: <address>"
RCPT_SYNTAX_EXTENDED = RCPT_SYNTAX + " [SP <mail-parameters>]"

# An address the email package cannot parse. RFC 5321 §4.2.2 (553 mailbox name not allowed),
# RFC 3463 X.1.3.
MALFORMED_ADDRESS = "553 5.1.3 Error: malformed address"

# RFC 5321 §4.1.4 (a session starts with EHLO or HELO) and §4.2.2 (503 bad sequence).
HELO_FIRST = "503 Error: send HELO first"
EHLO_FIRST = "503 Error: send EHLO first"  # AUTH needs EHLO (RFC 4954 §4)

# RFC 5321 §4.1.4: MAIL inside a transaction is a bad sequence (503).
NESTED_MAIL = "503 Error: nested MAIL command"

# RFC 6152 §2 (BODY=7BIT or 8BITMIME); we do not offer BINARYMIME.
BAD_BODY = "501 Error: BODY can only be one of 7BIT, 8BITMIME"

# RFC 6531 §3.4: the SMTPUTF8 parameter has no value.
SMTPUTF8_WITH_ARGUMENT = "501 Error: SMTPUTF8 takes no arguments"
SMTPUTF8_DISABLED = "501 Error: SMTPUTF8 disabled"

# RFC 6531 §3.4: an address with non-ASCII characters in a transaction that did not declare
# SMTPUTF8 on MAIL. RFC 6531 §3.6.1 (X.6.7: non-ASCII addresses not permitted).
SMTPUTF8_REQUIRED = "553 5.6.7 non-ASCII address needs SMTPUTF8 on MAIL FROM"

# RFC 5321 §4.5.3.1: a domain is at most 255 octets; local-parts over 128 octets are refused as
# mox does (RFC 5321's 64 is not enforced: SRS and VERP senders exceed it, and §4.5.3.1 asks
# servers to be liberal). RFC 3463 X.1.7 (bad sender address syntax), X.1.3 (recipient).
ADDRESS_TOO_LONG_SENDER = "501 5.1.7 sender address too long (RFC 5321 section 4.5.3.1)"
ADDRESS_TOO_LONG_RECIPIENT = "501 5.1.3 recipient address too long (RFC 5321 section 4.5.3.1)"

# RFC 5321 §4.1.1.11: parameters the server does not recognize or implement get 555.
MAIL_PARAMETERS_UNKNOWN = "555 MAIL FROM parameters not recognized or not implemented"
RCPT_PARAMETERS_UNKNOWN = "555 RCPT TO parameters not recognized or not implemented"

# RFC 5321 §4.1.4 and §4.2.2 (503 bad sequence): RCPT before MAIL, DATA before RCPT.
NEED_MAIL = "503 Error: need MAIL command"
NEED_RCPT = "503 Error: need RCPT command"

# RFC 5321 §4.1.1.4: DATA takes no argument.
DATA_SYNTAX = "501 Syntax: DATA"

# RFC 5321 §4.1.1.4 and §4.3.2: 354, then the data up to CRLF.CRLF.
START_DATA = "354 End data with <CR><LF>.<CR><LF>"

# AUTH in a HELO (not EHLO) session: the extension was never offered (RFC 4954 §4).
AUTH_NOT_RECOGNIZED = "500 Error: command 'AUTH' not recognized"


def auth_challenge(encoded: bytes) -> bytes:
    """RFC 4954 §4: ``334`` SP and the base64-encoded server challenge (may be empty)."""
    return b"334 " + encoded
