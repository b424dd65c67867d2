"""Rotation and MoCo v2 (methods/rotation.py, methods/moco.py), the SSP methods of Yang & Xu (2020), and the
cross-process helpers MoCo needs (engine/distributed.py)."""
import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from imbssl.augment import BatchRows, Normalize, PadCropFlip
from imbssl.config import AugmentConfig, OptimConfig, deep_merge
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.distributed import convert_sync_batchnorm, gather, sum_over_processes
from imbssl.engine.runlog import read_metrics
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.errors import ImbsslError
from imbssl.methods import build_method, moco, rotate_four_ways
from imbssl.methods.moco import MoCoConfig, SplitBatchNorm, split_batchnorms
from imbssl.methods.rotation import Rotation, RotationConfig, balanced_rotation_labels, rotate_each
from imbssl.models import SmallCNN, build_backbone
from imbssl.pipelines.common import load_encoder
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import BACKBONE_FILE, SUMMARY_FILE, pretrain, view_maker
from imbssl.recipes import load_preset
from imbssl.recipes.ssp import SSPExperimentConfig

WEAK_VIEWS = {"crop_scale": [0.75, 1.0], "jitter_prob": 0.0, "gray_prob": 0.0}


def last_epoch(run_dir) -> dict:
    return [r for r in read_metrics(run_dir) if "epoch/loss" in r][-1]


def views(batch: int = 6, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 8, 8, generator=gen) for _ in range(2)]


# -- Rotation --------------------------------------------------------------------------------------
def test_rotation_labels_match_the_rotated_images():
    images = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(0))  # no image is rotation-symmetric
    rotated, labels = rotate_four_ways(images)
    assert rotated.shape == (20, 3, 6, 6) and torch.equal(torch.bincount(labels), torch.full((4,), 5))
    for row, (image, label) in enumerate(zip(rotated, labels)):
        original = images[row % len(images)]
        assert torch.equal(torch.rot90(image, -int(label), dims=(1, 2)), original)  # turned back by its label
        for wrong in set(range(4)) - {int(label)}:
            assert not torch.equal(torch.rot90(image, -wrong, dims=(1, 2)), original)

    corner = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    rotated, labels = rotate_four_ways(corner)
    assert labels.tolist() == [0, 1, 2, 3]
    assert rotated[1, 0].tolist() == [[1.0, 3.0], [0.0, 2.0]]  # label 1: a quarter turn counter-clockwise


