"""ExCB (methods/excb.py): the balancing operator B, the cluster sizes s, where gradients flow, and short
real runs on digits that show what balancing does."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics.cluster import contingency_matrix
from torch import nn

from imbssl.config import deep_merge
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.runlog import read_metrics
from imbssl.engine.schedules import Schedules, constant_schedule
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.methods import build_method
from imbssl.methods.excb import (CENTROID_DECAY, ExCBConfig, balance, balance_by_cases, excb_loss,
                                 excb_loss_as_code, view_agreement)
from imbssl.models import SmallCNN
from imbssl.models.heads import CosineCentroids
from imbssl.pipelines.evaluate import CLUSTER_FIGURE, evaluate_run
from imbssl.pipelines.pretrain import pretrain
from imbssl.recipes import load_preset
from imbssl.recipes.excb import ExcbExperimentConfig
from imbssl.recipes.grid import Results, reproduce
from imbssl.records import EvalRecord

K = 8
UNIFORM = torch.full((K,), 1 / K)


def similarities(rows: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, K, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- B (Eq. 10) ------------------------------------------------------------------------------------
def test_balance_leaves_clusters_of_target_size_alone():
    z = similarities()
    assert torch.allclose(balance(z, UNIFORM, UNIFORM), z, atol=1e-6)
    power_law = torch.arange(1, K + 1.0) ** -1.5
    power_law /= power_law.sum()  # a non-uniform target, as a prior-matching variant would use
    assert torch.allclose(balance(z, power_law, power_law), z, atol=1e-6)


def test_balance_favours_undersized_and_penalises_oversized_clusters():
    z = similarities().clamp(-0.999, 0.999)  # at z = +-1 the operator has nothing left to move
    sizes = UNIFORM * torch.tensor([0.1, 0.5, 0.9, 1.0, 1.0, 1.5, 2.0, 2.0])  # sums to 1
    zb = balance(z, sizes, UNIFORM)
    assert (zb[:, :3] > z[:, :3]).all() and (zb[:, 5:] < z[:, 5:]).all()
    assert torch.allclose(zb[:, 3:5], z[:, 3:5], atol=1e-6)
    assert ((zb >= -1) & (zb <= 1)).all()


def test_balance_bounds_at_empty_and_at_collapse():
    z = similarities()
    empty = torch.tensor([0.0] + [1 / (K - 1)] * (K - 1))
    assert torch.equal(balance(z, empty, UNIFORM)[:, 0], torch.ones(len(z)))  # s = 0: z^B = 1, the maximum
    everything = torch.tensor([1.0] + [0.0] * (K - 1))
    collapsed = balance(z, everything, UNIFORM)[:, 0]  # s = 1: z^B = (1 + z)/K - 1, in [-1, -1 + 2/K]
    assert torch.allclose(collapsed, (1 + z[:, 0]) / K - 1)
    assert (collapsed >= -1).all() and (collapsed <= -1 + 2 / K).all()


def test_efficient_balance_equals_the_case_by_case_definition():
    z = similarities(rows=256)
    sizes = torch.distributions.Dirichlet(torch.full((K,), 0.3)).sample((256,))  # many near-empty clusters
    sizes[:8, 0], sizes[8:16, 1], sizes[16:24, 2] = 0.0, 1 / K, 1.0  # the edges: empty, on target, everything
    assert torch.allclose(balance(z, sizes, UNIFORM), balance_by_cases(z, sizes, UNIFORM), atol=1e-6)


# -- the method on tiny inputs ---------------------------------------------------------------------
def tiny_excb(**settings) -> torch.nn.Module:
    cfg = ExCBConfig(**{"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16, "num_clusters": K, **settings})
    torch.manual_seed(0)
    return build_method(cfg, SmallCNN(1, width=0.25))


def views(local: int = 0, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 1, 8, 8, generator=gen) for _ in range(2)] + \
           [torch.randn(6, 1, 4, 4, generator=gen) for _ in range(local)]


def test_cluster_sizes_follow_eq_9_by_hand():
    method = tiny_excb(num_clusters=4, size_momentum=0.5)
    method.update_cluster_sizes(torch.tensor([0, 0, 1, 0]))  # s_B = (3/4, 1/4, 0, 0)
    assert torch.allclose(method.cluster_sizes, torch.tensor([0.5, 0.25, 0.125, 0.125]))  # 0.5 s + 0.5 s_B
    method.update_cluster_sizes(torch.tensor([3, 3]))  # s_B = (0, 0, 0, 1)
    assert torch.allclose(method.cluster_sizes, torch.tensor([0.25, 0.125, 0.0625, 0.5625]))


def test_loss_is_eq_7_averaged_over_view_pairs():
    gen = torch.Generator().manual_seed(0)
    p_teacher = F.softmax(torch.randn(2, 5, K, generator=gen), dim=-1)
    z_proj, z_pred = torch.randn(3, 5, K, generator=gen), torch.randn(3, 5, K, generator=gen)

    def h(p, z):
        return -(p * F.log_softmax(z / 0.1, dim=-1)).sum(-1).mean()

    proj = [h(p_teacher[i], z_proj[j]) for i in range(2) for j in range(3) if j != i]
    pred = [h(p_teacher[i], z_pred[j]) for i in range(2) for j in range(3)]
    expected = torch.stack(proj).mean() / 2 + torch.stack(pred).mean() / 2
    assert torch.allclose(excb_loss(p_teacher, z_proj, z_pred, 0.1), expected)


@pytest.mark.slow
def test_the_code_pairing_is_the_official_loss_by_hand_and_the_method_uses_it():
    """pairing code (the official ClusteringLoss): teacher view i against the projector output of each other
    GLOBAL view and the predictor output of every view, one mean over all these pairs; not Eq. 7's loss."""
    gen = torch.Generator().manual_seed(0)
    p_teacher = F.softmax(torch.randn(2, 5, K, generator=gen), dim=-1)
    z_proj, z_pred = torch.randn(4, 5, K, generator=gen), torch.randn(4, 5, K, generator=gen)  # 2 global, 2 local

    def h(p, z):
        return -(p * F.log_softmax(z / 0.1, dim=-1)).sum(-1).mean()

    proj = [h(p_teacher[i], z_proj[j]) for i in range(2) for j in range(2) if j != i]
    pred = [h(p_teacher[i], z_pred[j]) for i in range(2) for j in range(4)]
    expected = torch.stack(proj + pred).mean()
    assert torch.allclose(excb_loss(p_teacher, z_proj, z_pred, 0.1, pairing="code"), expected)
    assert not torch.allclose(excb_loss(p_teacher, z_proj, z_pred, 0.1), expected, atol=1e-3)

    method = tiny_excb(pairing="code")
    twin, step_views = copy.deepcopy(method), views(local=2)
    loss = method.training_step(step_views, torch.arange(6)).loss
    p_teacher = twin.teacher_assignments(step_views[:2])
    _, z_proj, z_pred = twin.student_outputs(step_views[:2], step_views[2:])
    assert torch.allclose(loss, excb_loss_as_code(p_teacher, z_proj, z_pred, twin.cfg.student_temperature))


