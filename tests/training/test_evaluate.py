"""Tests of the evaluation: case scoring by hand-made outputs, JSON and PNG report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.analysis.lesions import LesionRule
from dicom_node.analysis.weights import load_model, save_model
from dicom_node.training.datasets import Case, PhantomDataset, PhantomSpec
from dicom_node.training.evaluate import (
    CaseOutcome,
    Evaluation,
    LesionOutcome,
    card_with_figures,
    evaluate,
    score_case,
    write_evaluation,
)
from tests.analysis.lungct_tiny import make_card, make_network


def _case() -> Case:
    hu = np.full((6, 32, 32), -850, dtype=np.int16)
    mask = np.zeros((6, 32, 32), dtype=np.uint8)
    mask[2:4, 10:16, 10:16] = 1  # 72 voxels of 1 mm³
    return Case("c1", "p1", hu, mask, (1.0, 1.0, 1.0))


def test_a_perfect_prediction_scores_dice_one_and_no_false_positives() -> None:
    """Probability equal to the truth: Dice 1, the lesion detected, no false positives."""
    case = _case()
    prob = case.tumour_mask.astype(np.float32)
    out = score_case(
        case,
        prob,
        np.array([0, 0, 1, 1, 0, 0], dtype=np.float32),
        1.0,
        rule=LesionRule(threshold=0.5, min_volume_mm3=10.0),
    )
    assert out.volume_dice == 1.0
    assert len(out.lesions) == 1 and out.lesions[0].detected and out.lesions[0].dice == 1.0
    assert out.false_positive_lesions == 0
    assert out.lesions[0].diameter_mm == pytest.approx((6 * 72 / np.pi) ** (1 / 3))


def test_a_distant_blob_is_a_false_positive_and_a_tiny_one_is_ignored() -> None:
    """A separate predicted blob counts as a false positive; one below the minimum is dropped."""
    case = _case()
    prob = np.zeros(case.hu.shape, dtype=np.float32)
    prob[2:4, 10:13, 10:16] = 0.9  # half the tumour
    prob[0:3, 25:30, 25:30] = 0.9  # 75 mm³ elsewhere
    prob[5, 0, 0] = 0.9  # 1 mm³, under the minimum volume
    out = score_case(
        case,
        prob,
        np.zeros(6, dtype=np.float32),
        0.1,
        rule=LesionRule(threshold=0.5, min_volume_mm3=10.0),
    )
    assert out.false_positive_lesions == 1
    assert out.predicted_lesions == 2
    assert out.lesions[0].detected
    assert out.lesions[0].dice == pytest.approx(2 * 36 / (72 + 36))


def test_a_lesion_without_a_confident_voxel_is_not_reported() -> None:
    """With a peak rule, a component whose highest probability stays below it is dropped."""
    case = _case()
    prob = np.zeros(case.hu.shape, dtype=np.float32)
    prob[2:4, 10:13, 10:16] = 0.95  # on the tumour, confident
    prob[0:3, 25:30, 25:30] = 0.6  # elsewhere, above the threshold but never confident
    out = score_case(
        case,
        prob,
        np.zeros(6, dtype=np.float32),
        0.1,
        rule=LesionRule(threshold=0.5, min_volume_mm3=10.0, min_peak=0.9),
    )
    assert out.predicted_lesions == 1
    assert out.false_positive_lesions == 0
    assert out.lesions[0].detected


def test_the_image_gate_scores_only_lesions_on_flagged_slices() -> None:
    """With the image gate, a blob on slices the classifier leaves below the gate is dropped;
    the tumour, on flagged slices, stays."""
    case = _case()
    prob = np.zeros(case.hu.shape, dtype=np.float32)
    prob[2:4, 10:16, 10:16] = 0.95  # the tumour, slices 2-3
    prob[4:6, 25:30, 25:30] = 0.95  # 50 mm³ on slices 4-5
    image = np.array([0.1, 0.1, 0.2, 0.7, 0.5, 0.1], dtype=np.float32)
    gated = LesionRule(threshold=0.5, min_volume_mm3=10.0, image_gate=0.6)
    out = score_case(case, prob, image, 0.7, rule=gated)
    assert (out.predicted_lesions, out.false_positive_lesions) == (1, 0)
    assert out.lesions[0].dice == 1.0
    out = score_case(case, prob, image, 0.7, rule=LesionRule(threshold=0.5, min_volume_mm3=10.0))
    assert (out.predicted_lesions, out.false_positive_lesions) == (2, 1)


def test_the_study_gate_scores_no_lesion_in_a_study_below_it() -> None:
    """The same maps with a study gate: a study probability below it leaves no lesion (the
    tumour is missed), one at it leaves both."""
    case = _case()
    prob = np.zeros(case.hu.shape, dtype=np.float32)
    prob[2:4, 10:16, 10:16] = 0.95
    prob[4:6, 25:30, 25:30] = 0.95
    image = np.array([0.1, 0.1, 0.2, 0.7, 0.5, 0.1], dtype=np.float32)
    gated = LesionRule(threshold=0.5, min_volume_mm3=10.0, study_gate=0.7)
    out = score_case(case, prob, image, 0.69, rule=gated)
    assert (out.predicted_lesions, out.false_positive_lesions) == (0, 0)
    assert not out.lesions[0].detected and out.lesions[0].dice == 0.0
    out = score_case(case, prob, image, 0.7, rule=gated)
    assert (out.predicted_lesions, out.false_positive_lesions) == (2, 1)


def test_the_errors_section_says_which_slices_and_tumours_were_missed() -> None:
    """By hand: a case with a large tumour (found), a small one (missed, no response) and
    three flagged slices without tumour; a tumour-free case with one flagged slice."""
    hu = np.full((12, 32, 32), -850, dtype=np.int16)
    mask = np.zeros((12, 32, 32), dtype=np.uint8)
    mask[1:4, 2:12, 2:12] = 1  # 100 mm² on slices 1-3: 300 mm³, found
    mask[8, 20:22, 20:24] = 1  # 8 mm² on slice 8, missed
    hu[8, 20:22, 20:24] = -550
    case = Case("c1", "p1", hu, mask, (1.0, 1.0, 1.0))
    prob = np.zeros(hu.shape, dtype=np.float32)
    prob[1:4, 2:12, 2:12] = 0.9
    prob[8, 20:22, 20:24] = 0.2
    image = np.zeros(12, dtype=np.float32)
    image[[1, 2, 3]] = 0.9  # tumour slices found
    image[[4, 5, 11]] = 0.8  # flagged: 4 and 5 next to the tumour, 11 three slices from 8
    rule = LesionRule(threshold=0.5, min_volume_mm3=10.0)
    with_tumour = score_case(case, prob, image, 0.9, rule=rule)
    free = Case(
        "c2",
        "p2",
        np.full((4, 32, 32), -850, np.int16),
        np.zeros((4, 32, 32), np.uint8),
        (1.0, 1.0, 1.0),
    )
    free_image = np.array([0.0, 0.7, 0.0, 0.0], dtype=np.float32)
    without = score_case(free, np.zeros((4, 32, 32), np.float32), free_image, 0.1, rule=rule)
    errors = Evaluation(card=make_card(), cases=(with_tumour, without)).errors()
    areas = {
        tuple(b["area_mm2"]): (b["images"], b["sensitivity"])
        for b in errors["image_sensitivity_by_tumour_area"]
    }
    assert areas[(0.0, 15.0)] == (1, 0.0)  # slice 8
    assert areas[(60.0, 150.0)] == (3, 1.0)  # slices 1-3
    assert areas[(15.0, 60.0)] == (0, None)
    assert errors["false_positive_images"] == {
        "within_2_slices_of_tumour": 2,
        "elsewhere_in_tumour_studies": 1,
        "in_tumour_free_studies": 1,
    }
    sizes = {
        b["diameter_mm"][0]: (b["lesions"], b["sensitivity"]) for b in errors["detection_by_size"]
    }
    assert sizes[0.0] == (1, 0.0) and sizes[6.0] == (1, 1.0)  # 8 mm³: 2.5 mm; 300 mm³: 8.3 mm
    assert errors["missed_ge_6mm"] == []
    small = next(les for les in with_tumour.lesions if not les.detected)
    assert small.mean_hu == pytest.approx(-550.0)
    assert small.peak_probability == pytest.approx(0.2)
    large = next(les for les in with_tumour.lesions if les.detected)
    assert large.peak_probability == pytest.approx(0.9) and large.mean_hu == pytest.approx(-850.0)


def _outcome(k: int, right: bool, *, slices: int = 50) -> CaseOutcome:
    """A case with tumour on every other slice, the classifier right or wrong on all of them;
    odd cases are tumour-free (2 false-positive lesions when wrong), even ones hold a 10 mm
    tumour (Dice 0.8 when right, missed when wrong)."""
    free = k % 2 == 1
    truth = np.zeros(slices, dtype=bool) if free else np.arange(slices) % 2 == 0
    probability = np.where(truth == right, 0.9, 0.1).astype(np.float32)
    lesions = () if free else (LesionOutcome(10.0, 524.0, right, 0.8 if right else 0.0),)
    return CaseOutcome(
        case_id=f"c{k}",
        image_truth=truth,
        image_probability=probability,
        image_tumour_area_mm2=truth * 80.0,
        study_truth=not free,
        study_probability=0.9 if right != free else 0.1,
        volume_dice=0.8 if right else 0.0,
        lesions=lesions,
        false_positive_lesions=0 if right or not free else 2,
        predicted_lesions=int(right and not free) + (0 if right or not free else 2),
        seconds=0.0,
    )


def test_intervals_resample_patients_not_slices() -> None:
    """20 cases of 50 slices, the classifier right on every slice of 10 and wrong on every
    slice of the others: the slices of one case stand or fall together, so the interval of
    the accuracy is as wide as 20 draws make it (+- 0.22 about 0.5), not 1000 (+- 0.03); 20
    cases each right on half their slices leave no doubt at all."""
    cases = tuple(_outcome(k, right=k % 4 < 2) for k in range(20))
    evaluation = Evaluation(card=make_card(), cases=cases)
    assert evaluation.image_scores().accuracy == pytest.approx(0.5)
    intervals = evaluation.intervals()
    assert intervals["resamples"] == 2000 and intervals["level"] == 0.95
    low, high = intervals["image"]["accuracy"]
    assert 0.3 < high - low < 0.55 and low < 0.5 < high
    for name in ("sensitivity", "specificity", "mcc", "kappa", "roc_auc"):
        low, high = intervals["image"][name]
        assert low <= high and high - low > 0.3, name
    low, high = intervals["lesion_dice_mean_ge_6mm"]  # 0.4: half the tumours found at 0.8
    assert 0.0 <= low < 0.4 < high <= 0.8
    low, high = intervals["detection_sensitivity_ge_6mm"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    low, high = intervals["false_positives_per_tumour_free_study"]  # 1.0: 2 in half of them
    assert 0.0 <= low < 1.0 < high <= 2.0
    assert evaluation.intervals() == intervals  # seeded

    half_right = []
    for k in range(20):
        case = _outcome(0, right=True)
        flipped = case.image_probability.copy()
        flipped[: flipped.size // 2] = 1.0 - flipped[: flipped.size // 2]
        half_right.append(
            CaseOutcome(**{**case.__dict__, "case_id": f"h{k}", "image_probability": flipped})
        )
    even = Evaluation(card=make_card(), cases=tuple(half_right)).intervals()
    assert even["image"]["accuracy"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert even["false_positives_per_tumour_free_study"] is None  # no tumour-free case


def test_the_image_study_gate_withdraws_the_calls_of_a_study_under_it() -> None:
    """A tumour study the classifier gets right (study probability 0.9) and a tumour-free one
    where it flags 5 of 50 slices at 0.65 (study probability 0.65). Without an image study
    gate those are 5 false-positive slices: 95 of 100 right. With the gate at 0.7 the second
    study's slices are not called: all 100 right, and no false-positive slice in the errors.
    The ROC AUC reads the probabilities and does not move."""
    flagged = np.full(50, 0.1, dtype=np.float32)
    flagged[10:15] = 0.65
    free = CaseOutcome(
        **{
            **_outcome(1, right=True).__dict__,
            "image_probability": flagged,
            "study_probability": 0.65,
        }
    )
    cases = (_outcome(0, right=True), free)
    ungated = Evaluation(card=make_card(), cases=cases)
    card = make_card(
        thresholds={"segmentation": 0.5, "image": 0.5, "study": 0.5, "image_study_gate": 0.7}
    )
    gated = Evaluation(card=card, cases=cases)
    assert ungated.image_scores().accuracy == pytest.approx(0.95)
    assert gated.image_scores().accuracy == 1.0
    assert gated.image_scores().roc_auc == ungated.image_scores().roc_auc
    assert ungated.errors()["false_positive_images"]["in_tumour_free_studies"] == 5
    assert gated.errors()["false_positive_images"]["in_tumour_free_studies"] == 0
    assert gated.intervals()["image"]["accuracy"] == [1.0, 1.0]
    assert gated.summary()["thresholds"]["image_study_gate"] == 0.7


def test_the_card_takes_every_held_out_figure_from_the_new_evaluation() -> None:
    """Held-out figures of an earlier evaluation leave the card (a figure the new one cannot
    give is absent, not stale); other figures stay; the intervals come with the figures."""
    card = make_card().model_copy(
        update={"metrics": {"heldout_lesion_dice_ge_6mm_ci95_low": 0.9, "val_image_mcc": 0.5}}
    )
    free = tuple(_outcome(k, right=k % 4 == 1) for k in (1, 3, 5, 7))  # no tumour at all
    written = card_with_figures(card, Evaluation(card=card, cases=free), description="four")
    assert written.metrics["val_image_mcc"] == 0.5
    assert "heldout_lesion_dice_ge_6mm_ci95_low" not in written.metrics
    assert written.metrics["heldout_image_accuracy"] == pytest.approx(0.5)
    low = written.metrics["heldout_fp_lesions_per_tumour_free_study_ci95_low"]
    high = written.metrics["heldout_fp_lesions_per_tumour_free_study_ci95_high"]
    assert 0.0 <= low < 1.0 < high <= 2.0


def test_a_new_held_out_set_replaces_the_note_and_the_baseline_of_the_earlier_one() -> None:
    """Written again on another set, the card names only that set, and the baseline's figures
    of the earlier set go (they compared it with the network there)."""
    free = tuple(_outcome(k, right=k % 4 == 1) for k in (1, 3, 5, 7))
    base = {"train": {"accuracy": 1.0, "mcc": 1.0}, "held_out": {"accuracy": 0.2, "mcc": 0.0}}
    card = make_card()
    first = card_with_figures(
        card, Evaluation(card=card, cases=free), description="set 1 (3.5 mm)", baseline=base
    )
    assert first.metrics["baseline_heldout_image_accuracy"] == pytest.approx(0.2)
    again = card_with_figures(first, Evaluation(card=first, cases=free), description="set 2")
    assert again.description.count("Held-out evaluation") == 1
    assert again.description.endswith("Held-out evaluation (metrics heldout_*): set 2.")
    assert "set 1" not in again.description
    assert not any(k.startswith("baseline_") for k in again.metrics)


def test_evaluate_writes_json_and_png(tmp_path: Path) -> None:
    """Evaluating a (random) tiny model on phantoms writes evaluation.json and report.png."""
    torch.set_num_threads(1)
    model_dir = tmp_path / "model"
    save_model(make_network(), make_card(), model_dir, dtype=torch.float32)
    ds = PhantomDataset(
        PhantomSpec(first_seed=5, count=3, shape_zyx=(16, 64, 64), tumour_probability=0.7)
    )
    result = evaluate(model_dir, ds, ds.case_ids(), overlays=2)
    assert len(result.cases) == 3
    baseline = {
        "train": result.image_scores().as_dict(),
        "held_out": result.image_scores().as_dict(),
        "roc_held_out": None,
    }
    json_path, png_path = write_evaluation(
        tmp_path / "out", result, description="tiny", train=result, baseline=baseline
    )
    payload = json.loads(json_path.read_text())
    for key in ("image", "study", "segmentation", "detection"):
        assert key in payload["held_out"]
    assert {"accuracy", "f1", "mcc", "kappa", "roc_auc", "confusion"} <= set(
        payload["held_out"]["image"]
    )
    assert payload["held_out"]["cases"] == 3 and len(payload["per_case"]) == 3
    intervals = payload["held_out_intervals"]
    assert intervals["method"] == "percentile bootstrap over cases (patients)"
    low, high = intervals["image"]["accuracy"]
    assert 0.0 <= low <= payload["held_out"]["image"]["accuracy"] <= high <= 1.0
    errors = payload["held_out"]["errors"]
    assert sum(b["images"] for b in errors["image_sensitivity_by_tumour_area"]) == sum(
        int(np.sum(c.image_truth)) for c in result.cases
    )
    assert sum(errors["false_positive_images"].values()) == sum(
        int(np.sum((c.image_probability >= 0.5) & ~c.image_truth)) for c in result.cases
    )
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_path.stat().st_size > 20_000


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--keep-mlp"], "--from-model"),
        (["--fine-tune"], "--from-model"),
        (["--from-model", "m", "--keep-mlp", "--fine-tune"], "choose one"),
        (["--input-size", "100"], "multiples of 32"),
        (["--lesion-fraction", "2"], "lesion_fraction must be in [0, 1]"),
        (["--seg-scales", "1.25"], "seg_scales must hold 1.0"),
    ],
)
def test_train_refuses_settings_that_do_not_fit_together(
    flags: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--keep-mlp and --fine-tune need --from-model and exclude each other, and every other
    rule of the training settings holds: a usage error that says which, before any case is
    made or any file written (the split file included)."""
    from dicom_node.cli import EXIT_USAGE, main

    status = main(["train", "--output", str(tmp_path / "model"), *flags])
    assert status == EXIT_USAGE
    assert said in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_train_and_evaluate_commands_run_end_to_end(tmp_path: Path) -> None:
    """``dicom-node train`` writes a model folder; ``evaluate --baseline`` scores it."""
    from dicom_node.cli import main

    small = ["--phantom-shape", "16", "64", "64", "--threads", "1", "--no-progress"]
    status = main(
        [
            "train",
            "--phantoms",
            "4",
            "--val-fraction",
            "0.25",
            "--encoder",
            "resnet18",
            "--input-size",
            "64",
            "--pixel-spacing",
            "6",
            "--crop",
            "64",
            "--batch-size",
            "2",
            "--seg-steps",
            "2",
            "--cls-epochs",
            "2",
            "--output",
            str(tmp_path / "model"),
            *small,
        ]
    )
    assert status == 0
    split = json.loads((tmp_path / "model-work" / "split.json").read_text())
    assert len(split["train"]) == 3 and len(split["val"]) == 1
    weights = (tmp_path / "model" / "weights.safetensors").read_bytes()
    status = main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "model"),
            "--phantoms",
            "2",
            "--train-phantoms",
            "2",
            "--train-eval-cases",
            "1",
            "--baseline",
            "--out",
            str(tmp_path / "eval"),
            "--write-card",
            str(tmp_path / "model"),
            *small,
            "--phantom-matrix",  # held-out phantoms on two matrices, as a site mix would be
            "48",
            "64",
        ]
    )
    assert status == 0
    card = load_model(tmp_path / "model").card
    assert "16 slices of 48x48 or 64x64 (by seed)" in card.description
    assert "heldout_image_accuracy" in card.metrics and "val_image_accuracy" in card.metrics
    low, high = (
        card.metrics["heldout_image_accuracy_ci95_low"],
        card.metrics["heldout_image_accuracy_ci95_high"],
    )
    assert low <= card.metrics["heldout_image_accuracy"] <= high
    # the card is new, the weights file is the evaluated one byte for byte
    assert (tmp_path / "model" / "weights.safetensors").read_bytes() == weights
    assert "Held-out evaluation" in card.description
    payload = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert {"held_out", "train", "baseline"} <= set(payload)
    assert "accuracy" in payload["baseline"]["held_out"]
    assert (tmp_path / "eval" / "report.png").exists()

    # The split records how its phantoms were made (train's settings: no shift, widened by 1,
    # tumour probability 0.6); evaluate --split makes its cases that way, not with its own
    # defaults, and refuses the empty test part train wrote.
    assert split["phantoms"]["widen"] == 1.0 and split["phantoms"]["tumour_probability"] == 0.6
    split_args = ["--split", str(tmp_path / "model-work" / "split.json"), *small]
    status = main(["evaluate", "--model", str(tmp_path / "model"), *split_args,
                   "--split-name", "val", "--out", str(tmp_path / "eval-val")])  # fmt: skip
    assert status == 0
    described = json.loads((tmp_path / "eval-val" / "evaluation.json").read_text())["dataset"]
    assert "widened by 1" in described and "tumour probability 0.6" in described
    status = main(["evaluate", "--model", str(tmp_path / "model"), *split_args,
                   "--out", str(tmp_path / "eval-test")])  # fmt: skip
    assert status == 1
    assert not (tmp_path / "eval-test").exists()


