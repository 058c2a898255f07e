"""Property tests (hypothesis) of what parses untrusted input: SMTP sessions and their command
and address parsers, end-of-data detection, header folding, and the config loader.

In CI the examples are a fixed, derandomized set (profile "ci", the default, see
tests/security/conftest.py); ``HYPOTHESIS_PROFILE=long`` searches longer and at random.
Coverage-guided fuzzing of the same session runs by hand: tests/security/fuzz_smtp.py.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import tomlkit
from hypothesis import given
from hypothesis import strategies as st

from mox_core.smtp import codes
from mox_core.smtp.domain import to_ascii
from mox_core.smtp.lines import only_crlf
from mox_core.smtpserver.protocol import MoxSMTP
from tests.security import memsession
from tests.security.memsession import Policy

# ---- a whole SMTP session over an in-memory transport ------------------------------------


async def run_session(chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Feed ``chunks`` as separate reads into one MoxSMTP session; return its output and the
    messages it handed to the policy."""
    policy = Policy()
    proto = MoxSMTP(policy, hostname="mx.test", max_message_size=2048, max_recipients=3, idle_timeout=60,
                    loop=asyncio.get_running_loop())
    return await memsession.run_session(proto, chunks), policy.messages


VERBS = [b"EHLO x", b"HELO x", b"MAIL FROM:<a@b.test>", b"MAIL FROM:<>", b"RCPT TO:<u@l.test>", b"DATA", b"RSET",
         b"NOOP", b"QUIT", b"VRFY u", b"STARTTLS", b"AUTH PLAIN", b"HELP", b".", b"", b"MAIL FROM:<a@b> SIZE=9",
         b"RCPT TO:<@r:u@l.test>", b"BDAT 1"]
PIECES = st.one_of(st.sampled_from(VERBS), st.binary(max_size=40),
                   st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"\x00", b"\r\n.\r\n", b"\xff", b" "]))
STREAM = st.lists(PIECES, max_size=30).map(lambda parts: b"".join(p + (b"\r\n" if i % 3 == 0 else b"")
                                                                    for i, p in enumerate(parts)))


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a] or [b""]


@given(STREAM, st.lists(st.integers(min_value=0), max_size=6))
def test_any_command_stream_is_answered_without_internal_errors(data, cuts):
    out, messages = asyncio.run(run_session(_cut(data, cuts)))
    assert out.startswith(b"220 ")
    assert codes.INTERNAL_ERROR.encode() not in out  # no exception the protocol did not expect
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), out
    for m in messages:  # smuggling: what was taken as a message never has a bare CR or LF
        assert only_crlf(m) and b"\x00" not in m


IMPROPER = codes.IMPROPER_PIPELINING.encode()


def _until_refused(out: bytes) -> bytes:
    """The replies before a 554 for improper pipelining (all of them if there is none)."""
    i = out.find(IMPROPER)
    return out if i < 0 else out[:i]


@given(STREAM, st.lists(st.integers(min_value=0), min_size=1, max_size=6))
def test_the_same_stream_split_differently_gets_the_same_replies(data, cuts):
    """How the stream is cut into reads changes nothing, except whether commands arrived
    ahead of a reply the client had to wait for (RFC 2920 §3.1): then one run ends early with
    554 5.5.0, and until that reply both runs answered the same."""
    whole, whole_messages = asyncio.run(run_session([data]))
    split, split_messages = asyncio.run(run_session(_cut(data, cuts)))
    if whole == split:
        assert whole_messages == split_messages
    else:
        assert IMPROPER in whole + split, (whole, split)
        a, b = _until_refused(whole), _until_refused(split)
        assert a.startswith(b) or b.startswith(a), (whole, split)


# ---- MAIL/RCPT argument and address parsing -------------------------------------------------

