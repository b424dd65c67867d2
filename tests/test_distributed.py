"""Data-parallel training (engine/distributed.py, docs/scale-out.md): two CPU processes (gloo) at global batch B
train exactly as one process at B.

The processes are forked, so they need not import torch again, and join their group through the same
``process_group`` that ``imbssl pretrain`` uses under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import Interrupt, crash_after
from imbssl.augment import BatchRows, MultiCrop, PadCropFlip
from imbssl.config import save_config
from imbssl.data.stream import StreamedImages
from imbssl.engine import distributed
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.distributed import GlobalBatchNorm, convert_sync_batchnorm, gather_with_grad, process_group
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.errors import ImbsslError
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.pipelines.train import CRT_DIR, MODEL_FILE, TRAIN_FILE, train

METHODS = {
    "simclr": {"name": "simclr"},
    "simsiam": {"name": "simsiam"},
    # m_s = 0.99, not 0.999: the cluster sizes move ten times faster, so a wrong histogram shows at once. (ExCB's
    # sizes count hard assignments: a rounding that flips one argmax shifts them, so over many steps its runs on 1
    # and 2 processes drift apart as any two roundings of it do; this config has no such near-tie.)
    "excb": {"name": "excb", "num_clusters": 16, "size_momentum": 0.99},
    # SDCLR's pruned branch and BCL's memory: every image's loss of the global batch, and the boosted views of the
    # second epoch drawn for the whole batch
    "bcl-d": {"name": "bcl-d"},
    # MSN's mean prediction p_bar over the global batch, unevenly split; its masks drawn for the global batch; the
    # Sinkhorn-balanced targets with the global batch's marginals
    "msn": {"name": "msn", "num_clusters": 16},
    "msn-sinkhorn": {"name": "msn", "num_clusters": 16, "sinkhorn": True},
    # MoCo's keys: the key encoder's global batch shuffled across the processes (parts of 42 and 41) and put back
    # in order before the queue takes them; one BatchNorm group (bn_splits 1) so that sync_batchnorm's global
    # statistics make the split irrelevant: with groups, the processes' parts are groups of their own
    "moco": {"name": "moco", "queue_size": 200, "bn_splits": 1},
    # Focal's weight on SimCLR's gathered negatives; GH (from epoch 2) allocates the global batch, and every process
    # keeps the same memory and pi
    "focal": {"name": "focal"},
    "simclr+gh": {"name": "simclr", "gh": {"target_dim": 10, "warm_up": 1, "gh_warm_up": 0, "prior_every": 1}},
    # Barlow Twins' cross-correlation and VICReg's variances and covariances: statistics of the global batch, from the
    # embeddings each process gathers (with their gradient)
    "barlow-twins": {"name": "barlow-twins", "projector": "32-32-32"},
    "vicreg": {"name": "vicreg", "mlp": "32-32-32"},
    # DINO's centre: the mean of the teacher's outputs over the global batch (all-reduced); each tensor clipped after
    # the gradients are summed; a teacher that moves within the 12 steps
    "dino": {"name": "dino", "out_dim": 64, "momentum_teacher": 0.9},
}
#: the methods that train on multi-crop views
LOCAL_CROPS = {"excb", "msn", "msn-sinkhorn", "dino"}
#: SimSiam at its default lr (0.03) amplifies a rounding difference about tenfold a step on these 503 digits: the
#: parts' sums round otherwise than the whole batch's (3e-8 in the first loss), which grew to 2e-4 by step 9 on one
#: 2-core AMD EPYC and stayed below 1e-6 on another CPU. At 0.02 it stays at 5e-8, so the test sees the split only.
#: SimCLR, with both views in one forward (as SimCLR's, SDCLR's and BCL's code), does the same at its LARS lr of 0.3:
#: equal for 4 steps, 1e-4 apart by step 12; at 0.1 the two stay within one ulp. Focal at its SGD lr (0.1 here), with
#: BCL's head (BatchNorm on the output), grows a first 5e-7 about fifteenfold a step from the third (SimCLR with that
#: head drifts too, later; Focal with SimCLR's head does not); at 0.02 it stays within a few ulps.
OPTIM = {"simsiam": {"base_lr": 0.02}, "simclr": {"base_lr": 0.1}, "simclr+gh": {"base_lr": 0.1},
         "focal": {"base_lr": 0.02}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, timeout_s: float, work, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group("cpu", timeout_s):
        work(*args)


def run_processes(work, *args, world: int = 2, timeout_s: float = 60) -> None:
    """``work(*args)`` in ``world`` forked processes of one gloo group; a failure in any of them fails the test."""
    mp.start_processes(_join, args=(world, _free_port(), timeout_s, work, args), nprocs=world, start_method="fork")


def small_cfg(tiny_cfg, method: str, **train):
    """503 digits (exp p=10) in batches of 84 or 83, so the last batch splits 42 + 41: uneven parts are exercised."""
    return tiny_cfg(data={"subset": {"profile": "exp", "imbalance": 10}}, method=METHODS[method],
                    augment={"local_crops": 2} if method in LOCAL_CROPS else {},
                    optim={"batch_size": 100, "epochs": 2, **OPTIM.get(method, {})},
                    train={"log_every": 1, "sync_batchnorm": True, **train})


def step_losses(run: Path) -> torch.Tensor:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["train/loss"] for r in records if "train/loss" in r])


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return load_safe(run / CHECKPOINT_FILE)["method"]


# -- the parts -------------------------------------------------------------------------------------
def test_rank_rows_cut_the_batch_as_tensor_split(monkeypatch):
    for world in (1, 2, 3, 4):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        for batch in (7, 8, 83, 84):
            parts = torch.arange(batch).tensor_split(world)
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda: r)
                assert torch.equal(torch.arange(batch)[distributed.rank_rows(batch).slice], parts[r])


def test_the_views_of_a_part_are_that_part_of_the_views(tiny_cfg):
    images = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8)
    cfg = tiny_cfg(augment={"local_crops": 2, "blur_prob": 0.5}).augment
    make_views = [MultiCrop(cfg, torch.full((3,), 0.5), torch.full((3,), 0.2), image_size=16, num_global=2),
                  PadCropFlip(torch.full((3,), 0.5), torch.full((3,), 0.2))]
    for views in make_views:
        whole = views(images, torch.Generator().manual_seed(3))
        for rows in (BatchRows(9, 0, 5), BatchRows(9, 5, 9)):
            part = views(images[rows.slice], torch.Generator().manual_seed(3), rows)
            assert all(torch.equal(p, w[rows.slice]) for p, w in zip(part, whole, strict=True))


def test_sync_batchnorm_conversion_keeps_the_tensors_and_is_plain_batchnorm_on_one_process():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5),
                          nn.BatchNorm1d(5, affine=False))
    model(torch.randn(4, 3, 6, 6))
    weight, running_var = model[1].weight, model[4].running_var
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 6, 6)
    expected = model(x)
    model.load_state_dict(reference)
    convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[1], GlobalBatchNorm) and isinstance(model[4], GlobalBatchNorm)
    assert model[1].weight is weight and model[4].running_var is running_var and not model[4].affine
    assert torch.equal(model(x), expected)


def contrastive(y: torch.Tensor, anchors: slice) -> torch.Tensor:
    """A loss in which every row meets every other, averaged over ``anchors``: as SimCLR's."""
    flat = y.flatten(1)
    return torch.logsumexp(flat[anchors] @ flat.T / 10, dim=1).mean()


