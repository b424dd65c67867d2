"""Regenerate fixtures/bcl_i.safetensors, bcl_d.safetensors and bcl_randaugment.safetensors: one training step of
MediaBrain-SJTU/BCL's own code, its momentum-loss memory, the boost it gives each image, and its RandAugment's
draws (the reference env).

    /work/refenv/bin/python tests/reference/make_bcl.py /path/to/MediaBrain-SJTU+BCL

BCL's README commands on CIFAR-100-LT:
- BCL-I: ``train.py --bcl --rand_k 1 --lr 0.5 --temperature 0.2 --weight_decay 5e-4``: models/simclr.py's SimCLR
  (ResNet-18, CIFAR stem; proj_head 512-512-128 with BatchNorm after both Linears), their ``train`` function.
- BCL-D: ``train_sdclr.py --bcl --rand_k 2 --lr 0.5 --temperature 0.2 --weight_decay 1e-4`` (prune_percent 0.9 by
  default): models/sdclr.py's SDCLR (``prune_resnet18_dual``, ``proj_head(512, 128, twoLayerProj=True)``), their
  ``train_prune`` function.

Both run as written for one step of epoch 2 (so the memory takes its momentum branch, from a seeded memory of the
8 images), on a loader of one batch: the 8 images of a dataset of 8, in a shuffled order. Their optimizer is
``SGD(model.parameters(), lr=0.5, weight_decay=wd, momentum=0.9)``; their scheduler (cosine with 10 warm-up epochs)
is replaced by a constant one at the peak lr 0.5, so the step is taken at the lr it reaches after warm-up. Then
their ``memoboosted_CIFAR100.update_momentum_weight`` turns the memory into each image's weight w, and their
``__getitem__`` builds each image's ``RandAugment_prob(k, m, p)``: the fixture records k, m, p and BCL-D's
``np.random.rand(1)`` draw u per image.

Stored: the inputs (two 16x16 views of 8 images in [0, 1], their indices, the memory before), fingerprints of the
seeded initial weights (``init.``), the loss, every gradient, every weight and buffer after (``after.``), the
memory after and the per-image losses (``state.``), the weights w and each image's k, m, p, u (``boost.``); for
BCL-D also the masks (``state.mask.``).
"""
from __future__ import annotations

import random
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

REPO = "MediaBrain-SJTU/BCL"
PINNED = "a2342f86fa3e2f8c5efc5b98334126133b0b360b"
SEED = 29
BATCH, SIZE = 8, 16  # two views of 8 x 3 x 16 x 16 stay under FULL_LIMIT: stored whole; the CIFAR ResNet takes 16 px
EPOCH = 2  # the second epoch: M <- (1 - beta) l + beta M
VARIANTS = {
    "bcl_i": dict(script="train.py", rand_k=1, weight_decay=5e-4),
    "bcl_d": dict(script="train_sdclr.py", rand_k=2, weight_decay=1e-4, prune_percent=0.9, random_prune_percent=0.0),
}
COMMON = dict(lr=0.5, momentum=0.9, temperature=0.2, momentum_loss_beta=0.97, rand_strength=30, epoch=EPOCH,
              num_class=100, model="resnet18", scheduler="constant at lr (their cosine after warm-up)")


def patch_for_this_torch() -> None:
    """What their 2022 code needs to run on torch 2.14 / torchvision 0.29 on the CPU."""
    # torchvision.models.utils is gone (0.13+); models/resnet*.py import load_state_dict_from_url from it.
    from torch.hub import load_state_dict_from_url
    sys.modules["torchvision.models.utils"] = types.SimpleNamespace(load_state_dict_from_url=load_state_dict_from_url)
    # No GPU: .cuda() (the inputs, nt_xent's negative mask) stays on the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class Log:
    def info(self, msg: str) -> None:
        print(msg)


