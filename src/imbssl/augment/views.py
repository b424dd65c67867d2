"""Batched SimSiam/SimCLR views on uint8 image tensors, on whatever device the batch lives.

The papers build each view per image with PIL in DataLoader workers (Chen & He 2021, SimSiam,
Sec. 4 / Appendix A; Chen et al. 2020, SimCLR, Appendix A):

    RandomResizedCrop(scale) -> RandomHorizontalFlip -> RandomApply(ColorJitter(.4,.4,.4,.1), p=.8)
    -> RandomGrayscale(p=.2) [-> RandomApply(GaussianBlur, p)] -> ToTensor -> Normalize

For 32x32 images that per-image Python work, not the network, bounds the step time. Here
the same operations run on the whole batch at once: every random parameter is drawn per
sample from one ``torch.rand`` call on the given generator, and "apply with probability p"
is a per-sample mask that sets the operation's parameter to its identity value (factor 1,
hue shift 0, flip sign +1, delta blur kernel, grayscale weight 0) with ``torch.where`` (or
``torch.lerp`` with a 0/1 weight), so there is no branch or Python loop over samples, no
host-device sync, and a seeded generator reproduces a batch exactly.

Semantics follow torchvision's tensor kernels, with these documented differences:

* ColorJitter runs in the fixed order brightness -> contrast -> saturation -> hue (the order of
  its arguments); torchvision draws a random order per image, which would need every op
  evaluated at each of the four positions when batched.
* The crop is resampled with ``grid_sample`` (bilinear, ``align_corners=False``) straight from
  the full image: taps at the crop border read the true neighbouring pixels instead of
  replicating the crop's edge, and a large crop shrunk to a small output is not
  antialiased (like torchvision's tensor ``resize(antialias=False)``; PIL always filters).
* The blur kernel side is 2 floor(0.05 s) + 1 >= 3 for output side s, about 10% (SimCLR's rule;
  torchvision's GaussianBlur takes a fixed size).

Hue is shifted exactly in HSV (as torchvision's tensor ``adjust_hue``), not with the YIQ
rotation approximation. Grayscale and the luma references of contrast/saturation use the
ITU-R BT.601 weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # config.py builds its method sections from the methods, which import this module
    from imbssl.config import AugmentConfig

__all__ = ["BatchRows", "channel_histogram", "channel_stats", "stats_from_histogram", "MultiCrop", "Normalize",
           "ViewAugment", "solarize"]

#: ITU-R BT.601 luma weights, as in PIL ``convert("L")`` (torchvision's tensor ``rgb_to_grayscale`` has 0.2989 for R).
LUMA_601 = (0.299, 0.587, 0.114)
#: aspect-ratio range (w/h) of torchvision's RandomResizedCrop.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: crop candidates per sample; torchvision's RandomResizedCrop also tries 10 times.
CROP_ATTEMPTS = 10
#: Gaussian blur sigma range of SimCLR (Appendix A) / MoCo v2.
BLUR_SIGMA = (0.1, 2.0)


@dataclass(frozen=True)
class BatchRows:
    """Rows ``start:stop`` of a global batch of ``size`` images: the part of it one process reads and views
    (engine/distributed.py ``rank_rows``). An augmentation draws its random parameters for all ``size`` images and
    keeps these rows' parameters, so a part's views are those rows of the whole batch's views, whatever the number of
    processes, while only the part's images are read and transformed."""

    size: int
    start: int = 0
    stop: int | None = None  # None: the end of the batch

    @property
    def slice(self) -> slice:
        return slice(self.start, self.size if self.stop is None else self.stop)

    def __len__(self) -> int:
        return self.slice.stop - self.start

    def check(self, images: torch.Tensor) -> None:
        if len(images) != len(self):
            raise ValueError(f"{len(images)} images for rows {self.start}:{self.slice.stop} of a batch of {self.size}")


def whole_batch(images: torch.Tensor, rows: BatchRows | None) -> BatchRows:
    """``rows``, checked against ``images``; None: every row of a batch of ``images`` alone."""
    rows = BatchRows(len(images)) if rows is None else rows
    rows.check(images)
    return rows


#: a per-image augmentation on float [0, 1] views: (views of a part's images, generator, the part's rows) -> views
Boost = Callable[[torch.Tensor, torch.Generator, BatchRows], torch.Tensor]


