"""Stored credentials: MD5 from a chaining state (OpenSSL, or pure Python) for CRAM-MD5, hashes, serialisation."""

from __future__ import annotations

import hashlib
import hmac
import json
import random

import pytest
from scramp import ScramMechanism

from mox_core.accounts import passwords
from mox_core.accounts.passwords import (
    CramMD5State,
    PasswordHash,
    StoredCredentials,
    cram_md5_state,
    hmac_md5_from_state,
    make_credentials,
    make_scram_keys,
    md5_compress,
    md5_from_state,
    normalize_password,
    verify_cram_md5,
    verify_password,
)

MD5_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


@pytest.fixture(scope="module")
def creds() -> StoredCredentials:
    return make_credentials("correct horse")


def test_md5_from_state_goes_through_openssl_here() -> None:
    # The Python fallback is tested below as well; this machine has libcrypto.
    assert passwords._LIBCRYPTO is not None


@pytest.mark.parametrize("python", [False, True], ids=["openssl", "python"])
@pytest.mark.parametrize("length", [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000])
def test_md5_from_initial_state_is_md5(length: int, python: bool) -> None:
    data = random.Random(length).randbytes(length)
    assert md5_from_state(MD5_IV, data, 0, python=python) == hashlib.md5(data).digest()


@pytest.mark.parametrize("python", [False, True], ids=["openssl", "python"])
def test_md5_resumes_after_whole_blocks(python: bool) -> None:
    rnd = random.Random(1)
    for blocks in (1, 2, 5, 70_000_000):  # the last: a bit count above 2**32 (Nh in OpenSSL)
        prefix = rnd.randbytes(64 * blocks) if blocks < 100 else b""
        rest = rnd.randbytes(rnd.randrange(200))
        state = MD5_IV
        for off in range(0, len(prefix), 64):
            state = md5_compress(state, prefix[off:off + 64])
        if blocks >= 100:  # compare the two implementations on a huge claimed prefix
            assert md5_from_state(state, rest, 64 * blocks, python=python) == md5_from_state(
                state, rest, 64 * blocks, python=not python)
            continue
        assert md5_from_state(state, rest, len(prefix), python=python) == hashlib.md5(prefix + rest).digest()


def test_md5_rejects_partial_block_and_prefix() -> None:
    with pytest.raises(ValueError):
        md5_compress(MD5_IV, b"x" * 63)
    with pytest.raises(ValueError):
        md5_from_state(MD5_IV, b"", 10)


def test_hmac_md5_from_state_matches_hmac_for_many_keys_and_messages() -> None:
    rnd = random.Random(2195)
    keys = ["", "a", "secret", "x" * 63, "y" * 64, "z" * 65, "w" * 200, "pässwörd", "\u4e2d\u6587"]
    keys += ["".join(chr(rnd.randrange(33, 127)) for _ in range(rnd.randrange(1, 90))) for _ in range(40)]
    for key in keys:
        state = cram_md5_state(key)
        for n in (0, 1, 40, 64, 100, 300):
            msg = rnd.randbytes(n)
            expected = hmac.new(key.encode("utf-8"), msg, "md5").digest()
            assert hmac_md5_from_state(state, msg) == expected, (key, n)


def test_rfc2195_example() -> None:
    # RFC 2195 §2: user "tim", password "tanstaaftanstaaf".
    state = cram_md5_state("tanstaaftanstaaf")
    digest = hmac_md5_from_state(state, b"<1896.697170952@postoffice.reston.mci.net>")
    assert digest.hex() == "b913a602c7eda7a495b4e6e7334d3890"


def test_cram_md5_state_serialises_as_dovecot_style_hex() -> None:
    state = cram_md5_state("tanstaaftanstaaf")
    d = state.to_dict()
    assert len(d["inner"]) == len(d["outer"]) == 32
    assert CramMD5State.from_dict(d) == state


def test_credentials_round_trip_through_json(creds: StoredCredentials) -> None:
    text = json.dumps(creds.to_dict())
    assert "correct horse" not in text
    back = StoredCredentials.from_dict(json.loads(text))
    assert back == creds
    assert verify_password(back, "correct horse")


def test_credentials_without_cram_md5() -> None:
    c = make_credentials("pw", cram_md5=False)
    assert c.cram_md5 is None
    assert "cram_md5" not in c.to_dict()
    assert StoredCredentials.from_dict(c.to_dict()) == c
    assert not verify_cram_md5(c, b"<1.2@h>", hmac.new(b"pw", b"<1.2@h>", "md5").digest())


def test_salts_are_random() -> None:
    a, b = make_credentials("same"), make_credentials("same")
    assert a.password is not None and b.password is not None
    assert a.password.salt != b.password.salt
    assert a.scram_sha256 is not None and b.scram_sha256 is not None
    assert a.scram_sha256.stored_key != b.scram_sha256.stored_key


def test_verify_password(creds: StoredCredentials) -> None:
    assert verify_password(creds, "correct horse")
    assert not verify_password(creds, "correct horse ")
    assert not verify_password(creds, "")
    assert not verify_password(None, "correct horse")
    assert not verify_password(StoredCredentials(), "correct horse")


def test_unknown_user_costs_a_hash_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = PasswordHash.verify

    def counting(self: PasswordHash, password: str) -> bool:
        calls.append(password)
        return real(self, password)

    monkeypatch.setattr(PasswordHash, "verify", counting)
    assert not verify_password(None, "guess")
    assert calls == ["guess"]


def test_scram_keys_match_scramp() -> None:
    salt = b"0123456789abcdef"
    for name, mech in (("sha1", "SCRAM-SHA-1"), ("sha256", "SCRAM-SHA-256")):
        ours = make_scram_keys("pencil", name, iterations=4096, salt=salt)
        s, stored, server, i = ScramMechanism(mech).make_auth_info("pencil", iteration_count=4096, salt=salt)
        assert (ours.salt, ours.stored_key, ours.server_key, ours.iterations) == (s, stored, server, i)


def test_default_iterations_follow_mox(creds: StoredCredentials) -> None:
    assert creds.scram_sha1 is not None and creds.scram_sha1.iterations == 8192
    assert creds.scram_sha256 is not None and creds.scram_sha256.iterations == 4096


def test_passwords_are_saslprep_normalised() -> None:
    # RFC 4013 §3: "I<U+00AD>X" (soft hyphen, mapped to nothing) -> "IX".
    assert normalize_password("I\u00adX") == "IX"
    c = make_credentials("I\u00adX")
    assert verify_password(c, "IX")
    # Prohibited characters are kept as they are instead of failing.
    assert normalize_password("a\u0007b") == "a\u0007b"


def test_from_dict_rejects_unknown_formats(creds: StoredCredentials) -> None:
    d = creds.to_dict()
    with pytest.raises(ValueError):
        StoredCredentials.from_dict({**d, "version": 2})
    with pytest.raises(ValueError):
        StoredCredentials.from_dict({**d, "password": {**d["password"], "scheme": "md5"}})


def test_scrypt_parameters() -> None:
    h = PasswordHash.make("x")
    assert (h.n, h.r, h.p, len(h.salt), len(h.hash)) == (
        passwords.SCRYPT_N, passwords.SCRYPT_R, passwords.SCRYPT_P, 16, 32)
