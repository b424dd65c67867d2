"""Regenerate fixtures/sdclr.safetensors: one training step of VITA-Group/SDCLR's own code (the reference env).

    /work/refenv/bin/python tests/reference/make_sdclr.py /path/to/VITA-Group+SDCLR

SDCLR's CIFAR command (cmds/execute_hist/camera_ready.sh -> cmds/shell_scrips/cifar-100-LT.sh): train_simCLR.py
--model res18 --optimizer sgd --lr 0.5 --temperature 0.2 --output_ch 128 --prune --prune_percent 0.9
--prune_dual_bn. So the model is ``prune_resnet18_dual`` (CIFAR stem) with ``fc = proj_head(512, 128)`` from
models/resnet_prune_multibn.py (twoLayerProj left at False: the 3-layer head; train_simCLR.py has no flag for it),
the optimizer ``SGD(model.parameters(), lr=0.5, weight_decay=1e-4, momentum=0.9)``, and one step is their
``prune.prune_simCLR.train_prune`` run as written: magnitude pruning at the epoch start (``Mask.magnitudePruning``),
the pruned view under no_grad, the dense view and its backward, the pruned view again and its backward, one
optimizer step. The learning rate is their peak 0.5 through their ``--scheduler constant`` (a ``MultiStepLR`` with
gamma 1), so the one step is taken at the lr the cosine schedule reaches after warm-up.

Stored: the inputs (8 images, two 16x16 views in [0, 1]: their model normalises inside, and the CIFAR ResNet-18
takes any size), fingerprints of the seeded initial weights (``init.``), the masks (``state.mask.``), the loss,
every gradient, every weight and buffer after the step (``after.``), the head's outputs of the three forwards
(``out.``).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

REPO = "VITA-Group/SDCLR"
PINNED = "f1490fce26e6bb67d2c21b450db5a6e3184e6bc3"
SEED = 29
BATCH, SIZE = 8, 16  # two views of 8 x 3 x 16 x 16 stay under FULL_LIMIT: stored whole
CONFIG = dict(model="res18", output_ch=128, prune_percent=0.9, random_prune_percent=0.0, prune_dual_bn=True,
              temperature=0.2, optimizer="sgd", lr=0.5, weight_decay=1e-4, momentum=0.9, scheduler="constant",
              epoch=1, world_size=1, dataset="cifar (imagenet=False stem)", num_classes=10)


def patch_for_this_torch() -> None:
    """What their 2021 code needs to run on torch 2.14 / torchvision 0.29 on one CPU process."""
    # torchvision.models.utils is gone (0.13+); models/resnet_prune*.py import load_state_dict_from_url from it.
    from torch.hub import load_state_dict_from_url
    sys.modules["torchvision.models.utils"] = types.SimpleNamespace(load_state_dict_from_url=load_state_dict_from_url)
    # No GPU: .cuda() (the inputs, nt_xent's negative mask) stays on the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # A one-process group, so their gatherFeatures (torch.distributed.all_gather) runs as written.
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29529", rank=0, world_size=1)


def patch_prune_conv(prune_conv2d: type) -> None:
    """prune_conv2d.forward calls ``self._conv_forward(input, weight)``, the torch < 1.8 signature; since 1.8 the
    bias is a third argument. The same forward with ``self.bias`` added (their convs have none), as BCL's copy of
    this class does."""
    def forward(self, input):
        weight = self.weight * self.prune_mask if self.prune_flag else self.weight
        return self._conv_forward(input, weight, self.bias)
    prune_conv2d.forward = forward


class DDPLike(torch.nn.Module):
    """train_prune reaches the network as ``model.module`` (DistributedDataParallel). One process: a plain wrapper.
    (SyncBatchNorm on one process is BatchNorm, so their convert_sync_batchnorm is left out too.)"""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


class Log:
    def info(self, msg: str) -> None:
        print(msg)


def main(checkout: Path) -> None:
    fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    patch_for_this_torch()
    from types import SimpleNamespace

    from models.resnet_prune import prune_conv2d
    from models.resnet_prune_multibn import proj_head, prune_resnet18_dual
    from prune.prune_simCLR import train_prune
    patch_prune_conv(prune_conv2d)

    # train_simCLR.py main(): the model for --model res18 --prune --prune_dual_bn on cifar, then its head
    model = prune_resnet18_dual(pretrained=False, imagenet=False, num_classes=CONFIG["num_classes"])
    model.fc = proj_head(model.fc.in_features, CONFIG["output_ch"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    init = fixture_io.seeded_weights(shapes, SEED)
    model.load_state_dict(init, strict=False)  # normalize.mean/std keep their ImageNet constants
    wrapped = DDPLike(model)

    # train_simCLR.py main(): --optimizer sgd, --scheduler constant
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=CONFIG["lr"], weight_decay=CONFIG["weight_decay"],
                                momentum=CONFIG["momentum"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10 ** 9], gamma=1)

    inputs = torch.rand(BATCH, 2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(SEED))  # [B, views, C, H, W]
    head_outputs = []
    model.fc.register_forward_hook(lambda module, args, out: head_outputs.append(out.detach().clone()))
    args = SimpleNamespace(prune_percent=CONFIG["prune_percent"], random_prune_percent=CONFIG["random_prune_percent"],
                           temperature=CONFIG["temperature"], print_freq=50)
    loss = train_prune([inputs], wrapped, optimizer, scheduler, CONFIG["epoch"], Log(), 0, 0, 1, args=args)

    tensors = {"input.views": inputs, "loss": torch.tensor(loss, dtype=torch.float32)}
    tensors |= {f"init.{k}": v for k, v in init.items()}
    tensors |= {f"grad.{k}": p.grad for k, p in model.named_parameters()}
    tensors |= {f"after.{k}": v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    tensors |= {f"state.mask.{name}": m.prune_mask.bool() for name, m in model.named_modules()
                if hasattr(m, "prune_mask")}
    tensors |= {f"out.{name}": z for name, z in zip(["pruned_no_grad", "dense", "pruned"], head_outputs)}
    meta = dict(repo=REPO, commit=PINNED, seed=SEED, shapes=shapes, config=CONFIG,
                normalize=dict(mean=model.normalize.mean.tolist(), std=model.normalize.std.tolist()),
                patches=["torchvision.models.utils stub", "Tensor.cuda -> identity", "gloo group of one process",
                         "prune_conv2d.forward passes self.bias (torch >= 1.8 signature)",
                         "DistributedDataParallel and SyncBatchNorm left out (one process)"])
    print(fixture_io.save("sdclr", tensors, meta), f"loss {loss:.6f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
