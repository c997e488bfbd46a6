"""The study pipeline and `dicom-node analyze` on generated chest CT, with the tiny model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydicom import dcmread

from dicom_node.analysis.lesions import LesionRule
from dicom_node.analysis.pipeline import SeriesFindings
from tests.peers import node_cli

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _config(tmp_path: Path, model: Path, threshold: float, lesions: str = "") -> Path:
    cfg = tmp_path / "analyze.yaml"
    more = f", {lesions}" if lesions else ""
    cfg.write_text(
        f"model: {{path: {model}}}\n"
        f"lesions: {{threshold: {threshold}, min_volume_mm3: 0{more}}}\n"
        "inference: {device: cpu, batch_size: 8}\n"
    )
    return cfg


def test_analyze_writes_findings_seg_and_sr(
    tmp_path: Path, tiny_model_dir: Path, phantom_series: Callable[..., list[Path]]
) -> None:
    """analyze: exit 0, findings JSON, and a SEG + SR in the source's study that re-read cleanly.

    The tiny random model's probabilities hover near 0.5; a threshold of 0.5 turns some of its
    output into lesions, which exercises the SEG path (what it finds means nothing)."""
    files = phantom_series()
    out = tmp_path / "out"
    done = node_cli(
        "analyze",
        str(files[0].parent),
        "--out",
        str(out),
        "--json",
        "--config",
        str(_config(tmp_path, tiny_model_dir, 0.5)),
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary == json.loads((out / "findings.json").read_text())
    [series] = summary["series"]
    assert series["slices"] == len(files)
    assert series["classification"] in ("cancerous", "non-cancerous")
    assert series["lesions"], "threshold 0.5 on the random model must yield lesions"
    classes = sorted(str(dcmread(p).SOPClassUID) for p in series["outputs"])
    assert classes == sorted([SEG, COMPREHENSIVE_3D_SR])
    study = str(dcmread(files[0]).StudyInstanceUID)
    assert all(str(dcmread(p).StudyInstanceUID) == study for p in series["outputs"])
    assert set(series["seconds"]) >= {"volume", "model", "lesions", "seg", "sr"}
    images = series["images"]
    assert all(0 <= f["slice"] < len(files) for f in images["flagged"])
    assert all(f["probability"] >= images["threshold"] for f in images["flagged"])
    assert bool(images["flagged"]) == (images["highest_probability"] >= images["threshold"])


def test_findings_name_the_slices_the_classifier_calls_cancerous() -> None:
    """The findings list each slice at or above the image threshold, in slice order, with its
    probability, and the highest probability of any slice; none in a study under the image
    study gate."""
    findings = SeriesFindings(
        series_instance_uid="1.2.3",
        label="CT 1",
        slices=5,
        lesions=(),
        study_probability=0.6,
        study_positive=False,
        threshold=0.89,
        outputs=(),
        seconds={},
        rule=LesionRule(threshold=0.5, min_volume_mm3=10.0),
        image_probabilities=(0.1, 0.61234, 0.37, 0.369, 0.9),
        image_threshold=0.37,
    )
    assert findings.summary()["images"] == {
        "threshold": 0.37,
        "study_gate": None,
        "highest_probability": 0.9,
        "flagged": [
            {"slice": 1, "probability": 0.6123},
            {"slice": 2, "probability": 0.37},
            {"slice": 4, "probability": 0.9},
        ],
    }
    # With an image study gate the study (0.6) does not reach, no slice is called; at one it
    # reaches, the same slices are.
    below = dataclasses.replace(findings, image_study_gate=0.7).summary()["images"]
    assert below["study_gate"] == 0.7
    assert below["flagged"] == []
    assert below["highest_probability"] == 0.9
    reached = dataclasses.replace(findings, image_study_gate=0.6).summary()["images"]
    assert reached["flagged"] == findings.summary()["images"]["flagged"]


def test_the_gates_drop_lesions_the_classifier_does_not_back(
    tmp_path: Path, tiny_model_dir: Path, phantom_series: Callable[..., list[Path]]
) -> None:
    """One model and lesion threshold without a gate, with the image gate at an image threshold
    (0.9999) that the tiny model's slices do not reach, and with a study gate (0.9999) its
    study does not reach: without a gate, threshold 0.5 finds lesions (as above); with either,
    every one is dropped: an SR without lesions and no SEG."""
    files = phantom_series()
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    card = yaml.safe_load((model / "model.yaml").read_text())
    card.setdefault("thresholds", {})["image"] = 0.9999
    (model / "model.yaml").write_text(yaml.safe_dump(card))
    series = {}
    for gate in ("false", "true", "study"):
        done = node_cli(
            "analyze",
            str(files[0].parent),
            "--out",
            str(tmp_path / f"out-{gate}"),
            "--json",
            "--config",
            str(
                _config(
                    tmp_path,
                    model,
                    0.5,
                    "image_gate: false, study_gate: 0.9999"
                    if gate == "study"
                    else f"image_gate: {gate}",
                )
            ),
        )
        assert done.returncode == 0, done.stderr
        [series[gate]] = json.loads(done.stdout)["series"]
    assert series["false"]["lesions"]
    assert series["true"]["lesions"] == []
    assert series["study"]["lesions"] == []
    assert series["study"]["study_probability"] < 0.9999
    # what the gates withheld: every component the ungated rule reported (or left out itself)
    every = len(series["false"]["lesions"]) + series["false"]["dropped_components"]
    assert series["true"]["dropped_components"] == series["study"]["dropped_components"] == every
    # findings.json (and the job's result) say which rule made the lesions
    rule = {"threshold": 0.5, "min_volume_mm3": 0.0, "min_peak": None}
    assert series["false"]["lesion_rule"] == {**rule, "image_gate": None, "study_gate": None}
    assert series["true"]["lesion_rule"] == {**rule, "image_gate": 0.9999, "study_gate": None}
    assert series["study"]["lesion_rule"] == {**rule, "image_gate": None, "study_gate": 0.9999}
    assert series["true"]["images"]["flagged"] == []  # no slice reaches 0.9999
    assert series["true"]["images"]["threshold"] == 0.9999
    for gate in ("true", "study"):
        [sr] = series[gate]["outputs"]
        assert str(dcmread(sr).SOPClassUID) == COMPREHENSIVE_3D_SR


def test_analyze_without_lesions_writes_only_the_sr(
    tmp_path: Path, tiny_model_dir: Path, phantom_series: Callable[..., list[Path]]
) -> None:
    """No lesion above the threshold: no SEG, an SR that says so."""
    files = phantom_series(tumour=False)
    out = tmp_path / "out"
    done = node_cli(
        "analyze",
        *map(str, files),
        "--out",
        str(out),
        "--json",
        "--config",
        str(_config(tmp_path, tiny_model_dir, 0.99)),
    )
    assert done.returncode == 0, done.stderr
    [series] = json.loads(done.stdout)["series"]
    assert series["lesions"] == []
    [sr] = series["outputs"]
    assert str(dcmread(sr).SOPClassUID) == COMPREHENSIVE_3D_SR


def test_analyze_exit_statuses(
    tmp_path: Path, tiny_model_dir: Path, phantom_series: Callable[..., list[Path]]
) -> None:
    """3 when skipped (reason on stderr), 2 for bad arguments, 1 for a failure; no traceback."""
    cfg = _config(tmp_path, tiny_model_dir, 0.5)
    few = phantom_series(slices=8)  # below selection.min_slices
    skipped = node_cli(
        "analyze", str(few[0].parent), "--out", str(tmp_path / "o1"), "--config", str(cfg)
    )
    assert skipped.returncode == 3
    assert "skipped" in skipped.stderr and "slices" in skipped.stderr
    missing = node_cli("analyze", str(tmp_path / "nothing-here"), "--config", str(cfg))
    assert missing.returncode == 2
    assert "no such file or folder" in missing.stderr
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "weights.safetensors").write_bytes(b"not weights")
    files = phantom_series()
    failed = node_cli("analyze", str(files[0].parent), "--model", str(broken), "--config", str(cfg))
    assert failed.returncode == 1
    for result in (skipped, missing, failed):
        assert "Traceback" not in result.stderr


def test_a_prone_or_feet_first_series_reaches_the_model_as_trained(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The same patient scanned head first supine (HFS), prone (HFP), feet first (FFS) and on
    either side (HFDL, HFDR: decubitus, the image's rows running front to back): the stored
    pixels are the HFS ones rotated, transposed or mirrored, the patient is where it was. The
    model reads each in the orientation it was trained on, so every finding (the slices it
    flags, the lesions at their LPS places) is the same; the SEG frames follow each series'
    own slices."""
    import numpy as np

    from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series
    from dicom_node.training.phantom import generate_phantom

    phantom = generate_phantom(
        seed=3, shape_zyx=(20, 96, 96), spacing_mm=(2.0, 3.5, 3.5), tumour_probability=1.0
    )
    hu = np.asarray(phantom.hu)
    (dz, dy, dx), (ox, oy, oz) = phantom.spacing_mm, phantom.origin_mm
    z, y, x = hu.shape
    # (stored pixels, orientation, origin) putting every voxel where HFS puts it; FFS's slice
    # normal points to the feet, so its slice 0 is the top one
    right, back, top = ox + (x - 1) * dx, oy + (y - 1) * dy, oz + (z - 1) * dz
    positions = {
        "HFS": (hu, (1, 0, 0, 0, 1, 0), (ox, oy, oz)),
        "HFP": (hu[:, ::-1, ::-1], (-1, 0, 0, 0, -1, 0), (right, back, oz)),
        "FFS": (hu[::-1, :, ::-1], (-1, 0, 0, 0, 1, 0), (right, oy, top)),
        # rows along +y (to the back), columns along -x: stored[z, r, c] = hu[z, c, x-1-r]
        "HFDL": (hu[:, :, ::-1].transpose(0, 2, 1), (0, 1, 0, -1, 0, 0), (right, oy, oz)),
        # rows along -y, columns along +x: stored[z, r, c] = hu[z, y-1-c, r]
        "HFDR": (hu[:, ::-1, :].transpose(0, 2, 1), (0, -1, 0, 1, 0, 0), (ox, back, oz)),
    }
    findings = {}
    for name, (pixels, orientation, origin) in positions.items():
        files = write_ct_series(
            np.ascontiguousarray(pixels),
            tmp_path / name,
            spacing_mm=phantom.spacing_mm,
            study=StudyIdentity.random(3),
            series=SeriesSpec(image_orientation=orientation, patient_position=name),
            origin_mm=origin,
        )
        out = tmp_path / f"out-{name}"
        done = node_cli(
            "analyze", str(files[0].parent), "--out", str(out), "--json",
            "--config", str(_config(tmp_path, tiny_model_dir, 0.5)),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        [series] = json.loads(done.stdout)["series"]
        findings[name] = series
    reference = findings["HFS"]
    assert reference["lesions"], "threshold 0.5 on the random model must yield lesions"

    def lesions(series: dict[str, Any]) -> list[tuple[float, list[float]]]:
        # the random model's lesions reach results.max_lesions; which of those tied at the
        # smallest volume is kept depends on the order of the labels: compare the others
        found = [(e["volume_mm3"], e["centroid_lps_mm"]) for e in series["lesions"]]
        smallest = min(v for v, _ in found)
        return sorted((v, c) for v, c in found if v > smallest)

    for name in ("HFP", "FFS", "HFDL", "HFDR"):
        got = findings[name]
        assert got["images"]["highest_probability"] == reference["images"]["highest_probability"]
        assert len(got["lesions"]) == len(reference["lesions"])
        for (volume, centroid), (volume_hfs, centroid_hfs) in zip(
            lesions(got), lesions(reference), strict=True
        ):
            assert volume == volume_hfs
            np.testing.assert_allclose(centroid, centroid_hfs, atol=0.11)  # written to 0.1 mm
