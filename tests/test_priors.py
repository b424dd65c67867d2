"""Cluster priors, MSN / PMSN, and ExCB balanced toward a non-uniform target."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from imbssl.augment.masking import kept_tokens, mask_patches
from imbssl.cluster import kmeans
from imbssl.config import ConfigError, ModelConfig, deep_merge
from imbssl.data import load_indices
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.methods import build_method
from imbssl.methods.excb import ExCBConfig, balance, balance_by_cases
from imbssl.methods.msn import MSNConfig, me_max, msn_loss, prior_matching
from imbssl.models import build_backbone
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import pretrain
from imbssl.priors import (PriorConfig, check_prior, cluster_prior, estimated_prior, fit_power_law, power_law_prior,
                           uniform_prior)
from imbssl.records import PretrainRecord
from imbssl.recipes import load_preset
from imbssl.recipes.priors import PriorsExperimentConfig


def test_priors_sum_to_one_with_k_positive_entries():
    for cfg in (PriorConfig(), PriorConfig(kind="power_law", tau=0.5),
                PriorConfig(kind="given", values=[0.5, 0.3, 0.2])):
        k = 3
        prior = cluster_prior(cfg, k)
        assert prior.shape == (k,) and (prior > 0).all() and prior.sum().item() == pytest.approx(1.0)
    power = power_law_prior(4, 1.0)  # 1, 1/2, 1/3, 1/4 over 25/12
    assert torch.allclose(power, torch.tensor([12, 6, 4, 3]) / 25.0)
    estimated = estimated_prior(np.array([0, 0, 0, 2, 2, 1]), 4)  # sizes 3, 2, 1, 0 -> (4, 3, 2, 1) / 10
    assert torch.allclose(estimated, torch.tensor([0.4, 0.3, 0.2, 0.1]))


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.0])
def test_the_power_law_fit_recovers_tau_from_kmeans_sizes(tau):
    """Clusters of sizes 20000 k^-tau in shuffled order: the fit reads them sorted, +1 each as ``estimated`` does,
    and PMSN's power law with the fitted tau is the prior."""
    num_clusters = 50
    sizes = np.round(20000 * np.arange(1, num_clusters + 1) ** -tau).astype(int)
    assignments = np.repeat(np.random.default_rng(0).permutation(num_clusters), sizes)
    fitted = fit_power_law(estimated_prior(assignments, num_clusters))
    assert fitted == pytest.approx(tau, abs=0.01)
    prior = cluster_prior(PriorConfig(kind="power_law_fit"), num_clusters, assignments)
    assert torch.allclose(prior, power_law_prior(num_clusters, fitted))
    assert fit_power_law(uniform_prior(8)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="power_law_fit prior needs the k-means assignments"):
        cluster_prior(PriorConfig(kind="power_law_fit"), num_clusters)


def test_a_given_prior_is_read_from_a_file(tmp_path):
    path = tmp_path / "prior.txt"
    path.write_text("0.6, 0.3\n0.1\n")
    assert torch.allclose(cluster_prior(PriorConfig(kind="given", path=str(path)), 3), torch.tensor([0.6, 0.3, 0.1]))


@pytest.mark.parametrize("values, k, message", [
    ([0.5, 0.5], 3, "has 2 entries for 3 clusters"),
    ([0.7, 0.4, -0.1], 3, "must be positive and finite: entry 2 is -0.1"),
    ([0.5, float("inf"), 0.5], 3, "must be positive and finite: entry 1 is inf"),
    ([0.5, 0.4, 0.05], 3, "sums to 0.95, not 1"),
])
def test_a_bad_prior_is_refused_naming_the_problem(values, k, message):
    with pytest.raises(ConfigError, match=message):
        check_prior(torch.tensor(values), k)


def test_prior_config_and_sinkhorn_with_a_non_uniform_prior_are_refused():
    with pytest.raises(ValueError, match="exactly one of values and path"):
        PriorConfig(kind="given")
    with pytest.raises(ValueError, match="sinkhorn forces uniform cluster marginals"):
        MSNConfig(sinkhorn=True, prior=PriorConfig(kind="power_law"))
    MSNConfig(sinkhorn=True)  # uniform: allowed
    with pytest.raises(ValueError, match="sinkhorn forces uniform cluster marginals"):
        MSNConfig(sinkhorn=True, prior=PriorConfig(kind="power_law_fit"))


