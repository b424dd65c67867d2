"""Regenerate fixtures/simclr_sdclr.safetensors: SimCLR as VITA-Group/SDCLR's code runs it (its NT-Xent, its SimCLR
training step, its LARS).

    /work/refenv/bin/python tests/reference/make_simclr.py /work/refs/VITA-Group+SDCLR

Records, from the authors' modules imported unchanged:

- ``xent.*``: ``utils.nt_xent`` on fixed projections of 2N = 16 rows in their layout (rows 2k and 2k + 1 are image
  k's two views) at tau 0.1, 0.2 (their CIFAR scripts) and 0.5 (the argparse default): the loss and its gradient
  with respect to the projections;
- one full SimCLR step of ``train_simCLR.train()`` (not pruned: plain SimCLR), with the model ``main()`` builds:
  ResNet-18 with the CIFAR stem (``models/resnet.py``, ``imagenet=False``) and ``models/utils.proj_head(512, 128)``,
  SGD (lr 0.5, momentum 0.9, wd 1e-4, ``--optimizer sgd`` of cmds/shell_scrips/cifar-*-LT.sh), tau 0.2, a fresh
  cosine scheduler (10 warm-up steps of 2,000, so the step runs at lr 0.05): loss, gradients, weights and BatchNorm
  buffers after the step;
- ``lars.*``: two steps of their ``optimizer/lars.py`` (lr 0.3, momentum 0.9, eta 1e-3) on four tensors (a conv and
  a linear weight, a bias, a BN weight) with fixed gradients, at weight decay 0, at their 1e-6, and at 0.05, where
  the two trust-ratio denominators, ||g|| + wd ||w|| and ||g + wd w||, differ by more than float32 round-off.

What is patched, and why (sdclr_train_simclr.py, shared with make_ts.py, runs the step):
- ``torch.Tensor.cuda`` returns the tensor: their loop and ``nt_xent`` move tensors to the GPU; this runs on the CPU.
- one gloo process group of one rank: their loop all-gathers the projections across processes.
- ``matplotlib``, ``cv2`` are empty modules and ``torchvision.models.utils`` holds torch.hub's
  ``load_state_dict_from_url``: imported at module level by their data and model files (the last moved in
  torchvision 0.13); nothing here calls them.
- the model is built as ``main()`` builds it, without DDP and SyncBatchNorm (one process: plain BatchNorm).
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
import sdclr_train_simclr as train_simclr  # noqa: E402

REPO = "VITA-Group/SDCLR"
PINNED = "f1490fce26e6bb67d2c21b450db5a6e3184e6bc3"
NAME = "simclr_sdclr"
SEED = 30
BATCH, SIZE = 4, 32
XENT_ROWS, XENT_DIM, XENT_TAUS = 16, 24, (0.1, 0.2, 0.5)
SCRIPT_ARGS = ["simclr", "--optimizer", "sgd", "--lr", "0.5", "--temperature", "0.2", "--epochs", "2000",
               "--output_ch", "128", "--model", "res18", "--scheduler", "cosine", "--dataset", "cifar100"]
LARS_SHAPES = {"conv.weight": [8, 4, 3, 3], "linear.weight": [16, 8], "linear.bias": [16], "bn.weight": [8]}
LARS_LR, LARS_WEIGHT_DECAYS = 0.3, (0.0, 1e-6, 0.05)  # 0.05: the two trust ratios then differ visibly


def legacy_torchvision_utils() -> None:
    """models/resnet.py imports ``load_state_dict_from_url`` from ``torchvision.models.utils``, which moved to
    torch.hub in torchvision 0.13."""
    legacy = types.ModuleType("torchvision.models.utils")
    legacy.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules["torchvision.models.utils"] = legacy


def xent(utils) -> dict[str, torch.Tensor]:
    features = torch.randn(XENT_ROWS, XENT_DIM, generator=torch.Generator().manual_seed(SEED))
    tensors = {"xent.features": features}
    for tau in XENT_TAUS:
        x = features.clone().requires_grad_()
        loss = utils.nt_xent(x, t=tau)
        loss.backward()
        tensors[f"xent.loss.t{tau}"], tensors[f"xent.grad.t{tau}"] = loss.detach(), x.grad
    return tensors


def lars_steps(lars_class) -> dict[str, torch.Tensor]:
    initial = fixture_io.seeded_weights(LARS_SHAPES, SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    grads = [{k: 0.01 * torch.randn(s, generator=gen) for k, s in LARS_SHAPES.items()} for _ in range(2)]
    tensors = {**{f"lars.init.{k}": v for k, v in initial.items()},
               **{f"lars.grad{i}.{k}": v for i, g in enumerate(grads) for k, v in g.items()}}
    for wd in LARS_WEIGHT_DECAYS:
        params = {k: torch.nn.Parameter(v.clone()) for k, v in initial.items()}
        optimizer = lars_class(list(params.values()), lr=LARS_LR, momentum=0.9, weight_decay=wd, eta=1e-3)
        for i, step_grads in enumerate(grads):
            for k, p in params.items():
                p.grad = step_grads[k].clone()
            optimizer.step()
            tensors.update({f"lars.wd{wd:g}.after{i}.{k}": p.detach().clone() for k, p in params.items()})
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of VITA-Group/SDCLR at the pinned commit")
    checkout = parser.parse_args().checkout
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, checkout)
    torch.manual_seed(SEED)
    legacy_torchvision_utils()
    with train_simclr.on_one_cpu_process(empty_modules=("matplotlib", "matplotlib.pyplot", "cv2")):
        import train_simCLR as sdclr
        import utils
        from optimizer.lars import LARS

        sdclr.nt_xent = train_simclr.Recorder(sdclr.nt_xent)  # keeps the step's loss
        args = sdclr.parser.parse_args(SCRIPT_ARGS)
        tensors, meta = train_simclr.one_step(sdclr, args, num_classes=100, epoch=1, seed=SEED, batch=BATCH,
                                              size=SIZE)
        tensors.update(xent(utils))
        tensors.update(lars_steps(LARS))
    meta.update(repo=REPO, commit=commit, seed=SEED, temperature=args.temperature, lr=args.lr,
                weight_decay=train_simclr.WEIGHT_DECAY, momentum=train_simclr.MOMENTUM, epochs=args.epochs,
                warmup_steps=train_simclr.WARMUP_EPOCHS, batch=BATCH, size=SIZE, xent_taus=XENT_TAUS,
                lars_shapes=LARS_SHAPES, lars_lr=LARS_LR, lars_weight_decays=LARS_WEIGHT_DECAYS,
                lars_momentum=0.9, lars_eta=1e-3, torch=torch.__version__,
                configured="train_simCLR.train(), one batch, not pruned; ResNet-18 (CIFAR stem) + proj_head(512, "
                           "128); SGD lr 0.5 wd 1e-4 momentum 0.9 with a fresh cosine scheduler (step lr 0.05); "
                           "tau 0.2")
    print(fixture_io.save(NAME, tensors, meta), f"loss {tensors['loss'].item():.6f}")


if __name__ == "__main__":
    main()
