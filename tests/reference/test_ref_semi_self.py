"""imbssl against YyzHarry/imbalanced-semi-self (Yang & Xu, NeurIPS 2020), from the fixtures of make_semi_self.py:

- Rotation SSP: one step of pretrain_rot.py (their ResNet-32 and rotation head, one rotation per image, their SGD)
  against ``rotation`` with ``rotations: one``, on the same weights, views and rotations: the loss, every gradient,
  the weights and BatchNorm statistics after the step, the momentum buffers; their crop (RandomCrop(32, padding=4)
  + flip) against ``augment.crop: pad``; their learning rate of every epoch against the ssp paper preset's.
- The counts of D_L and D_U per class at Table 1's settings (dataset/imbalance_cifar.py) against the builder of
  data/longtail.py, and the class counts their final model's loss sees.
- Pseudo-labels (gen_pseudolabels.py: the argmax of an eval-mode ResNet-32's logits, no threshold) against the
  self-training pipeline's, for a CE and an LDAM base, and on logits with ties and near-ties.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

from imbssl.augment import Normalize, PadCropFlip  # noqa: E402
from imbssl.config import (LossConfig, OptimConfig, PseudoLabelConfig, SelfTrainingConfig,  # noqa: E402
                           SubsetConfig, UnlabeledConfig, deep_merge, validate_tree)
from imbssl.data import ImageSet, labeled_unlabeled_split, longtail, subset_counts, unlabeled_counts  # noqa: E402
from imbssl.engine.optim import build_optimizer, resolve_optim  # noqa: E402
from imbssl.engine.supervised import LongTailClassifier  # noqa: E402
from imbssl.engine.trainer import optimizer_step, steps_per_epoch  # noqa: E402
from imbssl.methods.rotation import Rotation, RotationConfig, rotate_each  # noqa: E402
from imbssl.models.resnet import CifarResNet32  # noqa: E402
from imbssl.pipelines.pretrain import lr_schedule  # noqa: E402
from imbssl.pipelines.self_training import final_data, hard_labels, select_pseudo_labels  # noqa: E402
from imbssl.pipelines.train import predict  # noqa: E402
from imbssl.recipes import load_preset  # noqa: E402
from imbssl.recipes.ssp import SSPExperimentConfig  # noqa: E402

RTOL = 1e-5
#: for tensors that are equal: a fingerprint is a float64 sum, which two torch versions may round differently (by
#: about 1e-16 of its l1 norm), so "equal" is compared to 1e-12 of it
EXACT = 1e-12


def imbssl_name(name: str, head: str) -> str:
    """Their ResNet-32 (models/resnet_cifar.py) key -> imbssl's: conv1/bn1 are the stem, layerK.i the (5 (K-1) + i)th
    block, fc the ``head`` (Rotation's classifier, a classifier's head)."""
    if name.startswith("conv1."):
        return "backbone.stem.0." + name[len("conv1."):]
    if name.startswith("bn1."):
        return "backbone.stem.1." + name[len("bn1."):]
    if match := re.fullmatch(r"layer(\d)\.(\d)\.(.+)", name):
        stage, block, rest = match.groups()
        return f"backbone.layers.{5 * (int(stage) - 1) + int(block)}.{rest}"
    if name.startswith("fc."):
        return f"{head}.{name[len('fc.'):]}"
    raise KeyError(name)


def seeded_reference_weights(fx: fixture_io.Fixture, shapes: dict, seed: int, prefix: str = "init."
                             ) -> dict[str, torch.Tensor]:
    """The initial weights, drawn again, after checking the draw against the reference's fingerprints."""
    weights = fixture_io.seeded_weights(shapes, seed)
    fixture_io.assert_close(weights, fx, prefix, rtol=EXACT, atol=0)
    return weights


def load_reference_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], head: str,
                           transpose_head: bool = False) -> None:
    mapped = {imbssl_name(k, head): (v.T if transpose_head and k == "fc.weight" else v) for k, v in weights.items()}
    model.load_state_dict(mapped, strict=True)


def batch_of(fx: fixture_io.Fixture, prefix: str) -> torch.Tensor:
    return torch.stack([fx[f"{prefix}.{i}"] for i in range(len(fx.keys(prefix + ".")))])


# -- Rotation ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rotation_fx() -> fixture_io.Fixture:
    return fixture_io.load("semi_self_rotation")


def reference_rotation(fx: fixture_io.Fixture, rotations: str) -> Rotation:
    method = Rotation(CifarResNet32(3), RotationConfig(rotations=rotations))
    load_reference_weights(method, seeded_reference_weights(fx, fx.meta["shapes"], fx.meta["seed"]), "classifier")
    return method