def _batchnorm_and_gather_step(folder: Path) -> None:
    """One process's part of a step: its rows through GlobalBatchNorm, gathered, its share of the loss, backward."""
    x, bn_state = torch.load(folder / "inputs.pt", weights_only=True)
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3).double()), torch.device("cpu"))
    model[0].load_state_dict(bn_state)
    rows = distributed.rank_rows(len(x)).slice
    mine = x[rows].clone().requires_grad_()
    gathered, where = gather_with_grad(model(mine))
    (contrastive(gathered, where) * len(mine) / len(x)).backward()
    distributed.sum_gradients(model.parameters())
    torch.save({"rows": (rows.start, rows.stop), "where": (where.start, where.stop), "y": gathered.detach(),
                "x_grad": mine.grad, "grads": [p.grad for p in model.parameters()], "state": model.state_dict()},
               folder / f"rank{distributed.rank()}.pt")


def test_global_batchnorm_and_gather_give_the_one_process_values_and_gradients(tmp_path):
    torch.manual_seed(0)
    x, bn = torch.randn(9, 3, 4, 4, dtype=torch.float64), nn.BatchNorm2d(3).double()  # 9 rows: parts of 5 and 4
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    torch.save((x, bn.state_dict()), tmp_path / "inputs.pt")
    run_processes(_batchnorm_and_gather_step, tmp_path)

    whole = x.clone().requires_grad_()
    y = bn(whole)
    contrastive(y, slice(None)).backward()
    for r in (0, 1):
        part = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        rows = slice(*part["rows"])
        assert part["where"] == part["rows"] and part["rows"] == ((0, 5), (5, 9))[r]
        assert torch.allclose(part["y"], y, atol=1e-12)  # normalised with the whole batch's statistics
        assert torch.allclose(part["x_grad"], whole.grad[rows], atol=1e-12)  # through the gather and the statistics
        assert all(torch.allclose(g, p.grad, atol=1e-12) for g, p in zip(part["grads"], bn.parameters(), strict=True))
        for key, value in bn.state_dict().items():  # running mean, unbiased variance and count as BatchNorm's
            assert torch.allclose(part["state"][f"0.{key}"], value, atol=1e-12), key


