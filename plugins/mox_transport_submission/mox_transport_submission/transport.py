"""The submission transports: hand every message to one smarthost as an authenticated client.

As mox's ``Submission:`` / ``Submissions:`` transports. Like the smtp transport,
no MX lookup: the smarthost's name is resolved through our own resolver and one SMTP session
delivers all recipients. Unlike it, the session authenticates (RFC 4954) after TLS is up:

* ``submission``: port 587, STARTTLS required and the certificate verified against ``host``
  (unless ``starttls_insecure_skip_verify``/``no_starttls``);
* ``submissions``: port 465, TLS from the first byte (RFC 8314 §3.3), always verified.

The mechanism is chosen by :func:`mox_core.smtpclient.sasl.select_mechanism`: the configured
list (default SCRAM-SHA-256, SCRAM-SHA-1, CRAM-MD5) walked in order, the first one the server
announces wins; PLAIN only when listed and only over TLS. SCRAM's ``-PLUS`` variants are not
offered: the client has no channel binding (Python's ``ssl`` has no ``tls-exporter``, RFC 9266).

The password is read at every delivery, from ``password``, the environment (``password_env``) or
a file (``password_file``), so a rotated secret is picked up without a restart. When it cannot
be read the attempt fails temporarily (4.3.5): the admin can fix it while the message waits.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import structlog

from mox_core.api import (
    DESTINATION_CONCURRENCY,
    AuthCredentials,
    DeliveryContext,
    OutgoingMessage,
    RecipientResult,
    ResolverCache,
    Timeouts,
    TLSMode,
    ca_file_problem,
    config_path,
    deliver_to_host,
    local_failure,
    tcp_dial,
)
from mox_transport_submission.settings import SubmissionSettings

__all__ = ["LocalConfigProblem", "SubmissionTransport"]

log = structlog.get_logger(component="transport.submission")

class LocalConfigProblem(Exception):
    """A setting pointing outside mox.toml (password source, CA file) is unusable right now."""


class SubmissionTransport:
    """A configured submission/submissions transport; built once per config by the factory.

    ``implicit_tls`` selects submissions (465, TLS at connect). ``options`` are for tests and
    embedding: ``timeouts`` (:class:`Timeouts`), ``dial`` (a :data:`~mox_core.smtpclient.Dialer`).
    """

    #: parallel deliveries to one recipient domain the queue may run through this smarthost
    destination_concurrency = DESTINATION_CONCURRENCY

    def __init__(self, name: str, settings: SubmissionSettings, *, implicit_tls: bool = False,
                 **options: Any) -> None:
        self.name = name
        self.settings = settings
        self.implicit_tls = implicit_tls
        self.options = options
        self._resolvers = ResolverCache()
        self._settings_json = settings.model_dump_json()

    @property
    def kind(self) -> str:
        return "submissions" if self.implicit_tls else "submission"

    @property
    def port(self) -> int:
        return self.settings.port or (465 if self.implicit_tls else 587)  # RFC 8314 §7.3, RFC 6409

    @property
    def tls_mode(self) -> TLSMode:
        if self.implicit_tls:
            return TLSMode.IMMEDIATE
        if self.settings.no_starttls:
            return TLSMode.SKIP
        if self.settings.starttls_insecure_skip_verify:
            return TLSMode.REQUIRED_UNVERIFIED
        return TLSMode.REQUIRED_VERIFIED

    # ------------------------------------------------------------------ per delivery

    def password(self, ctx: DeliveryContext | None = None) -> str:
        """The password from its configured source, read now. Raises :class:`LocalConfigProblem`."""
        s = self.settings
        if s.password is not None:
            return s.password
        if s.password_env is not None:
            value = os.environ.get(s.password_env)
            if value is None:
                raise LocalConfigProblem(f"environment variable {s.password_env} (password_env) is not set")
            if not value:
                raise LocalConfigProblem(f"environment variable {s.password_env} (password_env) is empty")
            return value
        assert s.password_file is not None
        path = config_path(s.password_file, ctx)
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline()
        except OSError as exc:
            raise LocalConfigProblem(f"reading password_file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise LocalConfigProblem(f"reading password_file {path}: not UTF-8") from None
        value = first.rstrip("\r\n")
        if not value:
            raise LocalConfigProblem(f"password_file {path} is empty (the password is its first line)")
        return value

    async def deliver(
        self, message: OutgoingMessage, ctx: DeliveryContext
    ) -> Sequence[RecipientResult]:
        s = self.settings
        ca_file = config_path(s.ca_file, ctx)
        try:
            password = self.password(ctx)
            problem = ca_file_problem(ca_file) if self.tls_mode in (
                TLSMode.REQUIRED_VERIFIED, TLSMode.IMMEDIATE) else None
            if problem:
                raise LocalConfigProblem(problem)
        except LocalConfigProblem as exc:
            return self._local_failure(message, str(exc))
        creds = AuthCredentials(s.username, password, tuple(s.mechanisms) or None)
        results = await deliver_to_host(
            message, host=s.host, port=self.port, ehlo_name=ctx.hostname,
            resolver=self._resolvers.get(ctx), tls_mode=self.tls_mode, ca_file=ca_file, auth=creds,
            timeouts=self.options.get("timeouts", Timeouts()), allow_private=True,
            dial=self.options.get("dial", tcp_dial), sessions=ctx.sessions,
            # a kept session is shared only with the very same settings and password
            session_key=(self.kind, self.name, self._settings_json,
                         hashlib.sha256(password.encode()).hexdigest()))
        log.debug("smarthost_delivery", transport=self.name, kind=self.kind, host=s.host, port=self.port,
                  statuses=[r.status.value for r in results])
        return results

    def _local_failure(self, message: OutgoingMessage, problem: str) -> list[RecipientResult]:
        """Every recipient fails temporarily for a problem on our side (config, files)."""
        text = f"transport {self.name}: {problem}"
        log.error("transport_misconfigured", transport=self.name, kind=self.kind, error=problem)
        return local_failure(message, text)
