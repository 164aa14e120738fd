"""Prometheus metrics of the aggregator, computed from the store at each scrape.

The figures are the store's, not counters kept in memory, so they survive restarts and
agree with `free-server status`; submissions and releases are never deleted, so the
``_total`` counters only grow. Each scrape reads the store once (`Store.summary`).

- ``free_submissions_received_total``: every stored submission;
- ``free_submissions_accepted_total``, ``free_submissions_refused_total{reason}``:
  verdicts; ``reason`` is the refusal line's first clause with numbers as ``N``,
  so that values such as sizes do not make a new series each;
- ``free_submissions_pending``, ``free_submissions_held`` (screening or the operator
  holds them), ``free_submissions_withdrawn``;
- ``free_upload_bytes_total``: bytes of every stored submission;
- ``free_intake_latency_seconds``: histogram of receipt to verdict;
- ``free_screening_seconds``: histogram of the time screening took per model;
- ``free_rounds{state}``, ``free_round_duration_seconds`` (histogram of finished
  rounds), ``free_round_step`` and ``free_round_steps`` of running rounds (``round``);
- ``free_releases_total``, ``free_release_latest_version``;
- ``free_owners{state}``: owners' keys by state;
- ``free_store_bytes``: the store folder on disk.

- ``free_supernodes_connected``: SuperNodes whose signed call the SuperLink answered
  in the last `CONNECTED_WINDOW_S` seconds, as the Flower front saw them (heartbeats
  come every few seconds); absent when the server runs without Flower. The SuperLink's
  own node list sits behind its Control API, which this server never calls.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from free_server.console.views import ConsoleData, duration_s, store_bytes

__all__ = [
    "CONNECTED_WINDOW_S",
    "INTAKE_BUCKETS_S",
    "ROUND_BUCKETS_S",
    "SCREENING_BUCKETS_S",
    "StoreCollector",
    "reason_label",
    "registry",
]

INTAKE_BUCKETS_S = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SCREENING_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
CONNECTED_WINDOW_S = 60.0
ROUND_BUCKETS_S = (60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
_CLAUSE = re.compile(r"[:;(]")
_NUMBER = re.compile(r"\d+(\.\d+)?")


def reason_label(reason: str | None) -> str:
    """Return a refusal's ``reason`` label: its first clause, numbers as ``N``, <= 80 chars."""
    first = _CLAUSE.split(reason or "unknown", maxsplit=1)[0].strip()
    return _NUMBER.sub("N", first)[:80] or "unknown"


def _histogram(
    name: str, documentation: str, values: Sequence[float], buckets: Sequence[float]
) -> HistogramMetricFamily:
    counts = [sum(1 for v in values if v <= bound) for bound in buckets]
    return HistogramMetricFamily(
        name,
        documentation,
        buckets=[
            *((str(b), c) for b, c in zip(buckets, counts, strict=True)),
            ("+Inf", len(values)),
        ],
        sum_value=sum(values),
    )


class StoreCollector(Collector):
    """Yields the metrics above from one read of the store."""

    def __init__(self, data: ConsoleData) -> None:
        self._data = data

    def collect(self) -> Iterator[Metric]:
        """Read the store and yield every metric family."""
        report = self._data.report()
        subs = report["submissions"]
        rows = subs["recent"]
        yield CounterMetricFamily(
            "free_submissions_received", "Submissions stored (receipts given).", len(rows)
        )
        yield CounterMetricFamily(
            "free_submissions_accepted",
            "Submissions accepted by intake.",
            sum(1 for s in rows if s["state"] == "accepted"),
        )
        refused = CounterMetricFamily(
            "free_submissions_refused", "Submissions refused by intake.", labels=["reason"]
        )
        for reason, count in sorted(
            Counter(reason_label(s["reason"]) for s in rows if s["state"] == "refused").items()
        ):
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily(
            "free_submissions_pending", "Submissions waiting for intake.", subs["received"]
        )
        yield GaugeMetricFamily(
            "free_submissions_held", "Submissions held for the operator.", subs["held"]
        )
        yield GaugeMetricFamily(
            "free_submissions_withdrawn",
            "Submissions withdrawn (owner revoked).",
            subs["withdrawn"],
        )
        yield CounterMetricFamily(
            "free_upload_bytes", "Bytes of every stored submission.", sum(s["size"] for s in rows)
        )
        latencies = [
            d for s in rows if (d := duration_s(s["received_at"], s["verdict_at"])) is not None
        ]
        yield _histogram(
            "free_intake_latency_seconds",
            "Time from receipt to intake verdict.",
            latencies,
            INTAKE_BUCKETS_S,
        )
        yield _histogram(
            "free_screening_seconds",
            "Time screening took per model.",
            [s["screening"]["seconds"] for s in rows if s["screening"] is not None],
            SCREENING_BUCKETS_S,
        )
        yield from self._rounds(report["rounds"])
        releases = report["releases"]
        yield CounterMetricFamily("free_releases", "Releases published.", len(releases))
        yield GaugeMetricFamily(
            "free_release_latest_version",
            "Version of the newest release (0: none).",
            max((r["version"] for r in releases), default=0),
        )
        owners = GaugeMetricFamily("free_owners", "Owners' keys by state.", labels=["state"])
        by_state = Counter(c["state"] for c in report["clients"])
        for state in ("active", "revoked", "replaced"):
            owners.add_metric([state], by_state[state])
        yield owners
        if self._data.nodes is not None:
            yield GaugeMetricFamily(
                "free_supernodes_connected",
                f"SuperNodes with a call answered in the last {CONNECTED_WINDOW_S:.0f} s.",
                self._data.nodes.count(CONNECTED_WINDOW_S),
            )
        yield GaugeMetricFamily(
            "free_store_bytes",
            "Bytes the store takes on disk.",
            store_bytes(self._data.home.store_dir),
        )

    def _rounds(self, rounds: list[dict[str, Any]]) -> Iterator[Metric]:
        states = GaugeMetricFamily("free_rounds", "Meta rounds by state.", labels=["state"])
        by_state = Counter(r["state"] for r in rounds)
        for state in ("requested", "running", "finished", "failed"):
            states.add_metric([state], by_state[state])
        yield states
        finished = [
            d
            for r in rounds
            if r["state"] == "finished"
            and (d := duration_s(r["started_at"], r["finished_at"])) is not None
        ]
        yield _histogram(
            "free_round_duration_seconds",
            "Wall time of finished meta rounds.",
            finished,
            ROUND_BUCKETS_S,
        )
        step = GaugeMetricFamily(
            "free_round_step", "Steps done by a running round.", labels=["round"]
        )
        steps = GaugeMetricFamily("free_round_steps", "Steps of a running round.", labels=["round"])
        for r in rounds:
            progress = self._data.progress(int(r["id"])) if r["state"] == "running" else None
            if progress is not None:
                step.add_metric([str(r["id"])], progress.step)
                steps.add_metric([str(r["id"])], progress.steps)
        yield step
        yield steps


def registry(data: ConsoleData) -> CollectorRegistry:
    """Return a registry of the store's metrics alone (none of the client library's own)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(data))
    return reg