def _rank_1_hangs() -> None:
    if distributed.rank() == 1:
        time.sleep(3)
        return
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="Timed out"):
        distributed.sum_over_processes(torch.ones(1))
    assert time.perf_counter() - start < 2.5


@pytest.mark.slow
def test_a_process_that_stops_answering_fails_the_others_after_the_timeout():
    run_processes(_rank_1_hangs, timeout_s=1)


def _rank_1_dies() -> None:
    if distributed.rank() == 1:
        os._exit(0)  # as a kill -9: no goodbye to the group
    with pytest.raises(RuntimeError) as failure:
        distributed.sum_over_processes(torch.ones(1))
    assert distributed.lost_connection(failure.value), failure.value


def test_a_collective_that_loses_a_process_says_so():
    """gloo's own message for it, which process_group turns into ProcessLost and its resume command."""
    run_processes(_rank_1_dies, timeout_s=30)


# -- whole runs ------------------------------------------------------------------------------------
def _pretrain(cfg, run_dir: Path) -> None:
    pretrain(cfg, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_train_exactly_as_one_at_the_same_global_batch(tiny_cfg, tmp_path, method):
    """The same per-step losses and final weights (every parameter and buffer: BatchNorm statistics, ExCB's
    cluster sizes, its teacher): the images of each batch, their views, the BatchNorm statistics, SimCLR's
    negatives, ExCB's histogram, MSN's masks and mean prediction and the gradient are the global batch's on both
    processes."""
    cfg, one = small_cfg(tiny_cfg, method), tmp_path / "one"
    run_processes(_pretrain, cfg, one, world=1)  # one thread, as each of the two: the same kernels
    run_processes(_pretrain, cfg, tmp_path / "two")
    losses = step_losses(one)
    assert len(losses) == 12 and losses.std() > 1e-3  # 2 epochs of 6 steps that move
    assert torch.allclose(step_losses(tmp_path / "two"), losses, rtol=0, atol=1e-5)
    two = final_state(tmp_path / "two")
    for key, value in final_state(one).items():
        assert torch.allclose(two[key].double(), value.double(), rtol=0, atol=1e-4), key


def _pretrain_recording_reads(cfg, run_dir: Path) -> None:
    """``pretrain``, keeping the positions of every training image this process read from the memory map."""
    read, reads = StreamedImages.host_rows, []
    StreamedImages.host_rows = lambda self, positions: reads.append(positions.tolist()) or read(self, positions)
    pretrain(cfg, run_dir)
    (run_dir.parent / f"{run_dir.name}-reads{distributed.rank()}.json").write_text(json.dumps(reads))


@pytest.mark.slow
def test_each_process_reads_only_its_rows_of_the_global_batch(tiny_cfg, tmp_path):
    """Streamed from the memory map, each of two processes reads its own rows of each global batch (42 or 41 of 83,
    the halves tensor_split cuts), and the two together read what one process reads, each image once an epoch."""
    cfg = small_cfg(tiny_cfg, "simsiam", data_on_device=False)
    run_processes(_pretrain_recording_reads, cfg, tmp_path / "one", world=1)
    run_processes(_pretrain_recording_reads, cfg, tmp_path / "two")
    one, *two = (json.loads((tmp_path / name).read_text()) for name in ("one-reads0.json", "two-reads0.json",
                                                                          "two-reads1.json"))
    assert len(one) == len(two[0]) == len(two[1]) == 12  # 2 epochs of 6 batches, and no other read
    for whole, first, second in zip(one, *two):
        assert first + second == whole and abs(len(first) - len(second)) <= 1  # rank 0's rows, then rank 1's
    for epoch in (slice(0, 6), slice(6, 12)):
        assert sorted(sum(one[epoch], [])) == list(range(503))  # each image once an epoch
    assert sum(map(len, two[0])) + sum(map(len, two[1])) == sum(map(len, one)) == 2 * 503


def _watch_writes(root: Path) -> list[tuple[str, str]]:
    """Every file or folder this process creates, changes or removes under ``root`` from now on (audit hooks)."""
    writes = []
    changes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        else:
            path, writing = (args[0] if args else None), event in changes
        if writing and isinstance(path, (str, os.PathLike)) and str(path).startswith(str(root)):
            writes.append((event, str(path)))

    sys.addaudithook(hook)
    return writes


def _pretrain_watching_writes(cfg, run_dir: Path, root: Path) -> None:
    writes = _watch_writes(root) if distributed.rank() else []
    pretrain(cfg, run_dir)
    assert not writes, f"rank {distributed.rank()} wrote {writes}"


@pytest.mark.slow
def test_only_rank_0_writes(tiny_cfg, tmp_path):
    """Rank 1 writes nothing anywhere under tmp_path (the run folder, the data cache) while rank 0 writes the run."""
    cfg = small_cfg(tiny_cfg, "simsiam")
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 1})})
    run_processes(_pretrain_watching_writes, cfg, tmp_path / "run", tmp_path)
    written = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"config.yaml", "train.log", "subset.npz", "metrics.jsonl", CHECKPOINT_FILE.as_posix(), BACKBONE_FILE,
            "pretrain.json"} <= written
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text())["processes"] == 2


