"""BCL (issue 14): the batched RandAugment against PIL, the per-image memory and its boost, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from imbssl.augment import BatchRows, MultiCrop
from imbssl.augment import randaugment as ra
from imbssl.config import ModelConfig
from imbssl.methods import BCLD, BCLI, SECTIONS, boost_weights, build_method, momentum_loss_update, nt_xent
from imbssl.methods.simclr import nt_xent_per_image
from imbssl.models import build_backbone
from imbssl.pipelines.pretrain import pretrain


def _images(seed: int = 0, n: int = 4, size: int = 16) -> np.ndarray:
    """Smooth random colour images (uint8 NHWC), so the filters see structure rather than noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, size // 4, size // 4, 3)).astype(np.float64)
    noisy = np.kron(coarse, np.ones((1, 4, 4, 1))) + rng.normal(0, 20, (n, size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _ours(op, images: np.ndarray, value: float) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    out = op(x, torch.full((len(images),), value), torch.zeros(len(images), 3))
    return (out * 255).round().permute(0, 2, 3, 1).numpy()


def _pil(transform, images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(transform(Image.fromarray(img))) for img in images]).astype(np.float64)


@pytest.mark.parametrize("op, value, reference, levels_off", [
    (ra.autocontrast, 0.0, ImageOps.autocontrast, 1),
    (ra.invert, 0.0, ImageOps.invert, 0),
    (ra.equalize, 0.0, ImageOps.equalize, 0),
    (ra.solarize, 90.0, lambda im: ImageOps.solarize(im, 90), 0),
    (ra.posterize, 5.0, lambda im: ImageOps.posterize(im, 5), 0),
    (ra.contrast, 1.6, lambda im: ImageEnhance.Contrast(im).enhance(1.6), 2),
    (ra.color, 0.3, lambda im: ImageEnhance.Color(im).enhance(0.3), 2),
    (ra.brightness, 1.4, lambda im: ImageEnhance.Brightness(im).enhance(1.4), 1),
    (ra.sharpness, 1.8, lambda im: ImageEnhance.Sharpness(im).enhance(1.8), 2),
])
def test_colour_operations_match_pil(op, value, reference, levels_off):
    """The level maps exactly; the blends within PIL's uint8 rounding (and its integer luma, for contrast and
    colour)."""
    images = _images()
    assert np.abs(_ours(op, images, value) - _pil(reference, images)).max() <= levels_off


@pytest.mark.parametrize("op, value, reference", [
    (ra.shear_x, 0.3, lambda im: im.transform(im.size, Image.AFFINE, (1, 0.3, 0, 0, 1, 0))),
    (ra.shear_y, 0.3, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0.3, 1, 0))),
    (ra.translate_x, 0.25, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0.25 * im.size[0], 0, 1, 0))),
    (ra.translate_y, 0.25, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, 0.25 * im.size[1]))),
    (ra.rotate, 30.0, lambda im: im.rotate(30)),
])
def test_geometric_operations_match_pil(op, value, reference):
    """On a non-square image (16 x 24), where a swapped height and width would show; black fill outside."""
    images = _images(n=2)[:, :, :12].repeat(2, axis=2)[:, :, :24]  # 16 rows, 24 columns
    assert np.array_equal(_ours(op, images, value), _pil(reference, images))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(op(x, torch.zeros(2), torch.zeros(2, 3)), x)  # value 0 is the identity


@pytest.mark.parametrize("centre", [0.5, 0.0, 0.97])
def test_cutout_fills_bcls_rectangle(centre):
    """BCL's CutoutAbs drawn with PIL on a black image: side 0.25 * 20 = 5, corners included, at the centre
    (1 + u (w - 1)) that its np.random.uniform(w) draws; near the edges it is shifted in or cut."""
    from PIL import ImageDraw

    out = ra.cutout(torch.zeros(1, 3, 20, 20), torch.tensor([0.25]), torch.tensor([[0.0, centre, centre]]))
    image, c = Image.new("RGB", (20, 20)), 1 + centre * 19
    x0 = int(max(0, c - 2.5))
    ImageDraw.Draw(image).rectangle((x0, x0, min(20, x0 + 5), min(20, x0 + 5)), (125, 123, 114))
    assert np.array_equal((out[0] * 255).round().permute(1, 2, 0).numpy(), np.asarray(image))


