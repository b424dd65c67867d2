import math

import pytest
import torch

from imbssl.engine.optim import LARS
from imbssl.engine.schedules import Schedules, cosine_schedule
from imbssl.methods.simclr import nt_xent
from imbssl.methods.simsiam import negative_cosine, simsiam_loss


def test_negative_cosine_by_hand():
    p = torch.tensor([[1.0, 0.0]])
    z = torch.tensor([[1.0, 1.0]])
    assert negative_cosine(p, z).item() == pytest.approx(-1 / math.sqrt(2))


def test_simsiam_loss_symmetric_and_stops_gradient():
    p1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p2 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    z1 = torch.tensor([[1.0, 1.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = simsiam_loss(p1, p2, z1, z2)
    # D(p1, z2) = -1, D(p2, z1) = -1/sqrt(2)
    assert loss.item() == pytest.approx(-(1 + 1 / math.sqrt(2)) / 2)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient: targets get no gradient
    assert p1.grad is not None and p2.grad is not None


def test_nt_xent_by_hand():
    # Two images whose two views coincide: each row has one positive (cos 1) and two negatives (cos 0).
    z = torch.eye(2)
    expected = math.log(1 + 2 / math.e)  # -log(e / (e + 1 + 1)) at temperature 1
    assert nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # Lower temperature sharpens: -log(e^2 / (e^2 + 2)).
    assert nt_xent(z, z.clone(), temperature=0.5).item() == pytest.approx(math.log(1 + 2 / math.e**2), rel=1e-6)


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=1.0, momentum=0.9, weight_decay=0.0, eta=1e-3)
    w.grad = torch.tensor([[0.6, 0.8]])
    b.grad = torch.tensor([0.5])
    opt.step()
    # trust = eta * ||w|| / ||g|| = 1e-3 * 5 / 1; biases skip the trust ratio.
    assert torch.allclose(w, torch.tensor([[3.0 - 0.003, 4.0 - 0.004]]))
    assert torch.allclose(b, torch.tensor([0.5]))


@pytest.mark.parametrize("fixed", [True, False])
def test_simsiam_predictor_lr_constant_while_the_rest_decays(fixed):
    """fix_predictor_lr (PatrickHua/SimSiam constant_predictor_lr, facebookresearch/simsiam --fix-pred-lr)."""
    from imbssl.config import ModelConfig, OptimConfig
    from imbssl.engine.optim import build_optimizer
    from imbssl.methods import build_method
    from imbssl.methods.simsiam import SimSiamConfig
    from imbssl.models import build_backbone

    method = build_method(SimSiamConfig(proj_dim=16, proj_hidden=16, pred_hidden=8, fix_predictor_lr=fixed),
                          build_backbone(ModelConfig(width=0.25), 3))
    optimizer = build_optimizer(method, OptimConfig(), method.defaults, batch_size=512)
    base_lr = 0.03 * 512 / 256
    lr = cosine_schedule(base_lr, 0.0, 10, warmup_steps=2)
    schedules = Schedules(method, optimizer, {"lr": lr}, 10, 5)
    predictor = {id(p) for p in method.predictor.parameters()}
    for step in range(6):
        schedules.apply(step)
        for group in optimizer.param_groups:
            is_predictor = {id(p) for p in group["params"]} <= predictor
            assert group["lr"] == (base_lr if fixed and is_predictor else lr[step])
        optimizer.step()
    covered = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in method.parameters())  # every parameter, once
    assert any({id(p) for p in g["params"]} == predictor for g in optimizer.param_groups) == fixed


def test_focal_forms_by_hand_differ_only_with_class_weights():
    """CB-Focal, gamma 1, logits [2, 0] for targets 0 and 1, class weights [3, 0.5] (issue 29, deviation 6b):
    "cui" = w_y (1 - p_t) CE (Cui et al.), "ldam_code" = (1 - exp(-w_y CE)) w_y CE (the LDAM-DRW code's losses.py)."""
    from imbssl.losses import focal_loss

    logits, target, weight = torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]), torch.tensor([3.0, 0.5])
    p = math.exp(2) / (math.exp(2) + 1)
    ce = [-math.log(p), -math.log(1 - p)]  # the two images' CE
    weighted = [3.0 * ce[0], 0.5 * ce[1]]
    ldam_code = sum((1 - math.exp(-wce)) * wce for wce in weighted) / 2
    cui = (3.0 * (1 - p) * ce[0] + 0.5 * p * ce[1]) / 2
    assert focal_loss(logits, target, 1.0, weight, form="ldam_code").item() == pytest.approx(ldam_code, rel=1e-5)
    assert focal_loss(logits, target, 1.0, weight, form="cui").item() == pytest.approx(cui, rel=1e-5)
    assert abs(ldam_code - cui) > 0.05  # the forms are apart here, so the two checks above tell them apart
    unweighted = [focal_loss(logits, target, 2.0, form=form) for form in ("cui", "ldam_code")]
    assert torch.allclose(*unweighted, rtol=1e-6, atol=0)
    omega = torch.tensor([1.0, 0.25])  # self-training's per-image weight scales the ldam_code term too
    assert focal_loss(logits, target, 1.0, weight, omega, form="ldam_code").item() == pytest.approx(
        ((1 - math.exp(-weighted[0])) * weighted[0] + 0.25 * (1 - math.exp(-weighted[1])) * weighted[1]) / 2,
        rel=1e-5)


def test_classifier_passes_the_configured_focal_form_to_the_loss():
    from imbssl.config import LossConfig
    from imbssl.engine.supervised import LongTailClassifier
    from imbssl.losses import focal_loss
    from imbssl.models.small import SmallCNN

    labels = torch.tensor([0] * 12 + [1] * 3 + [2])
    logits, target = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2])
    for form in ("cui", "ldam_code"):
        model = LongTailClassifier(SmallCNN(3, 0.25), labels, 3, LossConfig(name="focal", reweight="cb",
                                                                               focal_form=form))
        assert torch.equal(model.loss(logits, target), focal_loss(logits, target, 1.0, model.cb_weights, form=form))


@pytest.mark.slow
def test_paper_ssp_preset_runs_cb_focal_in_the_reference_form_and_the_default_stays_cui():
    from imbssl.config import LossConfig, validate_tree
    from imbssl.pipelines.runfolder import changed_keys
    from imbssl.recipes import load_preset
    from imbssl.recipes.ssp import SSPExperimentConfig

    tree = load_preset("ssp", "paper")
    tree["base"]["data"]["path"] = "cifar10-jpg.tar.gz"  # the preset needs --data; the file is never read here
    exp = validate_tree(SSPExperimentConfig, tree, origin="the ssp preset 'paper'")
    assert exp.classifier_config(100, "cb-focal", "none", 0).loss.focal_form == "ldam_code"
    assert LossConfig(name="focal", reweight="cb").focal_form == "cui"  # today's form, a documented option
    # a run whose loss never meets focal with class weights resumes across a focal_form change
    assert changed_keys(LossConfig(), LossConfig(focal_form="ldam_code")) == {}
    assert changed_keys(LossConfig(name="focal"), LossConfig(name="focal", focal_form="ldam_code")) == {}
    assert list(changed_keys(LossConfig(name="focal", deferral="drw"),
                             LossConfig(name="focal", deferral="drw", focal_form="ldam_code"))) == ["focal_form"]
