"""Writes each message to ``<directory>/<n>.eml`` with the envelope in a header comment."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mox_core import hookimpl
from mox_core.api import DeliveryStatus, RecipientResult, TransportKind


class FileSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: Path = Field(description="Directory to write messages to.")


class FileTransport:
    def __init__(self, name: str, settings: FileSettings):
        self.directory = settings.directory

    async def deliver(self, message, ctx):
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{uuid.uuid4().hex}.eml"
        head = f"X-Envelope-From: {message.mail_from}\r\nX-Envelope-To: {', '.join(message.recipients)}\r\n"
        with open(path, "wb") as f:
            f.write(head.encode() + message.data)
            f.flush()
            os.fsync(f.fileno())
        return [RecipientResult(r, DeliveryStatus.DELIVERED, 250, "2.0.0", "file", str(path))
                for r in message.recipients]


@hookimpl
def mox_register_transports():
    return [TransportKind("file", FileSettings, FileTransport, "Write messages to a directory.")]