def _straight_then_interrupted_and_resumed(cfg, straight: Path, resumed: Path) -> None:
    pretrain(cfg, straight)
    with pytest.raises(Interrupt):  # every process stops after epoch 1, as a crash would
        pretrain(cfg, resumed, callbacks=[crash_after(1)])
    pretrain(cfg, resumed, resume=True)


@pytest.mark.slow
def test_a_two_process_run_resumed_after_an_interruption_matches_a_straight_one(tiny_cfg, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_processes(_straight_then_interrupted_and_resumed, small_cfg(tiny_cfg, "simclr"), straight, resumed)
    assert torch.equal(step_losses(resumed), step_losses(straight))
    reference = final_state(straight)
    assert all(torch.equal(value, reference[key]) for key, value in final_state(resumed).items())


#: classifier runs: class weights from epoch 2 (a weighted mean over the global batch), class-balanced batches from
#: epoch 2, and cRT's frozen backbone on class-balanced batches. (LDAM is left out: its cosine logits normalise
#: features that are sometimes near 0 on these digits, where a rounding of 1e-7 jumps to 1e-3 within a few steps.
#: Its DRW weights take CE-DRW's path, its sampling CE-DRS's.)
SUPERVISED = {
    "ce-drw": {"loss": {"deferral": "drw", "defer_epoch": 1}},
    "ce-drs": {"loss": {"deferral": "drs", "defer_epoch": 1}},
    "cb-focal-crt": {"loss": {"name": "focal", "reweight": "cb"}, "crt": {"enabled": True, "epochs": 1}},
}


def _train_watching_writes(cfg, run_dir: Path, root: Path) -> None:
    writes = _watch_writes(root) if distributed.rank() else []
    train(cfg, run_dir)
    assert not writes, f"rank {distributed.rank()} wrote {writes}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(SUPERVISED))
def test_two_processes_train_a_classifier_exactly_as_one(sup_cfg, tmp_path, variant):
    """imbssl train: the same per-step losses (within 1e-4 of losses near 1: the last epoch's grow from 1e-7 to 1e-5
    by rounding), selected epoch, test predictions and reported model on 1 and 2 processes at global batch 63 (parts
    of 32 and 31), rank 1 writing nothing."""
    cfg = sup_cfg(optim={"batch_size": 63, "epochs": 3, "lr": 0.02, "milestones": [2], "lr_factors": [0.1]},
                  train={"progress": False, "log_every": 1, "sync_batchnorm": True}, **SUPERVISED[variant])
    one, two = tmp_path / "one", tmp_path / "two"
    run_processes(_train_watching_writes, cfg, one, tmp_path / "one", world=1)
    run_processes(_train_watching_writes, cfg, two, tmp_path)
    for stage in ([""] + [CRT_DIR] * cfg.crt.enabled):
        losses = step_losses(one / stage)
        assert losses.std() > 1e-3 and torch.allclose(step_losses(two / stage), losses, rtol=0, atol=1e-4), stage
    results = [json.loads((run / TRAIN_FILE).read_text()) for run in (one, two)]
    for part in ("main", *(["crt"] if cfg.crt.enabled else [])):
        assert results[0][part]["selected_epoch"] == results[1][part]["selected_epoch"]
        assert results[0][part]["test"]["per_class"] == results[1][part]["test"]["per_class"]
    models = [load_safe(run / MODEL_FILE)["model"] for run in (one, two)]
    for key, value in models[0].items():
        assert torch.allclose(models[1][key].double(), value.double(), rtol=0, atol=1e-4), key


@pytest.mark.slow
def test_torchrun_launches_imbssl_pretrain(tiny_cfg, tmp_path):
    cfg = small_cfg(tiny_cfg, "simsiam")
    save_config(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 1})}), tmp_path / "run.yaml")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "imbssl", "pretrain", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "run"),
                           "--no-eval"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_torchrun_launches_imbssl_train(sup_cfg, tmp_path):
    save_config(sup_cfg(optim={"epochs": 1, "milestones": [], "lr_factors": []}), tmp_path / "train.yaml")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "imbssl", "train", str(tmp_path / "train.yaml"), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports
    assert json.loads((tmp_path / "run" / TRAIN_FILE).read_text())["processes"] == 2


