"""RandAugment with a strength and a probability per image, batched: BCL's boosted augmentation (Zhou et al., ICML
2022; MediaBrain-SJTU/BCL ``RandAugment_prob``).

For each view, k operations are drawn per image, uniformly with replacement from the 15 below, and each is applied
with the image's probability p at the value

    v = m / 30 * (hi - lo) + lo,   m in [0, 30] the image's strength                   (BCL data/randaug.py)

on the operation's range (lo, hi). Shears, translations and rotations take a random sign. The ranges are BCL's,
quirks included: solarize's threshold and posterize's bits grow with m, so those two get milder as m grows.

The operations run on float [0, 1] images, as every op of augment/views.py, after the colour jitter and grayscale
(BCL applies them to the PIL view after RandomGrayscale). Geometric ones resample with nearest neighbours and fill
with black, as PIL's ``transform``/``rotate`` by default; equalize, posterize and solarize act on the 256 uint8
levels, as PIL's ImageOps. Each image's draws come from one ``torch.rand`` of the whole batch, so the views of a
process's ``rows`` are those rows of the whole batch's (engine/distributed.py).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from imbssl.augment.views import BatchRows, luma

__all__ = ["OPS", "RandAugment"]

#: BCL's cutout fill, the CIFAR mean colour in uint8
CUTOUT_FILL = (125 / 255, 123 / 255, 114 / 255)
#: PIL's ImageFilter.SMOOTH kernel, the degenerate image of ImageEnhance.Sharpness
SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0

#: an operation: (images [n, C, H, W], values [n], uniforms [n, 3] for its own randomness) -> images
Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _signed(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """BCL's random direction: -v with probability 1/2."""
    return torch.where(u[:, 0] > 0.5, -v, v)