def seeded_model(model: torch.nn.Module, offset: int) -> tuple[dict, dict]:
    """Their model with seeded weights (the normalisation constants kept); returns (shapes, initial weights)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if "normalize." not in k}
    init = fixture_io.seeded_weights(shapes, SEED + offset)
    missing, unexpected = model.load_state_dict(init, strict=False)
    assert not unexpected and all("normalize." in k for k in missing)
    return shapes, init


def run_step(name: str, cfg: dict, model: torch.nn.Module, named: torch.nn.Module, step) -> dict:
    """One step of their ``train`` / ``train_prune`` at epoch 2 on one batch; the per-image losses recorded."""
    gen = torch.Generator().manual_seed(SEED)
    inputs = torch.rand(BATCH, 2, 3, SIZE, SIZE, generator=gen)  # [B, views, C, H, W], as their loader gives
    index = torch.randperm(BATCH, generator=gen)  # the dataset's indices, shuffled
    shadow = 1 + 4 * torch.rand(BATCH, generator=gen)  # the memory after epoch 1
    memory_before = shadow.clone()
    momentum_loss = torch.zeros(EPOCH, BATCH)
    momentum_loss[EPOCH - 2] = shadow

    from losses.nt_xent import NT_Xent_Loss

    class RecordingLoss(NT_Xent_Loss):
        calls: list = []

        def forward(self, features, features_=None):
            loss = super().forward(features, features_)
            self.calls.append(loss.detach().clone())
            return loss

    criterion = RecordingLoss(temp=cfg["temperature"], average=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                momentum=cfg["momentum"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda step: 1.0)
    args = SimpleNamespace(momentum_loss_beta=cfg["momentum_loss_beta"], print_freq=20,
                           prune_percent=cfg.get("prune_percent", 0.0),
                           random_prune_percent=cfg.get("random_prune_percent", 0.0))
    shadow, momentum_loss = step([(inputs, index)], model, criterion, optimizer, scheduler, EPOCH, Log(), shadow,
                                 momentum_loss, args=args)
    losses = criterion.calls[0]  # per image, in the batch's order: the one the memory takes (BCL-D: dense vs pruned)
    return dict(inputs=inputs, index=index, memory_before=memory_before, shadow=shadow, momentum_loss=momentum_loss,
                losses=losses, criterion_calls=criterion.calls)


def boosts(cfg: dict, momentum_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Their dataset's weights w after the epoch, and the RandAugment_prob(k, m, p) its __getitem__ builds for each
    image, with BCL-D's u (np.random.rand(1), recorded as drawn)."""
    import data.memoboosted_cifar100 as memo

    built, draws = [], []

    class RecordingRandAugment(memo.RandAugment_prob):
        def __init__(self, n, m, p):
            # BCL-D's m is a 1-element array (np.random.rand(1)); their float(self.m) took it on numpy 1.x, numpy 2
            # refuses: the same number as a scalar
            m = float(np.asarray(m).reshape(-1)[0])
            super().__init__(n, m, p)
            built.append((n, m, float(p)))

    draw = np.random.rand

    def recording_rand(*shape):
        out = draw(*shape)
        draws.append(float(np.asarray(out).reshape(-1)[0]))
        return out

    dataset = memo.memoboosted_CIFAR100.__new__(memo.memoboosted_CIFAR100)  # without CIFAR-100 on disk
    rng = np.random.default_rng(SEED)
    dataset.data = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    dataset.args = SimpleNamespace(rand_k=cfg["rand_k"], rand_strength=cfg["rand_strength"])
    dataset.momentum_weight = np.zeros(BATCH)
    dataset.update_momentum_weight(momentum_loss, EPOCH)
    memo.RandAugment_prob, np.random.rand = RecordingRandAugment, recording_rand
    # their __getitem__ draws from torch (crop, flip, jitter), Python's random (RandAugment's ops) and numpy (u,
    # cutout): all seeded, so the fixture is the same on every run
    random.seed(SEED), np.random.seed(SEED), torch.manual_seed(SEED)
    for idx in range(BATCH):
        dataset[idx]
    memo.RandAugment_prob, np.random.rand = RecordingRandAugment.__bases__[0], draw
    out = {"boost.weight": torch.as_tensor(dataset.momentum_weight),
           "boost.num_ops": torch.tensor([n for n, _, _ in built]),
           "boost.strength": torch.tensor([m for _, m, _ in built], dtype=torch.float64),
           "boost.prob": torch.tensor([p for _, _, p in built], dtype=torch.float64)}
    if cfg["rand_k"] != 1:
        assert len(draws) >= BATCH  # Cutout draws too (np.random.uniform), but not through rand: u's alone here
        out["boost.uniform"] = torch.tensor(draws[:BATCH], dtype=torch.float64)
    return out


