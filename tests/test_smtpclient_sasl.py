"""The client's SASL mechanisms and how one is chosen (``mox_core.smtpclient.sasl``), without
a server: PLAIN (RFC 4616), CRAM-MD5 (RFC 2195, its own example), SCRAM-SHA-1/-256 (RFC 5802,
RFC 7677) against scramp's server side, and the checks mox's client makes of a SCRAM server.
The mechanisms against real servers (mox, Postfix with Cyrus SASL): tests/test_smtpclient.py
and tests/test_sendmail.py."""

from __future__ import annotations

import base64

import pytest
import scramp

from mox_core.smtpclient.sasl import (
    DEFAULT_MECHANISMS,
    AuthCredentials,
    CramMD5,
    NoMatchingMechanism,
    Plain,
    PlainWithoutTLS,
    SASLError,
    Scram,
    select_mechanism,
)

ALL = ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN"]


def creds(*mechanisms: str) -> AuthCredentials:
    return AuthCredentials("user@example.org", "secret", list(mechanisms) or None)


# --------------------------------------------------------------------------------------------
# choosing


def test_the_defaults_are_scram_256_scram_1_cram_md5():
    assert DEFAULT_MECHANISMS == ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5")


@pytest.mark.parametrize("configured, offered, tls, chosen", [
    ((), ALL, True, "SCRAM-SHA-256"),
    ((), ["PLAIN", "CRAM-MD5", "SCRAM-SHA-1"], True, "SCRAM-SHA-1"),   # the configured order wins
    ((), ["plain", "cram-md5"], False, "CRAM-MD5"),                     # announced in any case
    ((), ["PLAIN", "CRAM-MD5"], True, "CRAM-MD5"),                      # PLAIN only when listed
    (("PLAIN",), ["LOGIN", "PLAIN"], True, "PLAIN"),
    (("CRAM-MD5", "SCRAM-SHA-256"), ALL, True, "CRAM-MD5"),
    (("PLAIN", "CRAM-MD5"), ["PLAIN", "CRAM-MD5"], False, "CRAM-MD5"),  # PLAIN skipped without TLS
    (("SCRAM-SHA-1",), ["SCRAM-SHA-1"], False, "SCRAM-SHA-1"),
])
def test_select_mechanism(configured, offered, tls, chosen):
    m = select_mechanism(creds(*configured), offered, tls=tls)
    assert m.name == chosen


@pytest.mark.parametrize("configured, offered, text", [
    ((), ["PLAIN", "LOGIN"], "no matching authentication mechanisms, server supports PLAIN, LOGIN"),
    ((), [], "no matching authentication mechanisms, server supports none"),
    (("PLAIN",), ["login", "Xoauth2"], "no matching authentication mechanisms, server supports LOGIN, XOAUTH2"),
])
def test_no_matching_mechanism(configured, offered, text):
    with pytest.raises(NoMatchingMechanism) as exc:
        select_mechanism(creds(*configured), offered, tls=True)
    assert str(exc.value) == text
    assert exc.value.offered == [o.upper() for o in offered]


def test_plain_without_tls_is_refused():
    with pytest.raises(PlainWithoutTLS, match="^refusing to send AUTH PLAIN credentials over a connection "
                                              "without TLS$"):
        select_mechanism(creds("PLAIN"), ["PLAIN"], tls=False)
    # PLAIN skipped, nothing else offered that is configured: still the PLAIN reason
    with pytest.raises(PlainWithoutTLS):
        select_mechanism(creds("PLAIN", "CRAM-MD5"), ["PLAIN", "SCRAM-SHA-1"], tls=False)


@pytest.mark.parametrize("name", ["SCRAM-SHA-256-PLUS", "LOGIN", "plain"])
def test_unknown_configured_mechanism(name):
    with pytest.raises(ValueError, match=f"^unknown authentication mechanism {name}$"):
        select_mechanism(creds(name), ALL, tls=True)


def test_the_credentials_reach_the_mechanism():
    plain = select_mechanism(AuthCredentials("alice", "pw", ["PLAIN"]), ["PLAIN"], tls=True)
    assert plain.initial() == b"\0alice\0pw"
    cram = select_mechanism(AuthCredentials("tim", "tanstaaftanstaaf", ["CRAM-MD5"]), ["CRAM-MD5"], tls=False)
    assert cram.respond(b"<1896.697170952@postoffice.reston.mci.net>") == b"tim b913a602c7eda7a495b4e6e7334d3890"


# --------------------------------------------------------------------------------------------
# PLAIN


