"""Tests of the dataset loaders (MSD, DICOM + SEG, phantoms) and patient-level splits."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.errors import DatasetError
from dicom_node.training.ctseries import (
    SeriesSpec,
    StudyIdentity,
    write_ct_series,
    write_enhanced_ct,
)
from dicom_node.training.datasets import (
    Case,
    CaseDataset,
    DicomSegDataset,
    MSDDataset,
    PhantomDataset,
    PhantomSpec,
    Split,
    iter_cases,
    read_split,
    split_cases,
    write_split,
)
from dicom_node.training.phantom import SiteDistribution, generate_phantom, write_phantom_dicom
from tests.peers import node_cli

SMALL = (16, 64, 64)


def _write_msd(root: Path, volumes: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    training = []
    for name, (hu, label) in volumes.items():
        for array, folder in ((hu, "imagesTr"), (label, "labelsTr")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.8, 0.7, 2.5))  # type: ignore[no-untyped-call, unused-ignore]
            (root / folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(root / folder / f"{name}.nii.gz"))
        training.append(
            {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
        )
    (root / "dataset.json").write_text(json.dumps({"name": "Lung", "training": training}))


def test_msd_loader_reads_volumes_masks_and_spacing(tmp_path: Path) -> None:
    """An MSD folder yields each pair as (z, y, x) HU and mask with (dz, dy, dx) spacing."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 400, size=(4, 6, 8)).astype(np.int16)
    label = np.zeros((4, 6, 8), dtype=np.uint8)
    label[2, 1:3, 4:6] = 1
    _write_msd(tmp_path, {"lung_001": (hu, label), "lung_002": (hu, np.zeros_like(label))})
    ds = MSDDataset(tmp_path)
    assert isinstance(ds, CaseDataset)
    assert ds.case_ids() == ["lung_001", "lung_002"]
    case = ds.load("lung_001")
    np.testing.assert_array_equal(case.hu, hu)
    np.testing.assert_array_equal(case.tumour_mask, label)
    assert case.spacing_mm == pytest.approx((2.5, 0.7, 0.8))
    assert case.slice_labels.tolist() == [False, False, True, False]
    assert not ds.load("lung_002").has_tumour
    with pytest.raises(KeyError):
        ds.load("lung_999")
    again = pickle.loads(pickle.dumps(ds))  # what loader processes receive
    np.testing.assert_array_equal(again.load("lung_001").tumour_mask, label)


def test_msd_loader_refuses_a_folder_without_dataset_json(tmp_path: Path) -> None:
    """A folder that is not MSD raises DatasetError naming dataset.json."""
    with pytest.raises(DatasetError, match=r"dataset\.json"):
        MSDDataset(tmp_path)


@pytest.mark.parametrize("position", ["HFS", "HFP"])
def test_dicom_seg_loader_places_frames_on_their_slices(tmp_path: Path, position: str) -> None:
    """SEG frames land on the CT slices they reference, giving back the phantom's mask; a
    prone series (its pixels stored rotated) comes back in the orientation the model reads."""
    phantom = generate_phantom(seed=3, shape_zyx=SMALL, tumour_probability=1.0)
    assert phantom.has_tumour
    mask = phantom.tumour_mask > 0
    if position == "HFS":
        files = write_phantom_dicom(phantom, tmp_path / "ct")
        stored_mask = mask
    else:
        (_, dy, dx), (ox, oy, oz) = phantom.spacing_mm, phantom.origin_mm
        _, rows, columns = phantom.hu.shape
        files = write_ct_series(
            np.ascontiguousarray(phantom.hu[:, ::-1, ::-1]),
            tmp_path / "ct",
            spacing_mm=phantom.spacing_mm,
            study=StudyIdentity.random(3),
            series=SeriesSpec(image_orientation=(-1, 0, 0, 0, -1, 0), patient_position="HFP"),
            origin_mm=(ox + (columns - 1) * dx, oy + (rows - 1) * dy, oz),
        )
        stored_mask = np.ascontiguousarray(mask[:, ::-1, ::-1])
    sources = [pydicom.dcmread(f) for f in files]
    _write_seg(sources, stored_mask, tmp_path / "seg.dcm")
    ds = DicomSegDataset(tmp_path)
    (case_id,) = ds.case_ids()
    case = ds.load(case_id)
    assert case.hu.shape == phantom.hu.shape
    np.testing.assert_array_equal(case.hu, phantom.hu)
    np.testing.assert_array_equal(case.tumour_mask > 0, mask)
    assert case.origin_mm == pytest.approx(phantom.origin_mm, abs=1e-3)
    assert ds.patient_id(case_id) == str(sources[0].PatientID)
    again = pickle.loads(pickle.dumps(ds))  # what loader processes receive
    np.testing.assert_array_equal(again.load(case_id).tumour_mask > 0, mask)


