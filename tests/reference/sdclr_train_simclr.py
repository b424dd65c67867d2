"""What make_simclr.py and make_ts.py share (the reference env): one step of ``train_simCLR.train()`` as written in
VITA-Group/SDCLR and in its fork Annusha/temperature_schedules, on one CPU process, with the model and optimizer
their ``main()`` builds. Their code is imported unchanged.

What is patched, and why:
- the modules a script names are empty: their data files import them at module level, nothing here uses them.
- ``torch.Tensor.cuda`` returns the tensor: their loop and ``nt_xent`` move tensors to the GPU; this runs on the CPU.
- one gloo process group of one rank: their loop all-gathers the projections across processes.
- the model is built as ``main()`` builds it, without DDP and SyncBatchNorm (one process: plain BatchNorm).
"""
from __future__ import annotations

import sys
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

#: main()'s SGD for --optimizer sgd, and its cosine schedule's warm-up in epochs (one batch per epoch here)
WEIGHT_DECAY, MOMENTUM, WARMUP_EPOCHS = 1e-4, 0.9, 10


@contextmanager
def on_one_cpu_process(empty_modules: tuple[str, ...]) -> Iterator[None]:
    """Their code on the CPU in a process group of one, the ``empty_modules`` stubbed; the group closed after."""
    for name in empty_modules:
        sys.modules[name] = types.ModuleType(name)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # their .cuda() calls: this runs on the CPU
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)  # their all_gather
        yield
        dist.destroy_process_group()


class Quiet:
    """Their loop logs through ``log.info``; nothing to print here."""

    @staticmethod
    def info(message: str) -> None:
        pass


class Recorder:
    """Wraps their ``nt_xent`` to keep the temperature their loop passes it (``t``) and the loss it returns."""

    def __init__(self, nt_xent) -> None:
        self.nt_xent, self.taus, self.losses = nt_xent, [], []

    def __call__(self, x, t=0.5, **kwargs):
        self.taus.append(t)
        self.losses.append(self.nt_xent(x, t=t, **kwargs))
        return self.losses[-1]


def one_step(code, args, num_classes: int, epoch: int, seed: int, batch: int,
             size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One step of their ``train()`` (``code``: their train_simCLR module, its ``nt_xent`` a ``Recorder``) at
    ``epoch`` on one batch of two uniform views [batch, 3, size, size]: main()'s ResNet-18 (CIFAR stem) with
    ``fc = proj_head(512, args.output_ch)`` and seeded weights, SGD (lr args.lr, momentum 0.9, wd 1e-4) and a fresh
    cosine scheduler (10 warm-up steps of args.epochs), so that the step runs at the first warm-up lr. Returns the
    views, the loss, ``init.``, ``grad.``, ``after.`` and ``state.`` (the BatchNorm buffers), and meta."""
    from models.resnet import resnet18
    from models.utils import proj_head

    model = resnet18(pretrained=False, imagenet=False, num_classes=num_classes)
    model.fc = proj_head(model.fc.in_features, args.output_ch)  # main(): one head, not pruned
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    initial = fixture_io.seeded_weights(shapes, seed)
    missing, unexpected = model.load_state_dict(initial, strict=False)
    assert sorted(missing) == ["normalize.mean", "normalize.std"] and not unexpected  # their fixed constants
    gen = torch.Generator().manual_seed(seed)
    view1, view2 = torch.rand(batch, 3, size, size, generator=gen), torch.rand(batch, 3, size, size, generator=gen)
    images = torch.stack([view1, view2], dim=1)  # their dataset's item: the two views of one image, stacked
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # main(), cosine; one batch per epoch
        optimizer, lr_lambda=lambda step: code.cosine_annealing(step, args.epochs, 1, 1e-6 / args.lr,
                                                                warmup_steps=WARMUP_EPOCHS))
    code.train([images], model, optimizer, scheduler, epoch, Quiet(), 0, 0, 1, args=args)
    # their loop zeroes the gradients before the backward pass, so after it they are still the step's
    tensors = {"input.view1": view1, "input.view2": view2, "loss": code.nt_xent.losses[-1].detach(),
               **{f"init.{k}": v for k, v in initial.items()},
               **{f"grad.{k}": p.grad for k, p in model.named_parameters()},
               **{f"after.{k}": v for k, v in model.named_parameters()},
               **{f"state.{k}": v for k, v in model.named_buffers() if not k.startswith("normalize.")}}
    meta = {"shapes": shapes, "normalize_mean": model.normalize.mean.tolist(),
            "normalize_std": model.normalize.std.tolist(), "step_lr": optimizer.param_groups[0]["lr"]}
    return tensors, meta