def test_randaugment_applies_with_each_images_probability_and_splits_by_rows():
    x = torch.rand(64, 3, 8, 8)
    never = ra.RandAugment(2, torch.full((64,), 30.0), prob=torch.zeros(64))
    assert torch.equal(never(x.clone(), torch.Generator().manual_seed(0)), x)
    prob = torch.cat([torch.zeros(32), torch.ones(32)])
    boost = ra.RandAugment(2, torch.full((64,), 20.0), prob=prob)
    out = boost(x.clone(), torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(dim=1)
    assert not changed[:32].any() and changed[32:].float().mean() > 0.8
    part = boost(x[40:].clone(), torch.Generator().manual_seed(0), rows=BatchRows(64, 40, 64))
    assert torch.equal(part, out[40:])  # a process's rows get the whole batch's draws


def test_boost_runs_inside_the_views_before_normalisation(tiny_cfg):
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    views = MultiCrop(tiny_cfg().augment, torch.full((3,), 0.5), torch.full((3,), 0.25), image_size=16, num_global=2)
    seen = []
    plain = views(images, torch.Generator().manual_seed(1))

    def blacken(x, generator, rows):
        seen.append(x.clone())
        return torch.zeros_like(x)

    boosted = views(images, torch.Generator().manual_seed(1), boost=blacken)
    assert len(seen) == 2 and 0 <= min(s.min() for s in seen) and max(s.max() for s in seen) <= 1  # [0, 1] views
    assert torch.allclose(seen[0], plain[0] * 0.25 + 0.5, atol=1e-6)  # what it boosts: the view, not normalised
    assert torch.equal(boosted[0], torch.full_like(boosted[0], -2.0))  # then normalised: (0 - 0.5) / 0.25


def test_momentum_loss_and_boost_weights_by_hand():
    memory, losses = torch.tensor([2.0, 4.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(momentum_loss_update(memory, losses, 0.97, first_epoch=True), losses)
    assert torch.allclose(momentum_loss_update(memory, losses, 0.97, first_epoch=False),
                          torch.tensor([0.03 * 3 + 0.97 * 2, 0.03 * 1 + 0.97 * 4]))
    # m - mean = (-2, -1, 0, 3); over the largest |z| (the std cancels): (-2/3, -1/3, 0, 1); w = that / 2 + 1/2
    m = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.allclose(boost_weights(m), torch.tensor([1 / 6, 1 / 3, 1 / 2, 1.0]))  # the highest loss: w = 1
    assert not boost_weights(torch.ones(5)).any() and not boost_weights(torch.ones(1)).any()  # no spread: no boost


def test_nt_xent_per_image_averages_each_images_two_views():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    per_image = nt_xent_per_image(z1, z2, 0.2)
    assert per_image.shape == (6,) and torch.allclose(per_image.mean(), nt_xent(z1, z2, 0.2))
    assert torch.allclose(nt_xent_per_image(z1, z2, 0.2, anchors=slice(2, 4)), per_image[2:4])


def _bcl(name: str):
    return build_method(SECTIONS[name](proj_hidden=32, proj_dim=16, temperature=0.2),
                        build_backbone(ModelConfig(width=0.25), 3))


@pytest.mark.parametrize("name", ["bcl-i", "bcl-d"])
def test_bcl_has_bcls_two_layer_head_with_batchnorm_on_both_layers(name):
    """MediaBrain-SJTU/BCL's proj_head (models/simclr.py; models/sdclr.py with twoLayerProj=True): f -> f -> d, a
    bias on the first Linear only, each Linear followed by an affine BatchNorm; BCL-D's pruned branch has its own
    copy of both (SDCLR's dual BN)."""
    method = _bcl(name)
    feature = method.backbone.feature_dim
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    norms = [m for m in method.projector if isinstance(m, torch.nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linears] == [
        (feature, feature, True), (feature, 16, False)]
    assert [(m.num_features, m.affine) for m in norms] == [(feature, True), (16, True)]
    assert isinstance(method.projector[-1], torch.nn.BatchNorm1d)
    if name == "bcl-d":
        assert {k for k in method.pruned_bn if k.startswith("projector/")} == {"projector/1", "projector/4"}


@pytest.mark.slow
@pytest.mark.parametrize("name, base", [("bcl-i", BCLI), ("bcl-d", BCLD)])
def test_bcl_remembers_each_images_loss_and_boosts_from_the_next_epoch(name, base):
    method = _bcl(name)
    assert isinstance(method, base)
    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    method.on_train_start(images, None, torch.Generator())
    method.on_epoch_start(0)
    assert not method.boost_weight.any()  # no memory yet: no RandAugment in the first epoch
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    indices = torch.arange(4, 12)
    with torch.no_grad():  # in train mode BatchNorm normalises by the batch: a second call gives the same outputs
        losses = nt_xent_per_image(*method.projections(*views), 0.2)
    out = method.training_step(views, indices)
    assert torch.allclose(method.momentum_loss[indices], losses, atol=1e-5)  # the first epoch: M = l
    assert torch.allclose(out.loss, losses.mean(), atol=1e-5)
    assert not method.momentum_loss[:4].any() and not method.momentum_loss[12:].any()  # only the batch's images
    method.momentum_loss.copy_(torch.linspace(1, 5, 20))
    method.on_epoch_start(1)
    assert torch.allclose(method.boost_weight, boost_weights(method.momentum_loss))
    before = method.momentum_loss[indices].clone()
    method.training_step(views, indices)
    assert torch.allclose(method.momentum_loss[indices], 0.03 * losses + 0.97 * before, atol=1e-5)


@pytest.mark.parametrize("name, num_ops, strength", [("bcl-i", 1, lambda w, u: 10 + 20 * w),
                                                       ("bcl-d", 2, lambda w, u: 5 + 25 * w * u)])
def test_bcl_boosts_each_view_at_its_images_weight(name, num_ops, strength):
    """The boost a step's views get: probability w of each image, strength 10 + 20 w (BCL-I) or 5 + 25 w u with
    one u per image (BCL-D), the same for both views."""
    method, images = _bcl(name), torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    method.on_train_start(images, None, torch.Generator())
    method.momentum_loss.copy_(torch.arange(10.0))
    method.on_epoch_start(1)
    boosts = []
    indices = torch.tensor([9, 2, 5])
    method.views(lambda imgs, gen, rows, boost: boosts.extend([boost, boost]), images[indices],
                 torch.Generator().manual_seed(0), BatchRows(3), indices)
    weight = boost_weights(torch.arange(10.0))[indices]
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))  # BCL-D's draw comes first from the generator
    boost = boosts[0]
    assert boost.num_ops == num_ops and torch.equal(boost.prob, weight)
    assert torch.allclose(boost.strength, strength(weight, u))


@pytest.mark.slow
def test_bcl_memory_survives_resume(tiny_cfg, interrupted_then_resumed):
    """The momentum losses are in the checkpoint: a run crashed after epoch 2 and resumed boosts the same images
    as one trained straight through, and ends with the same weights and memory."""
    straight, resumed = interrupted_then_resumed(tiny_cfg(method={"name": "bcl-d"}, optim={"epochs": 4}))
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["method"]
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert a["momentum_loss"].shape == (1297,) and a["momentum_loss"].std() > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_bcl_reports_the_boost_by_thirds(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method={"name": "bcl-i"}, optim={"epochs": 2}, data={"subset": {"profile": "exp", "imbalance": 10}})
    summary = json.loads((pretrain(cfg, tmp_path / "r") / "pretrain.json").read_text())
    weights = [summary[f"boost_weight_{t}"] for t in ("major", "minor", "rare")]
    assert all(0 <= w <= 1 for w in weights) and len(set(weights)) == 3