def _segment(
    number: int,
    label: str,
    kind: Code = codes.SCT.Neoplasm,
    category: Code = codes.SCT.MorphologicallyAbnormalStructure,
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def _write_seg(
    sources: list[pydicom.Dataset],
    mask: np.ndarray,
    path: Path,
    *,
    segments: list[hd.seg.SegmentDescription] | None = None,
    fractional: bool = False,
) -> None:
    """A DICOM SEG of ``mask`` (BINARY, one segment, tumour, by default) on the CT images
    ``sources``; ``mask`` is (frames, rows, columns[, segments])."""
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.FRACTIONAL
            if fractional
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=segments or [_segment(1, "tumour")],
        series_instance_uid=hd.UID(),
        series_number=50,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(path)


def test_dicom_seg_loader_needs_a_seg(tmp_path: Path) -> None:
    """CT series without any SEG give no cases: DatasetError."""
    phantom = generate_phantom(seed=4, shape_zyx=SMALL)
    write_phantom_dicom(phantom, tmp_path)
    with pytest.raises(DatasetError, match="no CT series with a DICOM SEG"):
        DicomSegDataset(tmp_path)


def test_phantom_dataset_is_seeded_and_shiftable() -> None:
    """The same seed gives the same case; a shifted distribution changes the sites drawn."""
    spec = PhantomSpec(first_seed=10, count=2, shape_zyx=SMALL, tumour_probability=1.0)
    ds = PhantomDataset(spec)
    assert ds.case_ids() == ["phantom-000010", "phantom-000011"]
    a, b = ds.load("phantom-000010"), ds.load("phantom-000010")
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.has_tumour
    shifted = PhantomDataset(PhantomSpec(first_seed=10, count=2, shape_zyx=SMALL, shift=1.0))
    assert shifted.distribution.noise_sd_hu[0] > ds.distribution.noise_sd_hu[0]
    with pytest.raises(KeyError):
        ds.load("phantom-000012")


class _Listed:
    """An in-memory dataset with several cases per patient (for split tests)."""

    name = "listed"

    def __init__(self, patients: dict[str, str]) -> None:
        self._patients = patients

    def case_ids(self) -> list[str]:
        return sorted(self._patients)

    def patient_id(self, case_id: str) -> str:
        return self._patients[case_id]

    def load(self, case_id: str) -> Case:
        zeros = np.zeros((1, 2, 2), dtype=np.int16)
        return Case(case_id, self._patients[case_id], zeros, zeros.astype(np.uint8), (1, 1, 1))


def test_split_keeps_each_patient_on_one_side(tmp_path: Path) -> None:
    """No patient's cases are in two splits; the split survives a JSON round trip."""
    patients = {f"case-{i:02d}": f"patient-{i // 3}" for i in range(30)}
    ds = _Listed(patients)
    split = split_cases(ds, val_fraction=0.2, test_fraction=0.2, seed=1)
    sides = {name: {patients[c] for c in split.get(name)} for name in ("train", "val", "test")}
    assert not sides["train"] & sides["val"]
    assert not sides["train"] & sides["test"]
    assert not sides["val"] & sides["test"]
    assert sum(len(split.get(n)) for n in ("train", "val", "test")) == 30
    assert split.val and split.test
    path = tmp_path / "split.json"
    write_split(split, path, patients=patients)
    assert read_split(path) == split


def test_read_split_refuses_a_patient_on_two_sides(tmp_path: Path) -> None:
    """A split file that puts one patient in train and test is refused."""
    path = tmp_path / "split.json"
    write_split(Split(train=("a",), val=(), test=("b",)), path, patients={"a": "p", "b": "p"})
    with pytest.raises(DatasetError, match="patient p"):
        read_split(path)


def test_phantom_cache_returns_the_generated_case(tmp_path: Path) -> None:
    """A cached phantom is written once and read back identical (volume, mask, geometry)."""
    spec = PhantomSpec(first_seed=7, count=1, shape_zyx=SMALL)
    first = PhantomDataset(spec, cache_dir=tmp_path).load("phantom-000007")
    (cached,) = tmp_path.glob("phantom-000007-*.npz")
    again = PhantomDataset(spec, cache_dir=tmp_path).load("phantom-000007")
    np.testing.assert_array_equal(first.hu, again.hu)
    np.testing.assert_array_equal(first.tumour_mask, again.tumour_mask)
    assert again.spacing_mm == pytest.approx(first.spacing_mm)
    assert again.origin_mm == pytest.approx(first.origin_mm)
    assert cached.stat().st_size > 0


def test_msd_loader_flips_ras_stored_volumes_to_increasing_lps(tmp_path: Path) -> None:
    """A volume whose x and y axes point right/anterior is flipped; the origin follows."""
    hu = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    label = np.zeros_like(hu, dtype=np.uint8)
    label[1, 0, 0] = 1
    _write_msd(tmp_path, {"lung_001": (hu, label)})
    for folder in ("imagesTr", "labelsTr"):
        path = tmp_path / folder / "lung_001.nii.gz"
        image = sitk.ReadImage(str(path))
        image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # type: ignore[no-untyped-call, unused-ignore]
        image.SetOrigin((10.0, 20.0, 30.0))  # type: ignore[no-untyped-call, unused-ignore]
        sitk.WriteImage(image, str(path))
    case = MSDDataset(tmp_path).load("lung_001")
    np.testing.assert_array_equal(case.hu, hu[:, ::-1, ::-1])
    assert case.tumour_mask[1, -1, -1] == 1
    # The new first voxel is the old (x=3, y=2): 10 - 3 * 0.8, 20 - 2 * 0.7.
    assert case.origin_mm == pytest.approx((10.0 - 2.4, 20.0 - 1.4, 30.0))


def test_msd_loader_brings_a_volume_stored_sagittal_to_axial(tmp_path: Path) -> None:
    """Axes stored in another order (index i towards the back, j up, k to the left): the
    loader permutes them to (z, y, x) along the LPS axes, spacing with them, mask alike."""
    stored = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (k, j, i)
    label = np.zeros_like(stored, dtype=np.uint8)
    label[3, 1, 2] = 1  # k=3 (x), j=1 (z), i=2 (y)
    _write_msd(tmp_path, {"lung_001": (stored, label)})
    for folder in ("imagesTr", "labelsTr"):
        path = tmp_path / folder / "lung_001.nii.gz"
        image = sitk.ReadImage(str(path))
        # columns: i -> +y (P), j -> +z (S), k -> +x (L)
        image.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0))  # type: ignore[no-untyped-call, unused-ignore]
        image.SetSpacing((0.6, 2.5, 0.9))  # type: ignore[no-untyped-call, unused-ignore]
        sitk.WriteImage(image, str(path))
    case = MSDDataset(tmp_path).load("lung_001")
    np.testing.assert_array_equal(case.hu, stored.transpose(1, 2, 0))  # [z, y, x] = [j, i, k]
    assert case.spacing_mm == pytest.approx((2.5, 0.6, 0.9))
    assert np.argwhere(case.tumour_mask).tolist() == [[1, 2, 3]]


