"""Model folders: save and load round trip, and a clear ModelError for each way one can be bad."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from dicom_node.analysis.network import LungCTNet
from dicom_node.analysis.weights import (
    CARD_FILE,
    WEIGHTS_FILE,
    ModelCard,
    load_model,
    read_card,
    save_card,
    save_model,
)
from dicom_node.errors import ModelError
from tests.analysis.lungct_tiny import make_card, make_network


def _outputs(net: LungCTNet) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        out: tuple[torch.Tensor, torch.Tensor] = net(x)
    return out


def _edit_card(path: Path, **changes: object) -> None:
    raw = yaml.safe_load((path / CARD_FILE).read_text())
    raw.update(changes)
    (path / CARD_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))


def _rewrite_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the weights file and put its true checksum in the card."""
    data = safetensors.torch.save(tensors)
    (path / WEIGHTS_FILE).write_bytes(data)
    raw = yaml.safe_load((path / CARD_FILE).read_text())
    raw["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    (path / CARD_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))


def test_fp32_round_trip_is_exact(tmp_path: Path) -> None:
    """Saved in float32 and loaded, the network gives bit-identical outputs; the card is kept."""
    net = make_network()
    card = make_card()
    written = save_model(net, card, tmp_path / "m", dtype=torch.float32)
    loaded = load_model(tmp_path / "m")
    assert loaded.card == written
    assert written.weights.dtype == "float32"
    assert (
        written.weights.sha256
        == hashlib.sha256((tmp_path / "m" / WEIGHTS_FILE).read_bytes()).hexdigest()
    )
    assert written.model_copy(update={"weights": card.weights}) == card
    assert not loaded.network.training
    for a, b in zip(_outputs(net), _outputs(loaded.network), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp16_round_trip_is_close_and_half_the_size(tmp_path: Path) -> None:
    """float16 weights (the default) load back into float32 with outputs within fp16 rounding."""
    net = make_network()
    save_model(net, make_card(), tmp_path / "m16")
    save_model(net, make_card(), tmp_path / "m32", dtype=torch.float32)
    size16 = (tmp_path / "m16" / WEIGHTS_FILE).stat().st_size
    size32 = (tmp_path / "m32" / WEIGHTS_FILE).stat().st_size
    assert size16 < 0.52 * size32
    loaded = load_model(tmp_path / "m16", dtype=torch.float32)
    assert loaded.card.weights.dtype == "float16"
    assert next(loaded.network.parameters()).dtype == torch.float32
    ref_seg, ref_cls = _outputs(net)
    seg, cls = _outputs(loaded.network)
    assert (torch.sigmoid(seg) - torch.sigmoid(ref_seg)).abs().max() < 0.02
    assert (torch.sigmoid(cls) - torch.sigmoid(ref_cls)).abs().max() < 0.02


def test_card_file_is_readable_yaml_with_every_section(saved_model_dir: Path) -> None:
    """model.yaml is plain YAML holding the card's sections, weights dtype and checksum."""
    raw = yaml.safe_load((saved_model_dir / CARD_FILE).read_text())
    for key in (
        "name",
        "version",
        "architecture",
        "input",
        "normalisation",
        "thresholds",
        "top_k",
        "classes",
        "intended_use",
        "training_data",
        "metrics",
        "weights",
    ):
        assert key in raw
    assert raw["architecture"]["encoder"] == "resnet18"
    assert raw["classes"]["finding"]["code"] == {
        "scheme": "SCT",
        "value": "108369006",
        "meaning": "Neoplasm",
    }
    assert len(raw["weights"]["sha256"]) == 64
    assert read_card(saved_model_dir / CARD_FILE).name == "lung-ct-test"


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    """After save_model (twice, replacing) the folder holds exactly the card and the weights."""
    for _ in range(2):
        save_model(make_network(), make_card(), tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CARD_FILE, WEIGHTS_FILE]


def test_load_places_network_on_device_and_dtype(saved_model_dir: Path) -> None:
    """load_model honours ``device`` and ``dtype`` and records them."""
    loaded = load_model(saved_model_dir, device="cpu", dtype=torch.bfloat16)
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.network.parameters()} == {torch.bfloat16}
    assert all(not t.is_meta for t in loaded.network.state_dict().values())
    assert loaded.load_seconds > 0


def test_load_never_opens_a_socket(saved_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model works with every socket connection refused (nothing is downloaded)."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("load_model tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_model(saved_model_dir)


def test_missing_folder(tmp_path: Path) -> None:
    """A folder that does not exist is named in the error."""
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_card(model_dir: Path) -> None:
    """A folder without model.yaml: 'model card missing'."""
    (model_dir / CARD_FILE).unlink()
    with pytest.raises(ModelError, match="model card missing"):
        load_model(model_dir)


def test_card_not_yaml(model_dir: Path) -> None:
    """A model.yaml that is not YAML says so."""
    (model_dir / CARD_FILE).write_text("name: [unclosed\n")
    with pytest.raises(ModelError, match="not valid YAML"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"thresholds": {"segmentation": 0.5, "image": 0.5, "study": 1.5}},
            "thresholds.study: 1.5",
        ),
        ({"top_k": 0}, "top_k: 0"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"input": {"size": 100}}, "not a multiple of the encoder's output stride 32"),
        (
            {"input": {"size": 64, "mode": "spacing"}},
            "input: mode 'spacing' needs pixel_spacing_mm",
        ),
        (
            {"normalisation": {"window_low_hu": 100, "window_high_hu": -100}},
            "window_high_hu must be above",
        ),
        ({"input": {"size": 64, "seg_scales": [1.25]}}, "seg_scales must hold 1.0"),
        ({"input": {"size": 64, "seg_scales": [1.0, 1.25, 1.25]}}, "each scale once"),
        ({"input": {"size": 64, "seg_scales": [1.0, 3.0]}}, "input.seg_scales[1]: 3.0 is invalid"),
    ],
)
def test_invalid_card_names_the_key(
    model_dir: Path, changes: dict[str, object], expected: str
) -> None:
    """An invalid card fails with the bad key's path and the reason."""
    _edit_card(model_dir, **changes)
    with pytest.raises(ModelError, match="model card is invalid") as info:
        load_model(model_dir)
    assert expected in str(info.value)


