"""Tests of the training run: loss, resume, encoder weights, model folder (tiny network)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import torchvision

from dicom_node.analysis.lesions import LesionRule
from dicom_node.analysis.network import Architecture, LungCTNet
from dicom_node.analysis.weights import load_model
from dicom_node.errors import DatasetError, ModelError, TrainingBudgetError
from dicom_node.training import augment
from dicom_node.training import train as train_module
from dicom_node.training.datasets import PhantomDataset, PhantomSpec, Split, split_cases
from dicom_node.training.train import (
    TrainConfig,
    bce_dice_loss,
    load_encoder_weights,
    to_model_grid,
    train,
)

TINY = Architecture(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), mlp_hidden=16)
TINY_CONTEXT = TINY.model_copy(update={"in_channels": 3})
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Two cores are shared by several test runs here: one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "architecture": TINY,
        "input_size": 64,
        "input_mode": "spacing",
        "pixel_spacing_mm": 6.0,
        "crop": 64,
        "batch_size": 2,
        "seg_steps": 4,
        "val_every": 2,
        "val_slices": 8,
        "checkpoint_every": 2,
        "log_every": 2,
        "cls_epochs": 3,
        "feature_views": 1,
        "progress": False,
        "name": "lung-ct-tiny",
    }
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def phantoms() -> PhantomDataset:
    """Four tiny phantoms, most with tumours."""
    return PhantomDataset(
        PhantomSpec(first_seed=0, count=4, shape_zyx=(16, 64, 64), tumour_probability=0.8)
    )


@pytest.mark.parametrize(
    ("device", "precision"),
    [("cpu", "fp32"), pytest.param("cuda", "auto", marks=[pytest.mark.gpu, cuda])],
)
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(device: str, precision: str) -> None:
    """Five AdamW steps on one batch lower the BCE + Dice loss (on CUDA under the bf16
    autocast that ``precision: auto`` trains with there)."""
    where = torch.device(device)
    torch.manual_seed(0)
    net = LungCTNet(TINY).train().to(where)
    x = torch.rand(2, 1, 64, 64, device=where)
    target = torch.zeros(2, 1, 64, 64, device=where)
    target[:, :, 20:30, 20:30] = 1.0
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        with train_module._autocast(where, precision):
            seg, _ = net(x)
            assert seg.dtype == (torch.bfloat16 if precision == "auto" else torch.float32)
            loss = bce_dice_loss(seg, target)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_model_grid_follows_the_card_spacing() -> None:
    """Spacing mode resamples to the card's pixel size and pads with air around the slice."""
    from dicom_node.analysis.weights import InputSpec

    hu = np.full((2, 32, 32), 50, dtype=np.int16)
    spec = InputSpec(size=64, mode="spacing", pixel_spacing_mm=2.0)
    x, m = to_model_grid(hu, (1.0, 1.0), spec=spec, window=(-1000.0, 400.0), mask=hu > 0)
    assert x.shape == (2, 1, 64, 64)
    assert m is not None and int(m[0, 0].sum()) == 16 * 16
    assert float(x[0, 0, 0, 0]) == -1000.0
    assert float(x[0, 0, 32, 32]) == pytest.approx(50.0)


def test_training_writes_a_loadable_model_folder(phantoms: PhantomDataset, tmp_path: Path) -> None:
    """A tiny run ends with a model folder that load_model accepts, with validation figures."""
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    result = train(
        phantoms, split, config=_config(), output=tmp_path / "model", work_dir=tmp_path / "work"
    )
    assert result.seg_steps_done == 4
    loaded = load_model(tmp_path / "model")
    assert loaded.card.architecture == TINY
    assert "val_image_accuracy" in loaded.card.metrics
    assert "NOT FOR CLINICAL USE" in loaded.card.description
    assert (tmp_path / "work" / "metrics.jsonl").read_text().count('"stage": "seg"') >= 1


def test_a_validation_part_without_tumour_is_refused(tmp_path: Path) -> None:
    """The kept weights, the thresholds and the lesion rule are chosen on the validation
    cases: without a tumour slice there (its Dice is 1 whatever the network does) the run is
    refused before any training."""
    data = PhantomDataset(
        PhantomSpec(first_seed=0, count=2, shape_zyx=(16, 64, 64), tumour_probability=0.0)
    )
    split = Split(train=("phantom-000000",), val=("phantom-000001",), test=())
    with pytest.raises(DatasetError, match=r"the validation part \(1 cases\) holds no slice"):
        train(data, split, config=_config(), output=tmp_path / "model", work_dir=tmp_path / "w")
    assert not (tmp_path / "model").exists()


