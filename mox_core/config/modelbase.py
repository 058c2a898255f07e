"""The base of every config model: unknown keys are errors, defaults are validated too."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Model"]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