def test_widened_phantoms_use_the_widened_distribution() -> None:
    """``widen`` applies :meth:`SiteDistribution.widened` after the shift and is described."""
    spec = PhantomSpec(first_seed=10, count=2, shape_zyx=SMALL, shift=0.5, widen=1.0)
    dataset = PhantomDataset(spec)
    assert dataset.distribution == SiteDistribution().shifted(0.5).widened(1.0)
    assert "widened by 1" in spec.describe()
    with pytest.raises(ValueError, match="widen"):
        PhantomSpec(widen=-1.0)


def test_phantoms_on_several_matrices_follow_their_seed(tmp_path: Path) -> None:
    """With ``matrices`` each phantom is rendered on one of them by seed (same field of view,
    finer pixels on the larger matrix); the cache keeps phantoms of different shapes apart and
    gives a single-matrix spec the phantoms already made on its matrix."""
    spec = PhantomSpec(first_seed=10, count=2, shape_zyx=SMALL, matrices=(48, 64))
    dataset = PhantomDataset(spec, cache_dir=tmp_path)
    even, odd = dataset.load("phantom-000010"), dataset.load("phantom-000011")
    assert even.hu.shape == (16, 48, 48) and odd.hu.shape == (16, 64, 64)
    assert even.tumour_mask.shape == even.hu.shape
    assert spec.shape_for(12) == (16, 48, 48)
    plain = PhantomSpec(first_seed=10, count=2, shape_zyx=SMALL)
    # the same site for seed 10 on 48 columns as on 64: pixels 64/48 times as large
    single = PhantomDataset(plain).load("phantom-000010")
    assert even.spacing_mm[1] == pytest.approx(single.spacing_mm[1] * 64 / 48)
    assert even.spacing_mm[0] == pytest.approx(single.spacing_mm[0])
    assert "16 slices of 48x48 or 64x64 (by seed)" in spec.describe()
    assert len(list(tmp_path.glob("phantom-*.npz"))) == 2
    # seed 11 was made on 64 columns, which is what the plain spec makes: read, not made again
    cached = PhantomDataset(plain, cache_dir=tmp_path)
    assert cached.cache_key("phantom-000011") == dataset.cache_key("phantom-000011")
    assert cached.cache_key("phantom-000010") != dataset.cache_key("phantom-000010")
    marked = odd.hu.copy()
    marked[0, 0, 0] = 12345  # a mark in the shared file shows it is read
    np.savez(
        tmp_path / f"phantom-000011-{cached.cache_key('phantom-000011')}.npz",
        hu=marked,
        tumour_mask=odd.tumour_mask,
        spacing_mm=np.array(odd.spacing_mm),
        origin_mm=np.array(odd.origin_mm),
    )
    assert cached.load("phantom-000011").hu[0, 0, 0] == 12345
    np.testing.assert_array_equal(cached.load("phantom-000010").hu, single.hu)
    assert len(list(tmp_path.glob("phantom-*.npz"))) == 3
    with pytest.raises(ValueError, match="matrix"):
        PhantomSpec(matrices=(4,))


