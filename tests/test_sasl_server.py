"""Server-side SASL state machines, driven directly (no network)."""

from __future__ import annotations

import base64
import hmac

import pytest
from scramp import ScramClient
from scramp.utils import ScramException

from mox_core.accounts.passwords import StoredCredentials, make_credentials
from mox_core.accounts.sasl import (
    MECHANISMS,
    AuthFailureLimiter,
    CramMD5,
    Login,
    Plain,
    ScramSHA1,
    ScramSHA256,
    Step,
    StepKind,
    new_mechanism,
)

PASSWORD = "s3cret pässword"


class Store:
    def __init__(self, users: dict[str, StoredCredentials]) -> None:
        self.users = users
        self.lookups: list[str] = []

    def lookup(self, username: str) -> StoredCredentials | None:
        self.lookups.append(username)
        return self.users.get(username)


@pytest.fixture(scope="module")
def creds() -> StoredCredentials:
    return make_credentials(PASSWORD)


@pytest.fixture
def store(creds: StoredCredentials) -> Store:
    return Store({"alice@example.org": creds})


def plain(authz: str, user: str, pw: str) -> bytes:
    return f"{authz}\0{user}\0{pw}".encode()


# ---- PLAIN ------------------------------------------------------------------------------------


def test_plain_initial_response(store: Store) -> None:
    step = Plain(store).start(plain("", "alice@example.org", PASSWORD))
    assert step == Step.success("alice@example.org")


def test_plain_without_initial_response_gets_empty_challenge(store: Store) -> None:
    m = Plain(store)
    first = m.start(None)
    assert first.kind is StepKind.CHALLENGE and first.data == b""
    assert m.step(plain("", "alice@example.org", PASSWORD)).is_success
    # The exchange is over; more input is a protocol error, not a second login.
    assert m.step(plain("", "alice@example.org", PASSWORD)).kind is StepKind.FAILURE


def test_plain_authzid_equal_to_authcid_is_allowed(store: Store) -> None:
    assert Plain(store).start(plain("alice@example.org", "alice@example.org", PASSWORD)).is_success


def test_plain_other_authzid_is_refused(store: Store) -> None:
    step = Plain(store).start(plain("bob@example.org", "alice@example.org", PASSWORD))
    assert step.kind is StepKind.FAILURE and not step.malformed
    assert store.lookups == []  # refused before looking at credentials


def test_plain_wrong_password_and_unknown_user_look_the_same(store: Store) -> None:
    wrong = Plain(store).start(plain("", "alice@example.org", "nope"))
    unknown = Plain(store).start(plain("", "mallory@example.org", PASSWORD))
    for step in (wrong, unknown):
        assert step.kind is StepKind.FAILURE and not step.malformed and step.username is None


@pytest.mark.parametrize("message", [b"alice\0pw", b"\0alice\0pw\0", b"\0\0pw", b"\0\xff\0pw"])
def test_plain_malformed(store: Store, message: bytes) -> None:
    step = Plain(store).start(message)
    assert step.kind is StepKind.FAILURE and step.malformed


# ---- LOGIN ------------------------------------------------------------------------------------


def test_login_two_challenges(store: Store) -> None:
    m = Login(store)
    assert m.start(None) == Step.challenge(b"Username:")
    assert m.step(b"alice@example.org") == Step.challenge(b"Password:")
    assert m.step(PASSWORD.encode()) == Step.success("alice@example.org")


def test_login_username_as_initial_response(store: Store) -> None:
    m = Login(store)
    assert m.start(b"alice@example.org") == Step.challenge(b"Password:")
    step = m.step(b"wrong")
    assert step.kind is StepKind.FAILURE and not step.malformed


# ---- CRAM-MD5 ---------------------------------------------------------------------------------


def cram_response(challenge: bytes, user: str, pw: str) -> bytes:
    return f"{user} {hmac.new(pw.encode(), challenge, 'md5').hexdigest()}".encode()


