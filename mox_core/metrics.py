"""Prometheus metrics of mox, served on listeners with ``metrics_http``.

``mox serve`` runs in several processes (SMTP workers, the web process, the main process);
the numbers a scrape shows are the whole server's: ``mox serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a directory of its data directory before any of them imports
this module (:func:`mox_core.server.metricsdir.prepare`), each process writes its counts there
(prometheus-client's multiprocess mode) and the metrics endpoint adds them up
(:func:`collect`). Without that variable (tests, other commands) the metrics are those of
the process.

Metric names follow mox's where mox has them (``mox_httpserver_*``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

__all__ = ["HTTP_BUCKETS", "METRICS", "ServiceMetrics", "collect", "process_exited"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# mox's buckets for both HTTP histograms, in seconds
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 20, 30, 60, 120)
_HTTP_LABELS = ("handler", "proto", "method", "code")


class Metrics:
    """mox's metrics, each created at its first use: prometheus-client reads
    PROMETHEUS_MULTIPROC_DIR when it is imported, which must come after ``mox serve`` set it,
    while this module is imported by much of mox (and so by every CLI command)."""

    @cached_property
    def http_request_duration(self) -> Histogram:
        from prometheus_client import Histogram

        return Histogram("mox_httpserver_request_duration_seconds",
                         "HTTP requests: time until the status line was written.", _HTTP_LABELS, buckets=HTTP_BUCKETS)

    @cached_property
    def http_response_duration(self) -> Histogram:
        from prometheus_client import Histogram

        return Histogram("mox_httpserver_response_duration_seconds",
                         "HTTP requests: time until the whole response was sent.", _HTTP_LABELS, buckets=HTTP_BUCKETS)

    @cached_property
    def smtp_messages(self) -> Counter:
        from prometheus_client import Counter

        return Counter("mox_smtpserver_messages_total",
                       "Messages offered to the SMTP listeners: result accepted or rejected, and why "
                       "(reason: delivered, queued, or the kind of refusal).",
                       ("listener", "service", "result", "reason"))

    @cached_property
    def smtp_sessions(self) -> Gauge:
        from prometheus_client import Gauge

        return Gauge("mox_smtpserver_sessions", "SMTP sessions open now.", ("listener", "service"),
                     multiprocess_mode="livesum")

    @cached_property
    def auth_failures(self) -> Counter:
        from prometheus_client import Counter

        return Counter("mox_smtpserver_auth_failures_total",
                       "Failed SMTP logins (wrong password, unknown user, aborted, throttled).", ("listener", "service"))

    @cached_property
    def deliveries(self) -> Counter:
        from prometheus_client import Counter

        return Counter("mox_queue_deliveries_total",
                       "Delivery attempts of queued messages, per recipient: result delivered, temporary "
                       "(tried again later) or permanent (a DSN goes to the sender).", ("transport", "result"))


METRICS = Metrics()


class ServiceMetrics:
    """The counts of one SMTP service of one listener (``local``/``submission``), with the
    labelled series looked up once: on the path of every session and message."""

    __slots__ = ("auth_failures", "listener", "service", "sessions", "_messages")

    def __init__(self, listener: str, service: str) -> None:
        self.listener = listener
        self.service = service
        self.sessions = METRICS.smtp_sessions.labels(listener, service)
        self.auth_failures = METRICS.auth_failures.labels(listener, service)
        self._messages: dict[tuple[str, str], Counter] = {}

    def message(self, result: str, reason: str) -> None:
        """Count a message ``accepted`` (reason ``delivered`` or ``queued``) or ``rejected``
        (reason: what was wrong, e.g. ``relay_denied``, ``no_such_user``, ``storage``)."""
        child = self._messages.get((result, reason))
        if child is None:
            child = self._messages[(result, reason)] = METRICS.smtp_messages.labels(
                self.listener, self.service, result, reason)
        child.inc()


def process_exited(pid: int) -> None:
    """Drop the live gauges of a process that ended (a worker that died or stopped)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def collect(extra: Iterable[object] = ()) -> bytes:
    """The text exposition of every process's metrics, plus the collectors ``extra``
    (computed at the time of the scrape, e.g. the queue's size)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    out = generate_latest(registry)
    extra = list(extra)
    if extra:
        scraped = CollectorRegistry()
        for c in extra:
            scraped.register(c)  # type: ignore[arg-type]
        out += generate_latest(scraped)
    return out