def test_cases_load_in_order_in_worker_processes() -> None:
    """Two loader processes give the cases of one process, in the order asked, and errors too."""
    dataset = PhantomDataset(PhantomSpec(first_seed=3, count=5, shape_zyx=SMALL))
    ids = list(reversed(dataset.case_ids()))
    alone = list(iter_cases(dataset, ids))
    together = list(iter_cases(dataset, ids, workers=2))
    assert [c.case_id for c in together] == ids
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a.hu, b.hu)
        np.testing.assert_array_equal(a.tumour_mask, b.tumour_mask)
        assert a.spacing_mm == b.spacing_mm
    with pytest.raises(KeyError, match="phantom-000099"):
        list(iter_cases(dataset, [*ids[:2], "phantom-000099"], workers=2))


def test_a_split_of_phantoms_records_how_they_were_made(tmp_path: Path) -> None:
    """The split file keeps the phantoms' settings; reading it back, they win over other
    settings asked for (the same ids made otherwise are other cases), with the split's seeds,
    or with the seeds asked for when only some of its cases are wanted."""
    made = PhantomSpec(first_seed=0, count=6, shape_zyx=SMALL, widen=1.0, tumour_probability=0.6)
    split = dataclasses.replace(split_cases(PhantomDataset(made), seed=1), phantoms=made)
    write_split(split, tmp_path / "split.json")
    back = read_split(tmp_path / "split.json")
    assert back == split
    asked = PhantomSpec(first_seed=100, count=2, shape_zyx=SMALL, shift=0.5)
    assert back.phantoms_for(asked) == made
    assert back.phantoms_for(asked, listing=False) == dataclasses.replace(
        made, first_seed=100, count=2
    )
    assert dataclasses.replace(back, phantoms=None).phantoms_for(asked) == asked