def test_cram_md5(store: Store) -> None:
    m = CramMD5(store, hostname="mx.example.org")
    first = m.start(None)
    assert first.is_challenge
    assert first.data.startswith(b"<") and first.data.endswith(b"@mx.example.org>")
    assert m.step(cram_response(first.data, "alice@example.org", PASSWORD)).is_success


def test_cram_md5_challenges_differ(store: Store) -> None:
    assert CramMD5(store).start(None).data != CramMD5(store).start(None).data


def test_cram_md5_failures(store: Store) -> None:
    m = CramMD5(store)
    ch = m.start(None).data
    wrong = m.step(cram_response(ch, "alice@example.org", "nope"))
    m2 = CramMD5(store)
    ch2 = m2.start(None).data
    unknown = m2.step(cram_response(ch2, "mallory@example.org", PASSWORD))
    for step in (wrong, unknown):
        assert step.kind is StepKind.FAILURE and not step.malformed
    # A response to another challenge is no good either.
    m3 = CramMD5(store)
    m3.start(None)
    assert m3.step(cram_response(ch, "alice@example.org", PASSWORD)).kind is StepKind.FAILURE


@pytest.mark.parametrize("response", [b"alice", b"alice 1234", b"alice " + b"g" * 32, b" " + b"a" * 32])
def test_cram_md5_malformed(store: Store, response: bytes) -> None:
    m = CramMD5(store)
    m.start(None)
    step = m.step(response)
    assert step.kind is StepKind.FAILURE and step.malformed


def test_cram_md5_initial_response_is_a_protocol_error(store: Store) -> None:
    step = CramMD5(store).start(b"alice 00")
    assert step.kind is StepKind.FAILURE and step.malformed


# ---- SCRAM ------------------------------------------------------------------------------------


def run_scram(mech_cls: type, store: Store, user: str, pw: str, *, initial: bool = True) -> tuple[Step, ScramClient]:
    client = ScramClient([mech_cls.name], user, pw)
    m = mech_cls(store)
    cf = client.get_client_first().encode()
    if initial:
        step = m.start(cf)
    else:
        assert m.start(None) == Step.challenge(b"")
        step = m.step(cf)
    assert step.is_challenge
    client.set_server_first(step.data.decode())
    step = m.step(client.get_client_final().encode())
    if not step.is_challenge:
        return step, client
    client.set_server_final(step.data.decode())  # raises if the server signature is wrong
    return m.step(b""), client


@pytest.mark.parametrize("mech_cls", [ScramSHA1, ScramSHA256])
@pytest.mark.parametrize("initial", [True, False])
def test_scram_success(store: Store, mech_cls: type, initial: bool) -> None:
    step, _ = run_scram(mech_cls, store, "alice@example.org", PASSWORD, initial=initial)
    assert step == Step.success("alice@example.org")


@pytest.mark.parametrize("mech_cls", [ScramSHA1, ScramSHA256])
def test_scram_wrong_password_and_unknown_user_fail_at_the_proof(store: Store, mech_cls: type) -> None:
    for user, pw in (("alice@example.org", "nope"), ("mallory@example.org", PASSWORD)):
        step, _ = run_scram(mech_cls, store, user, pw)
        assert step.kind is StepKind.FAILURE and not step.malformed


def server_first_of(mech_cls: type, store: Store, user: str) -> dict[str, str]:
    client = ScramClient([mech_cls.name], user, "x")
    step = mech_cls(store).start(client.get_client_first().encode())
    return dict(part.split("=", 1) for part in step.data.decode().split(","))


@pytest.mark.parametrize("mech_cls", [ScramSHA1, ScramSHA256])
def test_scram_unknown_user_gets_a_stable_plausible_salt(store: Store, creds: StoredCredentials, mech_cls: type) -> None:
    a = server_first_of(mech_cls, store, "mallory@example.org")
    b = server_first_of(mech_cls, store, "mallory@example.org")
    real = server_first_of(mech_cls, store, "alice@example.org")
    assert a["s"] == b["s"]  # a random salt per attempt would reveal the user does not exist
    assert a["s"] != server_first_of(mech_cls, store, "eve@example.org")["s"]
    assert len(base64.b64decode(a["s"])) == len(base64.b64decode(real["s"]))
    assert a["i"] == real["i"]


