"""SMTP replies mox-core sends, as complete reply lines (code, enhanced code, text).

They are plain strings because aiosmtpd handlers return plain status strings: a policy object
can return these constants from ``handle_MAIL``/``handle_RCPT``/``handle_DATA`` and tests compare
replies against them. Enhanced codes are from RFC 3463 (registry: RFC 5248) unless a comment
names another RFC. Texts are short and lower case, like mox's.
"""

from __future__ import annotations

__all__ = [
    "AUTH_ABORTED",
    "AUTH_ALREADY_DONE",
    "AUTH_BAD_BASE64",
    "AUTH_BAD_CREDENTIALS",
    "AUTH_DURING_MAIL",
    "AUTH_ENCRYPTION_REQUIRED",
    "AUTH_NOT_ENABLED",
    "AUTH_SUCCESS",
    "AUTH_SYNTAX",
    "AUTH_THROTTLED",
    "AUTH_UNKNOWN_MECHANISM",
    "BAD_LINE_ENDING_IN_DATA",
    "BAD_UTF8",
    "COMMAND_CONTROL_CHARS",
    "DUPLICATE_PARAMETER",
    "IDLE_TIMEOUT",
    "INTERNAL_ERROR",
    "LINE_TOO_LONG",
    "MESSAGE_TOO_BIG",
    "MUST_STARTTLS",
    "NUL_IN_DATA",
    "SIZE_TOO_BIG",
    "STARTTLS_AFTER_AUTH",
    "TLS_ALREADY_ACTIVE",
    "TOO_MANY_RECIPIENTS",
]


# Generic temporary failure for unexpected errors in a policy object (mox: queue errors give
# 451 4.3.0). RFC 5321 §4.2.2 (451 local error), RFC 3463 X.3.0 (mail system, other).
INTERNAL_ERROR = "451 4.3.0 internal error, try again later"

# RFC 5321 §4.1.5/§4.5.3.1.4 (command line at most 512 octets, 500 = line too long),
# RFC 3463 X.5.2 (syntax error).
LINE_TOO_LONG = "500 5.5.2 line too long"

# Bare CR, NUL or other control characters inside a command line (header injection into
# Received from HELO, reliability catalogue B.24). RFC 5321 §2.3.8, §4.2.2 (501 syntax error
# in parameters), RFC 3463 X.5.2.
COMMAND_CONTROL_CHARS = "501 5.5.2 control characters not allowed in command"

# Invalid UTF-8 in a command line when SMTPUTF8 is on (reliability catalogue B.33; Postfix
# "bad UTF-8 syntax"). RFC 6531 §3.3, RFC 3463 X.5.2.
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

# Message data larger than the limit, answered after the final dot. RFC 5321 §4.5.3.1.10
# (552 for too much mail data), RFC 3463 X.3.4.
MESSAGE_TOO_BIG = "552 5.3.4 message too big"

# RFC 5321 §4.5.3.1.10 (recipients buffer: 452, at least 100 must be accepted),
# RFC 3463 X.5.3 (too many recipients).
TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients"

# Bare CR or bare LF anywhere in message data, which includes every SMTP smuggling form
# (\n.\n, \n.\r\n, \r\n.\n, \r.\r, ...). RFC 5321 §2.3.8 (CR and LF only as CRLF) and §4.1.4.
# RFC 3463 X.6.0 (other media error): X.6.0 is used rather than an unregistered detail code.
BAD_LINE_ENDING_IN_DATA = "554 5.6.0 bare carriage return or linefeed in message"

# NUL in message data. RFC 5322 §3.5/§2.3 and RFC 6152 §3 (8bit data has no NUL); we do not
# offer BINARYMIME. A NUL next to a dot is a smuggling form against servers that strip NUL
# (smtpsmug "nullbefore/nullafter"). RFC 3463 X.6.0.
NUL_IN_DATA = "554 5.6.0 NUL character in message"

# Idle timeout: RFC 5321 §4.5.3.2 (server timeout at least 5 minutes, then 421),
# RFC 3463 X.4.2 (bad connection).
IDLE_TIMEOUT = "421 4.4.2 idle timeout, closing connection"

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

# Too many failed logins from this IP in the last minute (mox limitauth: 10/min, answers
# "421 4.7.0 too many auth failures" and closes). RFC 5321 §3.8 (421 closes the channel),
# RFC 3463 X.7.0 (security, other).
AUTH_THROTTLED = "421 4.7.0 too many authentication failures"