def test_resume_continues_where_an_interrupted_run_stopped(
    phantoms: PhantomDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed after its step-2 checkpoint and resumed ends with the same weights."""
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    whole = train(phantoms, split, config=_config(), output=None, work_dir=tmp_path / "a")
    assert whole.seg_steps_done == 4

    real = augment.augment_batch
    calls = {"n": 0}

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # step 3, after the checkpoint of step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(phantoms, split, config=_config(), output=None, work_dir=tmp_path / "b")
    monkeypatch.setattr(train_module, "augment_batch", real)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2
    resumed = train(
        phantoms,
        split,
        config=_config(),
        output=tmp_path / "model",
        work_dir=tmp_path / "b",
        resume=True,
    )
    assert resumed.seg_steps_done == 4
    assert resumed.validation["val_dice_slices"] == pytest.approx(
        whole.validation["val_dice_slices"]
    )
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for name, tensor in a.items():
        if not name.startswith("classifier"):
            torch.testing.assert_close(tensor, b[name])


def test_encoder_weights_load_from_a_torchvision_state_dict(tmp_path: Path) -> None:
    """A torchvision ResNet18 state dict loads into the encoder; conv1 is summed over RGB (and
    shared out among the planes of 2.5-D input)."""
    reference = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    net = LungCTNet(TINY)
    load_encoder_weights(net, path)
    got = net.encoder.state_dict()
    torch.testing.assert_close(got["conv1.weight"], reference["conv1.weight"].sum(1, keepdim=True))
    # 2.5-D input: each of the three planes gets a third of that sum
    context = LungCTNet(TINY_CONTEXT)
    load_encoder_weights(context, path)
    third = reference["conv1.weight"].sum(1, keepdim=True) / 3
    torch.testing.assert_close(
        context.encoder.state_dict()["conv1.weight"], third.expand(-1, 3, -1, -1)
    )
    torch.testing.assert_close(got["layer4.1.conv2.weight"], reference["layer4.1.conv2.weight"])

    wrapped = tmp_path / "timm-style.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}}, wrapped)
    load_encoder_weights(LungCTNet(TINY), wrapped)


def test_encoder_weights_of_another_resnet_are_refused(tmp_path: Path) -> None:
    """ResNet34 weights do not fit a ResNet18 encoder: ModelError."""
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match="do not fit"):
        load_encoder_weights(LungCTNet(TINY), path)


def test_a_spent_budget_ends_stage_one_and_still_trains_the_mlp(
    phantoms: PhantomDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stage 1's time spent, stage 1 stops by time and stage 2 still runs.

    The reserve is replaced by one that leaves stage 1 nothing; the real one refuses that
    (the test below).
    """
    monkeypatch.setattr(
        train_module._Run, "reserve_stage2", lambda run, *_: setattr(run, "seg_budget_s", 0.0)
    )
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    result = train(
        phantoms,
        split,
        config=_config(max_minutes=0.05, cls_epochs=25),
        output=None,
        work_dir=tmp_path / "work",
    )
    assert result.stopped_by == "time"
    assert result.seg_steps_done == 0
    assert result.cls_epochs_done >= 20


def test_a_budget_that_leaves_stage_one_no_time_is_refused(
    phantoms: PhantomDataset, tmp_path: Path
) -> None:
    """Three seconds cannot hold stage 2's minute to spare: refused before any training."""
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    with pytest.raises(TrainingBudgetError, match=r"leaves segmentation training no time"):
        train(
            phantoms,
            split,
            config=_config(max_minutes=0.05),
            output=tmp_path / "model",
            work_dir=tmp_path / "work",
        )
    assert not (tmp_path / "model").exists()


def test_stage_two_reads_every_tumour_slice_and_a_sample_of_the_rest() -> None:
    """Stage 2's slice cap keeps all slices with tumour and fills up with tumour-free ones."""
    labels = np.zeros(100, dtype=bool)
    labels[[3, 50, 51, 97]] = True
    bank = train_module.SliceBank(
        hu=np.zeros((100, 4, 4), np.int16),
        masks=np.zeros((100, 4, 4), np.uint8),
        labels=labels,
        case_index=np.zeros(100, np.int64),
        case_ids=("a",),
        spacing_zyx=np.ones((1, 3)),
    )
    chosen = train_module._stage2_indices(bank, 10, np.random.default_rng(0))
    assert chosen.size == 10 and set(np.flatnonzero(labels)) <= set(chosen.tolist())
    assert np.all(np.diff(chosen) > 0)
    everything = train_module._stage2_indices(bank, 1000, np.random.default_rng(0))
    assert everything.tolist() == list(range(100))


def test_precision_auto_follows_the_cpu() -> None:
    """``auto`` is bf16 exactly where the CPU has bf16 instructions; fp32 and bf16 are forced."""
    cpu = torch.device("cpu")
    assert train_module._use_bf16(cpu, "auto") == train_module.cpu_has_bf16()
    assert not train_module._use_bf16(cpu, "fp32")
    assert train_module._use_bf16(cpu, "bf16")
    flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    assert train_module.cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def _validation_with_a_false_positive(
    p_false: int,
) -> tuple[train_module.SliceBank, npt.NDArray[np.uint8]]:
    """Two validation cases: a 20 mm tumour found with p = 0.98 in the first, and in the
    tumour-free second a 12 mm blob at ``p_false / 255``, both on slices 4-12."""
    size, depth = 64, 16
    hu = np.full((2 * depth, size, size), -800, np.int16)
    masks = np.zeros((2 * depth, size, size), np.uint8)
    zz, yy, xx = np.indices((depth, size, size))
    ball = ((zz - 8) * 2.0) ** 2 + ((yy - 32) * 1.5) ** 2 + ((xx - 32) * 1.5) ** 2 <= 10.0**2
    masks[:depth][ball] = 1
    prob = np.zeros_like(masks)
    prob[:depth][ball] = 250  # the tumour, found with confidence
    blob = ((zz - 8) * 2.0) ** 2 + ((yy - 20) * 1.5) ** 2 + ((xx - 20) * 1.5) ** 2 <= 6.0**2
    prob[depth:][blob] = p_false
    bank = train_module.SliceBank(
        hu=hu,
        masks=masks,
        labels=np.asarray(masks.reshape(2 * depth, -1).any(axis=1)),
        case_index=np.repeat(np.arange(2), depth),
        case_ids=("with", "without"),
        spacing_zyx=np.array([[2.0, 1.5, 1.5], [2.0, 1.5, 1.5]]),
    )
    return bank, prob


def test_the_lesion_rule_is_chosen_to_drop_unconfident_false_positives() -> None:
    """On validation maps with a faint blob in a tumour-free case, a peak rule removes it; the
    MLP flags the blob's slices too, so the image gate cannot, and it stays off."""
    bank, prob = _validation_with_a_false_positive(200)  # p = 0.78, never 0.9
    image = np.where(prob.reshape(len(prob), -1).max(axis=1) > 0, 0.9, 0.1).astype(np.float32)
    rule, figures = train_module._lesion_operating_point(bank, prob, image, 0.5, top_k=3)
    assert figures["val_fp_lesions_per_tumour_free_study"] == 0.0
    assert figures["val_lesion_dice_ge_6mm"] == pytest.approx(1.0)
    assert figures["val_detection_sensitivity_ge_6mm"] == 1.0
    # The faint blob is 900 mm³ at p = 0.78: only a threshold or peak above it removes it.
    assert rule.threshold > 0.78 or (rule.min_peak is not None and rule.min_peak > 0.78)
    assert rule.image_gate is None
    assert rule.study_gate is None


def test_the_image_gate_is_chosen_when_only_it_drops_a_confident_false_positive() -> None:
    """A blob as confident as the tumour (p = 0.98) on slices the MLP does not flag: no
    threshold, peak or volume removes it, the image gate at the image threshold does. The MLP
    flags three other slices of the tumour-free study, so no study gate tried removes it."""
    bank, prob = _validation_with_a_false_positive(250)
    depth = len(prob) // 2
    image = np.full(len(prob), 0.2, np.float32)
    image[:depth][bank.labels[:depth]] = 0.8  # the tumour's slices only
    image[depth : depth + 3] = 0.95  # slices 0-2 of the tumour-free study, away from the blob
    rule, figures = train_module._lesion_operating_point(bank, prob, image, 0.6, top_k=3)
    assert rule.image_gate == 0.6
    assert figures["val_fp_lesions_per_tumour_free_study"] == 0.0
    assert figures["val_lesion_dice_ge_6mm"] == pytest.approx(1.0)
    # Without the gate every rule leaves the blob.
    rule, figures = train_module._lesion_operating_point(
        bank, prob, np.ones_like(image), 0.6, top_k=3
    )
    assert figures["val_fp_lesions_per_tumour_free_study"] == 1.0


def test_the_study_gate_is_chosen_when_only_it_drops_a_confident_false_positive() -> None:
    """The blob as confident as the tumour, and the MLP flags one of its slices (so neither the
    image gate nor any threshold, peak or volume removes it), but no others: the tumour-free
    study's probability (mean of its top 3 slices) is 0.4 against the tumour's 0.9. The study
    gate at 0.5, the lowest tried that is above 0.4, drops it and keeps the tumour."""
    bank, prob = _validation_with_a_false_positive(250)
    depth = len(prob) // 2
    image = np.full(len(prob), 0.1, np.float32)
    image[:depth][bank.labels[:depth]] = 0.9
    blob = np.flatnonzero(prob[depth:].reshape(depth, -1).max(axis=1) > 0)
    image[depth + blob[len(blob) // 2]] = 1.0
    rule, figures = train_module._lesion_operating_point(bank, prob, image, 0.6, top_k=3)
    assert rule.study_gate == 0.5
    assert rule.image_gate is None  # ties go to the rule tried first
    assert figures["val_fp_lesions_per_tumour_free_study"] == 0.0
    assert figures["val_lesion_dice_ge_6mm"] == pytest.approx(1.0)
    assert figures["val_detection_sensitivity_ge_6mm"] == 1.0
    # A study gate the tumour's study does not reach is never chosen: it loses the tumour.
    image[:depth][bank.labels[:depth]] = 0.55
    rule, figures = train_module._lesion_operating_point(bank, prob, image, 0.5, top_k=3)
    assert rule.study_gate == 0.5
    assert figures["val_detection_sensitivity_ge_6mm"] == 1.0


def test_without_tumour_free_validation_cases_no_false_positive_figure_is_claimed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a case with tumour to validate on: the rule is chosen without its false positives,
    the card gets no false-positive figure (not 0.0), and the log says why."""
    bank, prob = _validation_with_a_false_positive(200)
    depth = len(prob) // 2
    only = train_module.SliceBank(
        hu=bank.hu[:depth],
        masks=bank.masks[:depth],
        labels=bank.labels[:depth],
        case_index=bank.case_index[:depth],
        case_ids=bank.case_ids[:1],
        spacing_zyx=bank.spacing_zyx[:1],
    )
    image = np.full(depth, 0.9, np.float32)
    with caplog.at_level("WARNING"):
        _, figures = train_module._lesion_operating_point(only, prob[:depth], image, 0.5, top_k=3)
    assert "val_fp_lesions_per_tumour_free_study" not in figures
    assert figures["val_lesion_dice_ge_6mm"] == pytest.approx(1.0)
    assert "no tumour-free validation case" in caplog.text


def _image_bank(cases: int, depth: int) -> train_module.SliceBank:
    """``cases`` cases of ``depth`` slices of 8 x 8; even cases hold tumour on slices 3-6."""
    masks = np.zeros((cases * depth, 8, 8), np.uint8)
    for k in range(0, cases, 2):
        masks[k * depth + 3 : k * depth + 7, 2:5, 2:5] = 1
    return train_module.SliceBank(
        hu=np.full(masks.shape, -800, np.int16),
        masks=masks,
        labels=np.asarray(masks.reshape(len(masks), -1).any(axis=1)),
        case_index=np.repeat(np.arange(cases), depth),
        case_ids=tuple(f"c{k}" for k in range(cases)),
        spacing_zyx=np.tile([2.0, 1.5, 1.5], (cases, 1)),
    )


def test_the_image_study_gate_is_chosen_when_only_it_withdraws_confident_false_calls() -> None:
    """Tumour slices at 0.9 (study probability 0.9); in each tumour-free study one slice at
    0.95 (study probability (0.95 + 0.1 + 0.1) / 3 = 0.38): no image threshold separates
    them, the study gate at 0.5 (the first tried above 0.38) does. Where the tumour-free
    studies' slices stay low, no gate is chosen."""
    depth = 10
    bank = _image_bank(4, depth)
    image = np.where(bank.labels, 0.9, 0.1).astype(np.float32)
    image[[depth + 5, 3 * depth + 1]] = 0.95
    threshold, gate, scores = train_module._image_operating_point(bank, image, top_k=3)
    assert gate == 0.5
    assert scores.mcc == pytest.approx(1.0) and threshold <= 0.9
    clean = np.where(bank.labels, 0.9, 0.1).astype(np.float32)
    threshold, gate, scores = train_module._image_operating_point(bank, clean, top_k=3)
    assert gate is None
    assert scores.mcc == pytest.approx(1.0) and 0.1 < threshold <= 0.9
    # A gate above the tumour studies' probability would withdraw their calls: never chosen.
    weak = np.where(bank.labels, 0.45, 0.1).astype(np.float32)
    weak[[depth + 5, 3 * depth + 1]] = 0.95
    threshold, gate, scores = train_module._image_operating_point(bank, weak, top_k=3)
    assert gate is None and scores.mcc < 1.0


#: What the lesion rule search reads per case: tumour mask, spacing, tumour and image probability.
SearchCase = tuple[
    npt.NDArray[np.uint8],
    tuple[float, float, float],
    npt.NDArray[np.uint8],
    npt.NDArray[np.float32],
]


def _search_cases(seed: int) -> list[SearchCase]:
    """Validation-like cases for the rule search: three with tumours of several sizes, one
    tumour-free; predicted blobs of several sizes and confidences on and off the tumours, with
    ragged edges (some voxels halved)."""
    rng = np.random.default_rng(seed)
    shape, spacing = (20, 48, 48), (2.0, 1.5, 1.5)
    zz, yy, xx = np.indices(shape)

    def ball(z: float, y: float, x: float, r_mm: float) -> npt.NDArray[np.bool_]:
        inside = ((zz - z) * 2.0) ** 2 + ((yy - y) * 1.5) ** 2 + ((xx - x) * 1.5) ** 2 <= r_mm**2
        return np.asarray(inside, dtype=bool)

    cases = []
    for k in range(4):
        mask = np.zeros(shape, np.uint8)
        prob = np.zeros(shape, np.uint8)
        if k < 3:
            for _ in range(3):
                z, y, x = rng.uniform(4, 16), rng.uniform(8, 40), rng.uniform(8, 40)
                mask[ball(z, y, x, rng.uniform(2.0, 9.0))] = 1
                # the prediction: shifted a little, its own size and confidence, or none
                if rng.random() < 0.8:
                    region = ball(
                        z + rng.normal(0, 1), y + rng.normal(0, 1), x, rng.uniform(1.5, 9)
                    )
                    prob[region] = np.maximum(prob[region], rng.integers(120, 256))
        for _ in range(4):  # blobs off the tumours (or onto them, by chance)
            z, y, x = rng.uniform((2, 4, 4), (18, 44, 44))
            region = ball(z, y, x, rng.uniform(1.5, 6.0))
            prob[region] = np.maximum(prob[region], rng.integers(120, 256))
        prob[(prob > 0) & (rng.random(shape) < 0.3)] //= 2  # ragged maps: some voxels below
        # the classifier flags a few slices: some blobs lie on none of them
        image = np.where(rng.random(shape[0]) < 0.2, 0.8, 0.2).astype(np.float32)
        # and calls the study: some study gates drop every lesion of some cases
        cases.append((mask, spacing, prob, image, float(rng.uniform(0.45, 0.95))))
    return cases


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_rule_search_scores_rules_as_evaluate_does(seed: int) -> None:
    """Every rule of the search grid: the figures of ``lesion_rule_scores`` are those of
    ``score_case`` on ``find_lesions``' lesions (what ``dicom-node evaluate`` reports)."""
    from dicom_node.training.datasets import Case
    from dicom_node.training.evaluate import score_case

    cases = _search_cases(seed)
    rules = [
        LesionRule(
            threshold=t, min_volume_mm3=v, min_peak=p, image_gate=0.5 if g else None, study_gate=s
        )
        for t, p, v, g, s in itertools.product(
            train_module.LESION_THRESHOLDS,
            train_module.LESION_PEAKS,
            train_module.LESION_MIN_VOLUMES_MM3,
            train_module.LESION_IMAGE_GATES,
            train_module.LESION_STUDY_GATES,
        )
        if p is None or p > t
    ]
    fast = train_module.lesion_rule_scores(cases, rules)
    assert len(fast) == len(rules) == 432
    seen = set()
    for rule, got in zip(rules, fast, strict=True):
        outcomes = [
            score_case(
                Case(f"c{k}", f"p{k}", np.zeros(mask.shape, np.int16), mask, spacing),
                prob.astype(np.float32) / 255.0,
                image,
                study,
                rule=rule,
            )
            for k, (mask, spacing, prob, image, study) in enumerate(cases)
        ]
        large = [les for o in outcomes for les in o.lesions if les.diameter_mm >= 6.0]
        free = [o for o in outcomes if not o.study_truth]
        expected = (
            float(np.mean([les.dice for les in large])),
            float(np.mean([les.detected for les in large])),
            float(np.mean([o.false_positive_lesions for o in free])),
        )
        assert got == pytest.approx(expected, abs=1e-12), rule
        seen.add(expected)
    assert len(seen) > 5  # the rules differ on these cases


def test_training_with_lesion_pooling_writes_a_card_with_a_lesion_rule(
    phantoms: PhantomDataset, tmp_path: Path
) -> None:
    """The product's pooling trains end to end; the card carries the chosen lesion rule."""
    arch = Architecture(
        encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), mlp_hidden=16, mlp_pooling="lesion"
    )
    split = split_cases(phantoms, val_fraction=0.25, seed=0)
    result = train(
        phantoms,
        split,
        config=_config(architecture=arch, cls_max_slices=20, precision="fp32"),
        output=tmp_path / "model",
        work_dir=tmp_path / "work",
    )
    loaded = load_model(tmp_path / "model")
    assert loaded.card.architecture.mlp_pooling == "lesion"
    thresholds = loaded.card.thresholds
    assert thresholds.segmentation in train_module.LESION_THRESHOLDS
    assert thresholds.lesion_peak in train_module.LESION_PEAKS
    assert thresholds.lesion_min_volume_mm3 in train_module.LESION_MIN_VOLUMES_MM3
    assert thresholds.lesion_image_gate in train_module.LESION_IMAGE_GATES
    assert thresholds.lesion_study_gate in train_module.LESION_STUDY_GATES
    assert "val_fp_lesions_per_tumour_free_study" in result.validation


def test_the_slice_bank_is_the_same_built_in_worker_processes(phantoms: PhantomDataset) -> None:
    """Cases loaded and resampled in two processes make the bank one process makes."""
    from dicom_node.analysis.weights import InputSpec

    spec = InputSpec(size=64, mode="spacing", pixel_spacing_mm=6.0)
    ids = phantoms.case_ids()
    alone = train_module.build_bank(phantoms, ids, spec=spec, window=(-1000.0, 400.0))
    together = train_module.build_bank(phantoms, ids, spec=spec, window=(-1000.0, 400.0), workers=2)
    for name in ("hu", "masks", "labels", "case_index", "spacing_zyx"):
        np.testing.assert_array_equal(getattr(alone, name), getattr(together, name))
    assert alone.case_ids == together.case_ids
    assert int(together.masks.sum()) > 0


def test_bank_inputs_take_neighbours_from_their_own_case_only() -> None:
    """SliceBank.inputs gives each slice the planes of its own case, at its own spacing, as
    the node's engine makes them (with_context); never a slice of the next case."""
    from dicom_node.analysis.context import with_context
    from dicom_node.training.train import SliceBank

    hu = (np.arange(7, dtype=np.int16) * 100)[:, None, None] * np.ones((1, 4, 4), np.int16)
    bank = SliceBank(
        hu=hu,
        masks=np.zeros((7, 4, 4), np.uint8),
        labels=np.zeros(7, bool),
        case_index=np.array([0, 0, 0, 1, 1, 1, 1]),
        case_ids=("a", "b"),
        spacing_zyx=np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]]),
    )
    got = bank.inputs([2, 3, 5], 2.0)
    assert got[:, :, 0, 0].tolist() == [
        [0.0, 200.0, 200.0],  # case a, 1 mm: two slices away, clamped at its last slice
        [300.0, 300.0, 400.0],  # case b, 2 mm: one slice away, clamped at its first slice
        [400.0, 500.0, 600.0],
    ]
    np.testing.assert_array_equal(got[1:], with_context(hu[3:], [0, 2], 2.0, 2.0))
    assert bank.inputs([4], None).shape == (1, 1, 4, 4)