def _affine(x: torch.Tensor, rows_x: list[torch.Tensor], rows_y: list[torch.Tensor]) -> torch.Tensor:
    """Resample x at theta (``F.affine_grid`` convention, normalised output -> input coordinates), black outside."""
    theta = torch.stack([torch.stack(rows_x, dim=1), torch.stack(rows_y, dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def shear_x(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """PIL's affine (1, v, 0, 0, 1, 0): x_in = x + v y in pixels from the top-left corner."""
    s = _signed(v, u) * x.shape[-2] / x.shape[-1]
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return _affine(x, [one, s, s], [zero, one, zero])


def shear_y(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """PIL's affine (1, 0, 0, v, 1, 0): y_in = y + v x."""
    s = _signed(v, u) * x.shape[-1] / x.shape[-2]
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return _affine(x, [one, zero, zero], [s, one, s])


def translate_x(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A shift by v of the width (2 v in normalised coordinates)."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return _affine(x, [one, zero, 2 * _signed(v, u)], [zero, one, zero])


def translate_y(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return _affine(x, [one, zero, zero], [zero, one, 2 * _signed(v, u)])


def rotate(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A rotation by v degrees about the centre (the sign is random, so its direction does not matter)."""
    angle = _signed(v, u) * (math.pi / 180)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(v)
    aspect = x.shape[-2] / x.shape[-1]  # H / W: the rotation is of pixels, not of normalised coordinates
    return _affine(x, [cos, -sin * aspect, zero], [sin / aspect, cos, zero])


def autocontrast(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to [0, 1] (PIL's autocontrast without cutoff); a flat channel is left as it is."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    spread = hi - lo
    return torch.where(spread > 0, (x - lo) / spread.clamp_min(1e-12), x)


def invert(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def _levels(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().long()


def equalize(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel: step = (N - n_last) // 255 for n_last the count of the highest level
    present, lut[i] = (step // 2 + sum_{j < i} n_j) // step; a channel with step 0 is left as it is."""
    n, c, h, w = x.shape
    levels = _levels(x).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, levels, torch.ones_like(levels))
    last = levels.amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    below = hist.cumsum(dim=1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_max(255)
    out = torch.where(step > 0, lut.gather(1, levels), levels)
    return out.view(n, c, h, w).float().div_(255.0)


def solarize(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Levels at or above the threshold v (uint8 units) inverted."""
    return torch.where(_levels(x) >= v.view(-1, 1, 1, 1), 1.0 - x, x)


def posterize(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Only the int(v) highest bits of each level kept."""
    drop = 2 ** (8 - v.long().clamp(1, 8)).view(-1, 1, 1, 1)
    return (_levels(x) // drop * drop).float().div_(255.0)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + f (x - degenerate), clipped."""
    return torch.lerp(degenerate, x, factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return luma(x) if x.shape[1] == 3 else x


def contrast(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), v)


def color(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).expand_as(x), v)


def brightness(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), v)


def sharpness(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Blended with PIL's SMOOTH filter of x, whose border pixels are x's own."""
    c = x.shape[1]
    kernel = SMOOTH.to(x.device, x.dtype).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, smooth, v)


def cutout(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """BCL's CutoutAbs: a square from (x0, y0) = floor(max(0, centre - s / 2)) to x0 + s, s = v times the width,
    both corners included (PIL's ``rectangle``), filled with BCL's grey. Its centre is ``np.random.uniform(w)``,
    which draws from (1, w], not [0, w): kept."""
    n, c, h, w = x.shape
    side = v * w
    top = ((1 + u[:, 1] * (h - 1)) - side / 2).clamp_min(0).floor()
    left = ((1 + u[:, 2] * (w - 1)) - side / 2).clamp_min(0).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows <= (top + side).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols <= (left + side).view(-1, 1, 1))).unsqueeze(1)
    fill = torch.tensor(CUTOUT_FILL if c == 3 else (sum(CUTOUT_FILL) / 3,), device=x.device).view(1, c, 1, 1)
    return torch.where(inside & (side > 0).view(-1, 1, 1, 1), fill, x)


#: BCL's augment_list: (operation, lo, hi), in its order
OPS: tuple[tuple[Op, float, float], ...] = (
    (shear_x, 0.0, 0.6), (shear_y, 0.0, 0.6), (translate_x, 0.0, 0.66), (translate_y, 0.0, 0.66), (rotate, 0.0, 60.0),
    (autocontrast, 0.0, 1.0), (invert, 0.0, 1.0), (equalize, 0.0, 1.0), (solarize, 0.0, 110.0), (posterize, 4.0, 8.0),
    (contrast, 0.1, 1.9), (color, 0.1, 1.9), (brightness, 0.1, 1.9), (sharpness, 0.1, 1.9), (cutout, 0.0, 0.4),
)
MAX_STRENGTH = 30.0


class RandAugment:
    """k operations per view at the strengths ``strength`` [B] (in [0, 30]) and probabilities ``prob`` [B] of a
    batch's B images; called on float [0, 1] views of those images (or of ``rows`` of them, ``BatchRows``), which it
    changes in place."""

    def __init__(self, num_ops: int, strength: torch.Tensor, prob: torch.Tensor) -> None:
        self.num_ops, self.strength, self.prob = num_ops, strength, prob

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rows: BatchRows | None = None) -> torch.Tensor:
        rows = BatchRows(len(self.strength)) if rows is None else rows
        # [op?, applied?, the op's own three uniforms] per image and slot, drawn for the whole batch
        u = torch.rand(rows.size, self.num_ops, 5, generator=generator, device=x.device)[rows.slice]
        strength, prob = self.strength[rows.slice], self.prob[rows.slice]
        for slot in u.unbind(1):
            chosen = (slot[:, 0] * len(OPS)).long().clamp_max(len(OPS) - 1)
            op_of = torch.where(slot[:, 1] < prob, chosen, len(OPS))  # len(OPS): no op for this image
            # the images of each op, in one host sync per slot: sorted by op, cut by the op counts
            groups = torch.argsort(op_of, stable=True).split(torch.bincount(op_of, minlength=len(OPS) + 1).tolist())
            for (op, lo, hi), images in zip(OPS, groups):  # the last group, images without an op, is left out
                if len(images):
                    value = strength[images] / MAX_STRENGTH * (hi - lo) + lo
                    x[images] = op(x[images], value, slot[images, 2:])
        return x