@pytest.mark.slow
def test_rotation_learns_to_tell_rotations_on_digits(tiny_cfg, tmp_path):
    # 2 epochs of 11 steps: rotation_acc averages about 0.52, then 0.60 over the epoch on CPU (chance is 0.25).
    cfg = tiny_cfg(method={"name": "rotation"}, augment=WEAK_VIEWS, optim={"epochs": 2}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    epochs = [r for r in read_metrics(run) if "epoch/rotation_acc" in r]
    first, last = epochs[0], epochs[-1]
    assert last["epoch/rotation_acc"] > 0.45 and last["epoch/rotation_acc"] > first["epoch/rotation_acc"]
    assert 0 < last["epoch/output_std"] and load_safe(run / BACKBONE_FILE)["heads"] == {}  # no projector space
    result = evaluate_run(run)  # the linear probe and k-NN read the rotation backbone unchanged
    assert result.linear.top1 > 10 and result.knn[5].top1 > 10  # above the 10% of chance


def test_one_rotation_turns_each_image_by_a_label_drawn_as_pretrain_rot_py():
    gen = torch.Generator().manual_seed(0)
    labels = balanced_rotation_labels(10, gen)
    # the first 10 of a shuffled [0, 1, 2, 3] x 3: every label at most 3 times; the same generator, the same draw
    assert len(labels) == 10 and set(labels.tolist()) <= {0, 1, 2, 3} and torch.bincount(labels).max() <= 3
    assert torch.equal(labels, balanced_rotation_labels(10, torch.Generator().manual_seed(0)))
    images = torch.randn(10, 3, 6, 6, generator=gen)
    turned = rotate_each(images, labels)
    assert all(torch.equal(t, torch.rot90(x, int(r), dims=(1, 2))) for t, x, r in zip(turned, images, labels))


def test_one_rotation_draws_the_global_batchs_labels_with_its_views_and_uses_them_once():
    method = Rotation(SmallCNN(1, 0.25), RotationConfig(rotations="one"))
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    make_views = lambda batch, gen, rows: [batch.float()]  # noqa: E731 - the crop is not under test here
    method.views(make_views, images[4:8], torch.Generator().manual_seed(3), BatchRows(10, 4, 8), torch.arange(10))
    assert torch.equal(method.step_rotations, balanced_rotation_labels(10, torch.Generator().manual_seed(3))[4:8])
    out = method.training_step([images[4:8].float()], torch.arange(4, 8))
    assert out.loss.ndim == 0 and method.step_rotations is None
    with pytest.raises(RuntimeError, match="drawn by views"):
        method.training_step([images[4:8].float()], torch.arange(4, 8))
    every = Rotation(SmallCNN(1, 0.25), RotationConfig())
    gen = torch.Generator().manual_seed(3)
    every.views(make_views, images, gen, BatchRows(10), torch.arange(10))  # the default form draws nothing more
    assert torch.equal(torch.rand(1, generator=gen), torch.rand(1, generator=torch.Generator().manual_seed(3)))


@pytest.mark.slow
def test_rotation_in_pretrain_rot_pys_form_trains_and_resumes_exactly(tiny_cfg, interrupted_then_resumed):
    """One rotation per image, the pad crop and the step lr through the pipeline: the labels come from the step's
    generator, so an interrupted run resumes to the same weights; the lr ends at lr x 0.1 (a cosine ends at 0)."""
    cfg = tiny_cfg(method={"name": "rotation", "rotations": "one"},
                   data={"subset": {"profile": "exp", "imbalance": 10}},
                   augment={"crop": "pad", "crop_pad": 1, "jitter_prob": 0.0, "gray_prob": 0.0},
                   optim={"epochs": 3, "lr_schedule": "step", "milestones": [2], "lr_factors": [0.1]})
    straight, resumed = interrupted_then_resumed(cfg)
    a, b = (load_safe(run / CHECKPOINT_FILE) for run in (straight, resumed))
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.2 * 128 / 256 * 0.1)
    assert 0.25 < last_epoch(straight)["epoch/rotation_acc"] <= 1


