"""Bad data sets in a C-STORE, sent as hand-built PDUs to the real node (test-matrix D1-D3):
each gets its failure status, nothing is stored, nothing is written outside the spool."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID

from tests.hardening.conftest import Baseline, baseline, instances, stray_files
from tests.hardening.pdus import (
    A_ASSOCIATE_AC,
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LE,
    Context,
    PeerClosed,
    RawPeer,
    dataset_of,
)
from tests.peers import NodeProcess

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def node(module_nodes: Callable[..., NodeProcess]) -> Iterator[Baseline]:
    """A node with short timeouts."""
    proc = module_nodes("data", node={"network_timeout_seconds": 3.0, "acse_timeout_seconds": 2.0})
    yield baseline(proc)


def _encoded(path: Path, tmp_path: Path, **changes: str) -> tuple[bytes, str, str]:
    """The data set of ``path`` with attributes changed, encoded as on the wire."""
    ds = dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = UID(value)
    out = tmp_path / "changed.dcm"
    ds.save_as(out, enforce_file_format=True)
    data, _, sop_class, sop_instance = dataset_of(out)
    return data, sop_class, sop_instance


def _store(node: NodeProcess, data: bytes, *, sop_class: str, sop_instance: str) -> int | None:
    """C-STORE over a raw association: the status, or ``None`` if the node aborted instead."""
    with RawPeer(node.port) as peer:
        answer = peer.associate([Context(1, CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,))])
        assert answer.pdu_type == A_ASSOCIATE_AC
        try:
            status = peer.store(1, data, sop_class=sop_class, sop_instance=sop_instance)
        except PeerClosed:
            return None
        peer.release()
        return status


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_d1_truncated_dataset(
    node: Baseline, write_study: Callable[..., list[Path]], cut: float
) -> None:
    """D1: a data set cut short (in its header or its pixel data) is answered 0xC2xx (cannot
    understand: 0xC210 unparseable, 0xC211 its identifying UIDs cut off) and not stored."""
    data, _, sop_class, sop_instance = dataset_of(write_study(slices=1, size=32)[0])
    header_end = data.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    cut_at = int(header_end * cut) if cut < 0.9 else int(len(data) * cut)
    status = _store(node.node, data[:cut_at], sop_class=sop_class, sop_instance=sop_instance)
    assert status is not None
    assert status & 0xFF00 == 0xC200, hex(status)
    assert sop_instance not in instances(node.node)
    assert not node.node.spooled()
    node.check()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize(
    "uid", ["../../../../tmp/escaped", "1.2.3/../../x", "not-a-uid", "1.2.03", "1." + "1" * 70]
)
def test_d2_sop_instance_uid_that_is_not_a_uid(
    node: Baseline, write_study: Callable[..., list[Path]], tmp_path: Path, uid: str
) -> None:
    """D2: a SOP Instance UID with ``../`` or otherwise not a valid UID is refused (0xC211; one
    longer than 64 characters already fails pynetdicom's command check, an A-ABORT) and nothing
    is written, in the spool or anywhere else."""
    source = write_study(slices=1, size=16)[0]
    data, sop_class, _ = _encoded(source, tmp_path, SOPInstanceUID=uid)
    before = set(node.node.root.rglob("*"))
    status = _store(node.node, data, sop_class=sop_class, sop_instance=uid)
    assert status == (None if len(uid) > 64 else 0xC211)
    assert not Path("/tmp/escaped").exists()
    new = {p for p in set(node.node.root.rglob("*")) - before if p.is_file()}
    assert {p.name for p in new} <= {"audit.jsonl", "jobs.sqlite-wal", "jobs.sqlite-shm"}
    assert not stray_files(node.node)
    node.check()


def test_d3_dataset_sop_class_differs_from_the_command(
    node: Baseline, write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """D3: a data set whose SOP Class is not the command's is answered 0xA900 and not stored."""
    data, _, sop_instance = _encoded(
        write_study(slices=1, size=16)[0], tmp_path, SOPClassUID=MR_IMAGE_STORAGE
    )
    status = _store(node.node, data, sop_class=CT_IMAGE_STORAGE, sop_instance=sop_instance)
    assert status == 0xA900
    assert sop_instance not in instances(node.node)
    node.check()