def _torchrun_training(tiny_cfg, tmp_path) -> tuple[subprocess.Popen, Path, str]:
    """A long 2-process ``imbssl pretrain`` under torchrun, once its first checkpoint is written: (torchrun, run
    folder, the torchrun command that resumes it)."""
    config, run = tmp_path / "run.yaml", tmp_path / "run"
    cfg = small_cfg(tiny_cfg, "simsiam")
    save_config(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 500})}), config)
    args = ["-m", "imbssl", "pretrain", str(config), "--run-dir", str(run), "--no-eval"]
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / CHECKPOINT_FILE).exists():
        assert torchrun.poll() is None and time.monotonic() < deadline, torchrun.stderr.read()[-3000:]
        time.sleep(0.1)
    return torchrun, run, f"torchrun --standalone --nproc-per-node 2 {' '.join(args)} --resume"


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_with_the_resume_command(tiny_cfg, tmp_path):
    torchrun, run, resume = _torchrun_training(tiny_cfg, tmp_path)
    torchrun.send_signal(signal.SIGTERM)
    stderr = torchrun.communicate(timeout=120)[1]
    assert _error_lines(stderr) == [f"Error: terminated (SIGTERM); continue with `{resume}`"] * 2, stderr[-3000:]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]
    log = (run / "train.log").read_text()
    assert "ERROR imbssl: run terminated (SIGTERM)" in log and "ERROR imbssl: rank 1: run terminated (SIGTERM)" in log