@pytest.mark.slow
def test_heads_on_all_views_normalise_global_and_local_views_together():
    """head_batches all (the official Classifier): the backbone on each crop size, then the heads on all views
    as one batch; imbssl's default runs the heads on each group alone. Without local crops the two agree."""
    by_size, together = tiny_excb(), tiny_excb(head_batches="all")  # the same weights (seeded)
    step_views = views(local=2)
    global_views, local_views = step_views[:2], step_views[2:]
    projections, z_proj, z_pred = together.student_outputs(global_views, local_views)
    features = torch.cat([together.backbone(torch.cat(global_views)), together.backbone(torch.cat(local_views))])
    expected = together.projector(features)
    assert torch.allclose(projections, expected[:12], atol=1e-6)
    assert torch.allclose(z_proj, together.centroids(expected).unflatten(0, (4, -1)), atol=1e-6)
    assert torch.allclose(z_pred, together.centroids(together.predictor(expected)).unflatten(0, (4, -1)), atol=1e-6)
    _, z_proj_by_size, _ = by_size.student_outputs(global_views, local_views)
    assert not torch.allclose(z_proj_by_size, z_proj, atol=1e-3)
    assert torch.allclose(by_size.student_outputs(global_views, [])[1], together.student_outputs(global_views, [])[1])