def test_pmsn_with_a_uniform_prior_is_msn_up_to_log_k():
    p_bar = torch.softmax(torch.randn(16), 0)
    uniform = torch.full((16,), 1 / 16)
    assert prior_matching(p_bar, uniform).item() == pytest.approx(me_max(p_bar).item() + math.log(16), abs=1e-6)
    p_target, logits = torch.softmax(torch.randn(8, 16), 1), torch.randn(2, 8, 16)
    pmsn, _ = msn_loss(p_target, logits, uniform, 1.0)
    cross_entropy = -(p_target * torch.log_softmax(logits, -1)).sum(-1).mean()
    msn = cross_entropy + me_max(torch.softmax(logits, -1).mean((0, 1)))
    assert pmsn.item() == pytest.approx(msn.item() + math.log(16), abs=1e-5)


def test_the_prior_kl_by_hand_and_its_direction():
    p_bar, prior = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.25, 0.25, 0.5])
    forward = 0.7 * math.log(0.7 / 0.25) + 0.2 * math.log(0.2 / 0.25) + 0.1 * math.log(0.1 / 0.5)  # KL(p_bar || pi)
    reverse = 0.25 * math.log(0.25 / 0.7) + 0.25 * math.log(0.25 / 0.2) + 0.5 * math.log(0.5 / 0.1)  # KL(pi || p_bar)
    assert prior_matching(p_bar, prior).item() == pytest.approx(forward)
    assert abs(forward - reverse) > 0.05  # the reverse direction is another loss


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75])
def test_masking_drops_the_requested_share_of_tokens_seeded(ratio):
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    kept = kept_tokens(5, 16, ratio, gen())
    assert kept.shape == (5, 16 - round(ratio * 16)) and torch.equal(kept, kept_tokens(5, 16, ratio, gen()))
    assert all(len(set(row.tolist())) == kept.shape[1] for row in kept)
    images = torch.ones(5, 3, 8, 8)
    masked = mask_patches(images, kept, 2)  # a 4 x 4 grid of 2-pixel cells, row-major
    dropped_cells = (masked[:, 0] == 0).float().sum((1, 2)) / 4
    assert dropped_cells.tolist() == [round(ratio * 16)] * 5
    cells = masked[:, 0, ::2, ::2].flatten(1)  # one pixel of each cell
    assert all(set(row.nonzero().flatten().tolist()) == set(k.tolist()) for row, k in zip(cells, kept))


def tiny_msn(**method):
    cfg = MSNConfig(proj_hidden=32, proj_dim=16, num_clusters=8, **method)
    return build_method(cfg, build_backbone(ModelConfig(backbone="vit", vit_dim=16, vit_depth=1, vit_heads=2,
                                                        vit_patch=2), 1))


def test_msn_target_encoder_gets_no_gradient_and_a_vit_encodes_only_the_kept_tokens():
    method = tiny_msn(prior=PriorConfig(kind="power_law"))
    views = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]
    out = method.training_step(views, torch.arange(4))
    out.loss.backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    hard = method.target_predictions(views[0]).argmax(-1)  # the soft p_bar can hide few hard clusters
    assert out.stats["target_clusters"] == len(set(hard.tolist()))
    assert torch.allclose(method.prior, power_law_prior(8, 0.25))
    no_decay = next(g for g in method.param_groups() if g.get("weight_decay") == 0.0)["params"]
    assert any(p is method.prototypes.weight for p in no_decay)  # as MSN's code
    backbone, x = method.backbone.eval(), torch.randn(2, 1, 8, 8)
    keep = torch.tensor([[0, 5, 9], [1, 2, 3]])
    # the kept tokens alone decide the feature: changing a dropped patch (token 15 is the bottom-right 2x2) does not
    changed = x.clone()
    changed[:, :, 6:, 6:] += 5
    assert torch.allclose(backbone(x, keep), backbone(changed, keep), atol=1e-6)
    assert not torch.allclose(backbone(x), backbone(changed), atol=1e-3)