def make(name: str, checkout: Path) -> None:
    cfg = COMMON | VARIANTS[name]
    if name == "bcl_i":
        import train as bcl_train
        from models.simclr import SimCLR
        model = SimCLR(num_class=cfg["num_class"], network=cfg["model"])
        named, step = model, bcl_train.train
    else:
        import train_sdclr
        from models.sdclr import SDCLR
        model = SDCLR(num_class=cfg["num_class"], network=cfg["model"])
        named, step = model.backbone, train_sdclr.train_prune  # names as SDCLR's network: conv1, ..., fc.fc1
    shapes, init = seeded_model(named, offset=0 if name == "bcl_i" else 1)
    run = run_step(name, cfg, model, named, step)

    tensors = {"input.views": run["inputs"], "input.index": run["index"], "input.memory": run["memory_before"],
               "loss": run["losses"].mean()}
    tensors |= {f"init.{k}": v for k, v in init.items()}
    tensors |= {f"grad.{k}": p.grad for k, p in named.named_parameters()}
    tensors |= {f"after.{k}": v for k, v in named.state_dict().items() if "normalize." not in k}
    tensors |= {"state.memory": run["shadow"], "state.losses": run["losses"],
                "state.momentum_loss_row": run["momentum_loss"][EPOCH - 1]}
    if name == "bcl_d":
        tensors |= {f"state.mask.{n}": m.prune_mask.bool() for n, m in named.named_modules()
                    if hasattr(m, "prune_mask")}
        # their second criterion call: the pruned branch's loss against the detached dense outputs
        tensors["state.losses_pruned_pass"] = run["criterion_calls"][1]
    tensors |= boosts(cfg, run["momentum_loss"])
    meta = dict(repo=REPO, commit=PINNED, seed=SEED + (0 if name == "bcl_i" else 1), shapes=shapes, config=cfg,
                script=cfg["script"],
                normalize=dict(mean=model.backbone.normalize.mean.tolist(),
                               std=model.backbone.normalize.std.tolist()),
                patches=["torchvision.models.utils stub", "Tensor.cuda -> identity",
                         "constant LambdaLR at lr 0.5 for their warm-up cosine",
                         "the dataset object built without CIFAR-100 (its data: 8 seeded images)",
                         "RandAugment_prob and np.random.rand wrapped to record k, m, p and u",
                         "BCL-D's m (a 1-element array) passed as a scalar: numpy 2 refuses float() of it"])
    print(fixture_io.save(name, tensors, meta), f"loss {tensors['loss'].item():.6f}")


SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")  # their ops that draw a random direction


