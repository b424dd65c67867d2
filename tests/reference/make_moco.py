"""Regenerate the facebookresearch/moco fixtures: one training step of MoCo's CIFAR-10 demo (``ModelMoCo``, its split
BatchNorm and single-GPU key shuffle) with MoCo v2's MLP head, and builder.py's batch shuffle across two processes
(He et al., CVPR 2020, Sec. 3.3 "Shuffling BN"; Chen et al. 2020, MoCo v2).

Run in the REFERENCE environment (torch 2.14.1), never with imbssl:

    /work/refenv/bin/python tests/reference/make_moco.py /work/refs/facebookresearch+moco

The checkout must be at PINNED (moco/builder.py) and hold the ``colab-notebook`` branch at PINNED_DEMO, whose
``colab/moco_cifar10_demo.ipynb`` is read with ``git show`` (the notebook is not in PINNED's tree). It writes:

- fixtures/moco-step.safetensors: the two views, the key encoder's permutation of the batch, the loss, every
  gradient of the query encoder, both encoders' weights and BatchNorm statistics after the step (the key encoder's
  after the momentum update that the demo makes at the start of the next forward), the queue (fingerprint), the
  block of it the step wrote, and the pointer;
- fixtures/moco-shuffle_ddp.safetensors: a global batch of 8 rows on two gloo processes, each process's rows after
  builder.py's ``_batch_shuffle_ddp`` and a row-wise function of them after ``_batch_unshuffle_ddp``.

Their code runs with these patches, all here:

- the notebook's cells that define SplitBatchNorm, ModelBase and ModelMoCo are executed with ``.cuda()`` removed
  from their text (three calls: the permutation, the labels, the loss; this machine has no GPU), the cells that
  download CIFAR-10, build ``args`` or train are not run, and the imports they rely on come from here;
- the demo takes a torchvision ResNet by name (``getattr(resnet, arch)``); it is handed "resnet10", torchvision's
  own ResNet class with one BasicBlock per stage, to keep the step small (ModelBase replaces its stem and drops its
  max-pool as for ResNet-18);
- MoCo v2's head: builder.py's ``mlp=True`` lines (``fc`` -> Linear(dim_mlp, dim_mlp), ReLU, ``fc``) applied to
  both of the demo's encoders, whose ModelBase ends in the v1 linear ``fc``;
- builder.py's ``_batch_shuffle_ddp`` calls ``torch.randperm(...).cuda()``: ``torch.Tensor.cuda`` returns the
  tensor itself in the two shuffle processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

PINNED = "7397dfe146c7ca6bbb58e9c382498069178ba764"  # master: moco/builder.py
PINNED_DEMO = "f7364915bc4e9161427d7c6bb4f454fa0f171337"  # origin/colab-notebook
NOTEBOOK = "colab/moco_cifar10_demo.ipynb"
REPO = "facebookresearch/moco"
SEED = 29
#: the demo's defaults (--moco-dim 128, --moco-k 4096, --moco-m 0.99, --moco-t 0.1, --bn-splits 8, lr 0.06, wd 5e-4,
#: SGD momentum 0.9; the notebook sets symmetric = False), on a batch of 16 images of 16 x 16 (two per BN group)
DEMO = {"dim": 128, "K": 4096, "m": 0.99, "T": 0.1, "arch": "resnet10", "bn_splits": 8, "symmetric": False}
OPTIM = {"lr": 0.06, "weight_decay": 5e-4, "momentum": 0.9}
BATCH, IMAGE_SIZE = 16, 16
#: the queue's pointer before the step: its last block, so the step's enqueue wraps it to 0
START_PTR = DEMO["K"] - BATCH
#: builder.py's shuffle: a global batch of 8 rows of [3, 4, 4] on 2 processes, 4 each (builder.py needs equal parts)
SHUFFLE_ROWS, SHUFFLE_PROCESSES = 8, 2


def git(checkout: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True).stdout


# -- the CIFAR-10 demo's one step ------------------------------------------------------------------
def their_demo_classes(checkout: Path) -> dict:
    """SplitBatchNorm, ModelBase and ModelMoCo, from the notebook's own cells (patched as the module says)."""
    from torchvision.models import resnet as torchvision_resnet

    cells = ["".join(c["source"]) for c in json.loads(git(checkout, "show", f"{PINNED_DEMO}:{NOTEBOOK}"))["cells"]
             if c["cell_type"] == "code"]
    encoder_cell = next(c for c in cells if "class SplitBatchNorm" in c)
    moco_cell = next(c for c in cells if "class ModelMoCo" in c).split("# create model")[0]  # not: build with args
    resnet10 = partial(torchvision_resnet.ResNet, torchvision_resnet.BasicBlock, [1, 1, 1, 1])
    namespace = {"torch": torch, "nn": nn, "F": F, "partial": partial,
                 "resnet": types.SimpleNamespace(resnet10=resnet10)}
    for cell in (encoder_cell, moco_cell):
        exec(compile(cell.replace(".cuda()", ""), NOTEBOOK, "exec"), namespace)
    return namespace