def test_msn_views_of_one_size_go_through_the_projector_as_one_batch():
    """view_batches by_size (MSN's code): the focal views are one batch, so the projector's BatchNorm normalises
    them together; imbssl's default normalises each alone. With one anchor view the two forms agree on it."""
    each = tiny_msn()
    by_size = tiny_msn(view_batches="by_size")
    by_size.load_state_dict(each.state_dict())
    gen = torch.Generator().manual_seed(0)
    anchors = [torch.randn(4, 1, 8, 8, generator=gen)]
    focal = [torch.randn(4, 1, 4, 4, generator=gen) for _ in range(2)]
    masks = each.anchor_masks(anchors, torch.Generator().manual_seed(1))
    together = by_size.projector(by_size.backbone(torch.cat(focal)))
    got, default = by_size.anchor_projections(anchors, masks, focal), each.anchor_projections(anchors, masks, focal)
    assert len(got) == len(default) == 3
    assert torch.allclose(torch.cat(got[1:]), together, atol=1e-6)
    assert torch.allclose(got[0], default[0], atol=1e-6)
    assert not torch.allclose(torch.cat(default[1:]), together, atol=1e-3)


@pytest.mark.parametrize("preset", ["paper", "cpu", "demo"])
def test_the_paper_preset_builds_msn_as_its_code_and_the_others_as_before(preset):
    """The priors paper preset runs MSN in the form of MSN's code (docs/priors.md): GELU in the projector, DeiT's
    LayerNorm eps on the ViT, the views of one size together, the encoder (not the prototypes) clipped at 3.0. The
    cpu and demo presets, whose results are published, keep imbssl's defaults."""
    tree = deep_merge(load_preset("priors", preset), {"base": {"data": {"path": "unused"},
                                                               "model": {"backbone": "vit"}}})
    exp = PriorsExperimentConfig.model_validate(tree)
    for variant in ("msn", "pmsn-0.25"):
        cfg = exp.run_config(exp.subsets[0], variant, exp.seeds[0])
        method = build_method(cfg.method, build_backbone(cfg.model, 3))
        paper = preset == "paper"
        for projector in (method.projector, method.target.projector):
            assert {type(m) for m in projector if isinstance(m, (nn.ReLU, nn.GELU))} == {nn.GELU if paper else nn.ReLU}
        eps = {m.eps for m in method.modules() if isinstance(m, nn.LayerNorm)}
        assert eps == {1e-6 if paper else 1e-5}
        assert method.cfg.view_batches == ("by_size" if paper else "each")
        clipping = method.gradient_clipping()
        if not paper:
            assert clipping is None
            continue
        clipped, max_norm = clipping
        encoder = [*method.backbone.parameters(), *method.projector.parameters()]
        assert max_norm == 3.0 and {id(p) for p in clipped} == {id(p) for p in encoder}
        assert all(p is not method.prototypes.weight for p in clipped)


def test_the_msn_and_excb_forms_and_the_vit_eps_tell_runs_apart_only_where_they_are_read(tiny_cfg):
    """MSN's options are keys of MSN's section alone, ExCB's of ExCB's (another method's are refused), so each tells
    runs apart where it is read; the LayerNorm eps only on a ViT (``unused_keys``)."""
    from imbssl.pipelines.runfolder import changed_keys

    msn_form = {"proj_activation": "gelu", "view_batches": "by_size", "clip_grad_norm": 3.0}
    excb_form = {"proj_hidden_layers": 2, "head_batches": "all", "pairing": "code"}
    for name, own, other in (("msn", msn_form, excb_form), ("excb", excb_form, msn_form)):
        today = tiny_cfg(method={"name": name})
        assert set(changed_keys(today, tiny_cfg(method={"name": name, **own}))) == {f"method.{k}" for k in own}
        with pytest.raises(ConfigError, match=f"method.{next(iter(other))} is not a key of {name}'s section"):
            tiny_cfg(method={"name": name, **other})
    assert changed_keys(tiny_cfg(), tiny_cfg(model={"vit_ln_eps": 1e-6})) == {}
    for vit in ("vit", "vit_s16"):
        assert changed_keys(tiny_cfg(model={"backbone": vit}), tiny_cfg(model={"backbone": vit, "vit_ln_eps": 1e-6})
                            ) == {"model.vit_ln_eps": (1e-5, 1e-6)}


def test_excb_balancing_toward_a_non_uniform_target():
    target = power_law_prior(6, 1.0)
    z = torch.rand(10, 6) * 2 - 1
    assert torch.allclose(balance(z, target.clone(), target), z)  # on target: z^B = z
    sizes = target * torch.tensor([0.5, 2.0, 0.0, 1.5, 1.0, 0.9])  # under, over, empty, over, on, under its own t
    balanced = balance(z, sizes, target)
    assert torch.allclose(balanced, balance_by_cases(z, sizes, target), atol=1e-6)
    under, over = (sizes < target), (sizes > target)
    assert (balanced[:, under] >= z[:, under]).all() and (balanced[:, over] <= z[:, over]).all()
    assert torch.allclose(balanced[:, 2], torch.ones(10))  # an empty cluster: z^B = 1
    assert ((balanced >= -1) & (balanced <= 1)).all()


