"""Regenerate fixtures/simsiam_fair.safetensors: one SimSiam training step of facebookresearch/simsiam's code.

    /work/refenv/bin/python tests/reference/make_simsiam_fair.py /work/refs/facebookresearch+simsiam

Their ``simsiam/builder.SimSiam`` on torchvision's ResNet-18 (``--arch resnet18``) with ``--dim 512 --pred-dim 128``
(their 2048 and 512 narrowed 4x to keep the fixture small: the 3-layer projector is 512-512-512, the predictor
512-128-512), the optimizer ``main_worker``
builds with ``--fix-pred-lr`` (SGD, momentum 0.9, wd 1e-4, the predictor in a group of its own at the initial lr),
``adjust_learning_rate`` at epoch 0 and their ``train()`` itself for one batch of 4 views of 32 x 32 (the ImageNet
stem takes them down to 1 x 1 at layer4). lr: their rule ``--lr 0.05 * 512 / 256`` = 0.1, their batch of 512.

Recorded: the inputs, the loss (their ``train()`` logs it through ``losses.update``, read back here), every gradient,
the weights after the step, the BatchNorm buffers after it. The projector's last Linear keeps a bias that their
builder freezes (``requires_grad = False``, "followed by BN"): it is drawn like any bias and stored, since it moves
that BN's running mean.

What is copied or patched, and why: the six lines of ``main_worker`` that build the optimizer (their ``main_worker``
also sets up processes and data); nothing else. Their ``train()`` runs as is on the CPU (``args.gpu`` is None).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch
import torchvision.models as models
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

REPO = "facebookresearch/simsiam"
PINNED = "a7bc1772896d0dad0806c51f0bb6f3b16d290468"
NAME = "simsiam_fair"
SEED = 31
BATCH, SIZE = 4, 32
SCRIPT_ARGS = ["unused-data-dir", "--arch", "resnet18", "--fix-pred-lr", "--batch-size", "512", "--lr", "0.05",
               "--dim", "512", "--pred-dim", "128"]


def build(builder, args) -> nn.Module:
    model = builder.SimSiam(models.__dict__[args.arch], args.dim, args.pred_dim)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(fixture_io.seeded_weights(shapes, SEED))
    return model, shapes


def optimizer_for(model: nn.Module, args) -> tuple[torch.optim.Optimizer, float]:
    """main_worker's lines, verbatim but for ``model.module`` (no DDP here)."""
    init_lr = args.lr * args.batch_size / 256
    if args.fix_pred_lr:
        optim_params = [{'params': model.encoder.parameters(), 'fix_lr': False},
                        {'params': model.predictor.parameters(), 'fix_lr': True}]
    else:
        optim_params = model.parameters()
    optimizer = torch.optim.SGD(optim_params, init_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return optimizer, init_lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of facebookresearch/simsiam at the pinned commit")
    checkout = parser.parse_args().checkout
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, checkout)
    torch.manual_seed(SEED)
    import main_simsiam
    import simsiam.builder

    args = main_simsiam.parser.parse_args(SCRIPT_ARGS)
    model, shapes = build(simsiam.builder, args)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(SEED)
    view1, view2 = torch.rand(BATCH, 3, SIZE, SIZE, generator=gen), torch.rand(BATCH, 3, SIZE, SIZE, generator=gen)
    optimizer, init_lr = optimizer_for(model, args)
    criterion = nn.CosineSimilarity(dim=1)
    main_simsiam.adjust_learning_rate(optimizer, init_lr, 0, args)
    losses = []
    real_meter = main_simsiam.AverageMeter
    main_simsiam.AverageMeter = lambda name, fmt=":f": losses.append(real_meter(name, fmt)) or losses[-1]
    with contextlib.redirect_stdout(io.StringIO()):  # their progress display
        main_simsiam.train([([view1, view2], None)], model, criterion, optimizer, 0, args)
    main_simsiam.AverageMeter = real_meter
    loss = next(m for m in losses if m.name == "Loss").val  # losses.update(loss.item(), ...): a Python float
    tensors = {"input.view1": view1, "input.view2": view2, "loss": torch.tensor(loss, dtype=torch.float32),
               **{f"init.{k}": v for k, v in initial.items()},
               **{f"grad.{k}": p.grad for k, p in model.named_parameters() if p.requires_grad},
               **{f"after.{k}": v for k, v in model.named_parameters()},
               **{f"state.{k}": v for k, v in model.named_buffers()}}
    meta = {"repo": REPO, "commit": commit, "seed": SEED, "shapes": shapes, "batch": BATCH, "size": SIZE,
            "lr": init_lr, "lrs": [g["lr"] for g in optimizer.param_groups], "momentum": args.momentum,
            "weight_decay": args.weight_decay, "dim": args.dim, "pred_dim": args.pred_dim, "arch": args.arch,
            "frozen": [k for k, p in model.named_parameters() if not p.requires_grad], "torch": torch.__version__,
            "configured": "builder.SimSiam(resnet18, 512, 128), --fix-pred-lr, SGD lr 0.05 * 512 / 256 = 0.1 at "
                          "epoch 0, momentum 0.9, wd 1e-4; train() for one batch of 4 images 32 x 32"}
    print(fixture_io.save(NAME, tensors, meta), f"loss {loss:.7f}")


if __name__ == "__main__":
    main()