def channel_stats(images_uint8: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std, in [0, 1] units, of uint8 NHWC (or NHW) images."""
    return stats_from_histogram(channel_histogram(images_uint8))


def channel_histogram(images_uint8: np.ndarray | torch.Tensor) -> np.ndarray:
    """[C, 256] counts of each value per channel of uint8 NHWC (or NHW) images; histograms of chunks add up.

    The statistics come from these exactly, instead of from a float copy of the data, so a 50k x 32 x 32 x 3
    array costs no extra gigabyte of memory and no float rounding.
    """
    arr = images_uint8 if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if arr.dtype not in (np.uint8, torch.uint8):
        raise TypeError(f"channel_histogram expects uint8 images, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"channel_histogram expects NHWC or NHW images, got shape {tuple(arr.shape)}")
    if isinstance(arr, torch.Tensor):  # counted where the images are: no copy of a device's data to the host
        pixels = arr.reshape(-1, arr.shape[-1])
        return torch.stack([torch.bincount(pixels[:, c].int(), minlength=256) for c in range(pixels.shape[1])]
                           ).cpu().numpy()
    return np.stack([np.bincount(arr[..., c].ravel(), minlength=256) for c in range(arr.shape[-1])])


def stats_from_histogram(counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """mean = sum_v v n_v / N, var = sum_v v^2 n_v / N - mean^2 per channel, v in [0, 1] units."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in counts.astype(np.float64):
        n = channel.sum()
        mean = (channel * values).sum() / n
        means.append(mean)
        stds.append(math.sqrt(max((channel * values**2).sum() / n - mean**2, 0.0)))
    return torch.tensor(means, dtype=torch.float32), torch.tensor(stds, dtype=torch.float32)


def _as_channel_param(value: torch.Tensor, name: str) -> torch.Tensor:
    """Flatten a per-channel mean/std to shape [1, C, 1, 1] float32 for broadcasting over NCHW."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if name == "std" and bool((t <= 0).any()):
        raise ValueError("std must be positive")
    return t.view(1, -1, 1, 1)


class Normalize:
    """Eval-time transform: NCHW images -> float32 ``(x - mean) / std`` with x in [0, 1], on the input's device.

    Integer images (uint8) are levels in [0, 255] and divided by 255; float images are taken as [0, 1] already
    (what ``ToTensor`` and most pipelines give) and left unscaled. A float batch with a value above
    ``FLOAT_INPUT_MAX`` holds [0, 255] levels, which would silently give wrong features: it is refused.
    """

    #: the largest value a float [0, 1] batch may hold; above 1 to let a resampling overshoot (bicubic) pass
    FLOAT_INPUT_MAX = 2.0

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean = _as_channel_param(mean, "mean")
        self.std = _as_channel_param(std, "std")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        if not images.is_floating_point():
            return images.float().div_(255.0).sub_(self.mean).div_(self.std)
        # A check only on this path: the pipelines pass uint8, whose path needs no host-device sync.
        top = float(images.amax()) if images.numel() else 0.0
        if top > self.FLOAT_INPUT_MAX:
            raise ValueError(f"Normalize takes float images in [0, 1] (or uint8 in [0, 255]); got float values up to "
                             f"{top:g}: divide them by 255 or pass uint8")
        return (images.float() - self.mean).div_(self.std)  # out of place: the caller's tensor is left as it is


def luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> [B, 1, H, W] ITU-R 601 luma (torchvision ``rgb_to_grayscale``)."""
    r, g, b = x.unbind(1)
    return (r * LUMA_601[0]).add_(g, alpha=LUMA_601[1]).add_(b, alpha=LUMA_601[2]).unsqueeze(1)


def _crop_boxes(
    u_area: torch.Tensor, u_ratio: torch.Tensor, u_top: torch.Tensor, u_left: torch.Tensor,
    height: int, width: int, scale: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer crop boxes (top, left, h, w) distributed as torchvision's RandomResizedCrop.

    torchvision tries up to 10 times: area ~ U(scale) * H * W, log(w/h) ~ U(log 3/4, log 4/3),
    w = round(sqrt(area * r)), h = round(sqrt(area / r)), accepting the first box that fits
    (0 < w <= W, 0 < h <= H) at a uniform integer offset; if none fits it takes the central
    crop of the whole image clamped to the ratio range. Here the K candidates of each sample
    (``u_area``, ``u_ratio``: [B, K]) are evaluated at once and the first valid one is picked
    with ``argmax`` on the validity mask (argmax returns the first maximum).
    """
    area = (height * width) * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.sqrt(area * ratio).round_()
    h = torch.sqrt(area / ratio).round_()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = valid.any(dim=1)

    # Fallback: the whole image, its aspect ratio clamped into CROP_RATIO, centred.
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fw, fh = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        fw, fh = round(height * CROP_RATIO[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, float(fw))
    h = torch.where(found, h, float(fh))
    # Offsets uniform over {0, ..., H - h}; the clamp guards float rounding of u * (n + 1).
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return top, left, h, w


def _crop_theta(
    top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor, flip_sign: torch.Tensor,
    height: int, width: int,
) -> torch.Tensor:
    """[B, 2, 3] affine (``F.affine_grid`` convention) mapping output coords onto the pixel box.

    With ``align_corners=False`` pixel column p spans normalised x in [2p/W - 1, 2(p+1)/W - 1],
    so the box [left, left + w) is x_in = (w / W) x_out + (2 left + w) / W - 1 (same for y).
    Negating the x scale mirrors the sampled box, i.e. a horizontal flip of the view.
    """
    zeros = torch.zeros_like(w)
    row_x = torch.stack([flip_sign * w / width, zeros, (2 * left + w) / width - 1], dim=1)
    row_y = torch.stack([zeros, h / height, (2 * top + h) / height - 1], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def _axis_aligned_grid(theta: torch.Tensor, out: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, C, out, out], align_corners=False)`` for a shear-free theta.

    Output pixel centres sit at t_i = (2i + 1)/out - 1; with theta[:, 0, 1] = theta[:, 1, 0] = 0
    the grid is x = theta00 t_j + theta02, y = theta11 t_i + theta12, i.e. two [B, out] vectors
    broadcast to [B, out, out, 2]. Same values as ``affine_grid`` (up to rounding), which on
    CPU spends ~2x a whole ``grid_sample`` in its batched 3x2 matmul.
    """
    t = torch.arange(out, device=theta.device, dtype=theta.dtype).mul_(2.0 / out).add_(1.0 / out - 1.0)
    gx = torch.addcmul(theta[:, 0, 2:3], theta[:, 0, 0:1], t)  # [B, out]
    gy = torch.addcmul(theta[:, 1, 2:3], theta[:, 1, 1:2], t)
    bsz = theta.shape[0]
    return torch.stack([gx.unsqueeze(1).expand(bsz, out, out), gy.unsqueeze(2).expand(bsz, out, out)], dim=-1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, [B]) in HSV space; S and V are unchanged.

    RGB -> HSV as torchvision's ``_rgb2hsv``: with M = max, m = min, c = M - m, the hue in
    sixths of a turn is H6 = (G - B)/c if M = R, 2 + (B - R)/c if M = G, else 4 + (R - G)/c.
    HSV -> RGB by the closed form f(n) = V - V S clamp(min(k, 4 - k), 0, 1), k = (n + H6) mod 6,
    (R, G, B) = (f(5), f(3), f(1)) (https://en.wikipedia.org/wiki/HSL_and_HSV#HSV_to_RGB_alternative).
    Since V S = M - m = c and min(k, 4 - k) = 2 - |k - 2|, each channel is
    M - c clamp(2 - |((H6 + n + 1) mod 6) - 3|, 0, 1), evaluated for all three channels in
    one [B, 3, H, W] buffer; S is never formed. The case split uses 0/1 masks and the mod uses
    floor, because ``torch.where`` and ``torch.remainder`` are several times slower on CPU.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    h6 = (g - b).mul_(is_r)
    h6 += (b - r).add_(chroma, alpha=2.0).mul_(is_g)
    h6 += (r - g).add_(chroma, alpha=4.0).mul_(is_b)
    # c = 0 only for grey pixels, where the numerator is 0 too: any positive divisor gives H6 = 0.
    h6 = h6.div_(chroma.clamp_min(1e-12)).add_(6.0 * shift.view(-1, 1, 1))
    offsets = torch.tensor([6.0, 4.0, 2.0], device=x.device).view(1, 3, 1, 1)  # n + 1, n = 5, 3, 1
    k = h6.unsqueeze(1) + offsets
    k -= torch.floor(k * (1.0 / 6.0)).mul_(6.0)  # mod 6
    ramp = k.sub_(3.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1.0)


def _blur_kernel_size(size: int) -> int:
    """Odd kernel side 2 floor(0.05 s) + 1, about 10% of s (SimCLR Appendix A), at least 3: 32 -> 3, 224 -> 23."""
    return max(3, 2 * int(0.05 * size) + 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding (as torchvision).

    Taps g_t = exp(-t^2 / (2 sigma^2)) / sum, t in [-k//2, k//2]; samples not selected get a
    delta kernel, an exact identity. Each 1-D pass is a sum of k shifted views weighted by the
    per-sample taps (``addcmul_``), which on CPU is ~6x faster at 32 px than a grouped
    ``conv2d`` with B*C groups and equally fast at 224 px.
    """
    height, width = x.shape[-2:]
    ksize = _blur_kernel_size(min(height, width))
    taps = torch.arange(ksize, device=x.device, dtype=x.dtype) - ksize // 2
    kernel = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = torch.where(apply.view(-1, 1), kernel, (taps == 0).to(x.dtype))
    weights = kernel.view(-1, 1, 1, 1, ksize).unbind(-1)  # k tensors of shape [B, 1, 1, 1]
    pad = ksize // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = xp[..., 0:width] * weights[0]
    for t in range(1, ksize):
        rows.addcmul_(xp[..., t : t + width], weights[t])
    out = rows[..., 0:height, :] * weights[0]
    for t in range(1, ksize):
        out.addcmul_(rows[..., t : t + height, :], weights[t])
    return out


def solarize(x: torch.Tensor, threshold: float, apply: torch.Tensor) -> torch.Tensor:
    """Values at or above ``threshold`` inverted (x -> 1 - x) in the samples where ``apply`` ([B] bool) is set.

    BYOL's second view is solarized with probability 0.2 (Grill et al. 2020, Appendix B, Table 6), as are DINO's
    and ExCB's (torchvision ``RandomSolarize(threshold=128)`` on PIL images: threshold 128/255 here). On float
    [0, 1] views this is torchvision's tensor ``solarize``: ``where(x >= threshold, 1 - x, x)``.
    """
    return torch.where((x >= threshold) & apply.view(-1, 1, 1, 1), 1.0 - x, x)


class ViewAugment:
    """One random view per image of a uint8 [B, C, H, W] batch (C = 1 or 3), fully batched.

    Pipeline (SimSiam/SimCLR order): random resized crop + horizontal flip as a single
    affine ``grid_sample`` -> colour jitter (brightness, contrast, saturation, hue;
    per-sample prob ``cfg.jitter_prob``) -> grayscale (``cfg.gray_prob``) -> Gaussian blur
    (``cfg.blur_prob``) -> normalise (if ``cfg.normalize``). Values are clamped to [0, 1] after
    each colour op, as torchvision does. For C = 1 only brightness and contrast apply.
    Call twice with the same generator for the two views of a pair.

    ``images`` may be ``rows`` of a larger batch (``BatchRows``): each image then gets the random parameters it gets
    in the views of the whole batch, and one process's part of a global batch costs that part's work only.
    ``boost`` (float [0, 1] views, generator, rows) -> views runs last before normalisation: a method's per-image
    augmentation on top of these (BCL's RandAugment, augment/randaugment.py).
    """

    def __init__(self, cfg: AugmentConfig, mean: torch.Tensor, std: torch.Tensor, out_size: int | None = None):
        lo, hi = cfg.crop_scale
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 <= lo <= hi <= 1, got {cfg.crop_scale}")
        if min(cfg.jitter) < 0 or cfg.jitter[3] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {cfg.jitter}")
        self.cfg = cfg
        self.out_size = out_size
        self.mean = _as_channel_param(mean, "mean")
        self.std = _as_channel_param(std, "std")

    def __call__(self, images: torch.Tensor, generator: torch.Generator, rows: BatchRows | None = None,
                 boost: Boost | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 [B, 1|3, H, W] images, got {images.dtype} {tuple(images.shape)}")
        rows = whole_batch(images, rows)
        k = CROP_ATTEMPTS
        # One draw for every random parameter; fixed column layout so a seed means the same
        # crops whatever the colour settings: [area xK | ratio xK | top, left, flip,
        # jitter?, brightness, contrast, saturation, hue, gray?, blur?, sigma].
        u = torch.rand(rows.size, 2 * k + 11, generator=generator, device=images.device)[rows.slice]
        x = self._crop_flip(images, u[:, : 2 * k], u[:, 2 * k : 2 * k + 3])
        x = self._color(x, u[:, 2 * k + 3 : 2 * k + 9])
        if self.cfg.blur_prob > 0:
            sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 2 * k + 10]
            x = _gaussian_blur(x, sigma, u[:, 2 * k + 9] < self.cfg.blur_prob)
        if boost is not None:
            x = boost(x, generator, rows)
        if self.cfg.normalize:
            if self.mean.device != x.device:
                self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
            x = x.sub_(self.mean).div_(self.std)
        return x

    def _crop_flip(self, images: torch.Tensor, u_box: torch.Tensor, u_pos: torch.Tensor) -> torch.Tensor:
        """Random resized crop + flip in one bilinear resampling; uint8 -> float [0, 1] once."""
        height, width = images.shape[-2:]
        out = self.out_size or height
        k = CROP_ATTEMPTS
        top, left, h, w = _crop_boxes(
            u_box[:, :k], u_box[:, k:], u_pos[:, 0], u_pos[:, 1], height, width, self.cfg.crop_scale
        )
        flip_sign = torch.where(u_pos[:, 2] < self.cfg.flip_prob, -1.0, 1.0)
        theta = _crop_theta(top, left, h, w, flip_sign, height, width)
        grid = _axis_aligned_grid(theta, out)
        x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return x.mul_(1.0 / 255.0)

    def _color(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Colour jitter then random grayscale; ``u`` = [jitter?, b, c, s, h, gray?] uniforms.

        Jitter factors are torchvision's: brightness/contrast/saturation f ~ U[max(0, 1-s), 1+s]
        blending x with black / the mean luma / the pixel's luma (f x + (1 - f) ref), hue shift
        ~ U[-h, h]. Unselected samples get factor 1 and shift 0.
        """
        cfg = self.cfg
        rgb = x.shape[1] == 3
        bright, contrast, sat, hue = cfg.jitter
        jit = u[:, 0] < cfg.jitter_prob
        if cfg.jitter_prob > 0:
            if bright > 0:
                f = self._factor(u[:, 1], bright, jit)
                x = x.mul_(f).clamp_(0.0, 1.0)
            if contrast > 0:
                f = self._factor(u[:, 2], contrast, jit)
                gray = luma(x) if rgb else x
                ref = gray.mean(dim=(1, 2, 3), keepdim=True)
                x = x.mul_(f).add_(ref * (1.0 - f)).clamp_(0.0, 1.0)
            if sat > 0 and rgb:
                f = self._factor(u[:, 3], sat, jit)
                gray = luma(x)  # read before x is scaled in place: f x + (1 - f) luma(x), not luma(f x)
                x = x.mul_(f).add_(gray.mul_(1.0 - f)).clamp_(0.0, 1.0)
            if hue > 0 and rgb:
                shift = torch.where(jit, hue * (2.0 * u[:, 4] - 1.0), 0.0)
                x = _adjust_hue(x, shift)
        if cfg.gray_prob > 0 and rgb:
            # lerp with a 0/1 weight: exact selection, ~4x faster than torch.where on CPU.
            to_gray = (u[:, 5] < cfg.gray_prob).to(x.dtype).view(-1, 1, 1, 1)
            x = torch.lerp(x, luma(x), to_gray)
        return x

    @staticmethod
    def _factor(u: torch.Tensor, strength: float, apply: torch.Tensor) -> torch.Tensor:
        """Per-sample factor ~ U[max(0, 1 - s), 1 + s] where ``apply``, else 1; shape [B, 1, 1, 1]."""
        lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
        return torch.where(apply, lo + (hi - lo) * u, 1.0).view(-1, 1, 1, 1)


class MultiCrop:
    """The views a method trains on: ``num_global`` full-size views plus ``cfg.local_crops`` small ones.

    With ``local_crops=0`` this is the plain two-view SimSiam/SimCLR input; with local crops it is
    SwAV's multi-crop (Caron et al., 2020), local views drawn at ``cfg.local_scale`` and ``cfg.local_size``.
    """

    def __init__(self, cfg: AugmentConfig, mean: torch.Tensor, std: torch.Tensor, image_size: int, num_global: int):
        self.num_global = num_global
        self.global_view = ViewAugment(cfg, mean, std)
        self.local_view = None
        if cfg.local_crops:
            local_cfg = cfg.model_copy(update={"crop_scale": cfg.local_scale})
            self.local_view = ViewAugment(local_cfg, mean, std, out_size=cfg.local_size or max(2, image_size // 2))
        self.num_local = cfg.local_crops

    def __call__(self, images: torch.Tensor, generator: torch.Generator, rows: BatchRows | None = None,
                 boost: Boost | None = None) -> list[torch.Tensor]:
        """The views of ``images``, ``rows`` of a batch, drawn as in the views of the whole batch (``ViewAugment``);
        ``boost`` applies to the global views."""
        views = [self.global_view(images, generator, rows, boost) for _ in range(self.num_global)]
        if self.local_view is not None:
            views += [self.local_view(images, generator, rows) for _ in range(self.num_local)]
        return views
