"""Prometheus metrics: one registry for the node, counters named after what they count."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from dicom_node.pipeline import StudyResult
    from dicom_node.store.jobs import JobStore

REGISTRY = CollectorRegistry(auto_describe=True)

ASSOCIATIONS = Counter(
    "dicom_node_associations", "Associations by outcome", ["outcome"], registry=REGISTRY
)
INSTANCES = Counter(
    "dicom_node_instances_received",
    "C-STORE requests by outcome (stored, duplicate, replaced, dropped_*, failed_*)",
    ["outcome"],
    registry=REGISTRY,
)
BYTES = Counter(
    "dicom_node_bytes_received",
    "Dataset bytes received, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
STUDIES_COMPLETED = Counter(
    "dicom_node_studies_completed", "Studies completed, by reason", ["reason"], registry=REGISTRY
)
JOBS_FINISHED = Counter(
    "dicom_node_jobs_finished",
    "Job attempts finished, by resulting state",
    ["state"],
    registry=REGISTRY,
)
JOB_SECONDS = Histogram(
    "dicom_node_job_seconds",
    "Seconds per job attempt",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "dicom_node_stage_seconds",
    "Seconds per analysis stage (volume, model, lesions, seg, sr, ...)",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
    registry=REGISTRY,
)
INFERENCE_RATE = Gauge(
    "dicom_node_inference_slices_per_second",
    "Slices per second of the last model run",
    registry=REGISTRY,
)
FREE_DISK = Gauge("dicom_node_free_disk_bytes", "Free bytes on the spool's disk", registry=REGISTRY)
SENDS = Counter(
    "dicom_node_sends",
    "Result deliveries by destination and outcome",
    ["destination", "outcome"],
    registry=REGISTRY,
)
SECURITY_EVENTS = Counter(
    "dicom_node_security_events",
    "Security events by reason (caller_not_allowed, tls_handshake_failed, association_limit,"
    " caller_limit, connection_limit, pdu_too_long, peer_stalled)",
    ["reason"],
    registry=REGISTRY,
)


class StoreCollector(Collector):
    """Gauges read from the job store at scrape time: jobs by state, queue depth, deliveries."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs by state", labels=["state"])
        counts = self.store.counts()
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily(
            "dicom_node_queue_depth", "Jobs waiting to run", value=counts.get("queued", 0)
        )
        deliveries = GaugeMetricFamily(
            "dicom_node_deliveries",
            "Outbox rows by destination and state",
            labels=["destination", "state"],
        )
        tally = self.store.delivery_counts()
        for (dest, state), n in sorted(tally.items()):
            deliveries.add_metric([dest, state], n)
        yield deliveries
        yield GaugeMetricFamily(
            "dicom_node_dead_letters",
            "Deliveries dead-lettered",
            value=sum(n for (_, state), n in tally.items() if state == "dead"),
        )


def record_metrics(result: StudyResult) -> None:
    """Stage timings and the inference rate of a job's result, into the node's metrics.

    Read from the result's summary, so that a result made in the analysis process
    (:mod:`dicom_node.isolation`) is counted in the parent's registry.
    """
    for series in result.summary.get("series", ()):
        seconds: dict[str, float] = series.get("seconds", {})
        for stage, secs in seconds.items():
            STAGE_SECONDS.labels(stage).observe(secs)
        if seconds.get("model", 0.0) > 0:
            INFERENCE_RATE.set(series["slices"] / seconds["model"])
