"""D5 and D6 through the whole node: Enhanced CT, implicit VR with private tags, non-ASCII
character sets. Each study goes in over DICOM (dcmtk's storescu) and its SEG and SR come out at
a stand-in PACS (dcmtk's storescp); dciodvfy checks them.

The node runs the tiny randomly initialised model (a test double for trained weights; see
tests/conftest.py::tiny_model_dir): these tests are about the data, not the findings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_enhanced_ct
from dicom_node.training.phantom import Phantom, generate_phantom, write_phantom_dicom
from tests.peers import NodeProcess, StoreSCP, dciodvfy, storescu

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs")
    yield scp.start()
    scp.stop()


@pytest.fixture
def node(
    node_factory: Callable[..., NodeProcess], tiny_model_dir: Path, pacs: StoreSCP
) -> NodeProcess:
    return node_factory(
        model={"path": str(tiny_model_dir)},
        lesions={"threshold": 0.5, "min_volume_mm3": 0},
        inference={"device": "cpu", "batch_size": 8},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        dispatch={"retry_base_seconds": 0.5, "retry_max_seconds": 1.0},
    )


def _phantom(seed: int = 3) -> Phantom:
    return generate_phantom(
        seed=seed, shape_zyx=(24, 96, 96), spacing_mm=(2.0, 3.5, 3.5), tumour_probability=1.0
    )


def _results(node: NodeProcess, pacs: StoreSCP) -> list[pydicom.Dataset]:
    """Wait for the job to be done; the SEG and SR the PACS received, each valid per dciodvfy."""
    listing = node.wait_jobs(
        lambda j: bool(j["jobs"]) and j["jobs"][0]["state"] in ("done", "skipped", "dead"),
        timeout=180,
    )
    job = listing["jobs"][0]
    assert job["state"] == "done", job
    out = []
    for path in pacs.received():
        errors = dciodvfy(path)[0]
        assert not errors, (path.name, errors)
        out.append(dcmread(path))
    assert sorted(str(ds.SOPClassUID) for ds in out) == sorted([SEG, COMPREHENSIVE_3D_SR])
    return out


def _spooled(node: NodeProcess, sop_instance_uid: str) -> Path:
    found = [p for p in (node.data_dir / "spool").rglob("*") if sop_instance_uid in p.name]
    assert len(found) == 1, found
    return found[0]


def _dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta group."""
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    meta_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[128 + 4 + 12 + meta_length :]


def test_d5_enhanced_ct_multiframe_is_analysed(
    node: NodeProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    """D5: one Enhanced CT multi-frame file is a series; its SEG references its frames."""
    phantom = _phantom()
    study = StudyIdentity(patient_name="ENHANCED^CT", patient_id="D5-ENH")
    source = write_enhanced_ct(
        phantom.hu,
        tmp_path / "enhanced.dcm",
        spacing_mm=phantom.spacing_mm,
        origin_mm=phantom.origin_mm,
        study=study,
        series=SeriesSpec(),
    )
    assert storescu([source], node.port).returncode == 0
    results = _results(node, pacs)
    source_uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    seg = next(ds for ds in results if str(ds.SOPClassUID) == SEG)
    assert str(seg.StudyInstanceUID) == study.study_instance_uid
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced == {source_uid}
    frames = [
        int(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]
    assert frames and all(1 <= f <= phantom.hu.shape[0] for f in frames)


def test_d5_implicit_vr_with_private_tags_is_stored_exactly_and_analysed(
    node: NodeProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    """D5: implicit VR little endian slices carrying private elements (a private creator, a
    private LO and a private sequence) are spooled byte for byte and analysed."""
    files = write_phantom_dicom(
        _phantom(), tmp_path / "implicit", transfer_syntax=ImplicitVRLittleEndian
    )
    for path in files:
        ds = dcmread(path)
        block = ds.private_block(0x0029, "ACME CT 1.0", create=True)
        block.add_new(0x10, "LO", "reconstruction 7")
        inner = pydicom.Dataset()
        inner.add_new(0x00290010, "LO", "ACME CT 1.0")
        inner.add_new(0x00291011, "DS", "1.5")
        block.add_new(0x12, "SQ", pydicom.Sequence([inner]))
        ds.save_as(path, enforce_file_format=True)
    assert storescu(files, node.port).returncode == 0
    _results(node, pacs)
    for path in files[:3]:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(_spooled(node, uid)) == _dataset_bytes(path)


@pytest.mark.parametrize(
    ("charset", "name"),
    [("ISO_IR 192", "山田^太郎=やまだ^たろう"), ("ISO_IR 100", "Müller^Jürgen")],
)
def test_d6_non_ascii_names_are_stored_byte_exact_and_kept_in_the_outputs(
    node: NodeProcess, pacs: StoreSCP, tmp_path: Path, charset: str, name: str
) -> None:
    """D6: the spooled files are the sent bytes; the SEG and SR carry the source's Specific
    Character Set and the patient name with the same bytes."""
    study = StudyIdentity(patient_name=name, specific_character_set=charset)
    files = write_phantom_dicom(_phantom(seed=4), tmp_path / "names", study=study)
    assert storescu(files, node.port).returncode == 0
    results = _results(node, pacs)
    source = dcmread(files[0])
    assert str(source.PatientName) == name
    uid = str(source.SOPInstanceUID)
    assert _dataset_bytes(_spooled(node, uid)) == _dataset_bytes(files[0])
    source_raw = dcmread(files[0], stop_before_pixels=True)
    for ds in results:
        assert ds.SpecificCharacterSet == source.SpecificCharacterSet
        assert str(ds.PatientName) == name
        raw = dcmread(pacs_file_of(ds, pacs), stop_before_pixels=True)
        assert raw["PatientName"].value == source_raw["PatientName"].value


def pacs_file_of(ds: pydicom.Dataset, pacs: StoreSCP) -> Path:
    """The received file holding ``ds`` (by SOP Instance UID)."""
    for path in pacs.received():
        if str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) == str(ds.SOPInstanceUID):
            return path
    raise AssertionError("not received")