def test_card_missing_required_key(model_dir: Path) -> None:
    """A card without ``intended_use`` is refused, naming the key."""
    raw = yaml.safe_load((model_dir / CARD_FILE).read_text())
    del raw["intended_use"]
    (model_dir / CARD_FILE).write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelError, match="intended_use: missing"):
        load_model(model_dir)


def test_missing_weights(model_dir: Path) -> None:
    """A folder without weights.safetensors: 'weights file missing'."""
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelError, match="weights file missing"):
        load_model(model_dir)


def test_checksum_mismatch(model_dir: Path) -> None:
    """One flipped byte in the weights fails the SHA-256 check."""
    path = model_dir / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model(model_dir)


def test_card_without_checksum(model_dir: Path) -> None:
    """A card whose weights.sha256 is empty cannot be loaded."""
    _edit_card(model_dir, weights={"dtype": "float32", "sha256": None})
    with pytest.raises(ModelError, match=r"weights\.sha256 is missing"):
        load_model(model_dir)


def test_corrupt_safetensors(model_dir: Path) -> None:
    """A file that is not safetensors (with a matching checksum) is reported as corrupt."""
    data = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    (model_dir / WEIGHTS_FILE).write_bytes(data)
    _edit_card(model_dir, weights={"dtype": "float32", "sha256": hashlib.sha256(data).hexdigest()})
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        load_model(model_dir)


def test_weights_of_another_architecture(model_dir: Path) -> None:
    """Weights whose shapes differ from the card's architecture name the tensors."""
    raw = yaml.safe_load((model_dir / CARD_FILE).read_text())
    raw["architecture"]["mlp_hidden"] = 64
    (model_dir / CARD_FILE).write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelError, match="weights do not match the card's architecture") as info:
        load_model(model_dir)
    assert "wrong shape classifier.fc1.bias (32,) (expected (64,))" in str(info.value)


def test_missing_and_unexpected_tensors(model_dir: Path) -> None:
    """Missing and unexpected tensor names are both listed."""
    tensors = safetensors.torch.load_file(model_dir / WEIGHTS_FILE)
    del tensors["classifier.fc2.bias"]
    tensors["classifier.fc3.weight"] = torch.zeros(3)
    _rewrite_weights(model_dir, tensors)
    with pytest.raises(ModelError) as info:
        load_model(model_dir)
    message = str(info.value)
    assert "weights do not match the card's architecture" in message
    assert "missing classifier.fc2.bias" in message
    assert "unexpected classifier.fc3.weight" in message


