"""The long-tailed SSL methods and their protocol (issue 14): temperature schedules, SDCLR, few-shot probes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imbssl.config import ConfigError, ModelConfig, TemperatureScheduleConfig
from imbssl.engine.schedules import cosine_temperature, ts_temperature_schedule
from imbssl.eval import few_shot_set, shots_per_class
from imbssl.methods import SDCLR, SimCLR, build_method, global_magnitude_masks
from imbssl.methods.sdclr import SDCLRConfig
from imbssl.methods.simclr import SimCLRConfig
from imbssl.models import build_backbone
from imbssl.pipelines.pretrain import pretrain


def test_cosine_temperature_values():
    """The reference's t_max = 200 is half the period: tau(0) = tau+, tau(100) halfway (0.55, where a 200-epoch
    period would sit at tau-), tau(200) = tau-, tau(400) = tau+ again, 5 cycles in 2,000 epochs."""
    at = lambda t: cosine_temperature(t, 0.1, 1.0, 200)  # noqa: E731
    assert at(0) == pytest.approx(1.0)
    assert at(100) == pytest.approx(0.55)
    assert at(200) == pytest.approx(0.1)
    assert at(400) == pytest.approx(1.0)
    assert at(50) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert [t for t in range(1, 2001) if at(t) == pytest.approx(0.1)] == [200, 600, 1000, 1400, 1800]


def test_scheduled_temperature_clocks():
    """Per epoch (the reference): t is the 1-based epoch number, held for the whole epoch; per step: t is the
    fractional epoch from 0. The two differ by exactly that clock. 4 steps an epoch, 1,300 epochs."""
    per_epoch, per_step = (ts_temperature_schedule(0.1, 1.0, 200, 1300 * 4, 4, per_epoch=clock)
                           for clock in (True, False))
    assert per_epoch[0] == per_epoch[3] == cosine_temperature(1, 0.1, 1.0, 200) < 1.0
    assert per_epoch[99 * 4] == per_epoch[99 * 4 + 2] == pytest.approx(0.55)
    assert per_step[0] == 1.0 and per_step[99 * 4 + 2] == cosine_temperature(99.5, 0.1, 1.0, 200)
    for step in (0, 1, 30, 396, 4939):
        assert per_epoch[step] == per_step[(step // 4 + 1) * 4]


def test_temperature_schedule_config_names_the_half_period():
    with pytest.raises(ValueError, match="t_max_epochs = T / 2"):
        TemperatureScheduleConfig(tau_min=0.1, tau_max=1.0, period_epochs=200)
    with pytest.raises(ValueError, match="use update: step"):
        TemperatureScheduleConfig(t_max_epochs=0.5)
    assert TemperatureScheduleConfig(t_max_epochs=0.5, update="step").t_max_epochs == 0.5


@pytest.mark.slow
def test_trainer_follows_the_temperature_schedule(tiny_cfg, tmp_path, monkeypatch):
    """Each step contrasts at the schedule's temperature, not the method's fixed one: per epoch, from the 1-based
    epoch number as the reference (t_max 1: epoch 1 at tau-, epoch 2 back at tau+)."""
    used, real_step = [], SimCLR.training_step
    monkeypatch.setattr(SimCLR, "training_step", lambda self, views, indices: (used.append(self.temperature),
                                                                               real_step(self, views, indices))[1])
    cfg = tiny_cfg(method={"name": "simclr"}, optim={"batch_size": 256, "epochs": 2, "temperature_schedule":
                                                     {"tau_min": 0.1, "tau_max": 0.9, "t_max_epochs": 1}})
    pretrain(cfg, tmp_path / "r")
    steps = len(used) // 2
    assert steps > 1 and used == pytest.approx([0.1] * steps + [0.9] * steps)


def test_temperature_schedule_refuses_a_method_without_one(tiny_cfg, tmp_path):
    cfg = tiny_cfg(optim={"temperature_schedule": {"tau_min": 0.1, "tau_max": 1.0}})  # SimSiam
    with pytest.raises(ConfigError, match="simsiam has no contrastive temperature"):
        pretrain(cfg, tmp_path / "r")


def test_global_magnitude_masks_keep_the_largest_share_over_all_layers():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(40, 30, generator=gen), "b": 0.1 * torch.randn(200, generator=gen)}
    masks = global_magnitude_masks(weights, ratio=0.9)
    kept = torch.cat([weights[k][masks[k]].abs().flatten() for k in weights])
    dropped = torch.cat([weights[k][~masks[k]].abs().flatten() for k in weights])
    assert len(kept) == round(0.1 * 1400)
    assert kept.min() >= dropped.max()  # by magnitude, across layers at once
    assert masks["b"].float().mean() < masks["a"].float().mean()  # the small-weight layer loses more


def test_global_magnitude_masks_prune_the_ceiling_of_the_ratio_as_sdclrs_mask():
    """SDCLR's Mask.magnitudePruning zeroes ceil(r n) weights (its threshold is the sorted magnitudes at that
    index): 1,266 of 1,406 at r = 0.9, keeping 140, where round(0.1 n) would keep 141."""
    weights = {"w": torch.randn(1406, generator=torch.Generator().manual_seed(0))}
    assert int(global_magnitude_masks(weights, ratio=0.9)["w"].sum()) == 1406 - math.ceil(0.9 * 1406) == 140


def test_global_magnitude_masks_keep_every_weight_tied_at_the_threshold():
    """SDCLR's mask is |w| >= t, t the sorted magnitudes at index ceil(r n): weights tied at t are all kept (a
    float32 ResNet-18 has such ties; one decided a mask of the BCL-D reference fixture)."""
    masks = global_magnitude_masks({"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([2.0, 3.0])}, ratio=0.5)
    assert masks["a"].tolist() == [False, True] and masks["b"].tolist() == [True, True]


def _sdclr() -> SDCLR:
    return build_method(SDCLRConfig(proj_hidden=32, proj_dim=16), build_backbone(ModelConfig(), 3))


def test_sdclr_prunes_every_convolution_globally_each_epoch():
    method = _sdclr()
    method.on_epoch_start(0)
    masks = method.masks()
    convs = [n for n, m in method.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(masks) == sorted(f"backbone.{n}.weight" for n in convs)
    total = sum(m.numel() for m in masks.values())
    magnitudes = torch.cat([w.detach().abs().flatten() for w in method.prunable().values()]).sort().values
    # SDCLR's rule: |w| >= the sorted magnitudes at ceil(0.9 n), so ceil(0.9 n) zeroed unless weights tie there
    assert sum(int(m.sum()) for m in masks.values()) == int((magnitudes >= magnitudes[math.ceil(0.9 * total)]).sum())
    with torch.no_grad():  # re-pruning follows the current dense weights
        method.backbone.body[0].weight.fill_(1.0)
    method.on_epoch_start(1)
    assert method.masks()["backbone.body.0.weight"].all()


def test_sdclr_has_sdclrs_three_layer_head_with_batchnorm_on_every_layer():
    """VITA-Group/SDCLR's proj_head (twoLayerProj off in its CIFAR commands): f -> f -> f -> d, a bias on the first
    Linear only, every Linear followed by an affine BatchNorm, the output's included; the pruned branch has its own
    copy of each (dual BN). method.reference_head=false gives SimCLR's 2-layer head instead."""
    method = _sdclr()
    feature = method.backbone.feature_dim
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    norms = [m for m in method.projector if isinstance(m, torch.nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linears] == [
        (feature, feature, True), (feature, feature, False), (feature, 16, False)]
    assert [(m.num_features, m.affine) for m in norms] == [(feature, True), (feature, True), (16, True)]
    assert isinstance(method.projector[-1], torch.nn.BatchNorm1d)
    assert {k for k in method.pruned_bn if k.startswith("projector/")} == {"projector/1", "projector/4",
                                                                          "projector/7"}
    simclr_head = build_method(SDCLRConfig(proj_hidden=32, proj_dim=16, reference_head=False),
                               build_backbone(ModelConfig(), 3)).projector
    assert [type(m) for m in simclr_head] == [type(m) for m in SimCLR(build_backbone(ModelConfig(), 3),
                                                                      SimCLRConfig(proj_hidden=32)).projector]


def test_sdclr_pruned_branch_has_its_own_batchnorm():
    """The dense view moves only the dense BN statistics, the pruned view only the pruned branch's; the pruned
    branch's BN affine parameters get gradient, and the dense weights get gradient through the mask."""
    method = _sdclr()
    method.on_epoch_start(0)
    dense_bn, pruned_bn = method.backbone.body[1], method.pruned_bn["backbone/body/1"]
    assert dense_bn is not pruned_bn
    dense_stats, pruned_stats = dense_bn.running_mean.clone(), pruned_bn.running_mean.clone()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    method.projector(method.backbone(x))
    assert not torch.equal(dense_bn.running_mean, dense_stats) and torch.equal(pruned_bn.running_mean, pruned_stats)
    dense_stats = dense_bn.running_mean.clone()
    out = method.training_step([x, x.flip(-1)], torch.arange(8))
    out.loss.backward()
    assert not torch.equal(pruned_bn.running_mean, pruned_stats)
    assert pruned_bn.weight.grad is not None and pruned_bn.weight.grad.abs().sum() > 0
    stem = method.backbone.body[0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0


@pytest.mark.slow
def test_sdclr_resumes_with_its_masks(tiny_cfg, interrupted_then_resumed):
    """Masks and the pruned BN are in the checkpoint: a run crashed after epoch 2 and resumed ends as a run
    trained straight through."""
    straight, resumed = interrupted_then_resumed(tiny_cfg(method={"name": "sdclr"}))
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["method"]
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert any(k.startswith("mask_") for k in a) and any(k.startswith("pruned_bn.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_few_shot_sets_are_balanced_and_outside_validation():
    labels = np.repeat(np.arange(5), 40)
    validation = np.flatnonzero(np.arange(200) % 40 < 4)  # 4 per class
    chosen = few_shot_set(labels, shots=10, exclude=validation, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [10] * 5
    assert not set(chosen) & set(validation)
    assert shots_per_class("1%", 50_000, 100) == 5 and shots_per_class("100-shot", 50_000, 100) == 100
    with pytest.raises(ValueError, match="37-shot .* class 0"):
        few_shot_set(labels, shots=37, exclude=validation, seed=0)


@pytest.mark.slow
def test_evaluate_reports_few_shot_probes(tiny_cfg, tmp_path):
    from imbssl.pipelines.evaluate import evaluate_run

    cfg = tiny_cfg(optim={"epochs": 1}, eval={"few_shot": ["10-shot", "5%"]})
    result = evaluate_run(pretrain(cfg, tmp_path / "r")).model_dump()
    assert set(result["few_shot"]) == {"10-shot", "5%"}
    assert result["few_shot"]["10-shot"]["labelled_train"] == 100
    five_percent = result["few_shot"]["5%"]
    assert five_percent["labelled_train"] == 10 * five_percent["shots_per_class"]
    assert 1 <= five_percent["shots_per_class"] < 10  # 5% of digits' train split, over 10 classes
    ten_shot = result["few_shot"]["10-shot"]
    assert ten_shot["thirds_std"] == pytest.approx(np.std(list(ten_shot["thirds"].values())))  # population std


def _sdclr_style_split(labels: np.ndarray, validation: np.ndarray, head: int, rho: float) -> np.ndarray:
    """A split file as SDCLR's splitK_D_i: int(head * rho^(-c / (C - 1))) per class c, outside the validation list."""
    rng, num_classes = np.random.default_rng(0), labels.max() + 1
    pool = np.setdiff1d(np.arange(len(labels)), validation)
    return np.concatenate([rng.permutation(pool[labels[pool] == c])[:int(head * rho ** (-c / (num_classes - 1)))]
                           for c in range(num_classes)])


def test_index_file_subsets_read_split_files(tmp_path):
    from imbssl.config import SubsetConfig
    from imbssl.data import DataError, select_subset

    labels = np.repeat(np.arange(10), 50)
    validation = np.flatnonzero(np.arange(500) % 50 < 5)
    split = _sdclr_style_split(labels, validation, head=45, rho=10)
    np.save(tmp_path / "split1_D_i.npy", split)
    np.savetxt(tmp_path / "split1_D_i.txt", split, fmt="%d")
    expected = sum(int(45 * 10 ** (-c / 9)) for c in range(10))
    for name in ("split1_D_i.npy", "split1_D_i.txt"):
        chosen = select_subset(labels, SubsetConfig(profile="index_file", index_file=str(tmp_path / name)))
        assert len(chosen) == expected and np.array_equal(chosen, np.sort(split))
        assert not set(chosen) & set(validation)
    np.save(tmp_path / "other.npy", np.array([3, 700]))
    with pytest.raises(DataError, match="index 700 is outside the train split's 500 images"):
        select_subset(labels, SubsetConfig(profile="index_file", index_file=str(tmp_path / "other.npy")))
    np.save(tmp_path / "twice.npy", np.array([3, 3]))
    with pytest.raises(DataError, match="index 3 appears 2 times"):
        select_subset(labels, SubsetConfig(profile="index_file", index_file=str(tmp_path / "twice.npy")))
    with pytest.raises(ValueError, match="set both or neither"):
        SubsetConfig(profile="index_file")


@pytest.mark.slow
def test_evaluate_under_the_split_files_protocol(tiny_cfg, tmp_path):
    """BCL's protocol on digits with split files the test writes: pre-training on a D_i list, the full-shot probe
    on the train list, every probe selected on the validation list, a few-shot probe on a few-shot list."""
    from imbssl.data import DataError, load_splits
    from imbssl.pipelines.evaluate import evaluate_run

    labels = load_splits(tiny_cfg().data)["train"].labels  # 1,297 digits
    rng = np.random.default_rng(0)
    validation = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:10] for c in range(10)])
    train_list = np.setdiff1d(np.arange(len(labels)), validation)
    files = {"val": validation, "train": train_list, "D_i": _sdclr_style_split(labels, validation, head=100, rho=10),
             "test_20shot": np.concatenate([rng.permutation(train_list[labels[train_list] == c])[:20]
                                            for c in range(10)])}
    for name, indices in files.items():
        np.save(tmp_path / f"split1_{name}.npy", indices)
    cfg = tiny_cfg(optim={"epochs": 1},
                   data={"subset": {"profile": "index_file", "index_file": str(tmp_path / "split1_D_i.npy")}},
                   eval={"labelled_index_file": str(tmp_path / "split1_train.npy"),
                         "val_index_file": str(tmp_path / "split1_val.npy"),
                         "few_shot": [str(tmp_path / "split1_test_20shot.npy"), "10-shot"]})
    run = pretrain(cfg, tmp_path / "r")
    result = evaluate_run(run).model_dump()
    assert result["labelled_train"] == len(train_list) and result["labelled_val"] == 100
    assert set(result["few_shot"]) == {"split1_test_20shot", "10-shot"}
    assert result["few_shot"]["split1_test_20shot"]["labelled_train"] == 200
    assert result["few_shot"]["split1_test_20shot"]["shots_per_class"] == 20
    assert sum(result["pretrain_class_counts"]) == len(files["D_i"])
    np.save(tmp_path / "leaky.npy", validation[:3])
    leaky = cfg.eval.model_copy(update={"few_shot": [str(tmp_path / "leaky.npy")]})
    with pytest.raises(DataError, match="shares 3 images with the probes' validation part"):
        evaluate_run(run, leaky)
    with pytest.raises(ValueError, match="set labelled_index_file too"):
        tiny_cfg(eval={"val_index_file": str(tmp_path / "split1_val.npy")})


def _longtail_grid(**tree):
    from imbssl.recipes import load_preset
    from imbssl.recipes.longtail_ssl import LongtailSSLConfig

    return LongtailSSLConfig.model_validate({**load_preset("longtail-ssl", "paper"), **tree})


def test_longtail_ssl_variants_differ_in_the_method_alone():
    """SimCLR, +TS, SDCLR and BCL share SDCLR's SGD settings; TS adds its schedule; a preset's variant keys merge
    over the built-in ones (the paper preset's 6 local crops for ExCB and PMSN)."""
    exp = _longtail_grid()
    subset, runs = exp.subsets[0], {}
    for m in ("simclr", "simclr-ts", "sdclr", "bcl-i", "bcl-d", "excb", "pmsn"):
        runs[m] = exp.run_config(subset, m, 0)
    family = [runs[m] for m in ("simclr", "simclr-ts", "sdclr", "bcl-i", "bcl-d")]
    assert {(c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.method.temperature) for c in family} == {
        ("sgd", 0.25, 1e-4, 0.2)}
    assert runs["simclr-ts"].optim.temperature_schedule.t_max_epochs == 200
    assert runs["simclr-ts"].optim.temperature_schedule.update == "epoch"
    assert runs["simclr"].optim.temperature_schedule is None and runs["bcl-d"].method.name == "bcl-d"
    assert runs["excb"].augment.local_crops == 6 and runs["pmsn"].method.prior.kind == "power_law"
    assert runs["simclr"].augment.local_crops == 0
    # SimCLR and +TS take the head of BCL's SimCLR baseline, the one BCL-I takes
    heads = {m: build_method(runs[m].method, build_backbone(ModelConfig(), 3)).projector for m in
             ("simclr", "simclr-ts", "bcl-i")}
    layouts = {m: [(type(layer), tuple(p.shape for p in layer.parameters())) for layer in head]
               for m, head in heads.items()}
    assert layouts["simclr"] == layouts["simclr-ts"] == layouts["bcl-i"]
    assert isinstance(heads["simclr"][-1], torch.nn.BatchNorm1d)


def test_longtail_ssl_refuses_an_unknown_method():
    with pytest.raises(ValueError, match=r"methods \['mocov3'\] are neither variants"):
        _longtail_grid(methods=["simclr", "mocov3"])


def test_longtail_ssl_verdicts_name_the_leader_and_check_the_papers_order():
    from pathlib import Path

    from imbssl.recipes.grid import CellRecord, Results
    from imbssl.records import EvalRecord

    evaluated = EvalRecord.read(Path(__file__).parent / "data" / "format-0" / "eval.json")

    def results(top1: dict[str, tuple[float, ...]]) -> Results:
        return Results(recipe="longtail-ssl", command="test", cells=[
            CellRecord(axes={"subset": "imbalanced-p100", "method": m}, seed=s, kind="pretrain", run_dir="r",
                       eval=evaluated.model_copy(update={"linear": evaluated.linear.model_copy(update={"top1": v})}))
            for m, values in top1.items() for s, v in enumerate(values)])

    exp = _longtail_grid(methods=["simclr", "sdclr", "bcl-i", "bcl-d"], base={"eval": {"few_shot": []}})
    top1 = {"simclr": (40, 42, 41), "sdclr": (45, 46, 45), "bcl-i": (47, 47.5, 47.2), "bcl-d": (50, 52, 51)}
    lines = exp.verdict_lines(results(top1), "imbalanced-p100")  # BCL-D leads by 3, 4.5 and 3.8 points
    assert lines[0].startswith("- full-shot: BCL-D leads BCL-I by +3.77 points (95% CI +1.90 to +5.63, 3 seeds): "
                               "holds")
    assert lines[1].endswith("SimCLR < SDCLR < BCL-I < BCL-D, matches")
    leads = _rows([exp.lead_table(results(top1), "imbalanced-p100")])
    assert leads["each method"] == ["each method", "full-shot: BCL-D -"] and leads["BCL-D"] == ["BCL-D", "leads"]
    assert leads["BCL-I"] == ["BCL-I", "+3.77 (+1.90 to +5.63): holds"] and leads["SimCLR"][1].startswith("+10.00 (")
    top1["sdclr"] = (30, 31, 30)
    assert exp.verdict_lines(results(top1), "imbalanced-p100")[1].endswith("does not match")


# -- the cpu preset: SDCLR's and BCL's split 1 through the official order (issue 31) -----------------------------
#: the issue's run list in table order: the SimCLR family, the general SSL methods, the seeds'
CPU_METHODS = ["simclr", "simclr+gh", "focal", "focal+gh", "sdclr", "sdclr+gh", "bcl-i", "bcl-i+gh", "bcl-d",
               "bcl-d+gh", "byol", "dino", "barlow-twins", "vicreg", "simsiam", "excb", "pmsn"]


def _cpu_grid(*overrides: str):
    from imbssl.configbase import deep_merge, parse_overrides
    from imbssl.recipes import load_preset
    from imbssl.recipes.longtail_ssl import LongtailSSLConfig

    tree = deep_merge(load_preset("longtail-ssl", "cpu"), {"base": {"data": {"path": "cifar100-png.tar.gz"}}})
    return LongtailSSLConfig.model_validate(deep_merge(tree, parse_overrides(overrides)))


def test_the_cpu_preset_runs_split_1_of_bcl_through_the_official_order():
    """Every run pre-trains on split 1's D_i, probes on its train, validation and few-shot lists, all read through
    the order file; the seeds' protocol stays one override away, as the header says."""
    from pathlib import Path

    from imbssl.config import few_shot_name

    grid = _cpu_grid()
    assert grid.methods == CPU_METHODS and grid.seeds == [0, 1, 2] and [s.key for s in grid.subsets] == ["split1"]
    cells = grid.cells(Path("out"))
    assert len(cells) == len(CPU_METHODS) * 3
    for cell in cells:
        data, evaluation = cell.config.data, cell.config.eval
        assert (data.source, data.train_order) == ("imagefolder", "cifar100-train-official-order.txt")
        assert data.subset.index_file == "split/cifar100_imbSub_with_subsets/cifar100_split1_D_i.npy"
        assert (evaluation.labelled_index_file, evaluation.val_index_file) == (
            "split/cifar100/cifar100_trainIdxList.npy", "split/cifar100/cifar100_valIdxList.npy")
        assert [few_shot_name(s) for s in evaluation.few_shot] == ["cifar100_split1_test_100shot",
                                                                     "cifar100_split1_test_50shot"]
    assert grid.protocol().endswith("Train indices follow the order file cifar100-train-official-order.txt.")
    seeds = _cpu_grid("subset_keys=[imbalanced-p100]", "base.data.train_order=null",
                      "base.eval.labelled_index_file=null", "base.eval.val_index_file=null",
                      "base.eval.few_shot=['1%', 100-shot, 50-shot]")
    assert seeds.protocol().startswith("Protocol: the seeds' (Cao et al.'s") and "order file" not in seeds.protocol()
    assert seeds.run_config(seeds.subsets[0], "simclr", 0).data.subset.profile == "exp"


def _split_results(methods: dict[str, tuple[float, ...]], classes: list[str]):
    from pathlib import Path

    from imbssl.recipes.grid import CellRecord, Results
    from imbssl.records import EvalRecord

    evaluated = EvalRecord.read(Path(__file__).parent / "data" / "format-0" / "eval.json")
    counts = [int(450 * 0.01 ** (c / (len(classes) - 1))) for c in range(len(classes))]
    return Results(recipe="longtail-ssl", command="test", cells=[
        CellRecord(axes={"subset": "split1", "method": m}, seed=s, kind="pretrain", run_dir="r",
                   eval=evaluated.model_copy(update={"classes": classes, "pretrain_class_counts": counts,
                                                     "linear": evaluated.linear.model_copy(update={"top1": v})}))
        for m, values in methods.items() for s, v in enumerate(values)])


def _rows(report: list[str]) -> dict[str, list[str]]:
    """The report's table rows by their first cell, the first table's where several share it (the probe table's
    rows by method, its header under 'method')."""
    rows = {}
    for line in "\n".join(report).splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells)
    return rows


@pytest.mark.parametrize("cifar100", [True, False])
def test_bcls_published_figures_sit_in_their_own_columns_beside_cifar100_runs_alone(cifar100, tmp_path):
    """BCL README's full-shot, 100-shot and 50-shot figures are columns of the probe table, n/a for methods it does
    not report, only when the runs are of CIFAR-100; and each X+GH is paired with its X by seed."""
    from imbssl.recipes.grid import CIFAR100_CLASSES

    grid = _cpu_grid("methods=[simclr, simclr+gh, simsiam]", "base.eval.few_shot=[]",
                     "method_settings.simclr+gh={method: {name: simclr}}")
    classes = sorted(CIFAR100_CLASSES) if cifar100 else [str(c) for c in range(10)]
    results = _split_results({"simclr": (40, 42, 41), "simclr+gh": (42, 44.5, 43.5), "simsiam": (30, 31, 32)}, classes)
    table = grid.report(results, tmp_path)
    rows = _rows(table)
    published = ["BCL README: full-shot", "BCL README: 100-shot", "BCL README: 50-shot"]
    assert (rows["method"][-3:] == published) == cifar100
    if cifar100:
        assert rows["SimCLR"][-3:] == ["50.7", "46.3", "42.4"] and rows["SimSiam"][-3:] == ["n/a"] * 3
        assert rows["SimCLR"][1] == "41.0 ± 1.0"
        assert any(line.startswith("The published columns: BCL README, CIFAR-100-LT split 1") and
                   "These runs: the same split files, another backbone" in line for line in table)
    else:
        assert "The published figures (BCL README, CIFAR-100-LT split 1, BCL's protocol, ResNet-18, 2,000 ep) are left " \
               "out: they are not of CIFAR-100." in table
    assert rows["GH's gain, points"] == ["GH's gain, points", "full-shot"]
    assert rows["SimCLR+GH - SimCLR"] == ["SimCLR+GH - SimCLR", "+2.33 (+1.62 to +3.05): holds"]
    one_seed = grid.report(_split_results({"simclr": (40,), "simclr+gh": (42,), "simsiam": (30,)}, classes), tmp_path)
    assert _rows(one_seed)["SimCLR+GH - SimCLR"] == ["SimCLR+GH - SimCLR", "+2.00 (one seed)"]


def test_split_file_probes_are_named_by_their_shots_unless_another_probe_has_that_name():
    """BCL's cifar100_split1_test_100shot.npy is the column 100-shot; beside a drawn 100-shot probe it keeps its
    file's name."""
    assert list(_cpu_grid().probes()) == ["full-shot", "100-shot", "50-shot"]
    listed = "split/cifar100_imbSub_with_subsets/cifar100_split1_test_100shot.npy"
    both = _cpu_grid(f"base.eval.few_shot=[{listed}, 100-shot]")
    assert list(both.probes()) == ["full-shot", "cifar100_split1_test_100shot", "100-shot"]