def test_a_split_that_divides_a_patient_is_refused_whoever_wrote_it(tmp_path: Path) -> None:
    """A split file that does not list patients (another tool's, or an older one) and puts
    one patient's two studies on both sides is refused against the dataset, which knows each
    case's patient: by the split itself, and by `dicom-node evaluate` and `train`."""
    study = StudyIdentity.random(5)
    for n, seed in enumerate((5, 6)):
        phantom = generate_phantom(seed=seed, shape_zyx=SMALL, tumour_probability=1.0)
        files = write_ct_series(
            phantom.hu,
            tmp_path / "data" / f"ct{n}",
            spacing_mm=phantom.spacing_mm,
            study=study,
            series=SeriesSpec(series_number=n + 1),
            origin_mm=phantom.origin_mm,
        )
        sources = [pydicom.dcmread(f) for f in files]
        _write_seg(sources, phantom.tumour_mask > 0, tmp_path / "data" / f"seg{n}.dcm")
    ds = DicomSegDataset(tmp_path / "data")
    first, second = ds.case_ids()
    assert ds.patient_id(first) == ds.patient_id(second)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [first], "val": [second], "test": []}))
    split = read_split(path)  # the file alone cannot tell
    with pytest.raises(DatasetError, match=f"patient {ds.patient_id(first)} is in train and val"):
        split.check_patients(ds, source=str(path))
    common = ["--dataset", "dicom-seg", "--data", str(tmp_path / "data"), "--split", str(path)]
    for args in (
        [
            "evaluate",
            *common,
            "--split-name",
            "val",
            "--out",
            str(tmp_path / "ev"),
            "--model",
            str(Path(__file__).resolve().parents[2] / "models/lung-ct-unet-resnet50"),
        ],
        ["train", *common, "--output", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")],
    ):
        done = node_cli(*args)
        assert done.returncode != 0
        assert "is in train and val" in done.stderr, done.stderr[-500:]


def test_several_segs_of_one_series_give_the_union_of_their_outlines(tmp_path: Path) -> None:
    """Two readers' SEGs of one series (LIDC-IDRI converted has up to four): the case's mask
    is the union of both outlines, whatever their order on disk (one silently replaced the
    other before)."""
    phantom = generate_phantom(seed=3, shape_zyx=SMALL, tumour_probability=1.0)
    files = write_phantom_dicom(phantom, tmp_path / "ct")
    sources = [pydicom.dcmread(f) for f in files]
    first = np.zeros(phantom.hu.shape, dtype=bool)
    first[4, 10:14, 10:14] = True
    second = np.zeros(phantom.hu.shape, dtype=bool)
    second[6, 20:24, 20:26] = True
    _write_seg(sources, first, tmp_path / "seg_reader1.dcm")
    _write_seg(sources, second, tmp_path / "seg_reader2.dcm")
    ds = DicomSegDataset(tmp_path)
    (case_id,) = ds.case_ids()
    np.testing.assert_array_equal(ds.load(case_id).tumour_mask > 0, first | second)


@pytest.mark.parametrize(("value", "tumour"), [(0.99999994, True), (0.5, True), (0.45, False)])
def test_a_floating_point_msd_label_is_tumour_from_one_half(
    tmp_path: Path, value: float, tumour: bool
) -> None:
    """A label stored as float (resampled with linear interpolation, or 1.0 come back as
    0.99999994) is tumour at 0.5 or more; the uint8 cast had made every value below 1 zero."""
    hu = np.full((4, 6, 8), -800, dtype=np.int16)
    label = np.zeros((4, 6, 8), dtype=np.float32)
    label[2, 1:3, 4:6] = np.float32(value)
    _write_msd(tmp_path, {"lung_001": (hu, label)})
    case = MSDDataset(tmp_path).load("lung_001")
    assert int((case.tumour_mask > 0).sum()) == (4 if tumour else 0)


@pytest.mark.parametrize(
    ("origin", "direction"),
    [((20.0, 0.0, 0.0), None), ((0.0, 0.0, 0.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))],
    ids=["shifted", "mirrored"],
)
def test_an_msd_label_off_its_image_is_refused(
    tmp_path: Path, origin: tuple[float, float, float], direction: tuple[float, ...] | None
) -> None:
    """A label 20 mm off its image, or whose header says another orientation (its voxels would
    come back mirrored against the image's), is refused naming the case; a label whose origin
    differs by float rounding loads."""
    hu = np.full((4, 6, 8), -800, dtype=np.int16)
    label = np.zeros((4, 6, 8), dtype=np.uint8)
    label[2, 1:3, 4:6] = 1
    _write_msd(tmp_path, {"lung_001": (hu, label), "lung_002": (hu, label)})
    for name, moved, turned in (("lung_001", origin, direction), ("lung_002", (1e-4, 0, 0), None)):
        path = tmp_path / "labelsTr" / f"{name}.nii.gz"
        image = sitk.ReadImage(str(path))
        image.SetOrigin(moved)  # type: ignore[no-untyped-call, unused-ignore]
        if turned is not None:
            image.SetDirection(turned)  # type: ignore[no-untyped-call, unused-ignore]
        sitk.WriteImage(image, str(path))
    ds = MSDDataset(tmp_path)
    with pytest.raises(DatasetError, match="case lung_001: the label is not on the image's voxels"):
        ds.load("lung_001")
    np.testing.assert_array_equal(ds.load("lung_002").tumour_mask, label)


def test_a_split_refuses_to_leave_a_part_empty(tmp_path: Path) -> None:
    """Too few patients for the parts asked for (one shared Patient ID, or fewer patients than
    parts) is refused with the patient count, never the ids, before `train` writes its split
    file; two patients are enough for train and validation."""
    shared = _Listed({f"case-{i}": "ANONYMOUS" for i in range(4)})
    with pytest.raises(
        DatasetError, match=r"1 patient\(s\) in 4 case\(s\) leave the val and"
    ) as err:
        split_cases(shared, val_fraction=0.15, test_fraction=0.15)
    assert "ANONYMOUS" not in str(err.value)
    assert "(val fraction 0.15, test fraction 0.15)" in str(err.value)
    four = _Listed({f"case-{i}": f"patient-{i}" for i in range(4)})
    with pytest.raises(DatasetError, match=r"4 patient.* leave the train part"):
        split_cases(four, val_fraction=0.45, test_fraction=0.45)
    two = split_cases(_Listed({"a": "p", "b": "q"}), val_fraction=0.15, test_fraction=0.0)
    assert (len(two.train), len(two.val), len(two.test)) == (1, 1, 0)
    _write_msd(
        tmp_path / "msd",
        {"lung_001": (np.zeros((2, 3, 4), np.int16), np.zeros((2, 3, 4), np.uint8))},
    )
    from dicom_node.cli import main

    msd = ["--dataset", "msd", "--data", str(tmp_path / "msd")]
    status = main(
        ["train", *msd, "--output", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")]
    )
    assert status == 1
    assert not (tmp_path / "w" / "split.json").exists()


CT_SHAPE = (8, 32, 32)


def _tiny_ct(folder: Path, *, seed: int = 1, **identity: str) -> list[pydicom.Dataset]:
    """A small CT series (air, a 40 HU block where the tumour of :func:`_tumour` is)."""
    hu = np.full(CT_SHAPE, -800, dtype=np.int16)
    hu[_tumour()] = 40
    study = dataclasses.replace(StudyIdentity.random(seed), **identity)
    files = write_ct_series(
        hu, folder, spacing_mm=(2.5, 0.8, 0.8), study=study, series=SeriesSpec()
    )
    return [pydicom.dcmread(f) for f in files]


def _tumour() -> np.ndarray:
    tumour = np.zeros(CT_SHAPE, dtype=bool)
    tumour[3:5, 10:14, 10:14] = True
    return tumour


def test_only_the_tumour_segments_of_a_seg_are_ground_truth(tmp_path: Path) -> None:
    """A SEG of lung, heart and GTV (NSCLC-Radiomics) gives the GTV only (its Segmented
    Property Type is Neoplasm); --segment-labels picks segments by label instead; a SEG without
    a tumour segment is refused, naming the series and the file."""
    sources = _tiny_ct(tmp_path / "ct")
    tumour = _tumour()
    lung = np.zeros(CT_SHAPE, dtype=bool)
    lung[1:7, 4:28, 4:16] = True
    lung &= ~tumour
    heart = np.zeros(CT_SHAPE, dtype=bool)
    heart[2:6, 20:28, 18:28] = True
    _write_seg(
        sources,
        np.stack([lung, heart, tumour], axis=-1).astype(np.uint8),
        tmp_path / "seg.dcm",
        segments=[
            _segment(1, "Lung-Left", codes.SCT.Lung, codes.SCT.Organ),
            _segment(2, "Heart", codes.SCT.Heart, codes.SCT.Organ),
            _segment(3, "GTV-1"),
        ],
    )
    ds = DicomSegDataset(tmp_path)
    (case_id,) = ds.case_ids()
    case = ds.load(case_id)
    np.testing.assert_array_equal(case.tumour_mask > 0, tumour)
    assert set(np.unique(case.tumour_mask)) == {0, 3}  # the segment number is the label
    chosen = DicomSegDataset(tmp_path, segment_labels="lung-.*|heart").load(case_id)
    np.testing.assert_array_equal(chosen.tumour_mask > 0, lung | heart)
    with pytest.raises(DatasetError, match="not a regular expression"):
        DicomSegDataset(tmp_path, segment_labels="(")
    _write_seg(
        sources,
        lung,
        tmp_path / "seg.dcm",
        segments=[_segment(1, "Lung-Left", codes.SCT.Lung, codes.SCT.Organ)],
    )
    with pytest.raises(DatasetError, match=rf"case {case_id}: SEG seg\.dcm: no segment") as err:
        ds.load(case_id)
    assert "'Lung-Left'" in str(err.value)


def test_a_series_without_patient_id_keeps_to_its_study(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Series whose Patient ID an anonymiser blanked: two series of one study are one patient
    (they were two, by Series Instance UID, and could land on both sides of a split), and a
    series of a study whose other series has a Patient ID takes it; a warning says how many
    series had none, without naming anyone."""
    study = StudyIdentity.random(50)
    for n in range(2):  # two reconstructions of one study, names differing as well
        sources = _tiny_ct(
            tmp_path / f"a{n}",
            seed=10 + n,
            patient_id="",
            patient_name=f"NAME^{n}",
            study_instance_uid=study.study_instance_uid,
        )
        _write_seg(sources, _tumour(), tmp_path / f"a{n}.seg.dcm")
    other = StudyIdentity.random(60)
    for n, patient_id in enumerate(("P-OTHER", "")):
        sources = _tiny_ct(
            tmp_path / f"b{n}",
            seed=20 + n,
            patient_id=patient_id,
            study_instance_uid=other.study_instance_uid,
        )
        _write_seg(sources, _tumour(), tmp_path / f"b{n}.seg.dcm")
    with caplog.at_level("WARNING"):
        ds = DicomSegDataset(tmp_path)
    by_folder = {
        str(pydicom.dcmread(next((tmp_path / name).iterdir())).SeriesInstanceUID): name
        for name in ("a0", "a1", "b0", "b1")
    }
    patients = {by_folder[c]: ds.patient_id(c) for c in ds.case_ids()}
    assert patients["a0"] == patients["a1"] != patients["b0"]
    assert "NAME" not in patients["a0"]
    assert patients["b0"] == patients["b1"] == "P-OTHER"
    assert "3 of 4 series have no Patient ID" in caplog.text
    assert "P-OTHER" not in caplog.text and "NAME" not in caplog.text


def _seg_variant(root: Path, variant: str) -> np.ndarray:
    """A case of one SEG variant under ``root``; the tumour it should give."""
    tumour = _tumour()
    if variant == "fractional":  # values below 1, tumour from half its maximum
        partial = tumour * np.float32(0.6)
        partial[3, 10, 10] = 0.3
        _write_seg(_tiny_ct(root / "ct"), partial, root / "seg.dcm", fractional=True)
        tumour[3, 10, 10] = False
    elif variant in ("positions", "unreadable"):
        _write_seg(_tiny_ct(root / "ct"), tumour, root / "seg.dcm")
        if variant == "positions":  # frames placed by Plane Position (Patient) only
            seg = pydicom.dcmread(root / "seg.dcm")
            for frame in seg.PerFrameFunctionalGroupsSequence:
                del frame.DerivationImageSequence
            seg.save_as(root / "seg.dcm")
        else:  # its pixel data cut short
            data = (root / "seg.dcm").read_bytes()
            (root / "seg.dcm").write_bytes(data[: len(data) - 40])
    else:  # on an Enhanced (multi-frame) CT
        hu = np.full(CT_SHAPE, -800, dtype=np.int16)
        hu[tumour] = 40
        path = write_enhanced_ct(hu, root / "ct" / "ct.dcm", spacing_mm=(2.5, 0.8, 0.8),
                                 study=StudyIdentity.random(3), series=SeriesSpec())  # fmt: skip
        _write_seg([pydicom.dcmread(path)], tumour, root / "seg.dcm")
    return tumour


@pytest.mark.parametrize("variant", ["fractional", "positions", "enhanced", "unreadable"])
def test_seg_variants_load_onto_their_slices(tmp_path: Path, variant: str) -> None:
    """A FRACTIONAL SEG of values below 1, a SEG whose frames name their slice by Plane
    Position only, and a SEG on an Enhanced (multi-frame) CT give their tumour (each had failed
    on an error of highdicom's naming no case); a SEG highdicom cannot read is a DatasetError
    naming the case and the file."""
    tumour = _seg_variant(tmp_path, variant)
    ds = DicomSegDataset(tmp_path)
    (case_id,) = ds.case_ids()
    if variant == "unreadable":
        with pytest.raises(DatasetError, match=rf"case {case_id}: SEG seg\.dcm: cannot be read"):
            ds.load(case_id)
        return
    case = ds.load(case_id)
    np.testing.assert_array_equal(case.tumour_mask > 0, tumour)
    assert set(case.hu[case.tumour_mask > 0].tolist()) == {40}