def with_v2_head(encoder: nn.Module) -> None:
    """builder.py's ``mlp=True``: the last Linear (``fc``) becomes Linear(dim_mlp, dim_mlp), ReLU, fc."""
    fc = encoder.net[-1]
    dim_mlp = fc.weight.shape[1]
    encoder.net[-1] = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), fc)


def their_step(demo: dict) -> tuple[dict, dict]:
    model = demo["ModelMoCo"](**DEMO)
    for encoder in (model.encoder_q, model.encoder_k):
        with_v2_head(encoder)
    shapes = {name: list(t.shape) for name, t in model.encoder_q.state_dict().items()}
    weights = fixture_io.seeded_weights(shapes, SEED)
    # The demo copies the query encoder's parameters into the key encoder; their BatchNorm buffers are equal too (both
    # freshly built), so the key encoder takes the same seeded state.
    model.encoder_q.load_state_dict(weights)
    model.encoder_k.load_state_dict(weights)
    queue_shape = [DEMO["dim"], DEMO["K"]]
    with torch.no_grad():
        model.queue.copy_(F.normalize(fixture_io.seeded_weights({"queue": queue_shape}, SEED + 1)["queue"], dim=0))
        model.queue_ptr[0] = START_PTR
    initial_queue = model.queue.clone()

    gen = torch.Generator().manual_seed(SEED)
    im_q, im_k = (torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) for _ in range(2))
    recorded = {}
    shuffle = model._batch_shuffle_single_gpu

    def recording_shuffle(x):
        shuffled, idx_unshuffle = shuffle(x)
        recorded["idx_unshuffle"] = idx_unshuffle
        return shuffled, idx_unshuffle

    model._batch_shuffle_single_gpu = recording_shuffle
    optimizer = torch.optim.SGD(model.parameters(), **OPTIM)  # the demo's: every parameter, the keys' get no grad
    torch.manual_seed(SEED)  # their torch.randperm
    # the demo's train(): net.train(), loss = net(im_1, im_2), zero_grad, backward, step
    model.train()
    loss = model(im_q, im_k)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model._momentum_update_key_encoder()  # what the next forward does first: the key encoder after this step

    order = torch.argsort(recorded["idx_unshuffle"])
    tensors = {"input.im_q": im_q, "input.im_k": im_k, "input.key_order": order, "init.queue": initial_queue,
               **{f"init.{k}": v for k, v in weights.items()}, "loss": loss.detach(),
               **{f"grad.encoder_q.{n}": p.grad for n, p in model.encoder_q.named_parameters()},
               **{f"after.encoder_q.{k}": v for k, v in model.encoder_q.state_dict().items()},
               **{f"after.encoder_k.{k}": v for k, v in model.encoder_k.state_dict().items()},
               "state.queue": model.queue, "state.queue_block": model.queue[:, START_PTR:],
               "state.queue_ptr": model.queue_ptr}
    meta = {"shapes": shapes, "queue_shape": queue_shape, "queue_seed": SEED + 1, "start_ptr": START_PTR,
            "demo": DEMO, "optim": OPTIM, "batch": BATCH, "image_size": IMAGE_SIZE,
            "views": "randn(16, 3, 16, 16) twice from Generator().manual_seed(seed): im_q, then im_k",
            "queue_init": "normalize(seeded_weights({'queue': [dim, K]}, seed + 1)['queue'], dim=0), as the demo "
                          "normalises its randn(dim, K)",
            "order": "key_order = argsort(idx_unshuffle) of the demo's _batch_shuffle_single_gpu: the key encoder "
                     "sees im_k[key_order]",
            "after": "the step's SGD update; the key encoder after _momentum_update_key_encoder, which the demo runs "
                     "at the start of the next forward"}
    return tensors, meta