def test_the_pad_crop_makes_supervised_cifar_views(tiny_cfg):
    cfg = tiny_cfg(method={"name": "rotation"}, augment={"crop": "pad", "crop_pad": 3, "jitter_prob": 0.0,
                                                         "gray_prob": 0.0})
    method = build_method(cfg.method, SmallCNN(1, 0.25))
    normalize = Normalize(torch.tensor([0.5]), torch.tensor([0.25]))
    maker = view_maker(cfg, method, normalize, torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    assert isinstance(maker, PadCropFlip) and (maker.pad, maker.flip_prob, maker.num_views) == (3, 0.5, 1)
    with pytest.raises(ValidationError, match="crop pad is pretrain_rot.py's crop and flip alone; jitter_prob=0.8"):
        AugmentConfig(crop="pad")
    with pytest.raises(ValidationError, match=r"milestones \[160, 180\] are not before epochs=100"):
        OptimConfig(lr_schedule="step")


def test_the_ssp_paper_preset_pretrains_rotation_as_pretrain_rot_py_and_the_others_as_rotnet():
    """Deviation 6a: the paper preset follows Yang & Xu's pretrain_rot.py (one rotation per image, RandomCrop(32,
    padding=4) + flip, lr 0.1 x0.01 at 160 and x0.0001 at 180); demo and cpu keep RotNet's four rotations."""
    for preset, rotations in (("paper", "one"), ("cpu", "all"), ("demo", "all")):
        tree = load_preset("ssp", preset)
        exp = SSPExperimentConfig.model_validate(deep_merge(tree, {"base": {"data": {"path": "data.tar.gz"}}}))
        cfg = exp.pretraining_config("rotation", exp.labeled_config(exp.imbalances[0], 0), "rotation", 0)
        assert cfg.method.rotations == rotations, preset
    assert (cfg.augment.crop, cfg.optim.lr_schedule) == ("resized", "cosine")  # demo
    tree = deep_merge(load_preset("ssp", "paper"), {"base": {"data": {"path": "data.tar.gz"}}})
    exp = SSPExperimentConfig.model_validate(tree)
    cfg = exp.pretraining_config("rotation", exp.labeled_config(100, 0), "rotation", 0)
    assert (cfg.augment.crop, cfg.augment.crop_pad, cfg.optim.batch_size, cfg.optim.epochs) == ("pad", 4, 128, 200)
    assert (cfg.optim.lr_schedule, cfg.optim.milestones, cfg.optim.lr_factors) == ("step", [160, 180], [0.01, 1e-4])


# -- MoCo ------------------------------------------------------------------------------------------
def tiny_moco(**settings) -> torch.nn.Module:
    """Plain BatchNorm unless asked (bn_splits=1): the queue's tests hold whatever order the keys are computed
    in, since the whole batch's statistics do not depend on it."""
    cfg = MoCoConfig(**{"proj_hidden": 16, "proj_dim": 8, "queue_size": 10, "bn_splits": 1, **settings})
    torch.manual_seed(0)
    return build_method(cfg, SmallCNN(1, width=0.25))


def keys(n: int, start: int = 0) -> torch.Tensor:
    """n distinct unit 8-d keys, told apart by their first coordinate."""
    return F.normalize(torch.cat([torch.arange(start, start + n).float().view(-1, 1) + 1, torch.ones(n, 7)], 1), dim=1)


def test_moco_queue_is_first_in_first_out():
    method = tiny_moco(queue_size=10)
    initial = method.queue.clone()
    method.enqueue(keys(4, start=0))
    method.enqueue(keys(4, start=4))
    assert int(method.queue_ptr) == 8 and torch.equal(method.queue[8:], initial[8:])
    method.enqueue(keys(4, start=8))  # wraps: two keys at the end, two at the start
    assert int(method.queue_ptr) == 2
    assert torch.equal(method.queue[[8, 9, 0, 1]], keys(4, start=8))  # the newest, right before the pointer
    assert torch.equal(method.queue[2:8], keys(12)[2:8])  # the oldest (keys 0, 1) are gone, the rest kept
    assert not any(torch.equal(row, old) for row in method.queue for old in initial)

    method.enqueue(keys(13, start=20))  # more keys than slots: the newest K stay, still ending before the pointer
    assert int(method.queue_ptr) == 2
    assert torch.equal(method.queue[(2 - 10 + torch.arange(10)) % 10], keys(13, start=20)[3:])


def test_moco_step_enqueues_its_own_keys():
    method = tiny_moco(queue_size=16).train()
    x_q, x_k = views(batch=6)
    expected = F.normalize(copy.deepcopy(method.key_encoder)(x_k), dim=1)
    method.training_step([x_q, x_k], torch.arange(6))
    assert int(method.queue_ptr) == 6
    assert torch.allclose(method.queue[:6], expected, atol=1e-6)
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(16))


def test_moco_key_encoder_gets_no_gradient_and_follows_the_query_by_ema():
    method = tiny_moco(key_momentum=0.9)
    method.training_step(views(), torch.arange(6)).loss.backward()
    key_params = list(method.key_encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in key_params)
    query_params = [*method.backbone.parameters(), *method.projector.parameters()]
    assert all(p.grad is not None for p in query_params)
    trained = {id(p) for group in method.param_groups() for p in group["params"]}
    assert trained == {id(p) for p in query_params}  # everything but the key encoder

    optimizer = torch.optim.SGD(method.param_groups(), lr=0.1)
    before = [p.clone() for p in key_params]
    optimizer.step()
    assert all(torch.equal(k, b) for k, b in zip(key_params, before))  # the optimizer never touches the keys
    method.on_step_end()  # at its constant m, which the engine's schedule sets again before each step
    for k, b, q in zip(key_params, before, query_params, strict=True):
        assert torch.allclose(k, 0.9 * b + 0.1 * q, atol=1e-6)  # k <- m k + (1 - m) q
    assert any(not torch.equal(k, b) for k, b in zip(key_params, before))


