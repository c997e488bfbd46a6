"""``dicom-node jobs``: the state of the node as tables a person reads at a glance."""

from __future__ import annotations

import time
from typing import Any

from dicom_node.store.jobs import Job, JobStore, StudyRow
from dicom_node.store.outbox import OutboxItem

_OBJECTS = {"1.2.840.10008.5.1.4.1.1.66.4": "SEG", "1.2.840.10008.5.1.4.1.1.88.34": "SR"}


def age(seconds: float) -> str:
    """``42s``, ``7m``, ``5h``, ``3d``."""
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _short(uid: str, width: int = 28) -> str:
    return uid if len(uid) <= width else "…" + uid[-(width - 1) :]


def _series_and_result(result: dict[str, Any] | None) -> tuple[str, str]:
    if not result or not result.get("series"):
        return "", ""
    series = result["series"]
    first = series[0]
    if "classification" in first:  # the model's findings
        label = first.get("series", "")
        lesions = sum(len(s.get("lesions", [])) for s in series)
        verdict = f"{first['classification']} p={first['study_probability']:.2f}"
        return label, f"{lesions} lesion(s), {verdict}"
    return f"{len(series)} series", f"{result.get('instances', '')} instances"


def render(
    studies: list[StudyRow],
    jobs: list[Job],
    deliveries: list[OutboxItem],
    *,
    now: float | None = None,
) -> str:
    """The three tables: studies, jobs, deliveries."""
    now = time.time() if now is None else now
    lines = [f"{'STUDY':<28}  {'STATE':<10} {'INSTANCES':>9} {'LAST':>6}"]
    lines += [
        f"{_short(s.study_uid):<28}  {s.state:<10} {s.instances:>9} {age(now - s.last_received):>6}"
        for s in studies
    ]
    lines += [
        "",
        f"{'JOB':>4} {'STATE':<10} {'VER':>3} {'TRIES':>5} {'AGE':>5}  {'STUDY':<28}"
        f"  {'SERIES':<28}  {'RESULT':<32}  LAST ERROR",
    ]
    for j in jobs:
        series, result = _series_and_result(j.result)
        error = j.last_error.splitlines()[0][:70] if j.last_error else ""
        lines.append(
            f"{j.id:>4} {j.state:<10} {j.version:>3} {j.attempts:>5} {age(now - j.created_at):>5}"
            f"  {_short(j.study_uid):<28}  {series[:28]:<28}  {result[:32]:<32}  {error}"
        )
    if deliveries:
        lines += [
            "",
            f"{'JOB':>4} {'OBJECT':<6} {'DESTINATION':<16} {'STATE':<10} {'TRIES':>5}"
            f" {'NEXT':>5}  LAST ERROR",
        ]
        for d in deliveries:
            nxt = age(d.not_before - now) if d.state == "pending" and d.not_before > now else ""
            lines.append(
                f"{d.job_id:>4} {_OBJECTS.get(d.sop_class_uid, 'other'):<6}"
                f" {d.destination[:16]:<16} {d.state:<10} {d.attempts:>5} {nxt:>5}"
                f"  {d.last_error or ''}"
            )
    return "\n".join(lines)


def load(store: JobStore, deliveries: list[OutboxItem]) -> str:
    """Render what ``store`` holds now."""
    return render(store.studies(), store.jobs(), deliveries)
