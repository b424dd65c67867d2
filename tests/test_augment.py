"""Tests for the batched view augmentation (imbssl.augment) and the PIL baseline loader."""
from __future__ import annotations

import colorsys
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imbssl.augment import Normalize, ViewAugment, channel_stats
from imbssl.augment.views import _adjust_hue, _axis_aligned_grid, _crop_boxes
from imbssl.config import AugmentConfig

# Everything random off: the view must be the input itself.
IDENTITY = dict(crop_scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)


def _images(b: int = 4, c: int = 3, h: int = 8, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w or h), generator=g, dtype=torch.uint8)


def _aug(c: int = 3, out_size: int | None = None, **cfg) -> ViewAugment:
    return ViewAugment(AugmentConfig(**cfg), torch.full((c,), 0.5), torch.full((c,), 0.25), out_size=out_size)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("c,h,w,out", [(1, 8, 8, None), (3, 8, 8, None), (3, 32, 32, 16), (1, 8, 12, 10)])
def test_shape_dtype_device(c, h, w, out):
    x = _images(c=c, h=h, w=w)
    y = _aug(c, out_size=out, blur_prob=0.5)(x, _gen())
    side = out or h
    assert y.shape == (4, c, side, side) and y.dtype == torch.float32 and y.device == x.device


@pytest.mark.parametrize("c", [1, 3])
def test_values_in_unit_range_without_normalisation(c):
    y = _aug(c, normalize=False, jitter_prob=1.0, jitter=(0.8, 0.8, 0.8, 0.5), blur_prob=0.5)(
        _images(b=16, c=c), _gen()
    )
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_seed_determines_output():
    aug, x = _aug(blur_prob=0.5), _images()
    assert torch.equal(aug(x, _gen(1)), aug(x, _gen(1)))
    assert not torch.equal(aug(x, _gen(1)), aug(x, _gen(2)))


def test_parameters_drawn_per_sample():
    x = _images(b=1, h=16).expand(2, -1, -1, -1)
    y = _aug()(x, _gen())
    assert not torch.allclose(y[0], y[1])


@pytest.mark.parametrize("c,h,w", [(3, 8, 8), (1, 7, 7), (3, 5, 5)])
def test_identity_when_everything_off(c, h, w):
    x = _images(c=c, h=h, w=w)
    y = _aug(c, normalize=False, **IDENTITY)(x, _gen())
    torch.testing.assert_close(y, x.float() / 255, atol=1e-5, rtol=0)


def test_identity_normalised_matches_normalize():
    x = _images()
    y = _aug(**IDENTITY)(x, _gen())
    torch.testing.assert_close(y, Normalize(torch.full((3,), 0.5), torch.full((3,), 0.25))(x), atol=1e-4, rtol=0)


def test_jitter_prob_zero_keeps_colours():
    x = _images()
    y = _aug(normalize=False, **{**IDENTITY, "jitter": (0.9, 0.9, 0.9, 0.5)})(x, _gen())
    torch.testing.assert_close(y, x.float() / 255, atol=1e-5, rtol=0)


def test_flip_mirrors_exactly():
    x = _images(h=6)
    y = _aug(normalize=False, **{**IDENTITY, "flip_prob": 1.0})(x, _gen())
    torch.testing.assert_close(y, x.flip(-1).float() / 255, atol=1e-5, rtol=0)


def test_grayscale_makes_channels_equal():
    y = _aug(normalize=False, gray_prob=1.0)(_images(b=8), _gen())
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])


