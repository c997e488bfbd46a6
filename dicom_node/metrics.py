"""Prometheus metrics: one registry for the node, counters named after what they count."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
FREE_DISK = Gauge("dicom_node_free_disk_bytes", "Free bytes on the spool's disk", registry=REGISTRY)
SENDS = Counter(
    "dicom_node_sends",
    "Result deliveries by destination and outcome",
    ["destination", "outcome"],
    registry=REGISTRY,
)