def test_scram_channel_binding_request_fails(store: Store) -> None:
    m = ScramSHA256(store)
    step = m.start(b"p=tls-unique,,n=alice@example.org,r=abcdefghijkl")
    assert step.kind is StepKind.FAILURE


def test_scram_non_empty_final_response_fails(store: Store) -> None:
    client = ScramClient(["SCRAM-SHA-256"], "alice@example.org", PASSWORD)
    m = ScramSHA256(store)
    client.set_server_first(m.start(client.get_client_first().encode()).data.decode())
    assert m.step(client.get_client_final().encode()).is_challenge
    step = m.step(b"x")
    assert step.kind is StepKind.FAILURE and step.malformed


def test_scram_tampered_proof_fails(store: Store) -> None:
    client = ScramClient(["SCRAM-SHA-1"], "alice@example.org", PASSWORD)
    m = ScramSHA1(store)
    client.set_server_first(m.start(client.get_client_first().encode()).data.decode())
    final = client.get_client_final()
    head, proof = final.rsplit(",p=", 1)
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    step = m.step(f"{head},p={base64.b64encode(bytes(raw)).decode()}".encode())
    assert step.kind is StepKind.FAILURE


def test_scram_client_rejects_forged_server_signature(store: Store) -> None:
    # The server-final proves the server knows ServerKey: a client talking to an impostor
    # that answers with someone else's keys notices.
    other = Store({"alice@example.org": make_credentials("other")})
    client = ScramClient(["SCRAM-SHA-256"], "alice@example.org", PASSWORD)
    m = ScramSHA256(other)
    client.set_server_first(m.start(client.get_client_first().encode()).data.decode())
    step = m.step(client.get_client_final().encode())
    assert step.kind is StepKind.FAILURE  # proof does not verify against other keys
    with pytest.raises(ScramException):
        client.set_server_final("v=" + base64.b64encode(b"\0" * 32).decode())


def test_user_without_scram_keys_fails(creds: StoredCredentials) -> None:
    store = Store({"alice@example.org": StoredCredentials(password=creds.password)})
    step, _ = run_scram(ScramSHA256, store, "alice@example.org", PASSWORD)
    assert step.kind is StepKind.FAILURE


# ---- registry, limiter ------------------------------------------------------------------------


def test_mechanism_registry_order_and_factory(store: Store) -> None:
    assert list(MECHANISMS) == ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"]
    assert isinstance(new_mechanism("PLAIN", store), Plain)
    assert MECHANISMS["PLAIN"].cpu_heavy and MECHANISMS["LOGIN"].cpu_heavy
    assert not MECHANISMS["SCRAM-SHA-256"].cpu_heavy
    with pytest.raises(KeyError):
        new_mechanism("DIGEST-MD5", store)


def test_auth_failure_limiter_window() -> None:
    now = [1000.0]
    lim = AuthFailureLimiter(max_failures=3, window=60.0, clock=lambda: now[0])
    for _ in range(2):
        lim.failed("192.0.2.1")
    assert not lim.blocked("192.0.2.1")
    lim.failed("192.0.2.1")
    assert lim.blocked("192.0.2.1")
    assert not lim.blocked("192.0.2.2")
    now[0] += 61
    assert not lim.blocked("192.0.2.1")


def test_auth_failure_limiter_success_resets_and_ipv6_groups_by_64() -> None:
    lim = AuthFailureLimiter(max_failures=2)
    lim.failed("2001:db8::1")
    lim.failed("2001:db8::ffff:1")
    assert lim.blocked("2001:db8::2")
    assert not lim.blocked("2001:db8:0:1::1")
    lim.succeeded("2001:db8::1")
    assert not lim.blocked("2001:db8::2")
    lim.failed("::ffff:192.0.2.9")
    lim.failed("192.0.2.9")
    assert lim.blocked("192.0.2.9")
