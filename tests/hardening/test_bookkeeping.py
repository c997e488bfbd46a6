"""The bookkeeping behind the limits, on its own: the audit gate and the association count."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

from pynetdicom.association import Association

from dicom_node.receive.limits import Admission, EventGate


def test_event_gate_holds_back_a_flood_and_says_how_much() -> None:
    """Past ``burst`` reports per (code, peer) in a window the rest are held back; the next one
    let through says how many were; other peers and codes are unaffected."""
    gate = EventGate(burst=3, window=0.3)
    assert [gate.allow("pdu_too_long", "10.0.0.9") for _ in range(5)] == [0, 0, 0, None, None]
    assert gate.allow("pdu_too_long", "10.0.0.8") == 0
    assert gate.allow("peer_stalled", "10.0.0.9") == 0
    time.sleep(0.35)
    assert gate.allow("pdu_too_long", "10.0.0.9") == 2


def _assoc(alive: threading.Event) -> Association:
    thread = threading.Thread(target=alive.wait, daemon=True)
    thread.start()
    return cast(Association, thread)  # Admission only asks is_alive()


def test_admission_counts_total_and_per_caller_and_forgets_ended_threads() -> None:
    """Admission refuses past the total or the per-caller limit, counts a left association
    out, and forgets one whose thread ended without a release or abort event."""
    admission = Admission(total=3, per_caller=2)
    keep = threading.Event()
    a, b, c = _assoc(keep), _assoc(keep), _assoc(keep)
    assert admission.admit(a, "PACS") is None
    assert admission.admit(b, "PACS") is None
    assert admission.admit(_assoc(keep), "PACS") == "caller_limit"
    assert admission.admit(c, "CT1") is None
    assert admission.admit(_assoc(keep), "CT2") == "association_limit"
    admission.leave(a)
    assert admission.held() == 2
    short = threading.Event()
    d = _assoc(short)
    assert admission.admit(d, "CT2") is None
    short.set()
    cast(Any, d).join(5)
    assert admission.admit(_assoc(keep), "CT3") is None  # d's ended thread was forgotten
    keep.set()
