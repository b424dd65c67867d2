import math

import pytest
import torch

from imbssl.engine.optim import LARS, cosine_factor
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


def test_cosine_schedule():
    assert cosine_factor(0, 100) == pytest.approx(1.0)
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(100, 100) == pytest.approx(0.0)
    assert cosine_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)


@pytest.mark.parametrize("fixed", [True, False])
def test_simsiam_predictor_lr_constant_while_the_rest_decays(fixed):
    """fix_predictor_lr (PatrickHua/SimSiam constant_predictor_lr, facebookresearch/simsiam --fix-pred-lr)."""
    from imbssl.config import MethodConfig, ModelConfig, OptimConfig
    from imbssl.engine.optim import build_optimizer, cosine_schedule
    from imbssl.methods import build_method
    from imbssl.models import build_backbone

    method = build_method(MethodConfig(name="simsiam", proj_dim=16, proj_hidden=16, pred_hidden=8,
                                       fix_predictor_lr=fixed), build_backbone(ModelConfig(width=0.25), 3))
    optimizer = build_optimizer(method, OptimConfig(), method.defaults, batch_size=512)
    scheduler = cosine_schedule(optimizer, total_steps=10, warmup_steps=2)
    base_lr = 0.03 * 512 / 256
    predictor = {id(p) for p in method.predictor.parameters()}
    for step in range(6):
        for group in optimizer.param_groups:
            is_predictor = {id(p) for p in group["params"]} <= predictor
            expected = base_lr if fixed and is_predictor else base_lr * cosine_factor(step, 10, 2)
            assert group["lr"] == pytest.approx(expected)
        optimizer.step()
        scheduler.step()
    covered = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in method.parameters())  # every parameter, once
    assert any({id(p) for p in g["params"]} == predictor for g in optimizer.param_groups) == fixed
