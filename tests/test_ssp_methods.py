"""Rotation and MoCo v2 (methods/rotation.py, methods/moco.py), the SSP methods of Yang & Xu (2020), and the
cross-process helpers MoCo needs (engine/distributed.py)."""
import copy
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from imbssl.config import MethodConfig
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.distributed import gather, sum_over_processes
from imbssl.engine.runlog import read_metrics
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.methods import build_method, rotate_four_ways
from imbssl.models import SmallCNN
from imbssl.pipelines.common import load_encoder
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import BACKBONE_FILE, SUMMARY_FILE, pretrain

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


def test_rotation_learns_to_tell_rotations_on_digits(tiny_cfg, tmp_path):
    # 2 epochs of 11 steps: rotation_acc averages about 0.52, then 0.60 over the epoch on CPU (chance is 0.25).
    cfg = tiny_cfg(method={"name": "rotation"}, augment=WEAK_VIEWS, optim={"epochs": 2}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    epochs = [r for r in read_metrics(run) if "epoch/rotation_acc" in r]
    first, last = epochs[0], epochs[-1]
    assert last["epoch/rotation_acc"] > 0.45 and last["epoch/rotation_acc"] > first["epoch/rotation_acc"]
    assert 0 < last["epoch/output_std"] and load_safe(run / BACKBONE_FILE)["heads"] == {}  # no projector space
    result = evaluate_run(run)  # the linear probe and k-NN read the rotation backbone unchanged
    assert result["linear"]["top1"] > 10 and result["knn5"]["top1"] > 10  # above the 10% of chance


# -- MoCo ------------------------------------------------------------------------------------------
def tiny_moco(**settings) -> torch.nn.Module:
    cfg = MethodConfig(**{"name": "moco", "proj_hidden": 16, "proj_dim": 8, "queue_size": 10, **settings})
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
    method.on_step_end(0, 10, optimizer)
    for k, b, q in zip(key_params, before, query_params, strict=True):
        assert torch.allclose(k, 0.9 * b + 0.1 * q, atol=1e-6)  # k <- m k + (1 - m) q
    assert any(not torch.equal(k, b) for k, b in zip(key_params, before))


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


def test_moco_run_evaluates_in_backbone_and_projector_space(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method={"name": "moco", "queue_size": 256}, optim={"epochs": 1}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    assert 0 <= last_epoch(run)["epoch/instance_acc"] <= 1
    result = evaluate_run(run)
    assert result["linear"]["top1"] > 10 and result["knn5"]["top1"] > 10
    _, heads, _ = load_encoder(cfg, 1, run / BACKBONE_FILE, "projector")
    assert list(heads) == ["projector"] and heads["projector"][-1].out_features == cfg.method.proj_dim


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
        method = tiny_moco(queue_size=16).train()  # the same initial weights and queue on both processes
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