def test_excb_lays_a_power_law_prior_over_the_initial_kmeans_sizes():
    cfg = ExCBConfig(proj_hidden=32, proj_dim=16, pred_hidden=32, num_clusters=4,
                     prior=PriorConfig(kind="power_law", tau=1.0))
    method = build_method(cfg, build_backbone(ModelConfig(width=0.25), 1))
    method.set_target(power_law_prior(4, 1.0), np.array([2, 2, 2, 0, 0, 3, 1, 2, 0]))  # sizes 3, 1, 4, 1
    assert torch.allclose(method.target_sizes, torch.tensor([6, 4, 12, 3]) / 25.0)  # the largest share on cluster 2
    assert torch.equal(method.cluster_sizes, method.target_sizes)
    with pytest.raises(ValueError, match="centroid_init=kmeans"):
        ExCBConfig(prior=PriorConfig(kind="estimated"), centroid_init="random")


def msn_cfg(tiny_cfg, backbone="small_cnn", **method):
    model = {"backbone": backbone, "width": 0.25} if backbone == "small_cnn" else \
        {"backbone": "vit", "vit_dim": 16, "vit_depth": 1, "vit_heads": 2, "vit_patch": 2}
    return tiny_cfg(method={"name": "msn", "num_clusters": 16, "mask_patch": 2, **method}, model=model,
                    eval={"knn_k": [5]})


@pytest.mark.slow
def test_msn_in_its_codes_form_resumes_exactly_with_its_gradients_clipped(tiny_cfg, interrupted_then_resumed,
                                                                         monkeypatch):
    """Every option of MSN's code's form at once, with focal views: the clipping keeps no state, so a resumed run is
    the uninterrupted one; and it is at work (the encoder's norm before clipping is above clip_grad_norm)."""
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(float(clip(*a, **k))))
    cfg = tiny_cfg(method={"name": "msn", "num_clusters": 16, "proj_activation": "gelu", "view_batches": "by_size",
                           "clip_grad_norm": 0.05},
                   model={"backbone": "vit", "vit_dim": 16, "vit_depth": 1, "vit_heads": 2, "vit_patch": 2,
                          "vit_ln_eps": 1e-6},
                   augment={"local_crops": 2}, eval={"knn_k": [5]},
                   data={"subset": {"profile": "exp", "imbalance": 10}})  # 503 images, for speed
    straight, resumed = interrupted_then_resumed(cfg)
    a, b = (load_safe(run / CHECKPOINT_FILE)["method"] for run in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert norms and max(norms) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["small_cnn", "vit"])
def test_msn_resumes_exactly_with_its_prototypes_target_encoder_and_masks(tiny_cfg, interrupted_then_resumed,
                                                                         backbone):
    straight, resumed = interrupted_then_resumed(msn_cfg(tiny_cfg, backbone, prior={"kind": "power_law"}))
    a, b = (load_safe(run / CHECKPOINT_FILE)["method"] for run in (straight, resumed))
    kept = "target.backbone.patch_embed.weight" if backbone == "vit" else "steps_done"
    assert {"prototypes.weight", kept} <= a.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_evaluate_reports_msn_clusters_against_its_prior(tiny_cfg, tmp_path, final_clustering):
    run = pretrain(msn_cfg(tiny_cfg, prior={"kind": "power_law", "tau": 1.0}), tmp_path / "pmsn")
    clusters = evaluate_run(run).clusters.model_dump()
    assert np.allclose(clusters["sorted_prior"], power_law_prior(16, 1.0).numpy())
    assignments, target = final_clustering["assignments"], final_clustering["target"]
    shares = np.bincount(assignments, minlength=16) / len(assignments)
    assert clusters["sorted_shares"] == pytest.approx(sorted(shares, reverse=True))
    # KL(sizes || prior), scipy's sum p log(p / q) with 0 log 0 = 0; the other direction is infinite on an empty cluster
    assert clusters["kl_to_prior"] == pytest.approx(scipy.stats.entropy(shares, target))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["power_law_fit", "estimated"])
