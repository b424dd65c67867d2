"""Regenerate the kaidic/LDAM-DRW fixtures: one SGD step of the authors' ResNet-32 with each of their losses, and
their class weights, margins and learning-rate schedule (Cao et al. 2019, "Learning imbalanced datasets with
label-distribution-aware margin loss"; the code Yang & Xu 2020 ran for Table 2).

Run in the REFERENCE environment (torch 2.14.1), never with imbssl:

    /work/refenv/bin/python tests/reference/make_ldam_drw.py /work/refs/kaidic+LDAM-DRW

It writes fixtures/ldam_drw-recipe.safetensors (class counts, CB/DRW weights per epoch, margins, lr per epoch) and
one fixtures/ldam_drw-<case>.safetensors per loss in CASES (inputs, loss, logits, every gradient, the weights and
BatchNorm statistics after the step). Their code is imported from the checkout, with three patches, all here:

- ``torch.cuda.FloatTensor`` -> ``torch.FloatTensor`` while LDAMLoss is built and run (their loss puts its margins
  and one-hot on the GPU with it; this machine has none);
- tensorboardX, sklearn and matplotlib are stubbed in ``sys.modules``: cifar_train.py and utils.py import them for
  logs, confusion matrices and plots, none of which the step, the weights or the schedule touch;
- the per-class weights and the criterion are built inline in cifar_train.py's ``main_worker``, so
  ``their_per_cls_weights`` and ``their_criterion`` below copy those lines (without ``.cuda(args.gpu)``), and the
  step is the five lines of its ``train()`` that compute (``train()`` itself wants a loader, a log and a writer).
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

PINNED = "2536330f2afdaa65618323cb5a5850efccce762a"
REPO = "kaidic/LDAM-DRW"
SEED = 29
#: CIFAR-10-LT rho = 100 (their IMBALANCECIFAR10 profile); 8 images of 16 x 16 pixels (ResNet-32 pools 4 x 4 at the
#: end), the targets spread from the head class to the tail
IMB_FACTOR, NUM_CLASSES, IMAGE_SIZE = 0.01, 10, 16
TARGETS = [0, 9, 4, 7, 1, 8, 2, 9]
#: their --loss_type, --train_rule and the (0-based) epoch whose class weights the step uses; epoch 160 is the first
#: with DRW's weights on
CASES = {"ce": ("CE", "None", 0), "ce_drw": ("CE", "DRW", 160), "focal": ("Focal", "None", 0),
         "cb_focal": ("Focal", "Reweight", 0), "ldam": ("LDAM", "None", 0), "ldam_drw": ("LDAM", "DRW", 160)}
#: tensors above this many elements are kept as fingerprints (fixture_io.fingerprint), so that the six fixtures
#: stay small: every BatchNorm, the stem conv and the classifier whole, the 3 x 3 convs of the stages as prints; the
#: input images whole
WHOLE_LIMIT = 1024


def stub_logging_modules() -> None:
    """tensorboardX, sklearn, matplotlib: imported by cifar_train.py / utils.py for logs and plots only."""
    stubs = {"tensorboardX": {"SummaryWriter": object}, "sklearn": {}, "sklearn.metrics": {"confusion_matrix": None},
             "sklearn.utils": {}, "sklearn.utils.multiclass": {"unique_labels": None},
             "matplotlib": {"use": lambda *a, **k: None},
             "matplotlib.pyplot": {"cm": types.SimpleNamespace(Blues=None)}}
    for name, attributes in stubs.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo looks modules up by spec
            module.__dict__.update(attributes)
            sys.modules[name] = module


@contextmanager
def cuda_tensors_on_cpu():
    """LDAMLoss calls torch.cuda.FloatTensor(...) and .type(torch.cuda.FloatTensor): the CPU type instead."""
    original = torch.cuda.FloatTensor
    torch.cuda.FloatTensor = torch.FloatTensor
    try:
        yield
    finally:
        torch.cuda.FloatTensor = original


def their_cls_num_list(imbalance_cifar) -> list[int]:
    """IMBALANCECIFAR10.get_img_num_per_cls on CIFAR-10's 50,000 training images, without loading them."""
    fake = types.SimpleNamespace(data=np.zeros(50000))
    return imbalance_cifar.IMBALANCECIFAR10.get_img_num_per_cls(fake, NUM_CLASSES, "exp", IMB_FACTOR)


def their_per_cls_weights(train_rule: str, epoch: int, cls_num_list: list[int]) -> torch.Tensor | None:
    """Copied from cifar_train.py, main_worker's epoch loop (``.cuda(args.gpu)`` dropped)."""
    if train_rule == 'None':
        per_cls_weights = None
    elif train_rule == 'Reweight':
        beta = 0.9999
        effective_num = 1.0 - np.power(beta, cls_num_list)
        per_cls_weights = (1.0 - beta) / np.array(effective_num)
        per_cls_weights = per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)
        per_cls_weights = torch.FloatTensor(per_cls_weights)
    elif train_rule == 'DRW':
        idx = epoch // 160
        betas = [0, 0.9999]
        effective_num = 1.0 - np.power(betas[idx], cls_num_list)
        per_cls_weights = (1.0 - betas[idx]) / np.array(effective_num)
        per_cls_weights = per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)
        per_cls_weights = torch.FloatTensor(per_cls_weights)
    return per_cls_weights