@pytest.mark.slow
def test_moco_resume_restores_the_queue_and_the_weights(tiny_cfg, interrupted_then_resumed):
    # The p=10 subset (503 images) keeps it short; 3 epochs of its keys wrap a queue of 200 seven times.
    cfg = tiny_cfg(method={"name": "moco", "queue_size": 200}, data={"subset": {"profile": "exp", "imbalance": 10}})
    straight, resumed = interrupted_then_resumed(cfg)
    a, b = (load_safe(run / CHECKPOINT_FILE)["method"] for run in (straight, resumed))
    assert a.keys() == b.keys() and {"queue", "queue_ptr", "key_encoder.projector.0.weight"} <= a.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # queue, pointer, query and key encoders, BN statistics
    assert int(a["queue_ptr"]) == 3 * json.loads((straight / SUMMARY_FILE).read_text())["num_images"] % 200
    saved = [load_safe(run / BACKBONE_FILE) for run in (straight, resumed)]
    assert all(torch.equal(saved[0]["backbone"][k], saved[1]["backbone"][k]) for k in saved[0]["backbone"])


@pytest.mark.slow
def test_moco_run_evaluates_in_backbone_and_projector_space(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method={"name": "moco", "queue_size": 256}, optim={"epochs": 1}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    assert 0 <= last_epoch(run)["epoch/instance_acc"] <= 1
    result = evaluate_run(run)
    assert result.linear.top1 > 10 and result.knn[5].top1 > 10
    _, heads, _ = load_encoder(cfg, 1, run / BACKBONE_FILE, "projector")
    assert list(heads) == ["projector"] and heads["projector"][-1].out_features == cfg.method.proj_dim


# -- MoCo's shuffling BN (MoCo Sec. 3.3; the CIFAR-10 demo's SplitBatchNorm) --------------------------
def per_group_batchnorm(bn: nn.BatchNorm2d, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, dict]:
    """What ``groups`` GPUs would compute: group g (rows g, g + G, ...) through its own copy of ``bn``; the outputs
    in the batch's order and the copies' running statistics averaged, as the demo's SplitBatchNorm keeps them."""
    copies = [copy.deepcopy(bn).train() for _ in range(groups)]
    y = torch.empty_like(x)
    for g, part in enumerate(copies):
        y[g::groups] = part(x[g::groups])
    stats = {name: torch.stack([getattr(part, name) for part in copies]).mean(0)
             for name in ("running_mean", "running_var")}
    return y, stats


@pytest.mark.parametrize("batch", [12, 11])  # 11: groups of 3, 3, 3, 2 (the trainer's near-equal batches)
def test_split_batchnorm_is_batchnorm_per_group(batch):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1)
    split = split_batchnorms(nn.Sequential(copy.deepcopy(bn)), 4)[0]
    assert isinstance(split, SplitBatchNorm) and split.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(batch, 5, 3, 3)
    expected, stats = per_group_batchnorm(bn, x, 4)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = split(x_ours)
    assert torch.allclose(y, expected, atol=1e-6)
    for name, value in stats.items():
        assert torch.allclose(getattr(split, name), value, atol=1e-6), name
    assert int(split.num_batches_tracked) == 1  # one training batch, as BatchNorm counts it
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (per_group_batchnorm(bn, x_theirs, 4)[0] * weights).sum().backward()
    assert torch.allclose(x_ours.grad, x_theirs.grad, atol=1e-5)
    y_last = split(x.contiguous(memory_format=torch.channels_last))  # train.channels_last's layout, kept
    assert y_last.is_contiguous(memory_format=torch.channels_last) and torch.allclose(y_last, y, atol=1e-6)
    split.eval(), bn.eval()
    bn.load_state_dict(split.state_dict())
    assert torch.equal(split(x), bn(x))  # outside training: BatchNorm with the running statistics


