"""Regenerate fixtures/barlow_twins.safetensors: one training step of facebookresearch/barlowtwins' main.py, their loss
on fixed embeddings, their LARS and lr schedule, and lightly's BarlowTwinsLoss on the same embeddings.

    /work/refenv/bin/python tests/reference/make_barlow_twins.py /work/refs/facebookresearch+barlowtwins

Records, from their main.py imported unchanged (torch 2.14.1, lightly 1.6.0):

- ``terms.*``: their ``BarlowTwins.forward`` on fixed embeddings z1, z2 (12 rows of 16; the backbone and the projector
  the identity, --batch-size 12) at lambda 0 (the invariance term alone), 0.0051 (their default) and 1 (the two terms'
  sum): the loss and its gradients. ``lightly.*``: lightly's ``BarlowTwinsLoss`` on the same at lambda_param 0, 0.0051
  and 1, and at its own default (5e-3, ``lightly.default``);
- one step of their ``main_worker`` itself, for one epoch of one batch of 16 pairs of 16 x 16 views at --batch-size 16
  and --projector 64-64-64, their other flags at their defaults (--lambd 0.0051, --learning-rate-weights 0.2,
  --learning-rate-biases 0.0048, --weight-decay 1e-6): the loss (from the stats line it prints), every gradient, the
  weights after the step, their change in it, the BatchNorm buffers of the backbone and the projector, and the two
  groups' lr;
- ``lars.*``: their ``LARS`` as main_worker builds it (weight_decay_filter and lars_adaptation_filter True) for two
  steps on a 2-d weight and a 1-d bias with given gradients, at lr 0.5 and weight decay 0.1, large enough that the
  weight decay and its exclusion show;
- ``schedule.lr``: their ``adjust_learning_rate`` at every step of a run of 20 epochs of 3 steps, both groups' lr.

The encoder is imbssl's SmallCNN at width 0.5 (make_align_uniform's ``small_cnn_body``) in place of their ResNet-50,
which needs 224 px crops; their projector's first Linear, which main.py sizes for ResNet-50's 2048 features, is rebuilt
as the same Linear (without bias) from the stand-in's 128. Weights are ``fixture_io.seeded_weights`` from the names and
shapes kept in the metadata. Their ``bn`` (the BatchNorm without affine on z1 and z2) keeps running statistics that
nothing reads (the loss uses the batch's, evaluation the backbone alone): they are not recorded, and imbssl keeps none.

What is patched around main_worker, and why (one CPU process, no GPU):
- ``torch.distributed.init_process_group``: a no-op; this script has already made a gloo group of one process (their
  NCCL needs GPUs), in which their ``all_reduce`` of C is the identity;
- ``torch.cuda.set_device``, ``nn.Module.cuda`` and ``torch.Tensor.cuda``: no-ops, everything stays on the CPU;
- ``nn.SyncBatchNorm.convert_sync_batchnorm``: the identity, as SyncBatchNorm refuses CPU tensors; on one process it
  is BatchNorm;
- ``nn.parallel.DistributedDataParallel``: built without ``device_ids``, which CPU modules refuse (its average of one
  process's gradients is the identity);
- ``torchvision.models.resnet50`` and ``main.BarlowTwins``: the encoder above, the projector's first Linear and the
  seeded weights;
- ``torchvision.datasets.ImageFolder`` and ``torch.utils.data.DataLoader``: the one batch, already normalised;
- ``main.adjust_learning_rate``: called at step 10 rather than 0. At one step an epoch their warm-up is 10 steps and
  step 0 runs at lr 0, where nothing would move; step 10, the warm-up's end, runs at the peak lr, batch size / 256
  times --learning-rate-weights (0.0125) and --learning-rate-biases (0.0003), whatever --epochs is.
Their GradScaler and autocast find no CUDA and disable themselves: the step is fp32.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator
from unittest import mock

import torch
import torch.distributed as dist
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
from make_align_uniform import SIZE, WIDTHS, small_cnn_body  # noqa: E402

REPO = "facebookresearch/barlowtwins"
PINNED = "8e8d284ca0bc02f88b92328e53f9b901e86b4a3c"
NAME = "barlow_twins"
SEED = 34
BATCH, PROJECTOR = 16, "64-64-64"
STEP = 10  # the end of their warm-up at one step an epoch: the peak lr
TERM_ROWS, TERM_DIM, LAMBDS = 12, 16, (0.0, 0.0051, 1.0)
LARS_LR, LARS_WD = 0.5, 0.1
SCHEDULE_EPOCHS, SCHEDULE_STEPS = 20, 3


def barlow_args(main, *flags: str) -> argparse.Namespace:
    """main.py's argparse at its defaults but ``flags``, on one process."""
    args = main.parser.parse_args(["unused-data-dir", *flags])
    args.rank, args.world_size, args.dist_url = 0, 1, "unused: the group exists"
    return args