def test_grayscale_uses_601_luma():
    x = _images()
    y = _aug(normalize=False, **{**IDENTITY, "gray_prob": 1.0})(x, _gen())
    luma = (x.float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(y[:, 0], luma, atol=1e-5, rtol=0)


def test_brightness_scales_each_sample_by_one_factor():
    x = torch.full((8, 3, 4, 4), 100, dtype=torch.uint8)
    y = _aug(normalize=False, **{**IDENTITY, "jitter_prob": 1.0, "jitter": (0.4, 0.0, 0.0, 0.0)})(x, _gen())
    factor = y * 255 / 100
    assert torch.allclose(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-5)
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5 and factor.std() > 0


def _tv_gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision ``rgb_to_grayscale``: 0.299 R + 0.587 G + 0.114 B, kept as one channel."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _tv_blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision ``_blend``: (f x + (1 - f) other) clamped to [0, 1]."""
    return (f * x + (1 - f) * other).clamp(0, 1)


def _tv_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_hue`` pixel by pixel with colorsys: H <- (H + shift) mod 1 in HSV."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                out[b, :, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + shift[b].item()) % 1.0, s, v))
    return out


# torchvision ColorJitter's per-op formulas, given the op's factor f ~ U[max(0, 1 - s), 1 + s] (hue: shift).
TORCHVISION_JITTER = {
    "brightness": lambda x, f: (f * x).clamp(0, 1),
    "contrast": lambda x, f: _tv_blend(x, _tv_gray(x).mean(dim=(1, 2, 3), keepdim=True), f),
    "saturation": lambda x, f: _tv_blend(x, _tv_gray(x), f),
    "hue": lambda x, shift: _tv_hue(x, shift.flatten()),
}


@pytest.mark.parametrize("op", list(TORCHVISION_JITTER))
def test_each_jitter_op_matches_torchvision_formula(op):
    """One op at a time on random images, its random factor read back from the generator's draw.

    The draw layout is ViewAugment's: per sample [area x10 | ratio x10 | top, left, flip, jitter?, b, c, s, h, ...].
    """
    strengths = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
    jitter = tuple(strengths[name] if name == op else 0.0 for name in TORCHVISION_JITTER)
    x = _images(b=6, h=5, seed=3)
    y = _aug(normalize=False, **{**IDENTITY, "jitter_prob": 1.0, "jitter": jitter})(x, _gen(7))
    column = 20 + 4 + list(TORCHVISION_JITTER).index(op)
    u = torch.rand(6, 31, generator=_gen(7))[:, column].view(-1, 1, 1, 1)
    s = strengths[op]
    factor = (2 * u - 1) * s if op == "hue" else max(0.0, 1 - s) + 2 * s * u
    torch.testing.assert_close(y, TORCHVISION_JITTER[op](x.float() / 255, factor), atol=2e-5, rtol=0)


def test_blur_keeps_constant_images_and_smooths_noise():
    flat = torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)
    aug = _aug(normalize=False, **{**IDENTITY, "blur_prob": 1.0})
    torch.testing.assert_close(aug(flat, _gen()), flat.float() / 255, atol=1e-5, rtol=0)
    noise = _images(b=2, h=16)
    assert aug(noise, _gen()).std() < (noise.float() / 255).std()


def test_hue_matches_colorsys():
    x = torch.rand(2, 3, 4, 4, generator=_gen())
    shift = torch.tensor([0.3, -0.45])
    y = _adjust_hue(x, shift)
    for b in range(2):
        for i, j in [(0, 0), (1, 2), (3, 3)]:
            h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
            expected = colorsys.hsv_to_rgb((h + shift[b].item()) % 1.0, s, v)
            torch.testing.assert_close(y[b, :, i, j], torch.tensor(expected), atol=1e-5, rtol=0)


def test_hue_zero_shift_and_grey_pixels():
    x = torch.rand(2, 3, 5, 5, generator=_gen())
    x[:, :, 0, 0] = 0.4
    torch.testing.assert_close(_adjust_hue(x, torch.zeros(2)), x, atol=1e-6, rtol=0)
    assert torch.allclose(_adjust_hue(x, torch.tensor([0.2, -0.2]))[:, :, 0, 0], torch.tensor(0.4))


def test_axis_aligned_grid_equals_affine_grid():
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0] = torch.tensor([1.0, -0.5, 0.25])
    theta[:, 1, 1] = torch.tensor([1.0, 0.75, 0.3])
    theta[:, :, 2] = torch.tensor([[0.0, 0.0], [0.2, -0.1], [-0.6, 0.4]])
    expected = F.affine_grid(theta, [3, 1, 7, 7], align_corners=False)
    torch.testing.assert_close(_axis_aligned_grid(theta, 7), expected, atol=1e-6, rtol=0)


