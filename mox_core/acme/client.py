"""Obtaining one certificate from an ACME CA (RFC 8555) with the ``acme`` library (certbot's
client): account (RFC 8555 §7.3), order (§7.4), one challenge per authorization, finalization
with a CSR, download of the chain.

Blocking (``requests``): the manager runs it in a thread of its own. Challenges are
provisioned as files the web process serves (:mod:`mox_core.acme.store`) and removed when the
order is done. The account key (ECDSA P-256, ES256) is kept per directory URL; a key the CA
already knows gives back the existing account. Certificate keys are ECDSA P-256.

Failures raise :class:`ObtainError` with what went wrong and what to fix.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from mox_core import __version__
from mox_core.acme.store import acme_dir, alpn01_path, http01_path, key_and_chain, remove_quietly, write_private
from mox_core.acme.tlsalpn import challenge_certificate
from mox_core.config.models import ACMEProvider

__all__ = ["ACMEClient", "ObtainError"]

log = structlog.get_logger(component="acme")

NETWORK_TIMEOUT = 30
ORDER_TIMEOUT = 120.0  # seconds for validations and issuance of one order


class ObtainError(Exception):
    """A certificate could not be obtained. ``hint`` says what to fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def _register_tls_alpn() -> Any:
    """The tls-alpn-01 challenge type (RFC 8737 §3); the ``acme`` library dropped its own in
    version 5. Its response is the empty object, as for http-01."""
    from acme import challenges

    existing = getattr(challenges, "TLSALPN01", None)
    if existing is not None:
        return existing

    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        typ = "tls-alpn-01"

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        response_cls = TLSALPN01Response
        typ = response_cls.typ

        def validation(self, account_key: Any, **kwargs: Any) -> str:
            return self.key_authorization(account_key)

    challenges.TLSALPN01 = TLSALPN01
    return TLSALPN01


_HINTS = {
    "connection": "the CA could not connect to {name} on port {port}: check that the A/AAAA records of {name} "
                  "point to this server's public IP addresses and that port {port} reaches mox (firewall, "
                  "NAT port forward)",
    "incorrectResponse": "the CA reached a server for {name} on port {port} that gave the wrong answer: check "
                         "that the A/AAAA records of {name} point to this server and that no other web server "
                         "or proxy answers on port {port}",
    "unauthorized": "the CA did not get the right answer from {name} on port {port}: check that the A/AAAA "
                    "records of {name} point to this server and that port {port} reaches mox",
    "tls": "the TLS connection of the CA to {name} on port {port} failed: check that port {port} reaches mox "
           "and not another server",
    "dns": "the CA could not look up {name}: create its A/AAAA records (or a CNAME to the mail server's host "
           "name) and wait until they are visible",
    "caa": "a CAA record of {name} or of a parent domain does not allow this CA: add one that does "
           "(Let's Encrypt: 0 issue \"letsencrypt.org\") or remove the CAA records",
    "rateLimited": "the CA's rate limit was reached; mox tries again later (do not delete the data directory's "
                   "acme/ folder, it holds the certificates)",
    "rejectedIdentifier": "the CA does not issue certificates for {name}: is it a public DNS name?",
}


def _hint(code: str | None, name: str, challenge: str) -> str:
    port = 443 if challenge == "tls-alpn-01" else 80
    template = _HINTS.get(code or "", "")
    return template.format(name=name, port=port)