@pytest.mark.parametrize("preset,hidden_layers", [("paper", 2), ("cpu", 1), ("demo", 1)])
def test_the_paper_preset_builds_the_official_projector_and_the_others_as_before(preset, hidden_layers):
    """The paper preset runs ExCB in the official code's form (docs/excb.md): two hidden layers in the projector of
    student and teacher, the heads on all views together, the code's loss pairs; cpu and demo keep imbssl's."""
    tree = deep_merge(load_preset("experiment-excb", preset), {"base": {"data": {"path": "unused"}}})
    exp = ExcbExperimentConfig.model_validate(tree)
    cfg = exp.run_config(exp.subsets[0], "excb", exp.seeds[0]).method
    method = build_method(cfg, SmallCNN(1, width=0.25))
    block = [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    for projector in (method.projector, method.teacher.projector):
        assert [type(m) for m in projector] == block * hidden_layers + [nn.Linear]
    paper = preset == "paper"
    assert (cfg.head_batches, cfg.pairing) == (("all", "code") if paper else ("by_size", "paper"))


def test_view_agreement_by_hand():
    assert view_agreement(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0]])).item() == pytest.approx(0.5)


@pytest.mark.slow
def test_teacher_gets_no_gradient_and_follows_the_student_by_ema():
    method = tiny_excb(teacher_momentum=0.9)
    method.training_step(views(local=2), torch.arange(6)).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None for part in (method.backbone, method.predictor, method.centroids)
               for p in part.parameters())
    trained = {id(p) for group in method.param_groups() for p in group["params"]}
    assert not trained & {id(p) for p in method.teacher.parameters()}

    optimizer = torch.optim.SGD(method.param_groups(), lr=0.1)
    Schedules(method, optimizer, {"lr": constant_schedule(0.1, 10)}, 10, 5).apply(0)  # the momentum is still 0.9
    optimizer.step()
    before = method.teacher.projector[0].weight.clone()
    method.on_step_end()
    assert torch.allclose(method.teacher.projector[0].weight, 0.9 * before + 0.1 * method.projector[0].weight)


@pytest.mark.slow
def test_centroids_get_no_gradient_from_local_crops():
    layer, features = CosineCentroids(dim=4, num_clusters=K), torch.randn(3, 4, requires_grad=True)
    layer(features, detach=True).sum().backward()
    assert layer.weight.grad is None and features.grad is not None

    method = tiny_excb()
    grads = []
    for local_seed in (1, 2):  # same global views, different local crops
        trial = copy.deepcopy(method)  # the same cluster sizes s before each step
        trial.training_step(views(local=2)[:2] + views(local=2, seed=local_seed)[2:], torch.arange(6)).loss.backward()
        grads.append((trial.centroids.weight.grad, trial.backbone.body[0].weight.grad))
    assert torch.equal(grads[0][0], grads[1][0])  # the centroids only learn from the global views
    assert not torch.equal(grads[0][1], grads[1][1])  # while the local crops do train the backbone