def influence(encode, x: torch.Tensor) -> list[set[int]]:
    """For each image i, the images j whose input moves the output of i: perturb each in turn."""
    base = encode(x)
    moved = [set() for _ in range(len(x))]
    for j in range(len(x)):
        bumped = x.clone()
        bumped[j] += torch.randn_like(bumped[j])
        for i in torch.nonzero((encode(bumped) - base).abs().amax(1) > 1e-6).flatten().tolist():
            moved[i].add(j)
    return moved


@pytest.mark.slow
def test_moco_keys_and_queries_are_normalised_in_different_groups_of_images():
    """Shuffling BN on by default (the demo's 8 groups): a key's BatchNorm statistics come from its own group of 2
    of the 16 key views, picked at random, and not from the group that normalises its query. Plain BatchNorm lets
    every view of the batch into every key and query: the statistics the key shares with its query tell it apart
    from the queued keys (MoCo Sec. 3.3)."""
    assert MoCoConfig().shuffle_bn and MoCoConfig().bn_splits == 8  # the demo's --bn-splits 8
    method = tiny_moco(bn_splits=MoCoConfig().bn_splits).train()
    x_q, x_k = views(batch=16, seed=3)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))

    def keys(x: torch.Tensor) -> torch.Tensor:
        method.key_order = order  # the same shuffle for every perturbation
        return method.encode_keys(x)[0]

    with torch.no_grad():
        query_groups = influence(lambda x: method.projector(method.backbone(x)), x_q)
        key_groups = influence(keys, x_k)
    assert all(len(group) == 2 and i in group for i, group in enumerate(query_groups))  # rows i and i +- 8
    assert all(len(group) == 2 and i in group for i, group in enumerate(key_groups))
    shuffled = order.tolist()
    assert all(key_groups[shuffled[p]] == {shuffled[p % 8], shuffled[p % 8 + 8]} for p in range(16))
    assert sum(query_groups[i] != key_groups[i] for i in range(16)) >= 12  # two images share both groups by chance


def test_moco_draws_the_key_order_with_the_views_from_the_epoch_generator():
    method = tiny_moco(bn_splits=2).train()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    make_views = lambda batch, generator, rows: [batch.float()] * 2  # noqa: E731
    orders = []
    for _ in range(2):
        method.views(make_views, images, torch.Generator().manual_seed(5), BatchRows(6), torch.arange(6))
        orders.append(method.key_order)
    assert torch.equal(orders[0], orders[1]) and sorted(orders[0].tolist()) == list(range(6))
    method.training_step([torch.randn(6, 1, 8, 8)] * 2, torch.arange(6))
    assert method.key_order is None  # used once: the next step draws its own


def test_moco_refuses_split_batchnorm_converted_by_sync_batchnorm():
    method = tiny_moco(bn_splits=8)
    method.on_epoch_start(0)
    convert_sync_batchnorm(method, torch.device("cpu"))
    with pytest.raises(ImbsslError, match="method.bn_splits=8 needs MoCo's own split BatchNorm"):
        method.on_epoch_start(0)


def test_moco_bn_splits_must_share_out_over_the_processes(monkeypatch):
    method = tiny_moco(bn_splits=8).train()
    monkeypatch.setattr(moco, "world_size", lambda: 2)  # 4 groups of each process's rows
    method.backbone(torch.randn(8, 1, 8, 8))
    monkeypatch.setattr(moco, "world_size", lambda: 3)
    with pytest.raises(ImbsslError, match="method.bn_splits=8 is not a multiple of the 3 processes"):
        method.backbone(torch.randn(8, 1, 8, 8))