@pytest.mark.slow
def test_one_rotation_step_equals_pretrain_rot_py(rotation_fx):
    fx, meta = rotation_fx, rotation_fx.meta
    method = reference_rotation(fx, "one")
    # the method's optimizer as pretrain builds it: its defaults at pretrain_rot.py's batch of 128 give lr 0.1
    optimizer = build_optimizer(method, OptimConfig(), Rotation.defaults, batch_size=128)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (meta["lr"], meta["momentum"],
                                                                      meta["weight_decay"])
    views, targets = batch_of(fx, "input.view"), fx["rotation.target"]
    method.step_rotations = targets  # their utils.rotation's draw
    out = optimizer_step(method, optimizer, [views], torch.arange(len(views)))
    ref_names = {imbssl_name(name, "classifier"): name for name in meta["shapes"]}
    params = dict(method.named_parameters())
    worst = {
        "loss": fixture_io.assert_close({"": out.loss}, fx, "loss", rtol=RTOL),
        "rotated views": fixture_io.assert_close({"images": rotate_each(views, targets), "target": targets}, fx,
                                                 "rotation.", rtol=EXACT, atol=0),
        "grads": fixture_io.assert_close({ref_names[n]: p.grad for n, p in params.items()}, fx, "grad.", rtol=RTOL),
        "after": fixture_io.assert_close({ref_names[n]: t for n, t in method.state_dict().items()}, fx, "after.",
                                         rtol=RTOL),
        "momentum": fixture_io.assert_close({ref_names[n]: optimizer.state[p]["momentum_buffer"]
                                             for n, p in params.items()}, fx, "optim.momentum_buffer.", rtol=RTOL)}
    print("semi_self rotation:", {k: (f"{d.max_abs:.3g}", f"{d.max_rel:.3g}") for k, d in worst.items()})


@pytest.mark.slow
def test_all_four_rotations_are_the_one_rotation_step_on_each_image_turned_every_way(rotation_fx):
    """The default form differs from the reference's only in which rotations a step shows: ``all`` on B images is
    ``one`` on the 4B images of every rotation, with their labels."""
    views = batch_of(rotation_fx, "input.view")[:3]
    every, one = reference_rotation(rotation_fx, "all"), reference_rotation(rotation_fx, "one")
    four_copies = torch.cat([views] * 4)
    one.step_rotations = torch.arange(4).repeat_interleave(len(views))
    a, b = every.training_step([views], torch.arange(3)), one.training_step([four_copies], torch.arange(12))
    assert torch.equal(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(every.parameters(), one.parameters()))


def test_the_pad_crop_equals_pretrain_rot_pys_random_crop_and_flip(rotation_fx, monkeypatch):
    """Given the offsets and flips torchvision drew, PadCropFlip (``augment.crop: pad``) makes their views."""
    fx = rotation_fx
    images = batch_of(fx, "input.image")
    offsets, flips = fx["input.crop_offsets"], fx["input.flips"]
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: offsets.clone())
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.where(flips, 0.0, 1.0))
    view = PadCropFlip(torch.tensor(fx.meta["mean"]), torch.tensor(fx.meta["std"]), pad=4)(images, None)[0]
    diff = fixture_io.assert_close({str(i): v for i, v in enumerate(view)}, fx, "input.view.", rtol=1e-6)
    print("semi_self crop:", f"{diff.max_abs:.3g}")


def paper_rotation_config():
    tree = deep_merge(load_preset("ssp", "paper"), {"base": {"data": {"path": "cifar10-jpg.tar.gz"}}})
    exp = SSPExperimentConfig.model_validate(tree)
    return exp.pretraining_config("rotation", exp.labeled_config(100, 0), "rotation", 0)


def test_the_ssp_paper_presets_rotation_follows_pretrain_rot_py(rotation_fx):
    """Deviation 6a: the paper preset pre-trains Rotation in the reference's form: one rotation per image, its crop,
    its optimizer, and its learning rate at every epoch (the warm-up ramps per step, reaching theirs at each warm-up
    epoch's last step)."""
    cfg = paper_rotation_config()
    assert (cfg.method.rotations, cfg.model.backbone, cfg.optim.epochs) == ("one", "resnet32", 200)
    assert (cfg.augment.crop, cfg.augment.crop_pad, cfg.augment.flip_prob) == ("pad", 4, 0.5)
    name, base_lr, weight_decay = resolve_optim(cfg.optim, Rotation.defaults)
    lr = base_lr * cfg.optim.batch_size / 256
    assert (name, lr, weight_decay, cfg.optim.momentum) == ("sgd", 0.1, 2e-4, 0.9)
    theirs = rotation_fx["schedule.lr_per_epoch"]
    steps = steps_per_epoch(12406, cfg.optim.batch_size)  # CIFAR-10-LT at rho = 100
    warmup = round(cfg.optim.warmup_epochs)
    schedule = lr_schedule(lr, cfg.optim, steps)  # the pre-training pipeline's, from optim.lr_schedule: step
    for epoch, their_lr in enumerate(theirs.tolist()):
        ours = schedule[epoch * steps:(epoch + 1) * steps].tolist()
        assert ours[-1] == pytest.approx(their_lr, rel=1e-12)
        if epoch >= warmup:
            assert ours == pytest.approx([their_lr] * steps, rel=1e-12)
        else:
            assert min(ours) > (theirs[epoch - 1].item() if epoch else 0.0)