def their_criterion(losses, loss_type: str, cls_num_list: list[int], per_cls_weights):
    """As cifar_train.py builds it (``.cuda(args.gpu)`` dropped)."""
    if loss_type == 'CE':
        return nn.CrossEntropyLoss(weight=per_cls_weights)
    if loss_type == 'LDAM':
        return losses.LDAMLoss(cls_num_list=cls_num_list, max_m=0.5, s=30, weight=per_cls_weights)
    return losses.FocalLoss(weight=per_cls_weights, gamma=1)


def their_lr_per_epoch(cifar_train, args) -> list[float]:
    """cifar_train.adjust_learning_rate's lr for each of the run's epochs, read back from a real optimizer."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    lrs = []
    for epoch in range(args.epochs):
        cifar_train.adjust_learning_rate(optimizer, epoch, args)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def write_recipe(cifar_train, losses, args, cls_num_list: list[int], commit: str) -> None:
    """What their recipe derives from the class counts: CB weights, DRW's weights per epoch, margins, lr."""
    with cuda_tensors_on_cpu():
        margins = losses.LDAMLoss(cls_num_list=cls_num_list, max_m=0.5, s=30).m_list
    drw = torch.stack([their_per_cls_weights("DRW", epoch, cls_num_list) for epoch in range(args.epochs)])
    tensors = {"cls_num_list": torch.tensor(cls_num_list), "reweight_weights": their_per_cls_weights(
        "Reweight", 0, cls_num_list), "drw_weights_per_epoch": drw, "ldam_margins": margins,
        "lr_per_epoch": torch.tensor(their_lr_per_epoch(cifar_train, args), dtype=torch.float64)}
    meta = {"repo": REPO, "commit": commit, "seed": SEED, "args": vars(args),
            "what": "cifar_train.py's per_cls_weights (Reweight; DRW for every epoch), LDAMLoss(max_m=0.5, s=30)'s "
                    "m_list, adjust_learning_rate's lr per 0-based epoch, all for CIFAR-10-LT imb_factor 0.01"}
    print(fixture_io.save("ldam_drw-recipe", tensors, meta))


def write_case(case: str, models, losses, args, cls_num_list: list[int], commit: str) -> None:
    """One step of cifar_train.py's train(): output = model(input); loss = criterion(output, target); zero_grad;
    backward; step, with their SGD at args.lr (the lr their optimizer is built with, before any schedule)."""
    loss_type, train_rule, epoch = CASES[case]
    model = models.resnet32(num_classes=NUM_CLASSES, use_norm=loss_type == "LDAM")  # as main_worker builds it
    shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
    initial = fixture_io.seeded_weights(shapes, SEED)
    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    per_cls_weights = their_per_cls_weights(train_rule, epoch, cls_num_list)
    g = torch.Generator().manual_seed(SEED)
    images = torch.randn(len(TARGETS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    target = torch.tensor(TARGETS)
    with cuda_tensors_on_cpu():
        criterion = their_criterion(losses, loss_type, cls_num_list, per_cls_weights)
        model.train()
        output = model(images)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tensors = {"input": images, "target": target, "loss": loss.detach(), "output": output.detach()}
    if loss_type == "Focal":  # the weighted per-image CE their focal_loss modulates: what 6b of issue 29 is about
        tensors["ref.weighted_ce"] = nn.functional.cross_entropy(output.detach(), target, reduction="none",
                                                                 weight=per_cls_weights)
    tensors |= {f"init.{n}": value for n, value in initial.items()}  # the draw the test must repeat
    tensors |= {f"grad.{n}": p.grad for n, p in model.named_parameters()}
    tensors |= {f"after.{n}": p.detach() for n, p in model.named_parameters()}
    tensors |= {f"state.{n}": b for n, b in model.named_buffers()}
    meta = {"repo": REPO, "commit": commit, "seed": SEED, "shapes": shapes, "case": case, "loss_type": loss_type,
            "train_rule": train_rule, "epoch": epoch, "cls_num_list": cls_num_list, "targets": TARGETS,
            "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
            "per_cls_weights": None if per_cls_weights is None else per_cls_weights.tolist(),
            "what": "one SGD step of models.resnet32 (use_norm for LDAM) with cifar_train.py's criterion; inputs "
                    "randn(8, 3, 16, 16); weights fixture_io.seeded_weights(shapes, seed); BatchNorm in train mode"}
    print(fixture_io.save(f"ldam_drw-{case}", tensors, meta, whole_limit=WHOLE_LIMIT, whole_prefixes=("input",)))


def main(checkout: Path) -> None:
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    stub_logging_modules()
    import cifar_train  # noqa: E402  (their modules, from the checkout)
    import imbalance_cifar  # noqa: E402
    import losses  # noqa: E402
    import models  # noqa: E402

    torch.use_deterministic_algorithms(True)
    args = cifar_train.parser.parse_args([])  # their defaults: lr 0.1, momentum 0.9, wd 2e-4, batch 128, 200 epochs
    cls_num_list = their_cls_num_list(imbalance_cifar)
    write_recipe(cifar_train, losses, args, cls_num_list, commit)
    for case in CASES:
        write_case(case, models, losses, args, cls_num_list, commit)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]).resolve())
