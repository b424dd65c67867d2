"""Regenerate fixtures/ts_annusha.safetensors from Annusha/temperature_schedules (TS, Kukleva et al., ICLR 2023).

    /work/refenv/bin/python tests/reference/make_ts.py /work/refs/Annusha+temperature_schedules

Runs the authors' ``train_simCLR.py: train()`` itself, one batch per call, with the README's CIFAR settings
(``--adj_tau cos --temperature_min 0.1 --temperature_max 1.0 --t_max 200 --optimizer sgd --lr 0.5 --epochs 2000
--output_ch 128``), and records:

- ``tau``: the temperature their loop hands ``nt_xent`` at each epoch of ``meta["tau_epochs"]`` (1-based, as their
  ``for epoch in range(start_epoch, args.epochs + 1)`` with ``start_epoch = 1``), read from a tiny linear model;
- ``lr_factor``: their ``cosine_annealing`` multiplier at scheduler steps 0..30 of a 30-step run with 10 warm-up
  steps (their loop calls ``scheduler.step()`` before each optimizer step, so iteration i runs at step i + 1);
- one full training step at epoch ``meta["step_epoch"]``: their ResNet-18 (CIFAR stem, ``models/resnet.py``) with
  their projection head (``models/utils.proj_head``), SGD (lr 0.5, momentum 0.9, wd 1e-4), a fresh scheduler (so the
  step runs at the first warm-up lr, 0.05) and the scheduled temperature: the loss, every gradient, the weights and
  BatchNorm buffers after the step.

What is patched, and why (their code itself is imported unchanged; sdclr_train_simclr.py, shared with
make_simclr.py, runs the step):
- ``torch.Tensor.cuda`` returns the tensor: their loop and ``nt_xent`` move tensors to the GPU; this runs on the CPU.
- one gloo process group of one rank: their loop all-gathers the projections across processes.
- ``matplotlib`` is an empty module: ``data/LT_Dataset.py`` imports it at module level and nothing here uses it.
- the model is built as their ``main()`` builds it, without DDP and SyncBatchNorm (one process: plain BatchNorm);
  ``main()`` itself cannot run: it reads ``args.n_proj_heads`` and ``args.prune``, which its parser never defines.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
import sdclr_train_simclr as train_simclr  # noqa: E402

REPO = "Annusha/temperature_schedules"
PINNED = "3ac1db63ffeb000d917c596be51d6120c19aa633"
NAME = "ts_annusha"
SEED = 29
BATCH, SIZE = 4, 32
TAU_EPOCHS = [1, 2, 50, 99, 100, 101, 150, 199, 200, 201, 300, 399, 400, 401, 600, 1000, 1999, 2000]
STEP_EPOCH = 150  # tau = 0.1 + 0.45 (1 + cos(0.75 pi)) = 0.232: between the ends, where a clock error shows
README_ARGS = ["simclr_TS", "--adj_tau", "cos", "--temperature_min", "0.1", "--temperature_max", "1.0",
               "--t_max", "200", "--optimizer", "sgd", "--lr", "0.5", "--epochs", "2000", "--output_ch", "128",
               "--model", "res18", "--scheduler", "cosine"]
LR_STEPS, LR_WARMUP = 30, 10


def temperatures(ts, args) -> torch.Tensor:
    """Their loop's tau at each of TAU_EPOCHS, from one step of a tiny linear model per epoch."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = torch.rand(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(SEED))
    for epoch in TAU_EPOCHS:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        ts.train([batch], model, optimizer, scheduler, epoch, train_simclr.Quiet(), 0, 0, 1, args=args)
    return torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in ts.nt_xent.taus[-len(TAU_EPOCHS):]])


def lr_factors(ts, args) -> torch.Tensor:
    return torch.tensor([ts.cosine_annealing(s, LR_STEPS, 1, 1e-6 / args.lr, warmup_steps=LR_WARMUP)
                         for s in range(LR_STEPS + 1)], dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of Annusha/temperature_schedules at the pinned commit")
    checkout = parser.parse_args().checkout
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, checkout)
    torch.manual_seed(SEED)
    with train_simclr.on_one_cpu_process(empty_modules=("matplotlib", "matplotlib.pyplot")):
        import train_simCLR as ts

        ts.nt_xent = train_simclr.Recorder(ts.nt_xent)
        args = ts.parser.parse_args(README_ARGS)
        tensors, meta = train_simclr.one_step(ts, args, num_classes=10, epoch=STEP_EPOCH, seed=SEED, batch=BATCH,
                                              size=SIZE)
        tensors["step_tau"] = torch.as_tensor(ts.nt_xent.taus[-1], dtype=torch.float32)
        tensors["tau"], tensors["lr_factor"] = temperatures(ts, args), lr_factors(ts, args)
    meta.update(repo=REPO, commit=commit, seed=SEED, tau_epochs=TAU_EPOCHS, step_epoch=STEP_EPOCH,
                tau_min=args.temperature_min, tau_max=args.temperature_max, t_max=args.t_max, epochs=args.epochs,
                lr=args.lr, weight_decay=train_simclr.WEIGHT_DECAY, momentum=train_simclr.MOMENTUM,
                lr_steps=LR_STEPS, lr_warmup=LR_WARMUP, batch=BATCH, size=SIZE, torch=torch.__version__,
                configured="README CIFAR command; train() with one batch per epoch; ResNet-18 (CIFAR stem) + "
                           "proj_head(512, 128); SGD lr 0.5 wd 1e-4 momentum 0.9, a fresh cosine scheduler "
                           "(10 warm-up steps of 2,000): the step runs at lr 0.05")
    print(fixture_io.save(NAME, tensors, meta), f"loss {tensors['loss'].item():.6f} tau {tensors['step_tau']:.6f}")


if __name__ == "__main__":
    main()