def terms(main) -> dict[str, torch.Tensor]:
    """Their forward's loss on fixed embeddings (backbone and projector the identity), and lightly's."""
    from lightly.loss import BarlowTwinsLoss

    gen = torch.Generator().manual_seed(SEED)
    z1, z2 = (torch.randn(TERM_ROWS, TERM_DIM, generator=gen) for _ in range(2))
    z2 = 0.6 * z1 + 0.8 * z2  # correlated with z1, as two views' embeddings are
    tensors = {"terms.z1": z1, "terms.z2": z2}
    args = barlow_args(main, "--batch-size", str(TERM_ROWS), "--projector", str(TERM_DIM))
    with mock.patch.object(torchvision.models, "resnet50", lambda **kwargs: nn.Identity()):
        model = main.BarlowTwins(args)
    model.projector = nn.Identity()
    for lambd in LAMBDS:
        model.args.lambd = lambd
        theirs = ({"": z1.clone().requires_grad_(), "lightly": z1.clone().requires_grad_()},
                  {"": z2.clone().requires_grad_(), "lightly": z2.clone().requires_grad_()})
        losses = {"": model(theirs[0][""], theirs[1][""]),
                  "lightly": BarlowTwinsLoss(lambda_param=lambd)(theirs[0]["lightly"], theirs[1]["lightly"])}
        for who, loss in losses.items():
            loss.backward()
            key = f"{who or 'terms'}.lambda={lambd:g}/"
            tensors.update({f"{key}loss": loss.detach(), f"{key}grad_z1": theirs[0][who].grad,
                            f"{key}grad_z2": theirs[1][who].grad})
    tensors["lightly.default"] = BarlowTwinsLoss()(z1, z2)
    return tensors


# -- shared with make_vicreg.py --------------------------------------------------------------------
@contextlib.contextmanager
def process_group_of_one() -> Iterator[None]:
    """A gloo group of this one process, in which their collectives (all_reduce, all_gather) run as written."""
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def loop_on_one_cpu(views: list[torch.Tensor]) -> Iterator[io.StringIO]:
    """Their training loop on the CPU, on one batch of ``views``: the patches both scripts' docstrings list (.cuda,
    SyncBatchNorm, DDP's device_ids, the dataset and its loader). Yields what the loop prints."""
    real_ddp, printed = nn.parallel.DistributedDataParallel, io.StringIO()
    images = len(views[0])
    one_batch = [(tuple(views), torch.zeros(images, dtype=torch.long))]
    with mock.patch.object(nn.Module, "cuda", lambda self, device=None: self), \
            mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self), \
            mock.patch.object(nn.SyncBatchNorm, "convert_sync_batchnorm", lambda module, group=None: module), \
            mock.patch.object(nn.parallel, "DistributedDataParallel", lambda module, device_ids: real_ddp(module)), \
            mock.patch.object(torchvision.datasets, "ImageFolder", lambda root, transform: list(range(images))), \
            mock.patch.object(torch.utils.data, "DataLoader", lambda dataset, **kwargs: one_batch), \
            warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")  # GradScaler's and autocast's: no CUDA, disabled
        yield printed


