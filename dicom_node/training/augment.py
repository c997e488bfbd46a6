"""Training-time augmentation of CT slices and their masks, in torch.

Slices arrive in HU on the model's grid (already clipped to the card's window). Intensity
changes happen in HU, as a scanner would make them (calibration offset and gain, reconstruction
blur, image noise); the result is normalised as the card says; geometry (left-right flip, small
rotation and scaling) is applied to the normalised image and the mask together with one
``grid_sample`` per batch, the area brought in from outside the slice being air.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the name PyTorch's own documentation uses

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """How strongly slices are perturbed (each draw is uniform in its range).

    Attributes
    ----------
    flip_probability
        Probability of a left-right flip.
    rotate_deg
        Rotation in [-rotate_deg, +rotate_deg] degrees.
    scale
        Zoom factor range (1 keeps the pixel size).
    hu_offset
        Calibration offset in [-hu_offset, +hu_offset] HU.
    hu_gain
        Relative gain in [-hu_gain, +hu_gain] (applied to HU + 1000, so air stays air).
    noise_sd_hu
        Standard deviation range of added Gaussian noise, HU.
    noise_probability
        Probability that noise is added to a slice.
    blur_sigma_px
        Range of the Gaussian blur's sigma, pixels.
    blur_probability
        Probability that a slice is blurred.
    """

    flip_probability: float = 0.5
    rotate_deg: float = 12.0
    scale: tuple[float, float] = (0.88, 1.12)
    hu_offset: float = 25.0
    hu_gain: float = 0.04
    noise_sd_hu: tuple[float, float] = (0.0, 30.0)
    noise_probability: float = 0.6
    blur_sigma_px: tuple[float, float] = (0.3, 1.2)
    blur_probability: float = 0.4


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1, C, H, W) image, each channel on its own, sigma in pixels
    (reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    planes = image.transpose(0, 1)  # (C, 1, H, W): one image per channel
    padded = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1)).transpose(0, 1)


def augment_batch(
    hu: torch.Tensor,
    mask: torch.Tensor,
    *,
    config: AugmentConfig,
    generator: torch.Generator,
    window: tuple[float, float],
    scale_shift: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of slices and masks and normalise the slices.

    Parameters
    ----------
    hu
        (N, C, H, W) float32 slices in HU: C = 1, or 3 with 2.5-D context (the plane before,
        the slice, the plane after; each gets the same changes, and the two neighbours swap
        places with probability 1/2, as if the volume ran the other way).
    mask
        (N, 1, H, W) float32 tumour masks in {0, 1}.
    config
        The ranges to draw from.
    generator
        Source of randomness (CPU generator; the draws decide everything).
    window
        (low, high) HU window of the card; values are clipped to it after the intensity changes.
    scale_shift
        ``normalised = clipped_hu * scale + shift`` (from the card's normalisation).

    Returns
    -------
    image : torch.Tensor
        (N, C, H, W) normalised slices.
    mask : torch.Tensor
        (N, 1, H, W) masks in {0, 1} after the same geometric transform.
    """
    n = hu.shape[0]
    low, high = window
    scale, shift = scale_shift
    offset = _uniform(n, -config.hu_offset, config.hu_offset, generator).to(hu.device)
    gain = _uniform(n, -config.hu_gain, config.hu_gain, generator).to(hu.device)
    out = (hu - low) * (1.0 + gain.view(n, 1, 1, 1)) + low + offset.view(n, 1, 1, 1)
    blur_draw = torch.rand(n, generator=generator)
    sigma = _uniform(n, *config.blur_sigma_px, generator)
    noise_draw = torch.rand(n, generator=generator)
    noise_sd = _uniform(n, *config.noise_sd_hu, generator)
    slices = []
    for i in range(n):
        one = out[i : i + 1]
        if blur_draw[i] < config.blur_probability:
            one = _blur(one, float(sigma[i]))
        if noise_draw[i] < config.noise_probability:
            noise = torch.randn(one.shape, generator=generator).to(one.device)
            one = one + noise * float(noise_sd[i])
        slices.append(one)
    out = torch.cat(slices).clamp(low, high) * scale + shift
    air = low * scale + shift

    angle = _uniform(n, -config.rotate_deg, config.rotate_deg, generator) * (math.pi / 180.0)
    zoom = _uniform(n, config.scale[0], config.scale[1], generator)
    flip = torch.where(torch.rand(n, generator=generator) < config.flip_probability, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta.to(hu.device), list(hu.shape), align_corners=False)
    image = F.grid_sample(out - air, grid, mode="bilinear", align_corners=False) + air
    warped = F.grid_sample(mask, grid, mode="bilinear", align_corners=False)
    if image.shape[1] == 3:  # drawn only with context, so 1-channel runs keep their draws
        reverse = torch.rand(n, generator=generator) < 0.5
        image[reverse.to(image.device)] = image[reverse.to(image.device)].flip(1)
    return image, (warped >= 0.5).to(mask.dtype)
