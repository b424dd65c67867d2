"""Long-tailed supervised learning: the losses against hand computations, the deferred schedules, cRT, the
pad-crop-flip views, ResNet-32, the validation split and ``imbssl train`` end to end."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imbssl.augment import PadCropFlip
from imbssl.config import ConfigError, LossConfig
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.schedules import step_schedule
from imbssl.engine.runlog import read_metrics
from imbssl.engine.supervised import LongTailClassifier, class_balanced_batches
from imbssl.eval import held_out_validation
from imbssl.losses import (class_balanced_weights, cross_entropy, focal_loss, ldam_loss, ldam_margins,
                           logit_adjusted_loss, posthoc_logit_adjustment)
from imbssl.models import CifarResNet32, SmallCNN
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.pipelines.train import BEST_FILE, CRT_DIR, MODEL_FILE, TRAIN_FILE, train

from conftest import Interrupt, crash_after


# -- losses, by hand ----------------------------------------------------------------------------
def test_class_balanced_weights_by_hand():
    # beta = 0.9: (1 - beta) / (1 - beta^n) = 0.1 / (1 - 0.9^n) for n = 100, 10, 1 is 0.1000027, 0.1535340, 1;
    # their sum is 1.2535366, so scaled to sum to 3 they are 0.2393292, 0.3674420, 2.3932288.
    weights = class_balanced_weights(torch.tensor([100, 10, 1]), beta=0.9)
    assert torch.allclose(weights, torch.tensor([0.2393292, 0.3674420, 2.3932288]), atol=1e-6)
    # beta = 0: no re-weighting
    assert torch.allclose(class_balanced_weights(torch.tensor([5, 50, 500]), beta=0.0), torch.ones(3))
    default = class_balanced_weights(torch.tensor([5000, 50]))  # beta = 0.9999, normalised to sum to C = 2
    assert math.isclose(default.sum().item(), 2.0, rel_tol=1e-6) and default[1] > 10 * default[0]


def test_ldam_margins_and_scale_by_hand():
    margins = ldam_margins(torch.tensor([10000, 16, 1]), max_margin=0.5)  # 1 / n^(1/4) = 0.1, 0.5, 1 -> x 0.5
    assert torch.allclose(margins, torch.tensor([0.05, 0.25, 0.5]))
    cosines, target = torch.tensor([[0.5, 0.2, -0.1]]), torch.tensor([0])
    # s (z - Delta_y on the target): 30 * [0.45, 0.2, -0.1] = [13.5, 6, -3]
    expected = -math.log(math.exp(13.5) / (math.exp(13.5) + math.exp(6) + math.exp(-3)))
    assert math.isclose(ldam_loss(cosines, target, margins, scale=30).item(), expected, abs_tol=1e-6)  # float32
    # the margin is only ever taken off the target's logit: a target of class 2 shifts its own cosine by 0.5
    expected = -math.log(math.exp(-18) / (math.exp(15) + math.exp(6) + math.exp(-18)))
    assert math.isclose(ldam_loss(cosines, torch.tensor([2]), margins, scale=30).item(), expected, rel_tol=1e-4)


def test_focal_loss_by_hand_and_at_gamma_0_equals_cross_entropy():
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    target = torch.arange(16) % 5
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))
    p = math.exp(2) / (math.exp(2) + 1)  # logits [2, 0], target 0
    assert math.isclose(focal_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), gamma=2.0).item(),
                        -(1 - p) ** 2 * math.log(p), rel_tol=1e-5)
    weight = torch.tensor([3.0, 0.5])  # CB-Focal: each image's term times its class weight, then the batch mean
    two = focal_loss(torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]), gamma=1.0, weight=weight)
    assert math.isclose(two.item(), (3.0 * -(1 - p) * math.log(p) + 0.5 * -p * math.log(1 - p)) / 2, rel_tol=1e-5)


def test_weighted_cross_entropy_and_logit_adjustment_by_hand():
    logits, target = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    weight = torch.tensor([1.0, 3.0])  # both terms are log 2; the weighted mean of two equal terms is that term
    assert math.isclose(cross_entropy(logits, target, weight).item(), math.log(2), rel_tol=1e-6)
    prior = torch.tensor([0.9, 0.1])
    # z + log pi = [log .9, log .1]: CE of class 1 is -log(0.1 / (0.9 + 0.1)) = log 10
    assert math.isclose(logit_adjusted_loss(logits[:1], torch.tensor([1]), prior).item(), math.log(10), rel_tol=1e-6)
    # post hoc: a slight preference for the head class flips to the tail once its prior is taken out
    assert posthoc_logit_adjustment(torch.tensor([[1.0, 0.0]]), prior).argmax().item() == 1


# -- schedules and sampling ---------------------------------------------------------------------
def test_step_schedule_warms_up_then_drops_at_the_milestones():
    factors = step_schedule(1.0, 100, 10, 2, [5, 8], [0.01, 0.0001]).tolist()
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == 1.0  # linear over the 2 warm-up epochs
    assert set(factors[20:50]) == {1.0} and set(factors[50:80]) == {0.01} and set(factors[80:]) == {0.0001}


def toy_classifier(loss: dict, counts=(90, 10)) -> LongTailClassifier:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return LongTailClassifier(SmallCNN(1, 0.25), labels, len(counts), LossConfig(**loss))


def test_drw_switches_on_at_the_deferral_epoch_and_not_before():
    model = toy_classifier({"name": "ce", "deferral": "drw", "defer_epoch": 3})
    weights = []
    for epoch in range(5):
        model.on_epoch_start(epoch)
        weights.append(model.class_weight)
    assert weights[:3] == [None] * 3
    assert all(torch.equal(w, class_balanced_weights(torch.tensor([90, 10]))) for w in weights[3:])
    logits, target = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    model.on_epoch_start(2)
    before = model.loss(logits, target)
    model.on_epoch_start(3)
    assert model.loss(logits, target) > before  # the tail image's larger loss now weighs more


def test_drs_switches_to_class_balanced_batches_at_the_deferral_epoch():
    model = toy_classifier({"name": "ce", "deferral": "drs", "defer_epoch": 2}, counts=(900, 100))
    drawn_counts = []
    for epoch in range(4):
        model.on_epoch_start(epoch)
        batches = model.epoch_batches(1000, 8, epoch, torch.Generator().manual_seed(epoch))
        drawn = torch.cat(batches)
        drawn_counts.append(torch.bincount(model.labels[drawn], minlength=2).tolist())
        if epoch < 2:  # instance-balanced: a permutation, every image once
            assert torch.equal(drawn.sort().values, torch.arange(1000))
    assert drawn_counts[:2] == [[900, 100]] * 2
    assert all(abs(tail - 500) < 60 for _, tail in drawn_counts[2:])  # each class half the draws (binomial sd 16)


def test_class_balanced_batches_draw_each_class_equally():
    labels = torch.tensor([0] * 990 + [1] * 9 + [2] * 1)
    drawn = torch.cat(class_balanced_batches(labels, 10, torch.Generator().manual_seed(0)))
    assert len(drawn) == 1000 and abs(torch.bincount(labels[drawn], minlength=3) - 333).max() < 60


# -- views, backbone, validation split ------------------------------------------------------------
def test_pad_crop_flip_crops_the_zero_padded_image():
    images = torch.randint(1, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    view = PadCropFlip(torch.zeros(3), torch.ones(3), pad=2)(images, torch.Generator().manual_seed(1))[0]
    padded = F.pad(images.float() / 255, (2, 2, 2, 2))
    found = set()
    for image, out in zip(padded, view):
        crops = {(dy, dx): image[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)}
        matches = [(dy, dx, flip) for (dy, dx), crop in crops.items() for flip in (False, True)
                   if torch.allclose(crop.flip(2) if flip else crop, out)]
        assert len(matches) == 1  # every view is one crop of the padded image, flipped or not
        found.add(matches[0])
    assert len({(dy, dx) for dy, dx, _ in found}) > 10 and {f for *_, f in found} == {False, True}
    again = PadCropFlip(torch.zeros(3), torch.ones(3), pad=2)(images, torch.Generator().manual_seed(1))[0]
    assert torch.equal(view, again)  # a seeded generator reproduces the batch


@pytest.mark.slow
def test_resnet32_is_the_cifar_resnet_of_ldam():
    model = CifarResNet32()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 31 and model.feature_dim == 64  # + the classifier = 32 weighted layers
    assert sum(p.numel() for p in model.parameters()) + 64 * 10 + 10 == 464_154  # 0.46M with a 10-way classifier
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_validation_is_balanced_and_prefers_images_outside_the_subset():
    labels = np.repeat([0, 1, 2], [100, 100, 100])
    subset = np.concatenate([np.arange(0, 100), np.arange(100, 130), np.arange(200, 203)])  # head uses all its images
    train_idx, val_idx = held_out_validation(labels, subset, per_class=10, seed=0)
    assert np.bincount(labels[val_idx]).tolist() == [10, 10, 10] and not set(train_idx) & set(val_idx)
    assert np.bincount(labels[train_idx]).tolist() == [90, 30, 3]  # only the head class gives up images
    assert set(train_idx) <= set(subset)


# -- imbssl train, end to end -----------------------------------------------------------------------
def epoch_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "epoch/loss" in r]


@pytest.mark.slow
def test_train_selects_on_validation_and_reports_the_test_split(sup_cfg, tmp_path):
    run = train(sup_cfg(loss={"deferral": "drw", "defer_epoch": 2}), tmp_path / "run")
    result = json.loads((run / TRAIN_FILE).read_text())
    epochs = epoch_records(run)
    assert [r["epoch/class_weighted"] for r in epochs] == [0, 0, 1, 1, 1, 1]  # DRW from the deferral epoch on
    vals = [r for r in read_metrics(run) if "epoch/val_acc" in r]
    best = max(range(6), key=lambda i: (vals[i]["epoch/val_acc"], -i))  # the earliest best epoch
    assert result["main"]["selected_epoch"] == best + 1
    assert result["main"]["val_acc"] == vals[best]["epoch/val_acc"]
    test = result["test"]
    assert test["error"] == pytest.approx(100 - test["top1"]) and len(test["per_class"]) == 10
    assert set(test["thirds"]) == {"major", "minor", "rare"} and test["top1"] > 20  # chance is 10
    assert load_safe(run / BEST_FILE)["epoch"] == best + 1


def test_the_selected_model_keeps_the_weights_of_its_epoch(monkeypatch, tmp_path):
    import imbssl.pipelines.train as supervised_train

    scores = iter([60.0, 40.0])  # validation: epoch 1 is the best, epoch 2 worse
    monkeypatch.setattr(supervised_train, "balanced_accuracy", lambda logits, labels: next(scores))
    model = toy_classifier({})
    data = supervised_train.LabelledData(
        train_images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8), train_labels=model.labels,
        val_images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8), val_labels=np.array([0, 0, 1, 1]), test=None,
        classes=("a", "b"))
    selector = supervised_train.SelectOnValidation(model, data, supervised_train.Normalize(torch.zeros(1),
                                                                                           torch.ones(1)),
                                                   tmp_path / "best.pt", batch_size=4)
    selector(1, {})
    at_epoch_1 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # what the optimizer steps of epoch 2 do: change the weights in place
        for param in model.parameters():
            param.add_(1.0)
    selector(2, {})
    selected = selector.selected()
    assert selected.selected_epoch == 1 and selected.val_acc == 60.0
    assert all(torch.equal(selected.state_dict()[k], at_epoch_1[k]) for k in at_epoch_1)
    assert all(torch.equal(load_safe(tmp_path / "best.pt")["model"][k], at_epoch_1[k]) for k in at_epoch_1)


@pytest.mark.slow
def test_crt_leaves_the_backbone_bit_identical(sup_cfg, tmp_path):
    run = train(sup_cfg(crt={"enabled": True, "epochs": 2}), tmp_path / "run")
    trained = load_safe(run / BEST_FILE)["model"]
    reported = load_safe(run / MODEL_FILE)["model"]
    backbone_keys = [k for k in trained if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone_keys)  # BatchNorm statistics are compared too
    assert all(torch.equal(trained[k], reported[k]) for k in backbone_keys)
    assert not torch.equal(trained["head.weight"], reported["head.weight"])  # a new classifier was trained
    epochs = epoch_records(run / CRT_DIR)
    assert [r["epoch/class_balanced_sampling"] for r in epochs] == [1, 1]
    assert json.loads((run / TRAIN_FILE).read_text())["reported"] == "crt"


@pytest.mark.slow
def test_train_resumes_exactly(sup_cfg, tmp_path):
    cfg = sup_cfg(loss={"name": "ldam", "deferral": "drw", "defer_epoch": 2}, optim={"epochs": 4, "milestones": [3]})
    straight = train(cfg, tmp_path / "straight")
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "resumed", callbacks=[crash_after(2)])
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    a, b = (load_safe(run / MODEL_FILE)["model"] for run in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((run / TRAIN_FILE).read_text()) for run in (straight, resumed))
    assert ra["test"]["per_class"] == rb["test"]["per_class"] and ra["main"] == rb["main"]


@pytest.mark.slow
def test_train_starts_from_a_pretrained_backbone(sup_cfg, tiny_cfg, tmp_path):
    ssl = pretrain(tiny_cfg(model={"backbone": "resnet32", "width": 0.25}, optim={"epochs": 1}), tmp_path / "ssl")
    resnet32 = {"backbone": "resnet32", "width": 0.25}
    run = train(sup_cfg(init_from=str(ssl / BACKBONE_FILE), model=resnet32,
                        optim={"epochs": 1, "milestones": [], "lr_factors": []}, crt={"enabled": True, "epochs": 1}),
                tmp_path / "run")
    saved, ssp = load_safe(run / MODEL_FILE), load_safe(ssl / BACKBONE_FILE)
    assert torch.equal(saved["mean"], ssp["mean"])  # fed inputs standardised the way the SSP backbone was
    with pytest.raises(ConfigError, match="does not fit model.backbone=resnet32 width 0.5"):
        train(sup_cfg(init_from=str(ssl / BACKBONE_FILE), model={**resnet32, "width": 0.5}), tmp_path / "wrong")


def test_a_deferral_after_the_last_epoch_is_refused(sup_cfg):
    with pytest.raises(ConfigError, match="defer_epoch=9 is not before"):
        sup_cfg(loss={"deferral": "drs", "defer_epoch": 9})
    with pytest.raises(ConfigError, match="milestones"):
        sup_cfg(optim={"milestones": [2, 9], "lr_factors": [0.1, 0.01]})


@pytest.mark.slow
def test_ssp_runs_borrow_another_recipes_backbone_only_when_it_saw_the_same_images(tiny_cfg, tmp_path):
    from imbssl.recipes.ssp import SSPExperimentConfig

    def grid(width: float, subset: dict | None = None) -> SSPExperimentConfig:
        data = {"source": "digits", "cache_dir": str(tmp_path / "cache"), **({"subset": subset} if subset else {})}
        return SSPExperimentConfig(
            seeds=[0, 1], imbalances=[10], rows=["ce"], ssp=["none", "simsiam"],
            base={"data": data, "model": {"backbone": "small_cnn", "width": width},
                  "optim": {"epochs": 2, "milestones": [], "lr_factors": []}, "augment_pad": 0},
            ssp_runs={"simsiam": str(tmp_path / "experiment-1" / "p{rho:g}" / "seed{seed}")})

    exp = grid(0.25)
    other = tmp_path / "experiment-1" / "p10" / "seed0"
    pretrain(tiny_cfg(data={"subset": {"profile": "exp", "imbalance": 10}}, optim={"epochs": 1}), other)
    cells, backbones = exp.initialisations(tmp_path, 10, 0)
    assert cells == [] and backbones == {"none": None, "simsiam": other / BACKBONE_FILE}  # used as it is, not re-trained
    with pytest.raises(ConfigError, match="ssp_runs.simsiam: no backbone.pt in .*seed1"):
        exp.initialisations(tmp_path, 10, 1)
    with pytest.raises(ConfigError, match="differs from the classifier's run in model$"):
        grid(0.5).initialisations(tmp_path, 10, 0)
    with pytest.raises(ConfigError, match="in data.subset"):
        grid(0.25, {"profile": "exp", "imbalance": 10, "seed": 3}).initialisations(tmp_path, 10, 0)
    with pytest.raises(ValueError, match="ssp_runs \\['rotation'\\] name no pre-training method"):
        SSPExperimentConfig(ssp=["none"], ssp_runs={"rotation": "x"}, seeds=[0], imbalances=[10], rows=["ce"],
                            base={"data": {"source": "digits"}})
