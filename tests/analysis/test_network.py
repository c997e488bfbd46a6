"""The network: shapes, one encoder pass, parameter names, architecture checks, study rule."""

from __future__ import annotations

import math

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from dicom_node.analysis.network import Architecture, LungCTNet, image_calls, study_probability
from tests.analysis.lungct_tiny import make_network


def test_forward_returns_segmentation_and_class_logits() -> None:
    """A (N, 1, H, W) batch gives (N, 1, H, W) segmentation logits and (N,) class logits."""
    net = make_network()
    with torch.inference_mode():
        seg, cls = net(torch.zeros(2, 1, 64, 64))
    assert seg.shape == (2, 1, 64, 64)
    assert cls.shape == (2,)
    assert seg.dtype == cls.dtype == torch.float32


def test_encoder_runs_once_per_forward() -> None:
    """Both heads share one encoder pass: the encoder's forward is called once per batch."""
    net = make_network()
    calls: list[int] = []
    net.encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        net(torch.zeros(1, 1, 64, 64))
    assert len(calls) == 1


def test_mlp_reads_the_pooled_deepest_map() -> None:
    """The class logit depends only on the global average of the deepest encoder map."""
    net = make_network()
    seen: list[torch.Tensor] = []
    net.classifier.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.inference_mode():
        _seg, cls = net(torch.randn(2, 1, 64, 64))
        deepest = seen[0]
        assert deepest.shape == (2, 512, 2, 2)  # ResNet18: 512 channels at 1/32
        head = net.classifier
        expected = head.fc2(head.act(head.fc1(deepest.mean(dim=(2, 3))))).squeeze(1)
    torch.testing.assert_close(cls, expected)


def test_product_architecture_is_resnet50_with_2048_feature_mlp() -> None:
    """The default architecture is a ResNet50 U-Net whose MLP reads 2048 channels (meta device)."""
    with torch.device("meta"):
        net = LungCTNet()
    assert net.architecture.encoder == "resnet50"
    assert net.feature_channels == 2048
    assert net.classifier.fc1.out_features == 256
    unet_params = sum(
        p.numel() for n, p in net.named_parameters() if not n.startswith("classifier")
    )
    assert unet_params == 32_514_833  # smp.Unet("resnet50", in_channels=1, classes=1)


def test_parameter_names_are_smp_unet_names() -> None:
    """Apart from ``classifier.*`` the state dict has exactly smp.Unet's names and shapes."""
    with torch.device("meta"):
        net = LungCTNet()
        unet = smp.Unet("resnet50", encoder_weights=None, in_channels=1, classes=1)
    ours = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("classifier.")}
    theirs = {k: v.shape for k, v in unet.state_dict().items()}
    assert ours == theirs


def test_gelu_activation_and_dropout_are_built() -> None:
    """``mlp_activation: gelu`` and ``dropout`` reach the MLP."""
    arch = Architecture(encoder="resnet18", mlp_activation="gelu", dropout=0.3)
    with torch.device("meta"):
        net = LungCTNet(arch)
    assert isinstance(net.classifier.act, torch.nn.GELU)
    assert net.classifier.drop.p == 0.3


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"encoder_depth": 4}, "one decoder block per encoder stage"),
        ({"classes": 2}, "classes"),
        ({"encoder": "vgg16"}, "encoder"),
        ({"dropout": 1.0}, "dropout"),
        ({"decoder_channels": []}, "decoder_channels"),
    ],
)
def test_architecture_rejects_inconsistent_values(values: dict[str, object], fragment: str) -> None:
    """Invalid architectures fail validation, naming the field or the rule."""
    with pytest.raises(ValidationError, match=fragment):
        Architecture.model_validate(values)


def test_study_probability_is_mean_of_top_k() -> None:
    """The study probability is the mean of the k highest image probabilities."""
    probs = [0.1, 0.9, 0.2, 0.8, 0.7, 0.05]
    assert study_probability(probs, top_k=3) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert study_probability(probs, top_k=1) == pytest.approx(0.9)


def test_image_calls_follow_the_threshold_and_the_study_gate() -> None:
    probs = [0.2, 0.5, 0.49, 0.8]
    ungated = [False, True, False, True]
    assert image_calls(probs, threshold=0.5, study_probability=0.1).tolist() == ungated
    # a study at the gate keeps its calls; one just under it has none
    at = image_calls(probs, threshold=0.5, study_probability=0.6, study_gate=0.6)
    assert at.tolist() == ungated
    under = image_calls(probs, threshold=0.5, study_probability=0.5999, study_gate=0.6)
    assert under.tolist() == [False] * 4


def test_study_probability_clips_k_to_the_number_of_images() -> None:
    """With fewer images than k, all images are averaged."""
    assert study_probability([0.2, 0.4], top_k=5) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("probs", "top_k", "fragment"),
    [([], 5, "no image probabilities"), ([0.5], 0, "top_k"), ([0.5, math.nan], 1, r"\[0, 1\]")],
)
def test_study_probability_rejects_bad_input(probs: list[float], top_k: int, fragment: str) -> None:
    """Empty input, k < 1 and values outside [0, 1] (NaN) raise ValueError."""
    with pytest.raises(ValueError, match=fragment):
        study_probability(probs, top_k=top_k)


def _lesion_network(context_mm: float = 0.0) -> LungCTNet:
    torch.manual_seed(0)
    arch = Architecture(
        encoder="resnet18",
        decoder_channels=(64, 32, 16, 16, 8),
        mlp_hidden=32,
        mlp_pooling="lesion",
        mlp_context_mm=context_mm,
    )
    return LungCTNet(arch).eval()


