"""Regenerate fixtures/vicreg.safetensors: one training step of facebookresearch/vicreg's main_vicreg.py, their loss
on fixed embeddings, their LARS and lr schedule, and lightly's VICRegLoss on the same embeddings.

    /work/refenv/bin/python tests/reference/make_vicreg.py /work/refs/facebookresearch+vicreg

Records, from their main_vicreg.py imported unchanged (torch 2.14.1, lightly 1.6.0):

- ``terms.*``: their ``VICReg.forward`` on fixed embeddings x, y (12 rows of 16; the backbone and the projector the
  identity, --batch-size 12) at coefficients (--sim-coeff, --std-coeff, --cov-coeff) = (1, 0, 0), (0, 1, 0), (0, 0, 1),
  each of the three terms alone, and their default (25, 25, 1): the loss and its gradients. ``lightly.*``: lightly's
  ``VICRegLoss`` on the same at the same (lambda_param, mu_param, nu_param);
- one step of their ``main`` itself, for one epoch of one batch of 16 pairs of 16 x 16 views at --batch-size 16 and
  --mlp 64-64-64, their other flags at their defaults (coefficients 25, 25, 1, --base-lr 0.2, --wd 1e-6): the loss
  (from the stats line it prints), every gradient, the weights after the step, their change in it, the BatchNorm
  buffers and the lr;
- ``lars.*``: their ``LARS`` as main builds it (both filters ``exclude_bias_and_norm``) for two steps on a 2-d weight
  and a 1-d bias with given gradients, at lr 0.5 and weight decay 0.1, large enough that the weight decay and its
  exclusion show;
- ``schedule.lr``: their ``adjust_learning_rate`` at every step of a run of 20 epochs of 3 steps ([steps, 1]).

The encoder is imbssl's SmallCNN at width 0.5 (make_align_uniform's ``small_cnn_body``) in place of their ResNet-50,
which needs 224 px crops: their ``resnet`` module gives it, under the --arch name ``small_cnn``, with its width (128),
from which their ``Projector`` is built. Weights are ``fixture_io.seeded_weights`` from the names and shapes kept in
the metadata.

What is patched around main, and why (one CPU process, no GPU):
- the process group: this script makes a gloo group of one process, where their ``FullGatherLayer`` and
  ``DistributedSampler`` run as written; no RANK in the environment, so their ``init_distributed_mode`` leaves it
  (``args.rank`` 0 set as it would);
- ``nn.Module.cuda`` and ``torch.Tensor.cuda``: no-ops, everything stays on the CPU (--device cpu);
- ``nn.SyncBatchNorm.convert_sync_batchnorm``: the identity, as SyncBatchNorm refuses CPU tensors; on one process it
  is BatchNorm;
- ``nn.parallel.DistributedDataParallel``: built without ``device_ids``, which CPU modules refuse (its average of one
  process's gradients is the identity);
- ``resnet.__dict__`` gets ``small_cnn``; ``VICReg`` loads the seeded weights into what it builds;
- ``torchvision.datasets.ImageFolder`` and ``torch.utils.data.DataLoader``: the one batch, already normalised;
- ``main_vicreg.adjust_learning_rate``: called at step 10 rather than 0. At one step an epoch their warm-up is 10 steps
  and step 0 runs at lr 0, where nothing would move; step 10, the warm-up's end, runs at the peak lr, --base-lr times
  batch size / 256 (0.0125), whatever --epochs is.
Their GradScaler and autocast find no CUDA and disable themselves: the step is fp32. --log-freq-time -1 prints the
stats of every step.
"""
from __future__ import annotations

import argparse
import builtins
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
from make_align_uniform import SIZE, WIDTHS, small_cnn_body  # noqa: E402
from make_barlow_twins import (LARS_LR, LARS_WD, SCHEDULE_EPOCHS, SCHEDULE_STEPS, lars_steps,  # noqa: E402
                               loop_on_one_cpu, lr_schedule, printed_stats, process_group_of_one, step_tensors)

REPO = "facebookresearch/vicreg"
PINNED = "4e12602fd495af83efd1631fbe82523e6db092e0"
NAME = "vicreg"
SEED = 35
BATCH, MLP = 16, "64-64-64"
STEP = 10  # the end of their warm-up at one step an epoch: the peak lr
TERM_ROWS, TERM_DIM = 12, 16
#: (--sim-coeff, --std-coeff, --cov-coeff): each term alone, and their defaults
COEFFICIENTS = {"invariance": (1.0, 0.0, 0.0), "variance": (0.0, 1.0, 0.0), "covariance": (0.0, 0.0, 1.0),
                "default": (25.0, 25.0, 1.0)}


def vicreg_args(main_vicreg, *flags: str) -> argparse.Namespace:
    """main_vicreg.py's argparse at its defaults but ``flags``, on one process."""
    parser = argparse.ArgumentParser(parents=[main_vicreg.get_arguments()])
    args = parser.parse_args(["--data-dir", "unused", *flags])
    args.rank = 0
    return args