def test_ssp_paper_preset_builds_mocos_reference_head():
    """builder.py's mlp=True on ResNet-32: fc (64 -> 128) behind Linear(64, 64) and ReLU, dim_mlp = the feature size."""
    tree = deep_merge(load_preset("ssp", "paper"), {"base": {"data": {"path": "cifar10.tar.gz"}}})
    exp = SSPExperimentConfig.model_validate(tree)
    cfg = exp.pretraining_config("moco", exp.labeled_config(100, 0), "moco", 0)
    method = build_method(cfg.method, build_backbone(cfg.model, 3))
    linears = [layer for layer in method.projector if isinstance(layer, nn.Linear)]
    assert cfg.model.backbone == "resnet32" and method.backbone.feature_dim == 64
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(64, 64), (64, 128)]
    assert method.queue.shape == (cfg.method.queue_size, 128)
    assert cfg.method.shuffle_bn and any(isinstance(m, SplitBatchNorm) for m in method.key_encoder.modules())


# -- several processes -----------------------------------------------------------------------------
def test_gather_is_the_identity_on_one_process(tmp_path):
    x = torch.randn(3, 4)
    assert not dist.is_initialized() and gather(x) is x and sum_over_processes(x) is x
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:  # the all_gather path itself, with a world of one
        assert torch.equal(gather(x), x) and torch.equal(sum_over_processes(x), x)
    finally:
        dist.destroy_process_group()


def _two_process_moco(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        ranks = gather(torch.full((2, 3), float(rank)))
        # the same initial weights and queue on both processes; keys in each process's own order (no shuffle)
        method = tiny_moco(queue_size=16, shuffle_bn=False).train()
        x_q, x_k = views(batch=4, seed=rank)  # each process its own batch
        own_keys = F.normalize(copy.deepcopy(method.key_encoder)(x_k), dim=1)
        method.training_step([x_q, x_k], torch.arange(4))
        torch.save({"ranks": ranks, "queue": method.queue, "ptr": int(method.queue_ptr), "own_keys": own_keys.detach()},
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_moco_enqueues_the_keys_of_every_process(tmp_path):
    # fork, not spawn: the children need not import torch again (seconds on a busy machine)
    mp.start_processes(_two_process_moco, args=(str(tmp_path),), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert torch.equal(r0["ranks"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))  # rank order along dim 0
    assert torch.equal(r0["queue"], r1["queue"]) and r0["ptr"] == r1["ptr"] == 8  # one queue, 2 x 4 keys
    assert torch.allclose(r0["queue"][:4], r0["own_keys"], atol=1e-6)
    assert torch.allclose(r0["queue"][4:8], r1["own_keys"], atol=1e-6)


def _two_process_shuffled_moco(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        method = tiny_moco(queue_size=16, bn_splits=2).train()  # one BatchNorm group per process
        x_q, x_k = views(batch=4, seed=rank)
        # rank 1's own order is overruled: rank 0's is broadcast, as builder.py's
        method.key_order = torch.randperm(8, generator=torch.Generator().manual_seed(7 + rank))
        method.training_step([x_q, x_k], torch.arange(4))
        torch.save({"queue": method.queue, "ptr": int(method.queue_ptr), "x_k": x_k}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_moco_shuffles_the_keys_across_processes_and_enqueues_them_in_order(tmp_path):
    mp.start_processes(_two_process_shuffled_moco, args=(str(tmp_path),), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert torch.equal(r0["queue"], r1["queue"]) and r0["ptr"] == r1["ptr"] == 8
    order = torch.randperm(8, generator=torch.Generator().manual_seed(7))  # rank 0's
    x_k = torch.cat([r0["x_k"], r1["x_k"]])
    key_encoder = tiny_moco(queue_size=16, bn_splits=1).train().key_encoder  # the same initial weights
    with torch.no_grad():  # each process encodes its half of the shuffled global batch, with its own statistics
        shuffled_keys = torch.cat([key_encoder(x_k[order[:4]]), key_encoder(x_k[order[4:]])])
    expected = F.normalize(shuffled_keys, dim=1)[torch.argsort(order)]
    assert torch.allclose(r0["queue"][:8], expected, atol=1e-6)  # every key back at its image's place
    unshuffled = F.normalize(key_encoder(x_k), dim=1).detach()
    assert not torch.allclose(r0["queue"][:8], unshuffled, atol=1e-3)  # not what the batch's own order gives