@pytest.mark.slow
def test_a_dead_rank_0_leaves_rank_1_the_resume_command_and_a_line_in_train_log(tiny_cfg, tmp_path):
    torchrun, run, resume = _torchrun_training(tiny_cfg, tmp_path)
    rank_0 = int((run / ".lock").read_text().split()[2])  # "imbssl process PID on HOST ..."
    os.kill(rank_0, signal.SIGKILL)
    stderr = torchrun.communicate(timeout=120)[1]
    errors = _error_lines(stderr)
    assert len(errors) == 1 and errors[0].endswith(f"; continue with `{resume}`"), stderr[-3000:]
    assert "ERROR imbssl: rank 1: run " in (run / "train.log").read_text()


def _reproduce(out: Path, processes: int) -> subprocess.CompletedProcess:
    """``imbssl reproduce experiment-1`` on digits: one SimSiam run of 2 epochs (BatchNorm over the global batch),
    under torchrun or on its own."""
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [])
    grid = ["--set", "seeds=[0]", "--set", "methods=[simsiam]", "--set", "subset_keys=[imbalanced-p10]",
            "--set", "base.optim.epochs=2", "--set", "base.eval.linear.epochs=5",
            "--set", "base.train.sync_batchnorm=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets for each process: the same kernels
    return subprocess.run([sys.executable, *launcher, "-m", "imbssl", "reproduce", "experiment-1", "--preset", "demo",
                           "--out", str(out), *grid], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_a_recipe_under_torchrun_trains_data_parallel_and_reports_once(tmp_path):
    runs = {n: _reproduce(tmp_path / f"{n}proc", n) for n in (1, 2)}
    for done in runs.values():
        assert done.returncode == 0, done.stderr[-3000:]
    assert runs[2].stdout.count("report:") == 1  # rank 0 alone evaluates and reports
    run = Path("runs/imbalanced-p10/simsiam/seed0")
    assert json.loads((tmp_path / "2proc" / run / "pretrain.json").read_text())["processes"] == 2
    one, two = (load_safe(tmp_path / f"{n}proc" / run / BACKBONE_FILE)["backbone"] for n in (1, 2))
    for key, value in one.items():
        assert torch.allclose(two[key].double(), value.double(), rtol=0, atol=1e-4), key
    assert (tmp_path / "2proc" / run / "eval.json").exists() and (tmp_path / "2proc" / "table.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["experiment-2", "semi-supervised"])
def test_recipes_that_are_not_data_parallel_refuse_torchrun(monkeypatch, recipe):
    from imbssl.recipes import recipe as schema
    from imbssl.recipes.grid import run_cells

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    cells = schema(recipe)().cells(Path("unused"))
    with pytest.raises(ImbsslError, match="runs on one process only; start it without torchrun"):
        run_cells(cells, recipe)


# -- MoCo's shuffling BN across processes (moco/builder.py _batch_shuffle_ddp / _batch_unshuffle_ddp) -------------
def _reference_fixture(name: str):
    sys.path.insert(0, str(Path(__file__).parent / "reference"))
    import fixture_io

    return fixture_io.load(name)


def row_function(x: torch.Tensor) -> torch.Tensor:
    """The key encoder's stand-in in fixtures/moco-shuffle_ddp (make_moco.py): a function of each row alone."""
    return 2 * x.flatten(1) + 1


def _shuffle_and_unshuffle(folder: Path, x: torch.Tensor, order: torch.Tensor | None) -> None:
    """This process's rows of ``x`` shuffled with its ``order`` (rank 0's wins), mapped row by row, unshuffled."""
    mine = x[distributed.rank_rows(len(x)).slice]
    shuffled, used, where = distributed.shuffle_global_batch(mine, order)
    back = distributed.unshuffle_global_batch(row_function(shuffled), used)
    torch.save({"shuffled": shuffled, "order": used, "where": (where.start, where.stop), "back": back},
               folder / f"rank{distributed.rank()}.pt")


def _shuffle_as_builder(folder: Path) -> None:
    fixture = _reference_fixture("moco-shuffle_ddp")
    x, theirs = fixture["input.x"], fixture["order"]
    # rank 1 brings a permutation of its own: builder.py broadcasts rank 0's, and so must we
    order = theirs.clone() if distributed.rank() == 0 else torch.flip(theirs, [0])
    _shuffle_and_unshuffle(folder, x, order)


def test_moco_shuffle_across_processes_is_builders_and_is_undone_exactly(tmp_path):
    fixture = _reference_fixture("moco-shuffle_ddp")
    run_processes(_shuffle_as_builder, tmp_path)
    x = fixture["input.x"]
    for r in (0, 1):
        part = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.equal(part["order"], fixture["order"])  # rank 0's permutation on both
        assert torch.equal(part["shuffled"], fixture[f"rank{r}.shuffled"])  # the rows builder.py gave this process
        where = slice(*part["where"])
        assert torch.equal(part["back"][where], fixture[f"rank{r}.unshuffled"])  # builder.py's own rows back
        assert torch.equal(part["back"], row_function(x))  # and every row of the global batch, in its order


def _shuffle_uneven(folder: Path) -> None:
    torch.manual_seed(distributed.rank())  # each draws its own permutation; rank 0's is used
    x = torch.arange(9 * 2, dtype=torch.float32).view(9, 2)
    _shuffle_and_unshuffle(folder, x, None)


def test_moco_shuffle_of_uneven_parts_is_a_permutation_undone_exactly(tmp_path):
    """Parts of 5 and 4 rows, which builder.py refuses: each process gets as many shuffled rows as it holds, all
    of them together are the permuted global batch, and unshuffling returns it in order, bit for bit."""
    run_processes(_shuffle_uneven, tmp_path)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    x = torch.arange(9 * 2, dtype=torch.float32).view(9, 2)
    order = parts[0]["order"]
    assert torch.equal(parts[1]["order"], order) and sorted(order.tolist()) == list(range(9))
    assert [len(p["shuffled"]) for p in parts] == [5, 4]
    assert torch.equal(torch.cat([p["shuffled"] for p in parts]), x[order])
    assert all(torch.equal(p["back"], row_function(x)) for p in parts)


def test_moco_shuffle_on_one_process_is_indexing_alone():
    x, order = torch.randn(6, 3), torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled, used, where = distributed.shuffle_global_batch(x, order)
    assert torch.equal(shuffled, x[order]) and used is order and where == slice(0, 6)
    assert torch.equal(distributed.unshuffle_global_batch(shuffled, order), x)
    with pytest.raises(ValueError, match="a permutation of 5 rows for a global batch of 6"):
        distributed.shuffle_global_batch(x, order[:5])
