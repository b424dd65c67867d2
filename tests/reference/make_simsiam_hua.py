"""Regenerate fixtures/simsiam_hua.safetensors and simsiam_hua-neutral.safetensors: one SimSiam training step of
PatrickHua/SimSiam's code, with its CIFAR config (configs/simsiam_cifar.yaml).

    /work/refenv/bin/python tests/reference/make_simsiam_hua.py /work/refs/PatrickHua+SimSiam

Their ``models.get_model`` (SimSiam on ``resnet18_cifar_variant1``, ``proj_layers: 2``; heads narrowed, see below),
``optimizers.get_optimizer('sgd', ...)`` (momentum 0.9, wd 5e-4,
the predictor a group of its own), ``LR_Scheduler`` (10 warm-up epochs from 0, ``constant_predictor_lr=True``), and
the five lines of their ``main.py`` loop (copied: ``main()`` also builds datasets and loggers): zero_grad, forward,
``loss.mean()``, backward, ``optimizer.step()``, ``lr_scheduler.step()``. lr: their rule ``base_lr 0.03 * 512 / 256``
= 0.06 at their batch of 512; the batch here is 4 images of 32 x 32.

Their first step runs at that full lr: the optimizer is built at it, and the scheduler, stepped after the optimizer,
only then sets the warm-up's first lr (0) for the second step. Recorded as ``state.lr.*`` (the lrs after the step).

Two fixtures, the same but for the heads' extra parameters (imbssl's heads have none of them): the Linear biases
that feed a BatchNorm (projector layer1 and layer3, predictor layer1) and the affine weight and bias of the
projector's output BatchNorm.
- ``simsiam_hua``: every tensor as ``fixture_io.seeded_weights`` draws it;
- ``simsiam_hua-neutral``: those biases 0 and that BatchNorm's weight 1, bias 0, so that the network computes
  exactly imbssl's function at the start, and only the extra parameters' own gradients and updates remain.

Their unused projector ``layer2`` (``proj_layers: 2`` skips it) has no gradient and keeps its weights.

What is patched, and why: the default widths of ``projection_MLP`` (2048, 2048) and ``prediction_MLP`` (2048, 512,
2048), which their ``SimSiam`` builds without arguments, become 512, 512 and 512, 128, 512 (the same 4:1 bottleneck;
the projector's hidden and output widths stay equal, as its ``layer3`` BatchNorm, sized by ``hidden_dim``,
requires): the step is the same code on a quarter of the width, and the fixture and test stay small and fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

REPO = "PatrickHua/SimSiam"
PINNED = "75a7c51362c30e8628ad83949055ef73829ce786"
SEED = 32
BATCH, SIZE = 4, 32
CONFIG = {"backbone": "resnet18_cifar_variant1", "proj_layers": 2, "base_lr": 0.03, "batch_size": 512,
          "momentum": 0.9, "weight_decay": 0.0005, "warmup_epochs": 10, "warmup_lr": 0, "num_epochs": 800,
          "final_lr": 0}
HEAD_WIDTHS = {"proj_hidden": 512, "proj_dim": 512, "pred_hidden": 128}
#: the heads' parameters that imbssl's heads do not have, and their neutral values
EXTRA = {"projector.layer1.0.bias": 0.0, "projector.layer3.0.bias": 0.0, "predictor.layer1.0.bias": 0.0,
         "projector.layer3.1.weight": 1.0, "projector.layer3.1.bias": 0.0}


def build(get_model, neutral: bool):
    """Their model with seeded weights. ``encoder`` is ``Sequential(backbone, projector)``, the same modules under a
    second name: its state-dict entries are left out of the draw and follow from the others."""
    model = get_model(SimpleNamespace(name="simsiam", backbone=CONFIG["backbone"], proj_layers=CONFIG["proj_layers"]))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    initial = fixture_io.seeded_weights(shapes, SEED)
    if neutral:
        initial.update({k: torch.full_like(initial[k], value) for k, value in EXTRA.items()})
    missing, unexpected = model.load_state_dict(initial, strict=False)
    assert all(k.startswith("encoder.") for k in missing) and not unexpected
    assert model.encoder[1] is model.projector and model.encoder[0] is model.backbone
    return model, shapes, initial


def one_step(get_model, get_optimizer, LR_Scheduler, neutral: bool) -> tuple[dict, dict]:
    torch.manual_seed(SEED)
    model, shapes, initial = build(get_model, neutral)
    gen = torch.Generator().manual_seed(SEED)
    images1, images2 = torch.rand(BATCH, 3, SIZE, SIZE, generator=gen), torch.rand(BATCH, 3, SIZE, SIZE, generator=gen)
    lr = CONFIG["base_lr"] * CONFIG["batch_size"] / 256
    optimizer = get_optimizer("sgd", model, lr=lr, momentum=CONFIG["momentum"], weight_decay=CONFIG["weight_decay"])
    lr_scheduler = LR_Scheduler(optimizer, CONFIG["warmup_epochs"], CONFIG["warmup_lr"] * CONFIG["batch_size"] / 256,
                                CONFIG["num_epochs"], lr, CONFIG["final_lr"] * CONFIG["batch_size"] / 256, 1,
                                constant_predictor_lr=True)
    step_lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    model.train()
    # main.py's loop body
    model.zero_grad()
    data_dict = model.forward(images1, images2)
    loss = data_dict['loss'].mean()
    loss.backward()
    optimizer.step()
    lr_scheduler.step()
    named = [(k, p) for k, p in model.named_parameters()]  # named_parameters() skips encoder's repeats
    unused = [k for k in shapes if k.startswith("projector.layer2.")]  # proj_layers 2: never run
    assert {k for k, p in named if p.grad is None} == {k for k, _ in named if k in unused}
    tensors = {"input.view1": images1, "input.view2": images2, "loss": loss.detach(),
               **{f"init.{k}": v for k, v in initial.items()},
               **{f"grad.{k}": p.grad for k, p in named if p.grad is not None},
               **{f"after.{k}": p for k, p in named},
               **{f"state.{k}": v for k, v in model.named_buffers()},
               **{f"state.lr.{g['name']}": torch.tensor(g["lr"], dtype=torch.float64) for g in optimizer.param_groups}}
    meta = {"repo": REPO, "seed": SEED, "shapes": shapes, "batch": BATCH, "size": SIZE, "lr": lr,
            "step_lrs": step_lrs, "neutral": neutral, "extra": EXTRA, **CONFIG, **HEAD_WIDTHS,
            "torch": torch.__version__,
            "unused": unused,
            "configured": "configs/simsiam_cifar.yaml: resnet18_cifar_variant1, proj_layers 2, SGD base_lr 0.03 "
                          "* 512 / 256, momentum 0.9, wd 5e-4, LR_Scheduler(warm-up 10 epochs from 0, 800 epochs, "
                          "constant predictor lr); main.py's loop for one batch of 4 images 32 x 32"
                          + ("; the heads' extra biases 0 and output-BN affine 1, 0" if neutral else "")}
    return tensors, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of PatrickHua/SimSiam at the pinned commit")
    checkout = parser.parse_args().checkout
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, checkout)
    from models import get_model
    from models.simsiam import prediction_MLP, projection_MLP
    from optimizers import LR_Scheduler, get_optimizer

    projection_MLP.__init__.__defaults__ = (HEAD_WIDTHS["proj_hidden"], HEAD_WIDTHS["proj_dim"])  # see the docstring
    prediction_MLP.__init__.__defaults__ = (HEAD_WIDTHS["proj_dim"], HEAD_WIDTHS["pred_hidden"],
                                            HEAD_WIDTHS["proj_dim"])

    for name, neutral in (("simsiam_hua", False), ("simsiam_hua-neutral", True)):
        tensors, meta = one_step(get_model, get_optimizer, LR_Scheduler, neutral)
        meta["commit"] = commit
        print(fixture_io.save(name, tensors, meta), f"loss {tensors['loss'].item():.7f}")


if __name__ == "__main__":
    main()
