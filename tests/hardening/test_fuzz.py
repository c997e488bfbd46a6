"""Bounded fuzzing of the real node on loopback: malformed PDUs and mutated data sets.

Deterministic: every example comes from ``random.Random(seed + index)``, so a failure names the
seed and index that reproduce it. The number of examples is fixed (short in CI); a long run:

    DICOM_NODE_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/hardening/test_fuzz.py

(``DICOM_NODE_FUZZ_SEED`` picks another seed). After each batch the pass condition holds: the
node process is alive, C-ECHO answers, its threads are back to the baseline, nothing half-written
is left, and every instance acknowledged with success is in the job store.

Hypothesis is not used: it is not a dependency of the project, and its shrinking helps little
against a remote process whose failure shows only as its state after a batch; a seeded
generator gives the same determinism and names each example.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID

from tests.hardening.conftest import Baseline, baseline, instances, stray_files
from tests.hardening.pdus import (
    A_ASSOCIATE_AC,
    COMMAND,
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LE,
    LAST,
    VERIFICATION,
    Context,
    PeerClosed,
    RawPeer,
    abort,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    dataset_of,
    p_data,
    pdu,
    release_rq,
)
from tests.peers import NodeProcess

EXAMPLES = int(os.environ.get("DICOM_NODE_FUZZ_EXAMPLES", "100"))
SEED = int(os.environ.get("DICOM_NODE_FUZZ_SEED", "20260601"))
BATCH = 25
#: Seconds one example may take on our side before it counts as a hang of the node.
DEADLINE = 5.0
TIMEOUT = 2.0
MAX_PDU = 16384
CONTEXTS = [Context(1, VERIFICATION), Context(3, CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,))]


@pytest.fixture(scope="module")
def node(module_nodes: Callable[..., NodeProcess]) -> Iterator[Baseline]:
    """A node with 2 s timeouts and room for the connections a batch leaves behind."""
    proc = module_nodes(
        "fuzz",
        node={
            "max_associations": 30,
            "network_timeout_seconds": TIMEOUT,
            "acse_timeout_seconds": TIMEOUT,
            "max_pdu_bytes": MAX_PDU,
        },
    )
    yield baseline(proc)


def _batches(total: int) -> list[range]:
    return [range(i, min(i + BATCH, total)) for i in range(0, total, BATCH)]


def _pass_condition(node: Baseline, acknowledged: set[str], where: str) -> None:
    try:
        node.check(settle=2 * TIMEOUT + 8)
    except AssertionError as exc:
        raise AssertionError(f"{where} (seed {SEED}): {exc}") from exc
    assert not stray_files(node.node), where
    missing = acknowledged - instances(node.node)
    assert not missing, f"{where}: acknowledged but not stored: {sorted(missing)[:3]}"


# -- malformed PDUs ---------------------------------------------------------------------------

_VALID = [
    associate_rq(CONTEXTS),
    p_data([(1, COMMAND | LAST, c_echo_rq())]),
    p_data([(3, COMMAND | LAST, c_store_rq(CT_IMAGE_STORAGE, "1.2.3.4"))]),
    release_rq(),
    abort(),
    pdu(0x06, bytes(4)),
]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    kind = rng.randrange(8)
    if kind == 0 and data:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:  # insert random bytes
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3 and len(data) >= 6:  # lie about the length
        choice = rng.choice([0, 1, len(data) - 7, len(data) + 100, MAX_PDU + 1, 2**31, 2**32 - 1])
        data[2:6] = struct.pack(">L", max(choice, 0))
    elif kind == 4 and len(data) >= 1:  # another PDU type
        data[0] = rng.choice([0x00, 0x08, 0x09, 0x10, 0x7F, 0xFF, rng.randrange(256)])
    elif kind == 5:  # a random frame
        body = rng.randbytes(rng.randint(0, 300))
        return pdu(rng.randrange(256), body, length=rng.choice([len(body), rng.randrange(400)]))
    elif kind == 6:  # two frames run together, the first cut
        other = rng.choice(_VALID)
        return bytes(data[: rng.randrange(len(data) + 1)]) + other
    else:  # an item length inside the PDU
        if len(data) > 12:
            at = rng.randrange(6, len(data) - 2)
            data[at : at + 2] = rng.randbytes(2)
    return bytes(data)


def _send_pdu_example(port: int, index: int) -> None:
    rng = random.Random(SEED + index)
    associate_first = rng.random() < 0.5
    frame = _mutate(rng, rng.choice(_VALID[1:] if associate_first else _VALID))
    started = time.monotonic()
    with RawPeer(port, timeout=DEADLINE) as peer:
        try:
            if associate_first and peer.associate(CONTEXTS).pdu_type != A_ASSOCIATE_AC:
                return
            peer.send(frame)
            if rng.random() < 0.5:  # sometimes listen for the node's answer
                peer.sock.settimeout(0.15)
                try:
                    while peer.sock.recv(65536):
                        pass
                except TimeoutError:
                    pass
        except (PeerClosed, ConnectionError):
            pass
    took = time.monotonic() - started
    assert took < DEADLINE, f"example {index} (seed {SEED}) took {took:.1f} s"


def test_fuzz_malformed_pdus(node: Baseline) -> None:
    """Mutated and random PDUs, with or without an association first, one connection each:
    after every batch the node is alive, answers C-ECHO and has no association left open."""
    for batch in _batches(EXAMPLES):
        for index in batch:
            _send_pdu_example(node.node.port, index)
        _pass_condition(node, set(), f"PDU examples {batch.start}-{batch.stop - 1}")


# -- mutated data sets ------------------------------------------------------------------------


def _mutate_dataset(rng: random.Random, data: bytes, header_end: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        at = rng.randrange(max(1, min(header_end, len(out))))
        if kind == 0 and out:  # flip bits in the header
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            del out[rng.randrange(len(out) + 1) :]
        elif kind == 2:  # insert bytes
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3:  # an absurd value length somewhere in the header
            out[at : at + 4] = struct.pack(
                "<L", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1, 3, len(out) * 2])
            )
        elif kind == 4:  # drop a chunk
            del out[at : at + rng.randint(1, 64)]
        else:  # repeat a chunk
            out[at:at] = out[at : at + rng.randint(1, 64)]
    return bytes(out)


def _encoded_with_uid(path: Path, uid: str, tmp_path: Path) -> bytes:
    ds = dcmread(path)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    out = tmp_path / "example.dcm"
    ds.save_as(out, enforce_file_format=True)
    return dataset_of(out)[0]


def test_fuzz_mutated_datasets(
    node: Baseline, write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """Mutated CT data sets in C-STOREs: each gets a status (or, at worst, an abort); after
    every batch the pass condition holds, and every instance answered with success is in the
    job store."""
    source = write_study(slices=1, size=16)[0]
    acknowledged: set[str] = set()
    outcomes: dict[str, int] = {}
    for batch in _batches(max(1, EXAMPLES * 2 // 3)):
        for index in batch:
            rng = random.Random(SEED * 7 + index)
            uid = f"2.25.{SEED}{index:06d}"
            data = _encoded_with_uid(source, uid, tmp_path)
            mutated = _mutate_dataset(rng, data, data.find(b"\xe0\x7f\x10\x00"))
            started = time.monotonic()
            with RawPeer(node.node.port, timeout=DEADLINE) as peer:
                assert peer.associate(CONTEXTS).pdu_type == A_ASSOCIATE_AC
                try:
                    status = peer.store(3, mutated, sop_class=CT_IMAGE_STORAGE, sop_instance=uid)
                    peer.release()
                except (PeerClosed, ConnectionError, TimeoutError):
                    status = -1
            took = time.monotonic() - started
            assert took < DEADLINE, f"data set example {index} (seed {SEED}) took {took:.1f} s"
            outcomes[f"0x{status:04X}" if status >= 0 else "aborted"] = (
                outcomes.get(f"0x{status:04X}" if status >= 0 else "aborted", 0) + 1
            )
            if status == 0:
                acknowledged.add(uid)
        _pass_condition(node, acknowledged, f"data set examples {batch.start}-{batch.stop - 1}")
    print(f"data set outcomes (seed {SEED}): {dict(sorted(outcomes.items()))}")
