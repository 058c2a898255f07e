"""Hooks of the submission transport plugin."""

from __future__ import annotations

from mox_core import hookimpl
from mox_core.api import TransportKind
from mox_transport_submission.settings import SubmissionSettings, SubmissionsSettings


def _factory(implicit_tls: bool):
    def make(name: str, settings: SubmissionSettings):
        from mox_transport_submission.transport import SubmissionTransport

        return SubmissionTransport(name, settings, implicit_tls=implicit_tls)

    return make


@hookimpl
def mox_register_transports() -> list[TransportKind]:
    return [
        TransportKind(
            name="submission",
            settings_model=SubmissionSettings,
            factory=_factory(False),
            description="Submit to a smarthost on port 587 with STARTTLS and SASL.",
        ),
        TransportKind(
            name="submissions",
            settings_model=SubmissionsSettings,
            factory=_factory(True),
            description="Submit to a smarthost on port 465 with implicit TLS and SASL.",
        ),
    ]