def test_msn_takes_a_prior_measured_on_the_kmeans_of_its_initial_projections(tiny_cfg, tmp_path, monkeypatch, kind):
    """PMSN without a set tau: the prior comes from the k-means of the target encoder's initial projections (the
    sizes ``kmeans_of_one_view`` returns), is kept through training and its tau is in pretrain.json."""
    from imbssl.methods import base
    seen = []
    monkeypatch.setattr(base, "kmeans", lambda *a, **k: seen.append(kmeans(*a, **k)) or seen[-1])
    cfg = msn_cfg(tiny_cfg, prior={"kind": kind})
    run = pretrain(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 1})}), tmp_path / kind)
    prior = load_safe(run / CHECKPOINT_FILE)["method"]["prior"]
    assert len(seen) == 1 and len(seen[0].assignments) == len(load_indices(run / "subset.npz"))  # one view each
    assert torch.allclose(prior, cluster_prior(PriorConfig(kind=kind), 16, seen[0].assignments))
    assert not torch.allclose(prior, uniform_prior(16))
    assert PretrainRecord.read(run).figure("prior_tau") == pytest.approx(fit_power_law(prior.numpy()), abs=1e-6)
    if kind == "power_law_fit":
        assert torch.allclose(prior, power_law_prior(16, PretrainRecord.read(run).figure("prior_tau")), atol=1e-6)


@pytest.mark.slow
def test_excb_trains_toward_a_power_law_laid_over_its_clusters(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method={"name": "excb", "num_clusters": 16, "prior": {"kind": "power_law", "tau": 1.0}},
                   augment={"local_crops": 2}, optim={"epochs": 2})
    method = load_safe(pretrain(cfg, tmp_path / "excb") / CHECKPOINT_FILE)["method"]
    assert torch.allclose(method["target_sizes"].sort(descending=True).values, power_law_prior(16, 1.0))


def stale(run_dir, cfg) -> dict:
    """The settings by which ``run_dir``'s saved run differs from a grid's pre-training cell of ``cfg``."""
    from imbssl.recipes.grid import Cell, stale_folders

    return {key: change for _, changed in stale_folders(Cell({}, 0, "pretrain", cfg, run_dir)) for key, change
            in changed.items()}


def test_a_grid_tells_a_run_trained_with_other_settings(tiny_cfg, tmp_path):
    """--set base.model.backbone=vit under the same --out must not report the CNN's numbers as the ViT's; where the
    data is cached and how the probe is evaluated do not make another run."""
    from imbssl.config import save_config

    run_dir = tmp_path / "runs" / "imbalanced-p100" / "msn" / "seed0"
    run_dir.mkdir(parents=True)
    cfg = tiny_cfg(method={"name": "msn"})
    save_config(cfg, run_dir / "config.yaml")
    elsewhere = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": "/elsewhere"}),
                                       "eval": cfg.eval.model_copy(update={"knn_k": [5]})})
    assert stale(run_dir, elsewhere) == {}
    assert stale(run_dir, tiny_cfg(method={"name": "msn"}, model={"backbone": "vit"})) == {
        "model.backbone": ("small_cnn", "vit")}


def test_the_vit_sizes_tell_runs_apart_only_on_the_vit(tiny_cfg, tmp_path):
    """A CNN run saved when the ViT's default sizes were others is still the same run; a ViT run is not."""
    from imbssl.config import save_config

    for backbone in ("small_cnn", "vit"):
        run_dir = tmp_path / backbone
        run_dir.mkdir()
        saved = tiny_cfg(method={"name": "msn"}, model={"backbone": backbone, "vit_dim": 192, "vit_depth": 6})
        save_config(saved, run_dir / "config.yaml")
        now = tiny_cfg(method={"name": "msn"}, model={"backbone": backbone, "vit_dim": 128, "vit_depth": 4})
        assert stale(run_dir, now) == ({"model.vit_depth": (6, 4), "model.vit_dim": (192, 128)}
                                       if backbone == "vit" else {})


def test_pmsn_is_compared_with_msn_without_sinkhorn_even_when_msn_sinkhorn_is_listed_first():
    exp = PriorsExperimentConfig.model_validate(deep_merge(load_preset("priors", "demo"), {
        "methods": ["msn-sinkhorn", "msn", "pmsn-0.25", "excb", "excb-power-0.25"]}))
    assert exp.resolved_method("msn-sinkhorn").sinkhorn and exp.resolved_method("msn-sinkhorn").prior.kind == "uniform"
    assert exp.uniform_counterpart("pmsn-0.25") == "msn"  # the prior alone differs
    assert exp.uniform_counterpart("excb-power-0.25") == "excb"
    assert exp.uniform_counterpart("msn-sinkhorn") is None
