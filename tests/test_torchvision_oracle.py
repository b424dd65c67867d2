"""torchvision as an oracle (issue 29): exported ResNets and the view operations against torchvision's own code.

These run in CI's second job (.ci/run), whose environment has torch 2.14.1 and torchvision 0.29.1; the project's
environment has no torchvision (0.28 does not import beside its CPU torch 2.13), so there the module skips.

- Exported backbones: ``imbssl export`` of an ImageNet-stem ResNet-18/34/50 loads into ``torchvision.models`` with
  ``strict=True`` and gives imbssl's features bit for bit.
- Views: each operation of ``ViewAugment`` (augment/views.py), run alone with the others at their identity, equals
  ``torchvision.transforms.v2.functional`` given the parameters ViewAugment drew (read back from its generator's
  draw). Tolerances are in [0, 1] pixel units; where imbssl differs on purpose (docs in views.py) the test shows
  the difference is that one.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from imbssl.augment import views as views_module  # noqa: E402
from imbssl.augment.views import (CROP_ATTEMPTS, Normalize, ViewAugment, _adjust_hue, _crop_boxes,  # noqa: E402
                                  solarize)
from imbssl.config import AugmentConfig, save_config  # noqa: E402
from imbssl.models import build_backbone  # noqa: E402
from imbssl.pipelines.common import save_backbone  # noqa: E402
from imbssl.pipelines.export import SAFETENSORS_FILE, TORCHVISION_FILE, export_run, load_exported  # noqa: E402
from imbssl.pipelines.pretrain import BACKBONE_FILE  # noqa: E402
from imbssl.pipelines.runfolder import RUN_CONFIG  # noqa: E402

pytestmark = pytest.mark.torchvision_oracle

#: float32 round-off of values in [0, 1] after a few operations (a few units in the last place of 1.0)
ROUND_OFF = 1e-6
#: bilinear resampling: imbssl's sampling coordinates come from grid_sample's normalised grid, torchvision's from
#: interpolate's scale; they differ by float32 round-off, ~1e-6 pixel, which moves a value by up to that much
RESAMPLING = 1e-5
#: torchvision's tensor grayscale weighs R by 0.2989, imbssl (as PIL's convert("L")) by 0.299: luma differs by
#: 1.1e-4 R <= 1.1e-4, and the ops built on it (contrast, saturation, grayscale) by at most that much
LUMA_GAP = 1.1e-4 + ROUND_OFF
#: torchvision's tensor luma weights; with them imbssl's luma-based ops equal torchvision's to round-off
TORCHVISION_LUMA = (0.2989, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------- exported ResNets

def _trained_looking(backbone: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics, as training leaves them (fresh ones are 1, 0, 0,
    1): a BatchNorm mapped onto the wrong torchvision name then changes the features."""
    g = torch.Generator().manual_seed(seed)
    for bn in (m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)):
        n = bn.num_features
        with torch.no_grad():
            bn.weight.copy_(0.5 + torch.rand(n, generator=g))
            bn.bias.copy_(0.1 * torch.randn(n, generator=g))
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return backbone.eval()


@pytest.mark.parametrize("depth", ["resnet18", "resnet34", "resnet50"])
def test_exported_resnet_loads_into_torchvision_with_the_same_features(depth, tiny_cfg, tmp_path):
    """A run folder as pre-training leaves it (config.yaml, backbone.pt), exported; no training needed."""
    torch.manual_seed(0)
    cfg = tiny_cfg(model={"backbone": depth, "width": 1.0, "stem": "imagenet"})
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / RUN_CONFIG)
    backbone = _trained_looking(build_backbone(cfg.model, 3), seed=1)
    save_backbone(backbone, Normalize(torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])),
                  run / BACKBONE_FILE)
    export_run(run, tmp_path / "export")

    reference = getattr(torchvision.models, depth)(weights=None)
    reference.load_state_dict(torch.load(tmp_path / "export" / TORCHVISION_FILE, weights_only=True), strict=True)
    reference.fc = nn.Identity()
    exported, normalize = load_exported(tmp_path / "export" / SAFETENSORS_FILE)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.no_grad():
        inputs = normalize(images)
        features = exported(inputs)
        assert torch.equal(features, backbone(inputs))
        assert torch.equal(reference.eval()(inputs), features)  # to the last bit
    assert features.shape == (2, backbone.feature_dim) and features.std() > 0


# ---------------------------------------------------------------------------------------------------------- views

#: every random choice off: a ViewAugment with these settings returns the image itself (as float [0, 1])
IDENTITY = dict(crop_scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0, normalize=False)
BATCH = 8