def terms(main_vicreg, resnet) -> dict[str, torch.Tensor]:
    """Their forward's loss on fixed embeddings (backbone and projector the identity), and lightly's."""
    from lightly.loss import VICRegLoss

    gen = torch.Generator().manual_seed(SEED)
    x, y = (torch.randn(TERM_ROWS, TERM_DIM, generator=gen) for _ in range(2))
    x, y = 0.5 * x + 0.3, 0.4 * x + 0.9 * y  # stds below 1 in part, so that the variance hinge is active
    tensors = {"terms.x": x, "terms.y": y}
    args = vicreg_args(main_vicreg, "--arch", "identity", "--batch-size", str(TERM_ROWS), "--mlp", str(TERM_DIM))
    with mock.patch.dict(resnet.__dict__, identity=lambda **kwargs: (nn.Identity(), TERM_DIM)):
        model = main_vicreg.VICReg(args)
    model.projector = nn.Identity()
    for name, (sim, std, cov) in COEFFICIENTS.items():
        model.args.sim_coeff, model.args.std_coeff, model.args.cov_coeff = sim, std, cov
        inputs = {who: (x.clone().requires_grad_(), y.clone().requires_grad_()) for who in ("terms", "lightly")}
        losses = {"terms": model(*inputs["terms"]),
                  "lightly": VICRegLoss(lambda_param=sim, mu_param=std, nu_param=cov)(*inputs["lightly"])}
        for who, loss in losses.items():
            loss.backward()
            key = f"{who}.{name}/"
            tensors.update({f"{key}loss": loss.detach(), f"{key}grad_x": inputs[who][0].grad,
                            f"{key}grad_y": inputs[who][1].grad})
    return tensors


def one_step(main_vicreg, resnet) -> tuple[dict[str, torch.Tensor], dict]:
    """Their main for one epoch of one batch (the module docstring lists what is patched)."""
    gen = torch.Generator().manual_seed(SEED)
    views = [torch.randn(BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    built, settings = [], {}

    def encoder(**kwargs) -> tuple[nn.Module, int]:  # for their resnet50(zero_init_residual=True)
        return nn.Sequential(OrderedDict(body=small_cnn_body(), flatten=nn.Flatten())), WIDTHS[-1]

    def vicreg(args, real=main_vicreg.VICReg) -> nn.Module:
        model = real(args)
        settings["shapes"] = {k: list(v.shape) for k, v in model.state_dict().items()}
        model.load_state_dict(fixture_io.seeded_weights(settings["shapes"], SEED))
        built.append(model)
        return model

    def at_peak(args, optimizer, loader, step, real=main_vicreg.adjust_learning_rate):
        settings["lr"] = real(args, optimizer, loader, step + STEP)
        return settings["lr"]

    with tempfile.TemporaryDirectory() as experiment:
        args = vicreg_args(main_vicreg, "--exp-dir", experiment, "--log-freq-time", "-1", "--arch", "small_cnn",
                           "--mlp", MLP, "--epochs", "1", "--batch-size", str(BATCH), "--num-workers", "0",
                           "--device", "cpu")
        with mock.patch.dict(resnet.__dict__, small_cnn=encoder), mock.patch.object(main_vicreg, "VICReg", vicreg), \
                mock.patch.object(main_vicreg, "adjust_learning_rate", at_peak), \
                mock.patch.object(builtins, "print", builtins.print), loop_on_one_cpu(views) as printed:
            main_vicreg.main(args)
    stats = printed_stats(printed)
    assert stats["lr"] == settings["lr"]
    model = built[0]
    tensors = step_tensors(views, stats["loss"], model, fixture_io.seeded_weights(settings["shapes"], SEED),
                           [k for k, _ in model.named_buffers()])
    meta = {"shapes": settings["shapes"], "batch": BATCH, "mlp": args.mlp, "step": STEP,
            "lr_at_step": [settings["lr"]]}
    return tensors, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of facebookresearch/vicreg at the pinned commit")
    checkout = Path(parser.parse_args().checkout)
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    torch.manual_seed(SEED)
    import main_vicreg
    import resnet

    with process_group_of_one():
        tensors, meta = one_step(main_vicreg, resnet)
        tensors.update(terms(main_vicreg, resnet))
    tensors.update(lars_steps(lambda weight, bias: main_vicreg.LARS(  # main's filters
        [weight, bias], lr=LARS_LR, weight_decay=LARS_WD, weight_decay_filter=main_vicreg.exclude_bias_and_norm,
        lars_adaptation_filter=main_vicreg.exclude_bias_and_norm), SEED + 1))
    tensors.update(lr_schedule(main_vicreg.adjust_learning_rate,
                               vicreg_args(main_vicreg, "--epochs", str(SCHEDULE_EPOCHS), "--batch-size", "256"), 1))
    defaults = vars(vicreg_args(main_vicreg))
    meta["defaults"] = {k: defaults[k] for k in ("sim_coeff", "std_coeff", "cov_coeff", "mlp", "base_lr", "wd")}
    meta.update(repo=REPO, commit=commit, seed=SEED, size=SIZE, widths=WIDTHS, coefficients=COEFFICIENTS,
                lars_lr=LARS_LR, lars_weight_decay=LARS_WD, schedule_epochs=SCHEDULE_EPOCHS,
                schedule_steps=SCHEDULE_STEPS, torch=torch.__version__,
                configured=f"main_vicreg.py main for one epoch of one batch of {BATCH} pairs of {SIZE} x {SIZE} views "
                           f"at --batch-size {BATCH} --mlp {MLP}, otherwise their defaults, at step {STEP} of their "
                           f"lr schedule; encoder: imbssl's SmallCNN (width 0.5), seeded weights")
    path = fixture_io.save(NAME, tensors, meta, whole_prefixes=("input.",))
    print(path, f"loss {tensors['loss'].item():.7f}", f"lr {meta['lr_at_step']}")


if __name__ == "__main__":
    main()