def test_centroid_weight_decay_schedule():
    """The centroids' group follows its own cosine, 1e-3 -> 1e-4 (Sec. 4.1); the other groups keep theirs."""
    method = tiny_excb()
    optimizer = torch.optim.SGD(method.param_groups(), lr=0.1, weight_decay=5e-4)
    centroids = next(g for g in optimizer.param_groups if g.get("wd_schedule") == CENTROID_DECAY)
    assert centroids["params"] == [method.centroids.weight]
    schedules = Schedules(method, optimizer, {"lr": constant_schedule(0.1, 100)}, 100, 10)
    for step, expected in ((0, 1e-3), (50, 5.5e-4), (99, 1e-4 + 9e-4 * (1 + math.cos(math.pi * 0.99)) / 2)):
        schedules.apply(step)
        assert centroids["weight_decay"] == pytest.approx(expected, rel=1e-12)
        assert [g["weight_decay"] for g in optimizer.param_groups[:2]] == [5e-4, 0.0]


@pytest.mark.slow
def test_kmeans_init_puts_the_same_centroids_in_student_and_teacher():
    method = tiny_excb().train()
    random_init = method.centroids.weight.clone()
    bn_before = {k: v.clone() for k, v in method.teacher.state_dict().items() if "running" in k or "batches" in k}
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    views_made = []
    method.on_train_start(images, lambda batch, gen: views_made.append(len(batch)) or batch.float() / 255,
                          torch.Generator().manual_seed(0))
    assert torch.equal(method.centroids.weight, method.teacher.centroids.weight)
    assert not torch.equal(method.centroids.weight, random_init)
    assert views_made == [40]  # one global view of each image, nothing more
    after = method.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in bn_before.items())  # BatchNorm running stats untouched


def test_no_weight_decay_on_biases_and_normalisation():
    for centroid_decay in ((1e-3, 1e-4), None):
        method = tiny_excb(centroid_weight_decay=centroid_decay)
        optimizer = torch.optim.SGD(method.param_groups(), lr=0.1, weight_decay=5e-4)
        decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        for name, p in method.named_parameters():
            if name.startswith("teacher."):
                assert id(p) not in decay
            elif p.ndim == 1:
                assert decay[id(p)] == 0.0, name  # BatchNorm weights and biases, Linear biases
            elif name != "centroids.weight" or centroid_decay is None:
                assert decay[id(p)] == 5e-4, name


# -- short real runs on digits ---------------------------------------------------------------------
def excb_cfg(tiny_cfg, method: dict | None = None, **sections):
    """ExCB on digits in a few seconds: 10 batches an epoch, so m_s = 0.9 averages s over about one epoch."""
    return tiny_cfg(method={"name": "excb", "proj_hidden": 64, "pred_hidden": 64, "num_clusters": 32,
                            "size_momentum": 0.9, "teacher_momentum": 0.99, **(method or {})}, **sections)


def last_epoch(run_dir) -> dict:
    return [r for r in read_metrics(run_dir) if "epoch/loss" in r][-1]


@pytest.mark.slow
def test_balancing_keeps_clusters_in_bounds_where_no_balancing_concentrates_them(tiny_cfg, tmp_path):
    # 6 epochs of 10 steps. Teacher assignments of the last epoch relative to the target size N/K: about
    # 0.75-1.2 with balancing, 0-5 without (CPU); the bounds below leave a wide margin.
    balanced = last_epoch(pretrain(excb_cfg(tiny_cfg, {"balancing": "excb"}, optim={"epochs": 6}), tmp_path / "excb"))
    unbalanced = last_epoch(pretrain(excb_cfg(tiny_cfg, {"balancing": "none"}, optim={"epochs": 6}), tmp_path / "none"))
    assert 0.5 < balanced["epoch/cluster_size_min"] and balanced["epoch/cluster_size_max"] < 2
    assert balanced["epoch/empty_clusters"] == 0
    assert unbalanced["epoch/cluster_size_max"] > 2 * balanced["epoch/cluster_size_max"]
    assert unbalanced["epoch/cluster_size_min"] < balanced["epoch/cluster_size_min"] / 2
    for stat in ("teacher_confidence", "view_agreement", "purity", "nmi"):
        assert 0 <= balanced[f"epoch/{stat}"] <= 1