def _views(images: torch.Tensor, seed: int, out_size: int | None = None, **settings) -> torch.Tensor:
    """ViewAugment's views of ``images`` with ``settings`` on top of IDENTITY."""
    cfg = AugmentConfig(**{**IDENTITY, **settings})
    return ViewAugment(cfg, torch.zeros(3), torch.ones(3), out_size)(images, torch.Generator().manual_seed(seed))


def _draw(seed: int, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """The uniforms ViewAugment draws from a generator seeded ``seed``, by name (its fixed column layout:
    [area xK | ratio xK | top, left, flip, jitter?, brightness, contrast, saturation, hue, gray?, blur?, sigma])."""
    k = CROP_ATTEMPTS
    u = torch.rand(batch, 2 * k + 11, generator=torch.Generator().manual_seed(seed))
    names = ["top", "left", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma"]
    return {"area": u[:, :k], "ratio": u[:, k: 2 * k], **{name: u[:, 2 * k + i] for i, name in enumerate(names)}}


def _images(seed: int = 0, side: int = 32, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, side, side), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _factor(u: torch.Tensor, strength: float) -> torch.Tensor:
    """torchvision ColorJitter's factor ~ U[max(0, 1 - s), 1 + s] from the uniform u."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


def _inside_crop(out: int, length: int) -> torch.Tensor:
    """[out] bool: output pixels whose bilinear taps all lie inside a crop of ``length`` pixels.

    Output pixel i samples the crop at c = (i + 1/2) length / out - 1/2 (align_corners=False); torchvision clamps
    the taps into the crop, imbssl reads the image's true pixels beyond it (views.py), so they agree where
    0 <= c <= length - 1.
    """
    c = (torch.arange(out, dtype=torch.float64) + 0.5) * length / out - 0.5
    return (c >= 0) & (c <= length - 1)


@pytest.mark.parametrize("side,out", [(32, 32), (32, 48), (32, 20), (32, 16), (24, 13)])
@pytest.mark.parametrize("flip", [False, True])
def test_resize_and_flip_of_the_whole_image_equal_torchvision(side, out, flip):
    """A crop of the whole image: bilinear ``resize`` (antialias=False) and ``horizontal_flip``, everywhere."""
    images = _images(side=side)
    views = _views(images, seed=1, out_size=out, flip_prob=float(flip))
    expected = TF.resize(images.float() / 255, [out, out], interpolation=InterpolationMode.BILINEAR, antialias=False)
    if flip:
        expected = TF.horizontal_flip(expected)
    torch.testing.assert_close(views, expected, atol=RESAMPLING, rtol=0)


def test_downscaling_is_not_antialiased():
    """The documented difference: no antialiasing filter when shrinking (torchvision's v2 default antialias=True)."""
    images = _images()
    expected = TF.resize(images.float() / 255, [16, 16], interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert (_views(images, seed=1, out_size=16) - expected).abs().max() > 0.1


@pytest.mark.parametrize("out,scale", [(32, (0.08, 1.0)), (16, (0.5, 1.0)), (24, (0.2, 1.0))])
def test_random_resized_crop_and_flip_equal_torchvision_inside_the_crop(out, scale):
    """``resized_crop`` (bilinear, antialias=False) + ``horizontal_flip`` with ViewAugment's boxes and flips.

    Equal wherever the bilinear taps stay inside the crop; on the rim where they cross it, imbssl reads the image's
    pixels beyond the crop and torchvision repeats the crop's edge (the documented difference).
    """
    images, seed = _images(), 2
    views = _views(images, seed, out_size=out, crop_scale=scale, flip_prob=0.5)
    u = _draw(seed)
    boxes = torch.stack(_crop_boxes(u["area"], u["ratio"], u["top"], u["left"], 32, 32, scale), dim=1).int()
    rim_gap = 0.0
    for view, image, (top, left, h, w), flip in zip(views, images, boxes.tolist(), u["flip"] < 0.5):
        expected = TF.resized_crop(image.float() / 255, top, left, h, w, [out, out],
                                   interpolation=InterpolationMode.BILINEAR, antialias=False)
        inside = _inside_crop(out, h)[:, None] & _inside_crop(out, w)[None, :]
        if flip:
            expected, inside = TF.horizontal_flip(expected), inside.flip(-1)
        assert inside.float().mean() > 0.5  # the comparison covers most of the view
        torch.testing.assert_close(view[:, inside], expected[:, inside], atol=RESAMPLING, rtol=0)
        rim_gap = max(rim_gap, float((view - expected).abs().max()))
    # Only an enlarged crop (a side < out) has a rim; a shrunk one equals torchvision everywhere.
    assert (rim_gap > 0.01) == bool((boxes[:, 2:] < out).any())


@pytest.fixture(params=["imbssl", "torchvision"])
def luma_weights(request, monkeypatch) -> float:
    """The tolerance of the ops built on luma: imbssl's BT.601 weights (0.299 for R), or torchvision's (0.2989),
    patched into views.py to show that the weight is the whole difference."""
    if request.param == "imbssl":
        return LUMA_GAP
    monkeypatch.setattr(views_module, "LUMA_601", TORCHVISION_LUMA)
    return 5 * ROUND_OFF


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_operation_equals_torchvision(op, luma_weights):
    strengths = {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.5}
    jitter = tuple(strengths[name] if name == op else 0.0 for name in strengths)
    images, seed = _images(side=16), 3
    views = _views(images, seed, jitter_prob=1.0, jitter=jitter)
    u = _draw(seed)[op]
    for view, image, draw in zip(views, images.float() / 255, u.tolist()):
        if op == "hue":
            expected = TF.adjust_hue(image, strengths[op] * (2 * draw - 1))
        else:
            expected = getattr(TF, f"adjust_{op}")(image, float(_factor(torch.tensor(draw), strengths[op])))
        atol = luma_weights if op in ("contrast", "saturation") else 5 * ROUND_OFF
        torch.testing.assert_close(view, expected, atol=atol, rtol=0)


def test_the_four_jitter_operations_in_their_order_equal_torchvision(luma_weights):
    """ColorJitter(0.4, 0.4, 0.4, 0.1) in the fixed order brightness -> contrast -> saturation -> hue (views.py)."""
    strengths = (0.4, 0.4, 0.4, 0.1)
    images, seed = _images(side=16), 4
    views = _views(images, seed, jitter_prob=1.0, jitter=strengths)
    u = _draw(seed)
    for i, (view, image) in enumerate(zip(views, images.float() / 255)):
        x = TF.adjust_brightness(image, float(_factor(u["brightness"][i], strengths[0])))
        x = TF.adjust_contrast(x, float(_factor(u["contrast"][i], strengths[1])))
        x = TF.adjust_saturation(x, float(_factor(u["saturation"][i], strengths[2])))
        x = TF.adjust_hue(x, strengths[3] * (2 * float(u["hue"][i]) - 1))
        torch.testing.assert_close(view, x, atol=2 * luma_weights, rtol=0)


def test_hue_at_the_ends_of_its_range_equals_torchvision():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    shifts = torch.tensor([-0.5, 0.5, 0.0, 0.25])
    shifted = _adjust_hue(images.clone(), shifts)
    for view, image, shift in zip(shifted, images, shifts.tolist()):
        torch.testing.assert_close(view, TF.adjust_hue(image, shift), atol=5 * ROUND_OFF, rtol=0)


def test_grayscale_equals_torchvision(luma_weights):
    images = _images()
    expected = TF.rgb_to_grayscale(images.float() / 255, num_output_channels=3)
    torch.testing.assert_close(_views(images, seed=6, gray_prob=1.0), expected, atol=luma_weights, rtol=0)


@pytest.mark.parametrize("side,ksize", [(32, 3), (64, 7)])
def test_gaussian_blur_equals_torchvision(side, ksize):
    """Kernel side 2 floor(0.05 s) + 1 (SimCLR's 10% of the side), sigma ~ U[0.1, 2], reflect padding."""
    images, seed = _images(side=side), 7
    views = _views(images, seed, blur_prob=1.0)
    sigmas = 0.1 + 1.9 * _draw(seed)["sigma"]
    for view, image, sigma in zip(views, images.float() / 255, sigmas.tolist()):
        expected = TF.gaussian_blur(image, [ksize, ksize], [sigma, sigma])
        torch.testing.assert_close(view, expected, atol=ROUND_OFF, rtol=0)


@pytest.mark.parametrize("threshold", [128 / 255, 0.5])
def test_solarize_equals_torchvision(threshold):
    """DINO's/ExCB's PIL threshold 128 (128/255 on [0, 1]) and BYOL's 0.5; unselected samples are untouched."""
    x = _views(_images(), seed=8, crop_scale=(0.5, 1.0))  # resampled: values between the 256 levels
    apply = torch.tensor([True, False] * (BATCH // 2))
    out = solarize(x, threshold, apply)
    assert torch.equal(out[apply], TF.solarize(x[apply], threshold))
    assert torch.equal(out[~apply], x[~apply])