# -- builder.py's shuffle across processes ---------------------------------------------------------
def row_function(x: torch.Tensor) -> torch.Tensor:
    """What the key encoder stands for in the shuffle fixture: a function of each row alone."""
    return 2 * x.flatten(1) + 1


def _their_shuffle(rank: int, checkout: str, folder: str) -> None:
    sys.path.insert(0, checkout)
    import moco.builder

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # their randperm(...).cuda(): no GPU here
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=SHUFFLE_PROCESSES)
    try:
        x = torch.load(f"{folder}/x.pt", weights_only=True)
        part = len(x) // SHUFFLE_PROCESSES
        mine = x[rank * part:(rank + 1) * part]
        torch.manual_seed(100 + rank)  # each process draws its own permutation: rank 0's is broadcast
        shuffled, idx_unshuffle = moco.builder.MoCo._batch_shuffle_ddp(None, mine)
        back = moco.builder.MoCo._batch_unshuffle_ddp(None, row_function(shuffled), idx_unshuffle)
        torch.save({"shuffled": shuffled, "idx_unshuffle": idx_unshuffle, "unshuffled": back},
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def their_shuffle(checkout: Path) -> tuple[dict, dict]:
    x = torch.randn(SHUFFLE_ROWS, 3, 4, 4, generator=torch.Generator().manual_seed(SEED))
    with tempfile.TemporaryDirectory() as folder:
        torch.save(x, f"{folder}/x.pt")
        mp.start_processes(_their_shuffle, args=(str(checkout), folder), nprocs=SHUFFLE_PROCESSES,
                           start_method="fork")
        parts = [torch.load(f"{folder}/rank{r}.pt", weights_only=True) for r in range(SHUFFLE_PROCESSES)]
    assert all(torch.equal(p["idx_unshuffle"], parts[0]["idx_unshuffle"]) for p in parts)
    tensors = {"input.x": x, "order": torch.argsort(parts[0]["idx_unshuffle"]),
               **{f"rank{r}.shuffled": p["shuffled"] for r, p in enumerate(parts)},
               **{f"rank{r}.unshuffled": p["unshuffled"] for r, p in enumerate(parts)}}
    meta = {"processes": SHUFFLE_PROCESSES, "row_function": "2 * x.flatten(1) + 1, applied to the shuffled rows",
            "order": "the permutation rank 0 drew and broadcast: rank r's shuffled rows are "
                     "x[order.view(processes, -1)[r]]",
            "seeds": "x from Generator().manual_seed(seed); torch.manual_seed(100 + rank) before the shuffle"}
    return tensors, meta


def main(checkout: Path) -> None:
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    demo_commit = fixture_io.pinned_checkout(checkout, PINNED_DEMO, ref="origin/colab-notebook")
    torch.set_num_threads(1)
    common = {"repo": REPO, "commit": commit, "demo_commit": demo_commit, "seed": SEED,
              "torch": torch.__version__}
    tensors, meta = their_step(their_demo_classes(checkout))
    print(fixture_io.save("moco-step", tensors, {**common, **meta, "source": f"{NOTEBOOK} ModelMoCo (demo_commit) "
                                                                           f"with moco/builder.py's mlp head"}))
    tensors, meta = their_shuffle(checkout)
    print(fixture_io.save("moco-shuffle_ddp", tensors, {**common, **meta, "source": "moco/builder.py "
                                                                                   "_batch_shuffle_ddp, "
                                                                                   "_batch_unshuffle_ddp"}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} /path/to/facebookresearch+moco")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]).resolve())