def test_plain():
    m = Plain("alice@example.org", "p\u00e4ss")
    assert (m.name, m.cleartext, m.complete) == ("PLAIN", True, True)
    assert m.initial() == b"\0alice@example.org\0p\xc3\xa4ss"
    with pytest.raises(SASLError, match="^server requested unexpected continuation of authentication$"):
        m.respond(b"")


def test_plain_password_is_saslprepped():
    # RFC 4013: a non-ASCII space becomes a space, a soft hyphen is removed
    assert Plain("a", "x\u00a0y\u00ad").initial() == b"\0a\0x y"
    # a password SASLprep refuses (a prohibited character) is sent as it is
    assert Plain("a", "x\u0007").initial() == b"\0a\0x\x07"


# --------------------------------------------------------------------------------------------
# CRAM-MD5


def test_cram_md5_rfc_2195_example():
    m = CramMD5("tim", "tanstaaftanstaaf")
    assert (m.name, m.cleartext, m.initial(), m.complete) == ("CRAM-MD5", False, None, False)
    assert m.respond(b"<1896.697170952@postoffice.reston.mci.net>") == b"tim b913a602c7eda7a495b4e6e7334d3890"
    assert m.complete
    with pytest.raises(SASLError, match="^server requested unexpected continuation of authentication$"):
        m.respond(b"<1896.697170952@postoffice.reston.mci.net>")


@pytest.mark.parametrize("challenge, ok", [
    (b"<123.456@host.example>", True),
    (b"<1.@h>", True),               # the shortest form
    (b"<.1@host>", False),           # nothing before the dot
    (b"<1.@>", False),               # no host
    (b"<1234@host.example>", False),  # no dot
    (b"1234.5@host.example", False),  # no brackets
    (b"<123.456host.example>", False),
    (b"<123.456@host.example> ", False),
    (b"", False),
])
def test_cram_md5_challenge_form(challenge, ok):
    m = CramMD5("u", "p")
    if ok:
        assert m.respond(challenge).startswith(b"u ")
    else:
        with pytest.raises(SASLError, match="^invalid challenge "):
            m.respond(challenge)
        assert not m.complete


# --------------------------------------------------------------------------------------------
# SCRAM


def server(name: str, password: str = "secret", iterations: int = 4096, salt: bytes = b"0123456789abcdef"):
    mech = scramp.ScramMechanism(name)
    info = mech.make_auth_info(password, iteration_count=iterations, salt=salt)
    return mech.make_server(lambda username: info)