@pytest.mark.parametrize("flag", [["--baseline"], ["--write-card", "card"]])
def test_evaluate_refuses_a_folder_without_its_split_for_held_out_claims(
    flag: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MSD or DICOM+SEG data without --split: every case would be scored as held out, those
    trained on too, and the baseline would have no training cases: refused at once."""
    from dicom_node.cli import EXIT_USAGE, main

    status = main(["evaluate", "--model", "m", "--dataset", "msd", "--data", str(tmp_path), *flag])
    assert status == EXIT_USAGE
    assert "needs --split" in capsys.readouterr().err


def test_evaluate_scores_the_lesions_a_configured_node_reports(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``evaluate --config FILE`` applies the file's ``lesions`` section over the card's rule,
    as the node does: at threshold 0.5 the tiny random model's maps make lesions; a study gate
    its studies do not reach leaves none. The rule used is in evaluation.json, and so are the
    segmentation scales (the file's ``inference.seg_scales`` where it sets them). With
    ``--write-card`` it is a usage error (the card's figures are those of its own rule)."""
    from dicom_node.cli import EXIT_USAGE, main

    small = ["--phantoms", "2", "--phantom-shape", "16", "64", "64", "--threads", "1"]
    found = {}
    for name, lesions, inference in [
        ("open", "{threshold: 0.5, min_volume_mm3: 0}", "{}"),
        (
            "gated",
            "{threshold: 0.5, min_volume_mm3: 0, study_gate: 0.9999}",
            "{seg_scales: [1.0, 1.5]}",
        ),
    ]:
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"lesions: {lesions}\ninference: {inference}\n")
        status = main(
            [
                "evaluate",
                "--model",
                str(tiny_model_dir),
                "--train-eval-cases",
                "0",
                "--no-progress",
                "--config",
                str(config),
                "--out",
                str(tmp_path / name),
                *small,
            ]
        )
        assert status == 0
        payload = json.loads((tmp_path / name / "evaluation.json").read_text())
        found[name] = payload
    open_rule, gated_rule = (found[n]["held_out"]["lesion_rule"] for n in ("open", "gated"))
    assert (open_rule["threshold"], open_rule["min_volume_mm3"]) == (0.5, 0.0)
    assert (open_rule["study_gate"], gated_rule["study_gate"]) == (None, 0.9999)
    assert found["open"]["held_out"]["seg_scales"] == [1.0]
    assert found["gated"]["held_out"]["seg_scales"] == [1.0, 1.5]
    assert all(c["study_probability"] < 0.9999 for c in found["gated"]["per_case"])
    predicted = {n: sum(c["predicted_lesions"] for c in found[n]["per_case"]) for n in found}
    assert predicted["open"] > 0
    assert predicted["gated"] == 0
    capsys.readouterr()
    status = main(
        [
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--config",
            str(tmp_path / "open.yaml"),
            "--write-card",
            str(tmp_path / "card"),
            *small,
        ]
    )
    assert status == EXIT_USAGE
    assert "--config" in capsys.readouterr().err
    assert not (tmp_path / "card").exists()