@pytest.mark.slow
def test_resume_restores_cluster_sizes_and_teacher(tiny_cfg, interrupted_then_resumed):
    straight, resumed = interrupted_then_resumed(excb_cfg(tiny_cfg, augment={"local_crops": 2}))
    a, b = (load_safe(run / CHECKPOINT_FILE) for run in (straight, resumed))
    assert a["method"].keys() == b["method"].keys() and "cluster_sizes" in a["method"]
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])  # s, teacher (EMA), centroids
    assert a["optimizer"]["param_groups"][1]["weight_decay"] == b["optimizer"]["param_groups"][1]["weight_decay"]


@pytest.mark.slow
def test_evaluate_draws_the_final_cluster_sizes(tiny_cfg, tmp_path, final_clustering):
    cfg = excb_cfg(tiny_cfg, {"centroid_init": "random"}, optim={"epochs": 2}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    clusters = evaluate_run(run).clusters.model_dump()
    sizes = np.array(clusters["sorted_relative_sizes"])
    assert len(sizes) == 32 and np.all(np.diff(sizes) <= 0) and sizes.mean() == pytest.approx(1.0)
    assert clusters["cluster_size_max"] == sizes[0] and clusters["empty_clusters"] == int((sizes == 0).sum())
    labels, assignments = final_clustering["labels"], final_clustering["assignments"]
    majorities = contingency_matrix(labels, assignments).max(axis=0)  # each cluster's majority class, in images
    assert clusters["purity"] == pytest.approx(majorities.sum() / len(labels))
    assert (run / CLUSTER_FIGURE).stat().st_size > 0
    assert EvalRecord.read(run).clusters.nmi == clusters["nmi"]


@pytest.mark.parametrize("preset,balancing,subsets", [
    ("demo", {"excb", "none", "centering"}, ["imbalanced-p10", "imbalanced-p100", "balanced-rs-p100"]),
    ("paper", {"excb", "none", "centering"}, ["imbalanced-p10", "imbalanced-p100", "balanced-rs-p100"]),
    ("cpu", {"excb", "none"}, ["imbalanced-p100", "balanced-rs-p100"]),  # the re-measurement's grid, in its order
])
def test_presets_validate(preset, balancing, subsets):
    tree = deep_merge(load_preset("experiment-excb", preset), {"base": {"data": {"path": "cifar10.tar.gz"}}})
    exp = ExcbExperimentConfig.model_validate(tree)
    configs = [exp.run_config(s, m, 0) for s in exp.subsets for m in exp.methods]
    assert {c.method.balancing for c in configs} == balancing
    assert [s.key for s in exp.subsets] == subsets


@pytest.mark.slow
def test_recipe_writes_the_report(tmp_path):
    tree = deep_merge(load_preset("experiment-excb", "demo"), {
        "subsets": [s.model_dump() for s in ExcbExperimentConfig().subsets if s.key == "imbalanced-p100"],
        "base": {"data": {"cache_dir": str(tmp_path / "cache")}, "optim": {"epochs": 2},
                 "eval": {"knn_k": [5], "linear": {"epochs": 3, "lrs": [0.1], "weight_decays": [0.0]}}}})
    text = reproduce(ExcbExperimentConfig.model_validate(tree), tmp_path / "report", "test").read_text()
    assert "K ablation" in text and "dino-centering" in text
    ablation = text.split("## K ablation")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in ablation.splitlines() if line.startswith("| ")][2:] == [
        "| excb-K16", "| ExCB", "| excb-K64"]  # K = 32 is the grid's own ExCB run
    results = Results.read(tmp_path / "report")
    assert [c.axes["method"] for c in results.cells] == [
        "excb", "excb-no-balancing", "dino-centering", "excb-K16", "excb-K64"]
    assert [c.pretrain.figure("empty_clusters") is not None for c in results.cells] == [True] * 5
    assert (tmp_path / "report" / "cluster_sizes-k-ablation.png").stat().st_size > 0
