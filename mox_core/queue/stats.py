"""The queue's size and age for the metrics endpoint, read at the time of a scrape from
``queue/index.db`` (read-only; any process may do it while the server runs)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["QueueStats"]


class QueueStats(Collector):
    """``mox_queue_messages`` (recipients queued, held ones counted apart) and
    ``mox_queue_oldest_message_age_seconds`` (0 for an empty queue)."""

    def __init__(self, data_dir: Path) -> None:
        self.db_path = Path(data_dir) / "queue" / "index.db"

    def collect(self) -> Iterator[GaugeMetricFamily]:
        messages = GaugeMetricFamily("mox_queue_messages", "Recipients in the outgoing queue.", labels=["hold"])
        age = GaugeMetricFamily("mox_queue_oldest_message_age_seconds",
                                "Seconds since the oldest message in the outgoing queue was queued.")
        held = waiting = 0
        oldest = None
        if self.db_path.exists():
            db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=2.0)
            try:
                for hold, n in db.execute("SELECT hold, COUNT(*) FROM msg GROUP BY hold"):
                    if hold:
                        held += n
                    else:
                        waiting += n
                # ids grow with time: the lowest id is the oldest message (the primary key)
                row = db.execute("SELECT queued FROM msg ORDER BY id LIMIT 1").fetchone()
                oldest = row[0] if row else None
            except sqlite3.Error:
                pass
            finally:
                db.close()
        messages.add_metric(["false"], waiting)
        messages.add_metric(["true"], held)
        age.add_metric([], max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        yield messages
        yield age