def test_training_with_context_writes_a_three_channel_model(
    phantoms: PhantomDataset, tmp_path: Path
) -> None:
    """--context-mm: the run trains on three planes and the card says so; the node's engine
    runs the model on a volume."""
    from dicom_node.analysis.inference import InferenceEngine
    from dicom_node.config import InferenceSettings

    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    config = _config(architecture=TINY_CONTEXT, context_mm=2.5)
    result = train(phantoms, split, config=config, output=tmp_path / "m", work_dir=tmp_path / "w")
    assert result.seg_steps_done == 4
    loaded = load_model(tmp_path / "m")
    assert loaded.card.architecture.in_channels == 3
    assert loaded.card.input.context_mm == 2.5
    engine = InferenceEngine(loaded, InferenceSettings.model_validate({"device": "cpu"}))
    case = phantoms.load(phantoms.case_ids()[0])
    out = engine.run(case.hu, case.spacing_mm)
    assert out.probability.shape == case.hu.shape
    with pytest.raises(ValueError, match="in_channels"):
        _config(context_mm=2.5)


def test_from_model_keeps_the_segmentation_network_and_fits_an_mlp_with_slice_context(
    phantoms: PhantomDataset, tmp_path: Path
) -> None:
    """--from-model: stage 1 is skipped, the source's encoder, decoder and head are taken
    unchanged, and an MLP of another architecture (slice context) is fitted on them."""
    from dicom_node.analysis.inference import InferenceEngine
    from dicom_node.config import InferenceSettings

    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    train(
        phantoms,
        split,
        config=_config(),
        output=tmp_path / "a",
        work_dir=tmp_path / "wa",
        training_data="four tiny phantoms.",
    )
    arch = TINY.model_copy(update={"mlp_context_mm": 5.0})
    config = _config(architecture=arch, from_model=tmp_path / "a")
    result = train(
        phantoms,
        split,
        config=config,
        output=tmp_path / "b",
        work_dir=tmp_path / "wb",
        training_data="the same on 512x512.",
    )
    assert result.seg_steps_done == 4  # the source's steps; none here
    assert result.stopped_by == "from-model"
    assert '"stage": "seg"' not in (tmp_path / "wb" / "metrics.jsonl").read_text()
    source, refit = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert refit.card.architecture.mlp_context_mm == 5.0
    assert f"taken from {source.card.name} {source.card.version}," in refit.card.description
    # the card says which cases the MLP learnt on and which the segmentation network did
    assert refit.card.training_data == (
        "the same on 512x512. Segmentation network trained on: four tiny phantoms."
    )
    # ... and a recalibration of it, or a second refit on it, still says so
    again = _config(architecture=arch, from_model=tmp_path / "b")
    train(phantoms, split, config=again, output=tmp_path / "c", work_dir=tmp_path / "wd")
    assert load_model(tmp_path / "c").card.training_data.endswith(
        "Segmentation network trained on: four tiny phantoms."
    )
    kept = _config(architecture=arch, from_model=tmp_path / "b", keep_mlp=True)
    only_val = dataclasses.replace(split, train=())
    train(phantoms, only_val, config=kept, output=tmp_path / "k", work_dir=tmp_path / "wk")
    recalibrated = load_model(tmp_path / "k").card.training_data
    assert recalibrated.startswith(
        "the same on 512x512. Segmentation network trained on: four tiny phantoms. Operating"
    )
    before, after = source.network.state_dict(), refit.network.state_dict()
    for name, tensor in before.items():
        if not name.startswith("classifier."):
            torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    assert after["classifier.fc1.weight"].shape[1] == 2 * before["classifier.fc1.weight"].shape[1]
    engine = InferenceEngine(refit, InferenceSettings.model_validate({"device": "cpu"}))
    case = phantoms.load(phantoms.case_ids()[0])
    out = engine.run(case.hu, case.spacing_mm)
    assert out.image_probabilities.shape == (case.hu.shape[0],)
    other_grid = _config(pixel_spacing_mm=5.0, from_model=tmp_path / "a")
    with pytest.raises(ModelError, match="its input differ"):
        train(phantoms, split, config=other_grid, output=None, work_dir=tmp_path / "wc")