def printed_stats(printed: io.StringIO) -> dict:
    """The one stats line (JSON) their loop printed."""
    stats = [json.loads(line) for line in printed.getvalue().splitlines() if line.startswith("{")]
    assert len(stats) == 1, stats
    return stats[0]


def step_tensors(views: list[torch.Tensor], loss: float, model: nn.Module, initial: dict[str, torch.Tensor],
                 buffers: Iterable[str]) -> dict[str, torch.Tensor]:
    """What a fixture records of the step: the views, the loss, the initial weights, every gradient, the weights
    after the step and their change in it, and ``buffers`` after it."""
    state = dict(model.named_buffers())
    return {"input.view1": views[0], "input.view2": views[1], "loss": torch.tensor(loss, dtype=torch.float32),
            **{f"init.{k}": v for k, v in initial.items()},
            **{f"grad.{k}": p.grad for k, p in model.named_parameters()},
            **{f"after.{k}": p for k, p in model.named_parameters()},
            **{f"update.{k}": p.detach() - initial[k] for k, p in model.named_parameters()},
            **{f"state.{k}": state[k] for k in buffers}}


def lars_steps(make_lars: Callable[[nn.Parameter, nn.Parameter], torch.optim.Optimizer],
               seed: int) -> dict[str, torch.Tensor]:
    """Two steps of their LARS, ``make_lars(weight, bias)`` at lr LARS_LR and weight decay LARS_WD, on a 2-d weight
    and a 1-d bias with given gradients."""
    gen = torch.Generator().manual_seed(seed)
    weight, bias = nn.Parameter(torch.randn(8, 6, generator=gen)), nn.Parameter(torch.randn(6, generator=gen))
    grads = [(torch.randn(8, 6, generator=gen), torch.randn(6, generator=gen)) for _ in range(2)]
    optimizer = make_lars(weight, bias)
    tensors = {"lars.init.weight": weight.detach().clone(), "lars.init.bias": bias.detach().clone()}
    for step, (grad_weight, grad_bias) in enumerate(grads, start=1):
        weight.grad, bias.grad = grad_weight, grad_bias
        optimizer.step()
        tensors.update({f"lars.grad{step}.weight": grad_weight, f"lars.grad{step}.bias": grad_bias,
                        f"lars.after{step}.weight": weight.detach().clone(),
                        f"lars.after{step}.bias": bias.detach().clone()})
    return tensors


def lr_schedule(adjust_learning_rate: Callable, args: argparse.Namespace, groups: int) -> dict[str, torch.Tensor]:
    """``schedule.lr``: their adjust_learning_rate's lr of each of ``groups`` parameter groups at every step of a run
    of SCHEDULE_EPOCHS epochs of SCHEDULE_STEPS steps, [steps, groups]."""
    optimizer = SimpleNamespace(param_groups=[{} for _ in range(groups)])
    lrs = []
    for step in range(SCHEDULE_EPOCHS * SCHEDULE_STEPS):
        adjust_learning_rate(args, optimizer, range(SCHEDULE_STEPS), step)
        lrs.append([group["lr"] for group in optimizer.param_groups])
    return {"schedule.lr": torch.tensor(lrs, dtype=torch.float64)}