ADDRESS_TEXT = st.one_of(
    st.text(max_size=80),
    st.builds(lambda lp, d, params: f"<{lp}@{d}>{params}",
              st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=70),
              st.text(alphabet="abc.-_[]:0123456789xn--", max_size=270),
              st.sampled_from(["", " SIZE=10", " BODY=8BITMIME", " SMTPUTF8", " X=1", "  SIZE=", " (c)"])),
)


def _proto() -> MoxSMTP:
    loop = asyncio.new_event_loop()
    proto = MoxSMTP(Policy(), hostname="mx.test", loop=loop)
    proto.session = proto._create_session()
    proto.session.extended_smtp = True
    loop.close()
    return proto


PROTO = _proto()


@given(st.sampled_from(["FROM:", "TO:"]), ADDRESS_TEXT)
def test_mail_and_rcpt_arguments_parse_or_get_a_reply(keyword, text):
    arg = f"{keyword}{text}"
    result = PROTO._parse_path(arg, keyword)
    if isinstance(result, str):
        assert result[:3] in ("501", "553", "555"), result
        return
    address, params = result
    assert isinstance(address, str) and address and isinstance(params, list)
    parsed = PROTO._parse_params(params, keyword)
    assert isinstance(parsed, (dict, str))


@given(st.text(max_size=300))
def test_domains_are_ascii_and_valid_or_refused(domain):
    try:
        a = to_ascii(domain)
    except ValueError:
        return
    assert a.isascii() and a == a.lower() and len(a) <= 253 and not a.endswith(".")
    assert to_ascii(a) == a


# ---- end of data: any split of the stream into reads gives the same result ----------------

BODY_PIECES = st.sampled_from([b"a", b"text ", b".", b"..", b"\r\n", b"\r", b"\n", b"\x00", b"\r\n.", b".\r\n",
                               b"\r\n.\r\n", b"\r\n..\r\n", b"\xc3\xa9"])


def reference(stream: bytes) -> tuple[bytes | str, bytes]:
    """What DATA must return for ``stream`` (the bytes after the 354), and what is left over:
    only CRLF.CRLF (the CRLF of the DATA line counts) ends the data."""
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n")
    raw, rest = framed[2:end + 2], framed[end + 5:]
    if not only_crlf(raw):
        return codes.BAD_LINE_ENDING_IN_DATA, rest
    if b"\x00" in raw:
        return codes.NUL_IN_DATA, rest
    unstuffed = raw.replace(b"\r\n.", b"\r\n")
    return (unstuffed[1:] if unstuffed.startswith(b".") else unstuffed), rest


async def read_data(chunks: list[bytes], limit: int) -> tuple[bytes | str, bytes]:
    proto = MoxSMTP(Policy(), hostname="mx.test", max_message_size=None)
    reader = asyncio.StreamReader(limit=limit)
    proto._reader = reader
    task = asyncio.ensure_future(proto._read_data())
    for chunk in chunks:
        await asyncio.sleep(0)
        reader.feed_data(chunk)
    reader.feed_eof()
    result = await asyncio.wait_for(task, 5)
    return result, reader._buffer and bytes(reader._buffer) or b""


@given(st.lists(BODY_PIECES, max_size=40), st.lists(st.integers(min_value=0), max_size=8),
       st.sampled_from([8, 64, 65536]))
def test_end_of_data_is_found_the_same_for_any_split(pieces, cuts, limit):
    stream = b"".join(pieces) + b"\r\n.\r\nNOOP\r\n"
    expected = reference(stream)
    got = asyncio.run(read_data(_cut(stream, cuts), limit))
    assert got == expected


# ---- header folding ---------------------------------------------------------------------

