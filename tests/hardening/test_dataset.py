"""Bad data sets in a C-STORE, sent as hand-built PDUs to the real node (test-matrix D1-D3):
each gets its failure status, nothing is stored, nothing is written outside the spool."""

from __future__ import annotations

import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID

from tests.hardening.conftest import Baseline, baseline, instances, peak_rss_mib, stray_files
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
DEFLATED_VR_LE = "1.2.840.10008.1.2.1.99"


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


def _store(
    node: NodeProcess,
    data: bytes,
    *,
    sop_class: str,
    sop_instance: str,
    syntax: str = EXPLICIT_VR_LE,
) -> int | None:
    """C-STORE over a raw association: the status, or ``None`` if the node aborted instead."""
    with RawPeer(node.port) as peer:
        answer = peer.associate([Context(1, CT_IMAGE_STORAGE, (syntax,))])
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


@pytest.mark.parametrize("offset", [-1, 0, 4], ids=["last-value", "pixel-tag", "pixel-header"])
def test_d1_a_data_set_cut_just_before_its_pixel_data_is_refused(
    node: Baseline, write_study: Callable[..., list[Path]], offset: int
) -> None:
    """D1: cut in the last value before Pixel Data, at its tag or in its element header, a CT
    data set parses as a whole one without pixels: it is refused (0xC210), not stored, and so
    cannot fail its study later."""
    data, _, sop_class, sop_instance = dataset_of(write_study(slices=1, size=16)[0])
    cut = data.find(b"\xe0\x7f\x10\x00") + offset
    status = _store(node.node, data[:cut], sop_class=sop_class, sop_instance=sop_instance)
    assert status == 0xC210, status
    assert sop_instance not in instances(node.node)
    node.check()


def test_d4_pixel_data_encoded_otherwise_than_its_context_says_is_refused(
    node: Baseline, write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """D4: JPEG-LS pixel data sent on an explicit VR little endian context (and so filed as
    native) is refused, not acknowledged and left for the analysis to fail on."""
    original = write_study(slices=1, size=16)[0]
    jls = tmp_path / "jls.dcm"
    subprocess.run(["/usr/bin/dcmcjpls", "+el", str(original), str(jls)], check=True)
    data, _, sop_class, sop_instance = dataset_of(jls)
    status = _store(node.node, data, sop_class=sop_class, sop_instance=sop_instance)
    assert status == 0xC210, status
    assert sop_instance not in instances(node.node)
    node.check()


def test_d5_native_pixel_data_shorter_than_its_frames_is_refused(
    node: Baseline, write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """D5: a 16 x 16 slice claiming a million frames (a few hundred bytes that would make the
    analysis build a million frame headers) is refused, not stored."""
    data, _, sop_instance = _encoded(
        write_study(slices=1, size=16)[0], tmp_path, NumberOfFrames="1000000"
    )
    status = _store(node.node, data, sop_class=CT_IMAGE_STORAGE, sop_instance=sop_instance)
    assert status == 0xC210, status
    assert sop_instance not in instances(node.node)
    node.check()


def test_a_deflated_data_set_may_not_inflate_past_the_data_set_limit(
    module_nodes: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """A deflated data set of under a MiB that inflates to 256 MiB (past ``max_dataset_mb``,
    here 16) is refused, and the node's memory does not grow by what it would inflate to."""
    node = module_nodes("deflate", node={"max_dataset_mb": 16})
    data, _, sop_class, sop_instance = dataset_of(write_study(slices=1, size=16)[0])
    head = data[: data.find(b"\xe0\x7f\x10\x00")]
    size = 256 << 20
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = [squeeze.compress(head + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, size))]
    bomb += [squeeze.compress(bytes(1 << 24)) for _ in range(size >> 24)]
    bomb.append(squeeze.flush())
    wire = b"".join(bomb)
    assert len(wire) < 1 << 20
    before = peak_rss_mib(node)
    status = _store(
        node, wire, sop_class=sop_class, sop_instance=sop_instance, syntax=DEFLATED_VR_LE
    )
    assert status == 0xC210, status
    assert peak_rss_mib(node) - before < 100
    assert sop_instance not in instances(node)


def test_of_the_syntaxes_proposed_a_lossless_one_is_accepted(node: Baseline) -> None:
    """Proposed JPEG 2000 (which may be lossy) or JPEG-LS near-lossless beside a lossless
    syntax in one context, the node accepts the lossless one, so a sender that transcodes to
    what was accepted loses nothing."""
    j2k, j2k_lossless = "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.90"
    jls_near, rle = "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.5"
    with RawPeer(node.node.port) as peer:
        answer = peer.associate(
            [
                Context(1, CT_IMAGE_STORAGE, (j2k, j2k_lossless)),
                Context(3, CT_IMAGE_STORAGE, (jls_near, rle)),
            ]
        )
        peer.release()
    assert answer.accepted() == {1: (0, j2k_lossless), 3: (0, rle)}


def test_a_subsampled_colour_image_of_another_class_is_still_accepted() -> None:
    """Native YBR_FULL_422 holds two thirds of three samples a pixel: the frame-size check is
    for the CT the node analyses, and an image of another class (acknowledged and dropped
    by default) is not refused by it. pydicom's own test file."""
    from pydicom.data import get_testdata_file

    from dicom_node.receive.identify import identify

    data, syntax, sop_class, sop_instance = dataset_of(
        Path(str(get_testdata_file("SC_ybr_full_422_uncompressed.dcm")))
    )
    ident = identify(data, syntax, command_sop_class=sop_class, command_sop_instance=sop_instance)
    assert ident.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