class ACMEClient:
    """One provider of ``[acme]``: its account, and :meth:`obtain` for a host name."""

    def __init__(self, provider_name: str, provider: ACMEProvider, config_dir: Path, data_dir: Path) -> None:
        self.provider_name = provider_name
        self.provider = provider
        self.config_dir = config_dir
        self.data_dir = data_dir
        self._client: Any = None
        self._key: Any = None

    # -- account ---------------------------------------------------------------------------

    def _account_key(self) -> Any:
        import josepy as jose
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        digest = hashlib.sha256(self.provider.directory_url.encode()).hexdigest()[:16]
        path = acme_dir(self.data_dir) / f"account-{digest}.pem"
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        return jose.JWKEC(key=key)

    def _connect(self) -> Any:
        import josepy as jose
        from acme import client, errors, messages

        if self._client is not None:
            return self._client
        _register_tls_alpn()  # before any authorization is parsed
        self._key = self._account_key()
        ca = self.provider.ca_file
        verify: bool | str = True
        if ca is not None:
            verify = str(ca if ca.is_absolute() else self.config_dir / ca)
        net = client.ClientNetwork(self._key, alg=jose.ES256, verify_ssl=verify,  # type: ignore[arg-type]
                                   user_agent=f"mox-python/{__version__}", timeout=NETWORK_TIMEOUT)
        directory = client.ClientV2.get_directory(self.provider.directory_url, net)
        acme = client.ClientV2(directory, net)
        contact = (f"mailto:{self.provider.contact_email}",) if self.provider.contact_email else ()
        try:
            regr = acme.new_account(messages.NewRegistration.from_data(
                terms_of_service_agreed=True, **({"contact": contact} if contact else {})))
            log.info("acme_account_registered", provider=self.provider_name, account=regr.uri)
        except errors.ConflictError as exc:  # the key has an account already
            net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        self._client = acme
        return acme

    # -- one certificate ----------------------------------------------------------------------

    def obtain(self, name: str, challenges: Sequence[str]) -> tuple[bytes, str]:
        """A new key and certificate chain for ``name`` (one PEM, key first) and the challenge
        type that worked; each type of ``challenges`` is tried in turn."""
        from acme import errors, messages

        try:
            self._connect()
        except messages.Error as exc:
            self._client = None
            raise ObtainError(f"ACME account at {self.provider.directory_url}: {exc}",
                              "check contact_email of the provider (a valid address)") from None
        except Exception as exc:  # requests' and the library's exceptions
            self._client = None
            raise self._network_error(exc) from None
        failures: list[ObtainError] = []
        for challenge in challenges:
            try:
                return self._attempt(name, challenge), challenge
            except ObtainError as exc:
                failures.append(exc)
                log.info("acme_challenge_failed", name=name, challenge=challenge, error=str(exc))
            except messages.Error as exc:
                failures.append(ObtainError(f"{challenge}: {exc}", _hint(exc.code, name, challenge)))
            except (errors.Error, OSError, ValueError) as exc:
                self._client = None  # connect again next time
                raise self._network_error(exc) from None
            except Exception as exc:  # requests' exceptions, and whatever the library raises
                self._client = None
                raise self._network_error(exc) from None
        if not failures:
            raise ObtainError("no challenge type to use", "enable a web port for http-01 or tls-alpn-01")
        raise ObtainError("; ".join(str(f) for f in failures), "; ".join(f.hint for f in failures if f.hint))

    def _network_error(self, exc: BaseException) -> ObtainError:
        return ObtainError(
            f"ACME directory {self.provider.directory_url}: {type(exc).__name__}: {exc}",
            "check that the machine reaches the CA, the provider's directory_url"
            + (" and ca_file" if self.provider.ca_file else ""),
        )

    def _attempt(self, name: str, challenge: str) -> bytes:
        from acme import crypto_util
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        acme = self._connect()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        orderr = acme.new_order(crypto_util.make_csr(key_pem, [name]))
        provisioned: list[Path] = []
        deadline = time.monotonic() + ORDER_TIMEOUT
        try:
            for authzr in orderr.authorizations:
                self._answer(acme, authzr, name, challenge, provisioned)
            for authzr in orderr.authorizations:
                self._wait_valid(acme, authzr, name, challenge, deadline)
            chain = self._finalize(acme, orderr, deadline)
        finally:
            for path in provisioned:
                remove_quietly(path)
        return key_and_chain(key_pem, chain.encode())

    def _answer(self, acme: Any, authzr: Any, name: str, challenge: str, provisioned: list[Path]) -> None:
        from acme import messages

        if authzr.body.status == messages.STATUS_VALID:
            return  # validated recently; the CA reuses it
        challb = next((c for c in authzr.body.challenges if c.chall.typ == challenge), None)
        if challb is None:
            offered = ", ".join(c.chall.typ for c in authzr.body.challenges)
            raise ObtainError(f"{challenge}: the CA does not offer it for {name} (offers {offered})")
        key_authorization = challb.chall.key_authorization(self._key)
        if challenge == "http-01":
            path = http01_path(self.data_dir, challb.chall.encode("token"))
            write_private(path, key_authorization.encode())
        else:
            path = alpn01_path(self.data_dir, authzr.body.identifier.value)
            write_private(path, challenge_certificate(authzr.body.identifier.value, key_authorization))
        provisioned.append(path)
        acme.answer_challenge(challb, challb.chall.response(self._key))

    def _wait_valid(self, acme: Any, authzr: Any, name: str, challenge: str, deadline: float) -> None:
        from acme import messages

        delay = 0.1
        while authzr.body.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
            if time.monotonic() > deadline:
                raise ObtainError(f"{challenge}: the CA did not validate {name} within {ORDER_TIMEOUT:g}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
            authzr, _ = acme.poll(authzr)
        if authzr.body.status != messages.STATUS_VALID:
            problems = [c.error for c in authzr.body.challenges if c.error is not None]
            code = problems[0].code if problems else None
            detail = "; ".join(f"{p.code}: {p.detail}" for p in problems) or str(authzr.body.status)
            raise ObtainError(f"{challenge}: validation of {name} failed: {detail}", _hint(code, name, challenge))

    def _finalize(self, acme: Any, orderr: Any, deadline: float) -> str:
        from acme import messages

        orderr = acme.begin_finalization(orderr)
        delay = 0.1
        while True:
            body = messages.Order.from_json(self._post_as_get(acme, orderr.uri).json())
            if body.status == messages.STATUS_VALID and body.certificate:
                return self._post_as_get(acme, body.certificate).text
            if body.status == messages.STATUS_INVALID:
                raise ObtainError(f"the CA refused to issue: {body.error}")
            if time.monotonic() > deadline:
                raise ObtainError(f"the CA did not issue within {ORDER_TIMEOUT:g}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    @staticmethod
    def _post_as_get(acme: Any, url: str) -> Any:
        """RFC 8555 §6.3: a signed POST with an empty payload."""
        return acme.net.post(url, None, new_nonce_url=acme.directory["newNonce"])