# (separator, token) as the DKIM-Signature is built: a separator is white space or nothing
# (a break replaces it), anything else (":" of h=) belongs to the token.
TOKENS = st.lists(st.tuples(st.sampled_from([" ", ""]),
                            st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789=;+/.-:", min_size=1, max_size=90)),
                  max_size=30)


@given(TOKENS)
def test_folded_dkim_header_lines_are_short_and_unfold_to_the_same_field(tokens):
    from mox_core.outgoing.dkimsign import LINE_WIDTH, _fold, canonical_header

    folded = _fold(tokens, "DKIM-Signature:")
    lines = folded.split("\r\n")
    assert all(line.startswith("\t") for line in lines[1:])
    assert "\r" not in folded.replace("\r\n", "") and "\n" not in folded.replace("\r\n", "")
    for line in lines:
        longest = max((len(t) for _, t in tokens), default=0) + 1
        assert len(line) <= max(LINE_WIDTH, longest), line
    # RFC 6376 relaxed canonicalization: folding whitespace does not change the signed field
    flat = "DKIM-Signature:" + "".join(sep + t for sep, t in tokens)
    assert canonical_header(folded.encode() + b"\r\n", "relaxed").replace(b" ", b"") == \
        canonical_header(flat.encode() + b"\r\n", "relaxed").replace(b" ", b"")


@given(st.text(max_size=300))
def test_received_header_from_any_helo_is_one_clean_field(helo):
    import email.parser
    import email.policy
    from types import SimpleNamespace

    from mox_core.smtpserver.handler import Handler

    handler = Handler.__new__(Handler)
    handler.hostname = "mx.test"
    session = SimpleNamespace(extended_smtp=True, ssl=None, authenticated=False)
    field = handler._received(SimpleNamespace(transport=None), session, "192.0.2.1", helo, "1.2.3")
    assert field.endswith(b"\r\n") and only_crlf(field)
    lines = field.split(b"\r\n")[:-1]
    assert lines[0].startswith(b"Received: from ") and all(line.startswith(b"\t") for line in lines[1:])
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(field + b"\r\nbody\r\n")
    assert list(msg.keys()) == ["Received"]


# ---- the config loader: an error naming the problem, or a config; never a traceback --------

KEYS = ["domains", "accounts", "routes", "destinations", "example.org", "admin", "a", "kind", "transport",
        "to_domain", "localpart_catchall_separators", "disabled", "dkim", "selectors", "sign",
        "max_outgoing_messages_per_day", "smtp_error", "mailbox", "quota_message_size", "web_handlers",
        "path_regexp", "rate_limiters", "domain", "mta_sts", "mode", "admin@example.org", "@example.org"]
SCALARS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=20), st.booleans(),
                    st.floats(allow_nan=False), st.sampled_from(["direct", "^/", "[", "example.org", "enforce"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=20)
DOCS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)

_HOST = None


def _load(static: str, domains: str):
    from mox_core.config.loader import load_config
    from mox_core.errors import ConfigError
    from mox_core.plugins.host import PluginHost
    from mox_core.testing import write_config

    global _HOST
    _HOST = _HOST or PluginHost.load()
    with tempfile.TemporaryDirectory() as d:
        path = write_config(Path(d), static, domains)
        try:
            return load_config(path, _HOST)
        except ConfigError as exc:
            assert exc.problems and all(str(p).strip() for p in exc.problems)
            return exc


@given(DOCS)
def test_any_domains_toml_gives_a_config_or_named_problems(doc):
    try:
        text = tomlkit.dumps(doc)
    except Exception:  # a value tomlkit cannot write is no input mox could be given
        return
    _load("", text)


@given(st.text(max_size=400))
def test_any_text_as_domains_toml_gives_a_config_or_named_problems(text):
    _load("", text)


@given(st.dictionaries(st.sampled_from(["queue", "dns", "listeners", "transports", "testing", "http"]),
                       st.dictionaries(st.sampled_from(["retry_intervals", "max_attempts", "timeout", "nameservers",
                                                        "concurrency", "local", "ips", "port", "kind", "x"]),
                                       VALUES, max_size=4), max_size=3))
def test_any_mox_toml_tables_give_a_config_or_named_problems(tables):
    try:
        text = tomlkit.dumps(tables)
    except Exception:
        return
    _load(text, "")
