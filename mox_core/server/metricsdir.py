"""Where the processes of ``mox serve`` count their metrics: prometheus-client's
multiprocess mode reads ``PROMETHEUS_MULTIPROC_DIR`` when it is imported, so this module,
which does not import it, sets the variable first (see :mod:`mox_core.metrics`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["MULTIPROC_ENV", "prepare"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(data_dir: Path) -> Path:
    """Empty ``<data_dir>/tmp/metrics`` (counts of an earlier run are gone) and point the
    variable at it for this process and the ones it starts."""
    if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        raise RuntimeError("prometheus_client was imported before the metrics directory was set")
    d = data_dir / "tmp" / "metrics"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f in d.glob("*.db"):
        f.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(d)
    return d