def test_lesion_pooling_reads_average_maximum_lesion_weighted_and_seg_figures() -> None:
    """``lesion`` pooling: (average, maximum, seg-weighted average, peak, log-sum) of the maps."""
    net = _lesion_network()
    assert net.classifier.fc1.in_features == 3 * 512 + 2
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        features = net.encoder(x)
        seg = net.segmentation_head(net.decoder(features))
        _seg, cls = net(x)
        pooled = net.classifier.pool(features[-1], seg)
        deepest = features[-1]
        prob = torch.sigmoid(seg)
        weight = torch.nn.functional.adaptive_avg_pool2d(prob, (2, 2))
        lesion = (deepest * weight).sum(dim=(2, 3)) / (weight.sum(dim=(2, 3)) + 1e-3)
        expected = torch.cat(
            [
                deepest.mean(dim=(2, 3)),
                deepest.amax(dim=(2, 3)),
                lesion,
                prob.amax(dim=(1, 2, 3))[:, None],
                torch.log1p(prob.sum(dim=(1, 2, 3)))[:, None],
            ],
            dim=1,
        )
        torch.testing.assert_close(pooled, expected)
        torch.testing.assert_close(cls, net.classifier.score(pooled))
    with pytest.raises(ValueError, match="segmentation logits"):
        net.classifier.pool(features[-1])


def test_lesion_pooling_follows_the_segmentation() -> None:
    """Two slices with equal features but different segmentation maps pool differently."""
    net = _lesion_network()
    features = torch.rand(2, 512, 2, 2)
    seg = torch.full((2, 1, 64, 64), -10.0)
    seg[1, 0, :16, :16] = 10.0  # a confident lesion in the top-left cell
    with torch.inference_mode():
        pooled = net.classifier.pool(features, seg)
    assert pooled[0, -2] < 0.01 and pooled[1, -2] > 0.99
    torch.testing.assert_close(pooled[1, 1024:1536], features[1, :, 0, 0], atol=1e-2, rtol=1e-2)


def test_slice_context_adds_the_mean_of_the_slices_that_far_away() -> None:
    """``mlp_context_mm``: each vector is followed by the mean of the vectors ``round(mm /
    spacing)`` slices before and after it (at least one), clamped at the volume's ends."""
    head = _lesion_network(2.5).classifier
    assert head.fc1.in_features == 2 * (3 * 512 + 2)
    pooled = torch.arange(5.0)[:, None].expand(5, 3) * torch.tensor([1.0, 10.0, 100.0])
    out = head.with_context(pooled, 1.25)  # 2.5 mm is 2 slices
    assert head.neighbour_offset(1.25) == 2
    torch.testing.assert_close(out[:, :3], pooled)
    # slice 0: before clamps to 0, after is 2; slice 2: 0 and 4; slice 4: 2 and 4 (clamped)
    expected_mean = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0])[:, None] * torch.tensor(
        [1.0, 10.0, 100.0]
    )
    torch.testing.assert_close(out[:, 3:], expected_mean)
    assert head.neighbour_offset(5.0) == 1  # slices 5 mm apart: the next ones
    assert head.neighbour_offset(0.5) == 5
    with pytest.raises(ValueError, match="positive"):
        head.neighbour_offset(0.0)
    alone = _lesion_network().classifier
    assert alone.neighbour_offset(1.25) == 0
    assert alone.with_context(pooled, 1.25) is pooled


def test_a_network_with_slice_context_scores_a_batch_as_one_volume() -> None:
    """forward needs the slice spacing; its logits are the head's on the contextual vectors."""
    net = _lesion_network(2.5)
    x = torch.randn(4, 1, 64, 64)
    with torch.inference_mode():
        seg, pooled = net.trunk(x)
        _seg, cls = net(x, spacing_z_mm=2.5)
        expected = net.classifier.score(net.classifier.with_context(pooled, 2.5))
        torch.testing.assert_close(cls, expected)
        torch.testing.assert_close(_seg, seg)
        with pytest.raises(ValueError, match="slice spacing"):
            net(x)


def test_slice_context_is_bounded() -> None:
    """The context is a distance in mm between 0 and 50."""
    with pytest.raises(ValidationError):
        Architecture(mlp_context_mm=-1.0)
    with pytest.raises(ValidationError):
        Architecture(mlp_context_mm=60.0)


def test_trunk_at_several_scales_averages_the_segmentation_logits() -> None:
    """``trunk(x, scales)``: the logits are the mean of those on ``x`` and on ``x`` magnified
    by each other scale (brought back to ``x``'s size); the pooled vectors are the scale-1
    pass's, whatever the scales."""
    net = make_network()
    x = torch.randn(2, 1, 128, 64)
    with torch.inference_mode():
        seg, pooled = net.trunk(x)
        seg2, pooled2 = net.trunk(x, (1.0, 1.5))
        big = F.interpolate(x, size=(192, 96), mode="bilinear", align_corners=False)
        at_big = net.segmentation_head(net.decoder(net.encoder(big)))
        back = F.interpolate(at_big, size=(128, 64), mode="bilinear", antialias=True)
    assert seg2.shape == seg.shape == (2, 1, 128, 64)
    torch.testing.assert_close(pooled2, pooled)
    torch.testing.assert_close(seg2, (seg + back) / 2)
    assert float((seg2 - seg).abs().max()) > 1e-3