@pytest.mark.parametrize("name", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_exchange_with_a_server(name):
    m = Scram(name, "user", "secret")
    s = server(name)
    assert (m.name, m.cleartext, m.complete) == (name, False, False)
    first = m.initial()
    assert first.startswith(b"n,,n=user,r=")
    s.set_client_first(first.decode())
    final = m.respond(s.get_server_first().encode())
    assert not m.complete
    s.set_client_final(final.decode())
    assert m.respond(s.get_server_final().encode()) == b""
    assert m.complete
    with pytest.raises(SASLError, match="^server requested unexpected continuation of authentication$"):
        m.respond(b"v=abc")


def test_scram_nonce_is_12_random_bytes_in_base64():
    nonces = {Scram("SCRAM-SHA-256", "u", "p").initial().decode().split("r=")[1] for _ in range(3)}
    assert len(nonces) == 3 and all(len(base64.b64decode(n, validate=True)) == 12 for n in nonces)


def test_scram_wrong_password_is_noticed_in_the_server_signature():
    m = Scram("SCRAM-SHA-256", "user", "wrong")
    s = server("SCRAM-SHA-256")
    s.set_client_first(m.initial().decode())
    m.respond(s.get_server_first().encode())
    bad_signature = base64.b64encode(b"x" * 32).decode()
    with pytest.raises(SASLError, match="^SCRAM: "):
        m.respond(f"v={bad_signature}".encode())
    assert not m.complete


def test_scram_unknown_name():
    with pytest.raises(ValueError, match="^unsupported SCRAM mechanism 'SCRAM-SHA-512'$"):
        Scram("SCRAM-SHA-512", "u", "p")


def server_first(m: Scram, *, extra: str = "abcdefgh", salt: bytes = b"0123456789ab", iterations: int = 4096,
                 more: str = "") -> bytes:
    nonce = m.initial().decode().split("r=")[1]
    return f"{more}r={nonce}{extra},s={base64.b64encode(salt).decode()},i={iterations}".encode()


def test_scram_server_first_at_the_minimums_is_taken():
    """A nonce extended by 8 characters; a 12-byte salt and 4,096 iterations (scramp's own
    minimums, above mox's 8 bytes and 2,048)."""
    m = Scram("SCRAM-SHA-256", "u", "p")
    assert m.respond(server_first(m)).startswith(b"c=biws,r=")


def test_scram_between_the_minimums_of_mox_and_scramp():
    """2,048 iterations pass mox's check, then scramp refuses them: an error all the same."""
    m = Scram("SCRAM-SHA-256", "u", "p")
    with pytest.raises(SASLError, match="^SCRAM: "):
        m.respond(server_first(m, iterations=2048))


@pytest.mark.parametrize("kw, text", [
    ({"extra": "abcdefg"}, "SCRAM server nonce does not extend ours by at least 8 characters"),
    ({"extra": ""}, "SCRAM server nonce does not extend ours by at least 8 characters"),
    ({"salt": b"0123456"}, "SCRAM salt too short (7 bytes)"),
    ({"iterations": 2047}, "SCRAM iteration count too low (2047)"),
    ({"more": "m=ext,"}, "SCRAM server-first message has mandatory extension"),
    ({"more": "e=invalid-proof,"}, "SCRAM server error: invalid-proof"),
])
def test_scram_server_first_checks(kw, text):
    m = Scram("SCRAM-SHA-256", "u", "p")
    with pytest.raises(SASLError) as exc:
        m.respond(server_first(m, **kw))
    assert str(exc.value) == text


def test_scram_server_nonce_must_start_with_ours():
    m = Scram("SCRAM-SHA-256", "u", "p")
    m.initial()
    with pytest.raises(SASLError, match="^SCRAM server nonce does not extend ours"):
        m.respond(b"r=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA,s=MDEyMzQ1Njc=,i=4096")


@pytest.mark.parametrize("message", [
    b"r=abc,s=MDEyMzQ1Njc=",               # no i
    b"s=MDEyMzQ1Njc=,i=4096",               # no r
    b"r=abc,i=4096",                        # no s
    b"r=abc,s=MDEyMzQ1Njc=,i=many",
    b"r=abc,s=not base64!,i=4096",
    b"r=abc,ss=MDEyMzQ1Njc=,i=4096",        # a two-letter key
    b"r=abc,s,i=4096",                      # no =
])
def test_scram_malformed_server_first(message):
    m = Scram("SCRAM-SHA-256", "u", "p")
    m.initial()
    with pytest.raises(SASLError, match="^malformed SCRAM server-first message$"):
        m.respond(message)


def test_scram_first_value_of_a_repeated_attribute_counts():
    """mox's checks read the first value; scramp then refuses the repetition itself."""
    m = Scram("SCRAM-SHA-256", "u", "p")
    good = server_first(m).decode()
    with pytest.raises(SASLError) as exc:
        m.respond(f"{good},i=1".encode())
    assert str(exc.value).startswith("SCRAM: ")  # not "SCRAM iteration count too low (1)"


def test_scram_not_utf8():
    m = Scram("SCRAM-SHA-256", "u", "p")
    m.initial()
    with pytest.raises(SASLError, match="^SCRAM server message is not UTF-8$"):
        m.respond(b"r=\xff\xfe")


def test_scram_before_the_initial_response():
    """A challenge before the client-first message: nothing to answer."""
    m = Scram("SCRAM-SHA-256", "u", "p")
    with pytest.raises(SASLError, match="^server requested unexpected continuation of authentication$"):
        m.respond(b"r=abc,s=MDEyMzQ1Njc=,i=4096")


def test_cram_md5_invalid_challenge_text_shows_its_first_100_bytes():
    challenge = b"x" * 150
    with pytest.raises(SASLError) as exc:
        CramMD5("u", "p").respond(challenge)
    assert str(exc.value) == f"invalid challenge {b'x' * 100!r}"


def test_scram_salt_must_be_strict_base64():
    m = Scram("SCRAM-SHA-256", "u", "p")
    nonce = m.initial().decode().split("r=")[1]
    # decodes to 12 bytes when the "!" is skipped: refused, not skipped
    with pytest.raises(SASLError, match="^malformed SCRAM server-first message$"):
        m.respond(f"r={nonce}abcdefgh,s=MDEy!MzQ1Njc4OWFi,i=4096".encode())


def test_scram_salt_of_8_bytes_passes_mox_check():
    """mox's minimum is 8 bytes: an 8-byte salt passes it (scramp, wanting 12, refuses it)."""
    m = Scram("SCRAM-SHA-256", "u", "p")
    with pytest.raises(SASLError) as exc:
        m.respond(server_first(m, salt=b"01234567"))
    assert str(exc.value).startswith("SCRAM: ")  # not "SCRAM salt too short (8 bytes)"