def test_weights_dtype_must_match_the_card(model_dir: Path) -> None:
    """float16 tensors under a card that says float32 are refused."""
    tensors = safetensors.torch.load_file(model_dir / WEIGHTS_FILE)
    _rewrite_weights(
        model_dir, {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    )
    with pytest.raises(ModelError, match=r"weights\.dtype float32 but the file holds"):
        load_model(model_dir)


def test_integer_tensors_in_place_of_floating_ones_are_refused(model_dir: Path) -> None:
    """A weight stored as integers (right name and shape) is refused with its name."""
    tensors = safetensors.torch.load_file(model_dir / WEIGHTS_FILE)
    tensors["classifier.fc2.weight"] = tensors["classifier.fc2.weight"].to(torch.int8)
    _rewrite_weights(model_dir, tensors)
    with pytest.raises(ModelError, match=r"the file holds classifier\.fc2\.weight torch\.int8"):
        load_model(model_dir)


def test_a_card_that_is_not_utf8_is_refused(model_dir: Path) -> None:
    """A model.yaml saved in another encoding says so (not a UnicodeDecodeError)."""
    text = (model_dir / CARD_FILE).read_text()
    (model_dir / CARD_FILE).write_bytes(
        text.replace("name:", "# Résumé\nname:", 1).encode("latin-1")
    )
    with pytest.raises(ModelError, match="not UTF-8"):
        load_model(model_dir)


def test_weights_that_are_not_finite_are_refused(model_dir: Path) -> None:
    """An infinite value (checksum right) is a corrupt model, refused at load: an infinite
    running variance would silence its channel without a NaN anywhere to show it."""
    tensors = safetensors.torch.load_file(model_dir / WEIGHTS_FILE)
    tensors["encoder.bn1.running_var"][0] = float("inf")
    _rewrite_weights(model_dir, tensors)
    with pytest.raises(
        ModelError, match=r"not finite in torch\.float32: encoder\.bn1\.running_var"
    ):
        load_model(model_dir)


def test_weights_that_overflow_the_dtype_they_are_loaded_in_are_refused(tmp_path: Path) -> None:
    """float32 weights loaded as float16 (``model.dtype``) whose running variance float16
    cannot hold are refused at load, not run as infinities."""
    net = make_network()
    with torch.no_grad():
        net.encoder.bn1.running_var[0] = 1.0e5
    save_model(net, make_card(), tmp_path, dtype=torch.float32)
    load_model(tmp_path)  # fine in float32
    with pytest.raises(ModelError, match=r"not finite in torch\.float16"):
        load_model(tmp_path, dtype=torch.float16)


def test_save_refuses_a_card_of_another_architecture(tmp_path: Path) -> None:
    """save_model checks that the network and the card describe the same architecture."""
    card: ModelCard = make_card()
    other = card.model_copy(
        update={"architecture": card.architecture.model_copy(update={"mlp_hidden": 8})}
    )
    with pytest.raises(ModelError, match="architecture differs"):
        save_model(make_network(), other, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_save_refuses_weights_that_overflow_fp16(tmp_path: Path) -> None:
    """A weight too large for float16 would become Inf: save_model refuses it."""
    net = make_network()
    with torch.no_grad():
        net.classifier.fc2.weight[0, 0] = 1e6
    with pytest.raises(ModelError, match=r"classifier\.fc2\.weight is not finite"):
        save_model(net, make_card(), tmp_path / "m", dtype=torch.float16)
    save_model(net, make_card(), tmp_path / "m", dtype=torch.float32)


def test_a_running_variance_beyond_float16_is_rescaled_exactly(tmp_path: Path) -> None:
    """bf16 training can leave a batch-norm running variance above 65504: the float16 file
    holds it rescaled together with its convolution, and the network computes the same."""
    net = make_network()
    norm = net.decoder.blocks[0].conv1[1]
    conv = net.decoder.blocks[0].conv1[0]
    with torch.no_grad():
        norm.running_var[:4] = torch.tensor([1.3e5, 9.0e4, 7.0e4, 2.0])
        norm.running_mean[:4] = torch.tensor([300.0, -200.0, 50.0, 0.1])
        conv.weight[:4] *= 300.0  # activations large enough for such variances
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        before, _ = net(x)
    saved = save_model(net, make_card(), tmp_path / "m", dtype=torch.float16)
    assert saved.weights.dtype == "float16"
    loaded = load_model(tmp_path / "m").network.float().eval()
    stored = loaded.decoder.blocks[0].conv1[1].running_var
    assert float(stored.max()) <= 65504 and float(stored[3]) == pytest.approx(2.0, rel=1e-3)
    with torch.inference_mode():
        after, _ = loaded(x)
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.01)
    assert float(norm.running_var[0]) == pytest.approx(1.3e5)  # the network is not changed


def test_a_new_card_keeps_the_weights_file_byte_for_byte(tmp_path: Path) -> None:
    """save_card writes the card beside the weights it describes, without serialising them
    again: in place, or copied from another folder; a card whose checksum the file does not
    match is refused and nothing is written."""
    source = tmp_path / "source"
    card = save_model(make_network(), make_card(), source)
    weights = (source / WEIGHTS_FILE).read_bytes()
    figured = card.model_copy(update={"metrics": {"heldout_image_accuracy": 0.9}})
    save_card(figured, source)
    assert (source / WEIGHTS_FILE).read_bytes() == weights
    assert load_model(source).card.metrics == {"heldout_image_accuracy": 0.9}
    copy = tmp_path / "copy"
    save_card(figured, copy, weights_from=source)
    assert (copy / WEIGHTS_FILE).read_bytes() == weights
    assert load_model(copy).card == load_model(source).card
    other = tmp_path / "other"
    save_model(make_network(seed=5), make_card(), other)
    with pytest.raises(ModelError, match="not the card's"):
        save_card(figured, other)
    assert read_card(other / CARD_FILE).metrics == {}
    with pytest.raises(ModelError, match="not the card's"):
        save_card(figured, tmp_path / "third", weights_from=other)
    assert not (tmp_path / "third").exists()