def test_crop_boxes_inside_image_and_in_range():
    n, k, height, width = 2000, 10, 32, 24
    u = torch.rand(n, 2 * k + 2, generator=_gen())
    top, left, h, w = _crop_boxes(u[:, :k], u[:, k : 2 * k], u[:, -2], u[:, -1], height, width, (0.2, 1.0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert torch.equal(top, top.round()) and torch.equal(w, w.round())
    frac = h * w / (height * width)
    assert frac.min() > 0.15 and frac.max() <= 1.0
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4


def test_full_scale_gives_whole_square_image():
    u = torch.rand(50, 22, generator=_gen())
    top, left, h, w = _crop_boxes(u[:, :10], u[:, 10:20], u[:, 20], u[:, 21], 9, 9, (1.0, 1.0))
    assert (top == 0).all() and (left == 0).all() and (h == 9).all() and (w == 9).all()


def test_normalize_inverts_with_mean_std():
    x = _images(c=3)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    y = Normalize(mean, std)(x)
    restored = y * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    torch.testing.assert_close(restored, x.float() / 255, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(5, 4, 4, 3), (5, 4, 4)])
def test_channel_stats_matches_float64(shape):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    mean, std = channel_stats(arr)
    ref = arr.reshape(-1, shape[3] if len(shape) == 4 else 1).astype(np.float64) / 255
    np.testing.assert_allclose(mean.numpy(), ref.mean(0), atol=1e-6)
    np.testing.assert_allclose(std.numpy(), ref.std(0), atol=1e-6)
    mean_t, _ = channel_stats(torch.from_numpy(arr))
    assert torch.equal(mean, mean_t)


def test_channel_stats_rejects_float():
    with pytest.raises(TypeError):
        channel_stats(np.zeros((2, 4, 4, 3), dtype=np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_device_of_input():
    x = _images().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    y = _aug(blur_prob=0.5)(x, g)
    assert y.device == x.device and y.shape == (4, 3, 8, 8)


def _load_baseline():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pil_baseline.py"
    spec = importlib.util.spec_from_file_location("pil_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("channels", [1, 3])
def test_pil_baseline_two_views_and_seeded(channels):
    baseline = _load_baseline()
    shape = (8, 8, 8) + ((3,) if channels == 3 else ())
    imgs = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    mean, std = [0.5] * channels, [0.25] * channels
    first = [torch.cat(b) for b in baseline.make_pil_loader(imgs, 4, 0, mean, std, seed=3, out_size=6)]
    again = [torch.cat(b) for b in baseline.make_pil_loader(imgs, 4, 0, mean, std, seed=3, out_size=6)]
    assert len(first) == 2 and first[0].shape == (8, channels, 6, 6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_pil_crop_boxes_match_vectorised_distribution():
    """Both samplers follow torchvision: same mean area fraction and aspect (incl. rejection bias)."""
    baseline = _load_baseline()
    rng = random.Random(0)
    boxes = np.array([baseline.random_resized_crop_box(rng, 32, 24, (0.2, 1.0)) for _ in range(2000)], float)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 24).all()
    assert baseline.random_resized_crop_box(rng, 9, 9, (1.0, 1.0)) == (0, 0, 9, 9)
    u = torch.rand(2000, 22, generator=_gen())
    _, _, vh, vw = _crop_boxes(u[:, :10], u[:, 10:20], u[:, 20], u[:, 21], 32, 24, (0.2, 1.0))
    assert (vh * vw).mean().item() / 768 == pytest.approx((h * w).mean() / 768, abs=0.02)
    assert (vw / vh).mean().item() == pytest.approx((w / h).mean(), abs=0.02)


def test_multicrop_global_and_local_views():
    from imbssl.augment import MultiCrop

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    cfg = AugmentConfig(local_crops=3, local_size=12)
    views = MultiCrop(cfg, torch.zeros(3), torch.ones(3), image_size=32, num_global=2)(
        images, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 12, 12)] * 3