def test_keep_mlp_takes_the_whole_network_and_only_chooses_operating_points(
    phantoms: PhantomDataset, tmp_path: Path
) -> None:
    """--from-model --keep-mlp: every weight is the source's (the weights file is copied as it
    is), no training case is read (the split has none), and on the source's own validation
    cases the image and study thresholds come out as the source's; the card says where the
    network came from."""
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    arch = TINY.model_copy(update={"mlp_pooling": "lesion", "mlp_context_mm": 5.0})
    train(
        phantoms,
        split,
        config=_config(architecture=arch),
        output=tmp_path / "a",
        work_dir=tmp_path / "wa",
        training_data="four tiny phantoms.",
    )
    only_val = dataclasses.replace(split, train=())

    def recalibrate(source: str, output: str, cases: str) -> train_module.TrainResult:
        config = _config(architecture=arch, from_model=tmp_path / source, keep_mlp=True)
        return train(
            phantoms,
            only_val,
            config=config,
            output=tmp_path / output,
            work_dir=tmp_path / "wk",
            training_data=cases,
        )

    result = recalibrate("a", "k", "the same phantoms")
    source, kept = load_model(tmp_path / "a"), load_model(tmp_path / "k")
    before, after = source.network.state_dict(), kept.network.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    # the source's weights file byte for byte (not serialised again), its checksum on the card
    weights = "weights.safetensors"
    assert (tmp_path / "k" / weights).read_bytes() == (tmp_path / "a" / weights).read_bytes()
    assert kept.card.weights == source.card.weights
    assert kept.card.thresholds.image == source.card.thresholds.image
    assert kept.card.thresholds.image_study_gate == source.card.thresholds.image_study_gate
    assert kept.card.thresholds.study == source.card.thresholds.study
    assert result.cls_epochs_done == int(source.card.metrics["cls_epochs"])
    assert result.seg_steps_done == int(source.card.metrics["seg_steps"])
    assert f"MLP taken from {source.card.name} {source.card.version}" in kept.card.description
    assert kept.card.training_data == (
        "four tiny phantoms. Operating points chosen on the validation cases of: the same phantoms"
    )
    recalibrate("k", "k2", "other cases")  # the note of the first recalibration goes
    assert load_model(tmp_path / "k2").card.training_data == (
        "four tiny phantoms. Operating points chosen on the validation cases of: other cases"
    )
    # the source's work folder caches two slice banks (train, val), this run's only one
    assert len(list((tmp_path / "wa").glob("bank-*.npz"))) == 2
    assert len(list((tmp_path / "wk").glob("bank-*.npz"))) == 1
    other = _config(architecture=TINY, from_model=tmp_path / "a", keep_mlp=True)
    with pytest.raises(ModelError, match="its architecture differ"):
        train(phantoms, split, config=other, output=None, work_dir=tmp_path / "wc")
    with pytest.raises(ValueError, match="keep_mlp"):
        _config(keep_mlp=True)