def randaugment_draws(num_images: int = 64, num_ops: int = 2) -> None:
    """fixtures/bcl_randaugment.safetensors: BCL's RandAugment_prob(2, m, p) on 64 PIL images at seeded m in
    [0, 30] and p in [0, 1], every draw recorded: per image and op slot, the uniform that chose the op and the op
    (``random.choices``), the one that decided whether it applies (``random.uniform(0, 1) < p``), the one that chose
    a direction (shears, translations, rotation: ``random.random() > 0.5``), cutout's centre
    (``np.random.uniform(size)``), and the value v each applied op got. The ops' names and ranges in their order."""
    import data.randaug as randaug
    from PIL import Image

    class RecordingRandom(random.Random):
        draws: list[float] = []

        def random(self):
            out = super().random()
            self.draws.append(out)
            return out

    nan = float("nan")
    gen = torch.Generator().manual_seed(SEED + 2)
    strength = 30 * torch.rand(num_images, generator=gen, dtype=torch.float64)
    prob = torch.rand(num_images, generator=gen, dtype=torch.float64)
    images = np.random.default_rng(SEED + 2).integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
    table = randaug.augment_list()
    names = [op.__name__ for op, _, _ in table]
    fields = {k: torch.full((num_images, num_ops), nan, dtype=torch.float64)
              for k in ("choice_u", "apply_u", "sign_u", "cutout_x", "cutout_y", "value", "op")}
    randaug.random = RecordingRandom(SEED + 2)  # their module's `random`: choices, uniform and random draw from it
    np.random.seed(SEED + 2)  # cutout's centres
    uniform = np.random.uniform
    for i in range(num_images):
        applied, centres = [], []

        def recording_op(index, op):
            def run(img, v):
                applied.append((index, v))
                return op(img, v)
            return run

        def recording_uniform(*args, **kwargs):
            out = uniform(*args, **kwargs)
            centres.append(float(out))
            return out

        augment = randaug.RandAugment_prob(num_ops, float(strength[i]), float(prob[i]))
        augment.augment_list = [(recording_op(j, op), lo, hi) for j, (op, lo, hi) in enumerate(table)]
        RecordingRandom.draws = []
        np.random.uniform = recording_uniform
        augment(Image.fromarray(images[i]))
        np.random.uniform = uniform
        draws, ops = RecordingRandom.draws, iter(applied)
        fields["choice_u"][i] = torch.tensor(draws[:num_ops])
        chosen, at = [int(u * len(table)) for u in draws[:num_ops]], num_ops  # CPython's choices: floor(u * n)
        for slot in range(num_ops):
            fields["apply_u"][i, slot] = draws[at]
            fields["op"][i, slot] = chosen[slot]
            at += 1
            if draws[at - 1] < prob[i]:
                index, v = next(ops)
                assert index == chosen[slot]
                fields["value"][i, slot] = v
                if names[index] in SIGNED:
                    fields["sign_u"][i, slot] = draws[at]
                    at += 1
                if names[index] == "Cutout" and v > 0:
                    fields["cutout_x"][i, slot], fields["cutout_y"][i, slot] = centres[:2]
                    centres = centres[2:]
        assert at == len(draws) and next(ops, None) is None and not centres
    randaug.random = random
    tensors = {"input.strength": strength, "input.prob": prob} | {f"draw.{k}": v for k, v in fields.items()}
    tensors |= cutout_rectangles(randaug, fields)
    meta = dict(repo=REPO, commit=PINNED, seed=SEED + 2, num_ops=num_ops, image_size=32,
                ops=[[name, float(lo), float(hi)] for name, (_, lo, hi) in zip(names, table)],
                patches=["data.randaug's `random` module replaced by a recording random.Random",
                         "each op and np.random.uniform wrapped to record what they got"])
    print(fixture_io.save("bcl_randaugment", tensors, meta))


def cutout_rectangles(randaug, fields: dict[str, torch.Tensor], size: int = 32) -> dict[str, torch.Tensor]:
    """Where their Cutout draws each recorded rectangle: Cutout(v) on a black image with np.random.uniform giving
    the recorded centre (x, then y), as a [events, size, size] mask, and the events' (image, slot)."""
    from PIL import Image

    events = (~fields["cutout_x"].isnan()).nonzero().tolist()
    masks, uniform = [], np.random.uniform
    for i, j in events:
        centre = iter([fields["cutout_x"][i, j].item(), fields["cutout_y"][i, j].item()])
        np.random.uniform = lambda *args, **kwargs: next(centre)
        out = randaug.Cutout(Image.new("RGB", (size, size)), fields["value"][i, j].item())
        masks.append(torch.from_numpy(np.asarray(out).any(axis=2).copy()))
    np.random.uniform = uniform
    return {"cutout.mask": torch.stack(masks), "cutout.event": torch.tensor(events)}


def main(checkout: Path) -> None:
    fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    patch_for_this_torch()
    for name in VARIANTS:
        make(name, checkout)
    randaugment_draws()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