# -- D_L / D_U counts -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def counts_fx() -> fixture_io.Fixture:
    return fixture_io.load("semi_self_counts")


def seed_unlabeled_counts(labeled_counts: np.ndarray, ranks: np.ndarray, cfg: UnlabeledConfig) -> np.ndarray:
    """D_U's counts as the seed's get_img_num_per_cls_unlabeled computes them, restated to switch imbssl's builder to
    them: a profile on total // C truncated, then rescaled to the total and truncated again. imbssl truncates once,
    int(total x share_r), which keeps the profile's ratio at small sizes (docs/semi-supervised.md)."""
    total, num_classes = cfg.size_factor * int(np.sum(labeled_counts)), len(labeled_counts)
    profile = [int((total // num_classes) * (1 / cfg.imbalance) ** (r / (num_classes - 1))) for r in range(num_classes)]
    counts = np.empty(num_classes, dtype=np.int64)
    counts[ranks] = [int(n * total / sum(profile)) for n in profile]
    return counts


@pytest.mark.slow
def test_d_l_counts_equal_imbalance_cifars_and_d_u_counts_differ_only_by_its_two_truncations(counts_fx, monkeypatch):
    """Every column of Table 1 as the seed's SemiSupervisedImbalanceCIFAR10 builds it. D_L: equal, from the counts
    function and from the whole builder. D_U: imbssl's one truncation of the same total and profile is within a few
    images of the seed's two per class (11 at most); with the seed's arithmetic switched in, the builder takes the
    seed's counts exactly."""
    fx = counts_fx
    cifar = fx["cifar10.class_counts"].numpy()  # of the official train labels: 5,000 a class
    pool = np.repeat(np.arange(10), cifar + fx.meta["tiny_per_class"])  # CIFAR-10 and the 80M Tiny Images stand-in
    worst = 0
    for setting in fx.meta["settings"]:
        key, rho, rho_u = setting["key"], setting["rho"], setting["rho_u"]
        labeled_cfg = SubsetConfig(profile="exp", imbalance=rho)
        unlabeled_cfg = UnlabeledConfig(size_factor=5, imbalance=rho_u)
        labeled, theirs = subset_counts(labeled_cfg, cifar), fx[f"unlabeled.{key}"].numpy()
        assert labeled.tolist() == fx[f"labeled.{key}"].tolist(), key
        ours, total = unlabeled_counts(labeled, np.arange(10), unlabeled_cfg), 5 * labeled.sum()
        shares = rho_u ** (-np.arange(10) / 9)
        assert ours.tolist() == (total * shares / shares.sum()).astype(np.int64).tolist()
        assert seed_unlabeled_counts(labeled, np.arange(10), unlabeled_cfg).tolist() == theirs.tolist(), key
        assert total - 10 < ours.sum() <= total and total - 10 < theirs.sum() <= total
        worst = max(worst, int(np.abs(ours - theirs).max()))
        with monkeypatch.context() as patch:
            patch.setattr(longtail, "unlabeled_counts", seed_unlabeled_counts)
            parts = labeled_unlabeled_split(pool, labeled_cfg.model_copy(update={"head_count": 5000}), unlabeled_cfg, 0)
        for part, name in zip(parts[:2], ("labeled", "unlabeled")):
            assert np.bincount(pool[part], minlength=10).tolist() == fx[f"{name}.{key}"].tolist(), (name, key)
        # their loss counts D_L's labels and D_U's pseudo-labels (get_cls_num_list)
        assert fx[f"cls_num_list.{key}"].tolist() == (fx[f"labeled.{key}"] + fx[f"pseudo.{key}"]).tolist()
    assert worst <= 11
    print(f"semi_self D_U counts: imbssl - seed at most {worst} images a class")


def test_d_u_counts_at_imbssls_head_of_600_are_the_seeds_formula_up_to_its_truncations(counts_fx):
    for rho in (100, 50, 10):
        labeled = subset_counts(SubsetConfig(profile="exp", imbalance=rho, head_count=600),
                                counts_fx["cifar10.class_counts"].numpy())
        assert labeled.tolist() == counts_fx[f"head600.labeled.rho{rho}"].tolist()
        for rho_u in (1, rho / 2, rho, 2 * rho):
            cfg = UnlabeledConfig(size_factor=5, imbalance=rho_u)
            theirs = counts_fx[f"head600.unlabeled.rho{rho}.rhoU{rho_u:g}"].numpy()
            assert seed_unlabeled_counts(labeled, np.arange(10), cfg).tolist() == theirs.tolist(), (rho, rho_u)
            assert np.abs(unlabeled_counts(labeled, np.arange(10), cfg) - theirs).max() <= 10, (rho, rho_u)


def test_the_final_model_counts_d_ls_labels_and_d_us_pseudo_labels_as_the_seed(counts_fx, tmp_path):
    """imbssl's final stage sees the class counts the seed's loss sees (its LDAM margins and DRW weights)."""
    key = "rho100.rhoU100"
    labeled, pseudo = counts_fx[f"labeled.{key}"].numpy(), counts_fx[f"pseudo.{key}"].numpy()
    labels = np.concatenate([np.repeat(np.arange(10), labeled), np.repeat(np.arange(10), pseudo)])
    pool = ImageSet(np.zeros((len(labels), 2, 2, 3), dtype=np.uint8), labels, tuple(str(c) for c in range(10)))
    labeled_idx, unlabeled_idx = np.arange(labeled.sum()), np.arange(labeled.sum(), len(labels))
    cfg = validate_tree(SelfTrainingConfig, {"data": {"source": "digits"}, "train": {"device": "cpu"}})
    pseudo_labels = {"labels": torch.as_tensor(labels[unlabeled_idx]),
                     "kept": torch.ones(len(unlabeled_idx), dtype=torch.bool)}
    data = final_data(cfg, pool, pool, (labeled_idx, unlabeled_idx, labeled_idx[:10]), pseudo_labels, tmp_path)
    assert data.class_counts.tolist() == counts_fx[f"cls_num_list.{key}"].tolist()


# -- pseudo-labels ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pseudo_fx() -> fixture_io.Fixture:
    return fixture_io.load("semi_self_pseudo")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "ldam"])
def test_pseudo_labels_equal_gen_pseudolabels_pys(pseudo_fx, loss):
    fx = pseudo_fx
    images = batch_of(fx, "input.image")
    model = LongTailClassifier(CifarResNet32(3), torch.arange(10), 10, LossConfig(name=loss))
    weights = seeded_reference_weights(fx, fx.meta["shapes"][loss], fx.meta["seeds"][loss], f"{loss}.init.")
    load_reference_weights(model, weights, "head", transpose_head=loss == "ldam")  # their NormedLinear is [in, out]
    normalize = Normalize(torch.tensor(fx.meta["mean"]), torch.tensor(fx.meta["std"]))
    fixture_io.assert_close({"": normalize(images)}, fx, "input.batch", rtol=EXACT, atol=0)  # ToTensor + Normalize
    logits = predict(model.eval(), images, normalize, batch_size=5)
    diff = fixture_io.assert_close({"": logits}, fx, f"{loss}.logits", rtol=RTOL)
    confidence, labels = hard_labels(logits, model.logit_scale)
    assert labels.tolist() == fx[f"{loss}.preds"].tolist()
    assert hard_labels(fx[f"{loss}.logits"], model.logit_scale)[1].tolist() == fx[f"{loss}.preds"].tolist()
    assert select_pseudo_labels(confidence.numpy(), labels.numpy(), PseudoLabelConfig(), 10).all()  # none dropped
    print(f"semi_self pseudo {loss}: logits {diff.max_abs:.3g} ({diff.max_rel:.3g})")


@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_pseudo_labels_of_tied_and_neighbouring_logits_are_torch_maxs(pseudo_fx, logit_scale):
    """Ties go to the first class, and of two logits one float apart the larger wins, as torch.max on the logits
    gives; a softmax first would round the two to one probability and pick the first."""
    confidence, labels = hard_labels(pseudo_fx["crafted.logits"], logit_scale)
    assert labels.tolist() == pseudo_fx["crafted.preds"].tolist()
    probabilities = torch.softmax(pseudo_fx["crafted.logits"] * logit_scale, dim=1)
    assert torch.equal(confidence, probabilities[torch.arange(len(labels)), labels])