def test_keep_mlp_with_segmentation_scales_chooses_the_lesion_rule_on_their_maps(
    phantoms: PhantomDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--keep-mlp --seg-scales 1 1.5: the validation maps the lesion rule is chosen on are
    taken at both scales, the card keeps the scales and says so, and the weights file is the
    source's byte for byte; scales without 1 are refused before any case is read."""
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    train(phantoms, split, config=_config(), output=tmp_path / "a", work_dir=tmp_path / "wa")
    seen: list[tuple[float, ...]] = []
    trunk = LungCTNet.trunk

    def spy(
        self: LungCTNet, x: torch.Tensor, scales: Sequence[float] = (1.0,)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(tuple(scales))
        return trunk(self, x, scales)

    monkeypatch.setattr(LungCTNet, "trunk", spy)
    config = _config(from_model=tmp_path / "a", keep_mlp=True, seg_scales=(1.0, 1.5))
    only_val = dataclasses.replace(split, train=())
    train(phantoms, only_val, config=config, output=tmp_path / "k", work_dir=tmp_path / "wk")
    assert (1.0, 1.5) in seen
    kept = load_model(tmp_path / "k")
    assert kept.card.input.seg_scales == (1.0, 1.5)
    assert "segmentation run at scales 1, 1.5 (mean logits)" in kept.card.description
    weights = "weights.safetensors"
    assert (tmp_path / "k" / weights).read_bytes() == (tmp_path / "a" / weights).read_bytes()
    with pytest.raises(ValueError, match=r"seg_scales must hold 1\.0"):
        _config(seg_scales=(1.5,))


def test_fine_tune_trains_the_source_network_further_from_its_weights(
    phantoms: PhantomDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--from-model --fine-tune: stage 1 starts from the source's segmentation network (the
    source's weights are validated first and are the best until a step beats them), runs this
    run's steps, counts them on top of the source's, and a resumed run ends where an
    uninterrupted one does."""
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    train(phantoms, split, config=_config(), output=tmp_path / "a", work_dir=tmp_path / "wa")
    source = load_model(tmp_path / "a")
    config = _config(from_model=tmp_path / "a", fine_tune=True, seg_lr=1e-3)
    result = train(phantoms, split, config=config, output=tmp_path / "b", work_dir=tmp_path / "wb")
    assert result.seg_steps_done == 4 + 4
    assert result.stopped_by == "steps"
    log = (tmp_path / "wb" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    checks = [r for r in records if r["stage"] == "seg_val"]
    assert [r["step"] for r in checks] == [0, 2, 4]
    assert [r["step"] for r in records if r["stage"] == "seg"] == [2, 4]
    tuned = load_model(tmp_path / "b")
    assert f"fine-tuned from {source.card.name} {source.card.version}" in tuned.card.description
    # the source's cases once: the description says where the network came from
    assert tuned.card.training_data == source.card.training_data
    assert tuned.card.metrics["seg_steps"] == 8.0
    before, after = source.network.state_dict(), tuned.network.state_dict()
    best = max(checks, key=lambda r: r["val_dice"])
    changed = [
        n
        for n, t in before.items()
        if not n.startswith("classifier.") and not torch.equal(after[n], t)
    ]
    if best["step"] == 0:  # no step beat the source on the validation slices: its weights stay
        assert not changed
    else:
        assert changed
    # From step 0 with the source's weights: a zero learning rate changes no weight.
    frozen = _config(from_model=tmp_path / "a", fine_tune=True, seg_lr=0.0)
    train(
        phantoms,
        split,
        config=frozen,
        output=tmp_path / "z",
        work_dir=tmp_path / "wz",
        training_data="the same, described otherwise",
    )
    zero = load_model(tmp_path / "z")
    # described otherwise than the source's cases: both, and which the fine-tune read
    assert zero.card.training_data == (
        f"the same, described otherwise Segmentation network trained on: "
        f"{source.card.training_data}; fine-tuned on: the same, described otherwise"
    )
    still = zero.network.state_dict()
    for name, tensor in before.items():
        # (batch-norm statistics follow the batches even at a zero learning rate)
        if not name.startswith("classifier.") and "running_" not in name and "batches" not in name:
            torch.testing.assert_close(still[name], tensor, rtol=0, atol=0)
    # Interrupted after the step-2 checkpoint and resumed: the uninterrupted run's network.
    real = augment.augment_batch
    calls = {"n": 0}

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(phantoms, split, config=config, output=None, work_dir=tmp_path / "wr")
    monkeypatch.setattr(train_module, "augment_batch", real)
    resumed = train(
        phantoms, split, config=config, output=None, work_dir=tmp_path / "wr", resume=True
    )
    assert resumed.seg_steps_done == 8
    whole = torch.load(tmp_path / "wb" / "checkpoint.pt", weights_only=False)["model"]
    again = torch.load(tmp_path / "wr" / "checkpoint.pt", weights_only=False)["model"]
    for name, tensor in whole.items():
        if not name.startswith("classifier"):
            torch.testing.assert_close(again[name], tensor)
    # Fine-tuning may move the network to another grid (transfer learning); the card says so.
    finer = _config(from_model=tmp_path / "a", fine_tune=True, pixel_spacing_mm=4.0, input_size=96)
    train(phantoms, split, config=finer, output=tmp_path / "f", work_dir=tmp_path / "wf")
    moved = load_model(tmp_path / "f").card
    assert (moved.input.size, moved.input.pixel_spacing_mm) == (96, 4.0)
    assert (
        f"fine-tuned from {source.card.name} {source.card.version}, which read 64x64 slices"
        " (spacing, 6.0 mm pixels) (stage 1 ended by steps)" in moved.description
    )
    assert "which read" not in tuned.card.description  # the same grid goes unsaid
    # ... but what a pixel holds stays: 2.5-D planes make another network
    planes = _config(
        architecture=TINY_CONTEXT, context_mm=6.0, from_model=tmp_path / "a", fine_tune=True
    )
    with pytest.raises(ModelError, match="its input, architecture differ"):
        train(phantoms, split, config=planes, output=None, work_dir=tmp_path / "wp")
    with pytest.raises(ValueError, match="fine_tune"):
        _config(fine_tune=True)
    with pytest.raises(ValueError, match="fine_tune"):
        _config(from_model=tmp_path / "a", fine_tune=True, keep_mlp=True)


def test_stage_two_with_slice_context_reads_neighbours_within_each_case() -> None:
    """The MLP's training and validation inputs get their context case by case, at each case's
    slice spacing, as the engine gives it over one volume."""
    net = LungCTNet(TINY.model_copy(update={"mlp_context_mm": 4.0}))
    bank = train_module.SliceBank(
        hu=np.zeros((6, 4, 4), np.int16),
        masks=np.zeros((6, 4, 4), np.uint8),
        labels=np.zeros(6, dtype=bool),
        case_index=np.array([0, 0, 0, 1, 1, 1]),
        case_ids=("a", "b"),
        spacing_zyx=np.array([[2.0, 1.0, 1.0], [4.0, 1.0, 1.0]]),
    )
    pooled = torch.arange(6.0)[:, None]
    out = train_module._with_context(net, bank, pooled, np.array([0, 2, 3, 5]))
    # case a: 2 slices away (4 mm at 2 mm), clamped within 0..2; case b: 1 slice, within 3..5
    expected = torch.tensor([[0.0, 1.0], [2.0, 1.0], [3.0, 3.5], [5.0, 4.5]])
    torch.testing.assert_close(out, expected)


def test_reading_slices_in_nhwc_leaves_the_network_trainable_in_nchw() -> None:
    """``_features`` reads in channels_last and gives what NCHW gives; afterwards the weights
    are NCHW, ordinary tensors again (not inference tensors), and a training step runs (the
    time budget's probe reads slices before stage 1)."""
    torch.manual_seed(0)
    net = LungCTNet(TINY.model_copy(update={"mlp_pooling": "lesion"}))
    rng = np.random.default_rng(0)
    bank = train_module.SliceBank(
        hu=rng.integers(-1000, 200, (3, 64, 64)).astype(np.int16),
        masks=np.zeros((3, 64, 64), np.uint8),
        labels=np.zeros(3, dtype=bool),
        case_index=np.zeros(3, dtype=np.int64),
        case_ids=("a",),
        spacing_zyx=np.array([[2.0, 6.0, 6.0]]),
    )
    config = _config(precision="fp32")  # compared with fp32 (auto is bf16 on CPUs that have it)
    x = train_module._normalise(torch.from_numpy(bank.inputs(np.arange(3), None)), config)
    with torch.inference_mode():
        net.eval()
        feats = net.encoder(x)
        expected = net.classifier.pool(feats[-1], net.segmentation_head(net.decoder(feats)))
    pooled, _ = train_module._features(
        net,
        bank,
        config,
        torch.device("cpu"),
        augmented=False,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)
    for p in net.parameters():
        assert p.is_contiguous()
        assert not p.is_inference()
    net.train()
    seg, _ = net(x)
    bce_dice_loss(seg, torch.zeros_like(seg)).backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_augmentation_treats_context_planes_alike_and_may_reverse_them() -> None:
    """Three equal planes stay equal through every change but the added noise; the blur acts
    per plane; with distinct planes, some slices come out with before and after swapped."""
    from dicom_node.training.augment import AugmentConfig, _blur, augment_batch

    plane = torch.rand(1, 1, 32, 32) * 1400 - 1000
    three = plane.expand(1, 3, 32, 32).contiguous()
    torch.testing.assert_close(_blur(three, 1.0), _blur(plane, 1.0).expand(1, 3, 32, 32))

    def run(hu: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
        image, _ = augment_batch(
            hu.contiguous(),
            torch.zeros(hu.shape[0], 1, *hu.shape[2:]),
            config=config,
            generator=torch.Generator().manual_seed(0),
            window=(-1000.0, 400.0),
            scale_shift=(1 / 1400, 1000 / 1400),
        )
        return image

    image = run(three.expand(8, 3, 32, 32), AugmentConfig(noise_probability=0.0))
    torch.testing.assert_close(image[:, 0], image[:, 1])
    torch.testing.assert_close(image[:, 2], image[:, 1])

    ordered = torch.stack([torch.full((32, 32), v) for v in (-600.0, -300.0, 0.0)])[None]
    still = AugmentConfig(
        rotate_deg=0.0,
        scale=(1.0, 1.0),
        hu_offset=0.0,
        hu_gain=0.0,
        noise_probability=0.0,
        blur_probability=0.0,
        flip_probability=0.0,
    )
    image = run(ordered.expand(16, 3, 32, 32), still)
    first = image[:, 0, 16, 16]
    assert bool((first < image[:, 1, 16, 16]).any()) and bool((first > image[:, 1, 16, 16]).any())
    torch.testing.assert_close(image[:, 1, 16, 16], torch.full((16,), 700 / 1400))


def test_crop_dice_weighs_a_small_tumour_like_a_large_one() -> None:
    """The per-crop Dice term, by hand: two crops with tumour (16 and 1 pixels), one without.

    With certain logits (+/-40) the prediction is the mask, except that the small tumour is
    missed. Batch Dice: (2*16 + 1) / (16 + 17 + 1) = 33/34; crop Dice: (2*16 + 1)/(16 + 16 + 1)
    = 1 and (0 + 1)/(0 + 1 + 1) = 1/2; the crop without tumour is left out of the crop term.
    """
    target = torch.zeros(3, 1, 8, 8)
    target[0, 0, 2:6, 2:6] = 1.0
    target[1, 0, 4, 4] = 1.0
    logits = torch.where(target > 0, 40.0, -40.0)
    logits[1, 0, 4, 4] = -40.0  # the small tumour is missed
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, target))
    batch_only = float(bce_dice_loss(logits, target))
    assert batch_only == pytest.approx(bce + 1.0 - 33.0 / 34.0, abs=1e-6)
    mixed = float(bce_dice_loss(logits, target, crop_dice=0.5))
    crop_term = ((1.0 - 1.0) + (1.0 - 0.5)) / 2.0
    assert mixed == pytest.approx(bce + 0.5 * (1.0 - 33.0 / 34.0) + 0.5 * crop_term, abs=1e-6)
    # the Dice term for missing the small tumour: 0.140 with the crop Dice, 0.029 without
    assert mixed - bce > 4 * (batch_only - bce)
    # no crop holds tumour: the crop term is absent
    empty = torch.zeros(2, 1, 8, 8)
    quiet = torch.full_like(empty, -40.0)
    empty_bce = float(torch.nn.functional.binary_cross_entropy_with_logits(quiet, empty))
    # batch Dice of an empty batch predicted empty is 1, weighted 0.5; no crop term
    assert float(bce_dice_loss(quiet, empty, crop_dice=0.5)) == pytest.approx(
        empty_bce + 0.5 * (1.0 - 1.0), abs=1e-6
    )


def _two_tumour_bank() -> train_module.SliceBank:
    """Case a: a large tumour (slices 0-5, 10x10 px) and a small one (slice 7, 1 px); case
    b: a tumour touching a's on the slice grid but in another case."""
    masks = np.zeros((12, 32, 32), np.uint8)
    masks[0:6, 2:12, 2:12] = 1
    masks[7, 25, 25] = 1
    masks[8:10, 2:4, 2:4] = 1  # case b starts at row 8
    return train_module.SliceBank(
        hu=np.zeros((12, 32, 32), np.int16),
        masks=masks,
        labels=np.asarray(masks.reshape(12, -1).any(axis=1)),
        case_index=np.array([0] * 8 + [1] * 4),
        case_ids=("a", "b"),
        spacing_zyx=np.ones((2, 3)),
    )


def test_tumour_voxels_are_3d_components_within_a_case() -> None:
    """Three tumours: the one of case b is not merged with a's across the case boundary."""
    bank = _two_tumour_bank()
    tumours = sorted(train_module.tumour_voxels(bank), key=len)
    assert [t.size for t in tumours] == [1, 8, 600]
    plane = 32 * 32
    assert tumours[0].tolist() == [7 * plane + 25 * 32 + 25]
    assert {int(v) // plane for v in tumours[1]} == {8, 9}
    assert {int(v) // plane for v in tumours[2]} == set(range(6))


def test_sampling_by_tumour_shows_a_small_tumour_as_often_as_a_large_one() -> None:
    """Drawn by slice, the 1-pixel tumour of one slice is the centre of 1 crop in 9 (it has
    1 of 9 slices with tumour); drawn by tumour, of 1 in 3 (1 of 3 tumours)."""
    bank = _two_tumour_bank()

    def share(lesion_fraction: float) -> float:
        sampler = train_module._Sampler(
            bank, crop=32, positive_fraction=1.0, lesion_fraction=lesion_fraction
        )
        rng = np.random.default_rng(0)
        centres = [sampler._tumour_centre(rng) for _ in range(3000)]
        for k, y, x in centres:
            assert bank.masks[k, y, x]  # always on a tumour pixel
        return sum(c == (7, 25, 25) for c in centres) / len(centres)

    assert share(0.0) == pytest.approx(1 / 9, abs=0.03)
    assert share(1.0) == pytest.approx(1 / 3, abs=0.03)
    assert share(0.5) == pytest.approx((1 / 9 + 1 / 3) / 2, abs=0.03)


def test_sampling_fractions_outside_zero_to_one_are_refused() -> None:
    with pytest.raises(ValueError, match="lesion_fraction"):
        TrainConfig(lesion_fraction=1.5)
    with pytest.raises(ValueError, match="crop_dice"):
        TrainConfig(crop_dice=-0.1)


@pytest.mark.parametrize(("patience_after", "stops_at"), [(0.0, 3), (0.5, 7)])
def test_early_stopping_waits_until_the_schedule_is_half_way(
    phantoms: PhantomDataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    patience_after: float,
    stops_at: int,
) -> None:
    """A validation Dice that only falls after step 1, patience 2, 12 planned steps: counted
    from the start, stage 1 stops at step 3; counted from half-way (step 6), at step 7."""
    real = train_module._validate_seg
    calls = iter(range(100))

    def falling(*args: Any, **kwargs: Any) -> dict[str, float]:
        scores = real(*args, **kwargs)
        return {**scores, "val_dice": 0.9 - 0.01 * next(calls)}

    monkeypatch.setattr(train_module, "_validate_seg", falling)
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    result = train(
        phantoms,
        split,
        config=_config(
            seg_steps=12, val_every=1, patience=2, patience_after=patience_after, cls_epochs=1
        ),
        output=None,
        work_dir=tmp_path / "work",
    )
    assert result.stopped_by == "early_stopping"
    assert result.seg_steps_done == stops_at


@pytest.mark.gpu
@cuda
def test_training_on_cuda_writes_a_model_folder_that_loads_on_the_cpu(
    phantoms: PhantomDataset, tmp_path: Path
) -> None:
    """A run on CUDA ends with a model folder that loads and runs on the CPU."""
    split = split_cases(phantoms, val_fraction=0.25, test_fraction=0.0)
    result = train(
        phantoms,
        split,
        config=_config(device="cuda"),
        output=tmp_path / "model",
        work_dir=tmp_path / "work",
    )
    assert result.seg_steps_done == 4
    loaded = load_model(tmp_path / "model", device=torch.device("cpu"))
    assert "val_image_accuracy" in loaded.card.metrics
    x = torch.rand(1, 1, 64, 64)
    seg, logit = loaded.network(x.to(dtype=loaded.dtype))
    assert bool(torch.isfinite(seg).all()) and bool(torch.isfinite(logit).all())