@pytest.mark.parametrize("reported", [False, True])
def test_the_report_outlines_the_lesions_the_node_reports(reported: bool) -> None:
    """The report's red outline is what the node reports (the lesion rule applied), not the
    probability map at the segmentation threshold: a small confident blob the rule drops
    (under its minimum volume, or gated) is not drawn as a model lesion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dicom_node.training.evaluate import Overlay
    from dicom_node.training.report import _overlay

    probability = np.zeros((32, 32), dtype=np.float32)
    probability[20, 20:22] = 0.9
    overlay = Overlay(
        case_id="c1",
        slice_index=3,
        hu=np.full((32, 32), -850.0, dtype=np.float32),
        truth=np.zeros((32, 32), dtype=bool),
        probability=probability,
        predicted=probability > 0.5 if reported else np.zeros((32, 32), dtype=bool),
        image_probability=0.3,
    )
    fig, ax = plt.subplots()
    try:
        _overlay(ax, overlay)
        drawn = [c for c in ax.collections if type(c).__name__ in ("QuadContourSet", "ContourSet")]
        assert len(drawn) == (1 if reported else 0)
    finally:
        plt.close(fig)


def test_a_split_naming_cases_the_folder_lacks_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A split written for a fuller folder: `evaluate` and `train` list the cases the folder
    lacks before reading any (evaluate had scored the cases before it, then died on a bare
    KeyError with nothing written)."""
    import SimpleITK as sitk

    from dicom_node.cli import main

    training = []
    for name in ("lung_003", "lung_004"):
        for folder in ("imagesTr", "labelsTr"):
            (tmp_path / "msd" / folder).mkdir(parents=True, exist_ok=True)
            image = sitk.GetImageFromArray(np.zeros((2, 8, 8), dtype=np.int16))
            sitk.WriteImage(image, str(tmp_path / "msd" / folder / f"{name}.nii.gz"))
        training.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"})
    (tmp_path / "msd" / "dataset.json").write_text(json.dumps({"training": training}))
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"train": ["lung_004", "lung_011"], "val": [], "test": ["lung_003", "lung_010"]})
    )
    data = ["--dataset", "msd", "--data", str(tmp_path / "msd"), "--split", str(split)]
    status = main(["evaluate", "--model", str(tmp_path / "model"), *data,
                   "--train-eval-cases", "0", "--out", str(tmp_path / "eval")])  # fmt: skip
    assert status == 1
    said = capsys.readouterr().err
    assert "names 1 case(s) (test) that MSD" in said and "lung_010" in said
    assert "lung_011" not in said  # the training part is not read with --train-eval-cases 0
    assert not (tmp_path / "eval").exists()
    status = main(
        ["train", *data, "--output", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")]
    )
    assert status == 1
    assert "names 1 case(s) (train/val) that MSD" in capsys.readouterr().err