# -- Barlow Twins' step ----------------------------------------------------------------------------
def one_step(main) -> tuple[dict[str, torch.Tensor], dict]:
    """Their main_worker for one epoch of one batch (the module docstring lists what is patched)."""
    gen = torch.Generator().manual_seed(SEED)
    views = [torch.randn(BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    built, settings = [], {}

    def encoder(**kwargs) -> nn.Module:  # for torchvision's resnet50(zero_init_residual=True): main.py sets its fc
        return nn.Sequential(OrderedDict(body=small_cnn_body(), flatten=nn.Flatten()))

    def barlow_twins(args, real=main.BarlowTwins) -> nn.Module:
        model = real(args)
        model.projector[0] = nn.Linear(WIDTHS[-1], model.projector[0].out_features, bias=False)
        settings["shapes"] = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("bn.")}
        missing = model.load_state_dict(fixture_io.seeded_weights(settings["shapes"], SEED), strict=False)
        assert all(k.startswith("bn.") for k in missing.missing_keys) and not missing.unexpected_keys
        built.append(model)
        return model

    def at_peak(args, optimizer, loader, step, real=main.adjust_learning_rate):
        real(args, optimizer, loader, step + STEP)
        settings["lr"] = [group["lr"] for group in optimizer.param_groups]

    with tempfile.TemporaryDirectory() as checkpoints:
        args = barlow_args(main, "--workers", "0", "--epochs", "1", "--batch-size", str(BATCH), "--projector",
                           PROJECTOR, "--print-freq", "1", "--checkpoint-dir", checkpoints)
        with mock.patch.object(dist, "init_process_group", lambda **kwargs: settings.update(group=kwargs)), \
                mock.patch.object(torch.cuda, "set_device", lambda device: None), \
                mock.patch.object(torchvision.models, "resnet50", encoder), \
                mock.patch.object(main, "BarlowTwins", barlow_twins), \
                mock.patch.object(main, "adjust_learning_rate", at_peak), loop_on_one_cpu(views) as printed:
            main.main_worker(0, args)
    stats = printed_stats(printed)
    assert settings["group"]["backend"] == "nccl" and [stats["lr_weights"], stats["lr_biases"]] == settings["lr"]
    model = built[0]
    tensors = step_tensors(views, stats["loss"], model, fixture_io.seeded_weights(settings["shapes"], SEED),
                           [k for k, _ in model.named_buffers() if not k.startswith("bn.")])
    meta = {"shapes": settings["shapes"], "batch": BATCH, "projector": args.projector, "step": STEP,
            "lr_at_step": settings["lr"]}
    return tensors, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of facebookresearch/barlowtwins at the pinned commit")
    checkout = Path(parser.parse_args().checkout)
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    torch.manual_seed(SEED)
    import main as barlow_main

    with process_group_of_one():
        tensors, meta = one_step(barlow_main)
        tensors.update(terms(barlow_main))
    tensors.update(lars_steps(lambda weight, bias: barlow_main.LARS(  # main_worker's groups and filters
        [{"params": [weight]}, {"params": [bias]}], lr=LARS_LR, weight_decay=LARS_WD, weight_decay_filter=True,
        lars_adaptation_filter=True), SEED + 1))
    tensors.update(lr_schedule(barlow_main.adjust_learning_rate,
                               barlow_args(barlow_main, "--epochs", str(SCHEDULE_EPOCHS), "--batch-size", "256"), 2))
    defaults = vars(barlow_args(barlow_main))
    meta["defaults"] = {k: defaults[k] for k in ("lambd", "projector", "learning_rate_weights", "learning_rate_biases",
                                                 "weight_decay")}
    meta.update(repo=REPO, commit=commit, seed=SEED, size=SIZE, widths=WIDTHS, lambds=LAMBDS, lars_lr=LARS_LR,
                lars_weight_decay=LARS_WD, schedule_epochs=SCHEDULE_EPOCHS, schedule_steps=SCHEDULE_STEPS,
                torch=torch.__version__,
                configured=f"main.py main_worker for one epoch of one batch of {BATCH} pairs of {SIZE} x {SIZE} "
                           f"views at --batch-size {BATCH} --projector {PROJECTOR}, otherwise their defaults, at "
                           f"step {STEP} of their lr schedule; encoder: imbssl's SmallCNN (width 0.5), seeded weights")
    path = fixture_io.save(NAME, tensors, meta, whole_prefixes=("input.",))
    print(path, f"loss {tensors['loss'].item():.7f}", f"lr {meta['lr_at_step']}")


if __name__ == "__main__":
    main()
