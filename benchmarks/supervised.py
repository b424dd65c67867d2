"""Supervised training throughput (img/s): our batched pad-crop-flip on the device vs per-image PIL in a DataLoader.

Both sides train the same ``LongTailClassifier`` (CE) with the same SGD step; they differ only in how the batch
is made. The baseline is what the LDAM-DRW code runs, rebuilt from PIL (torchvision is not a dependency):

    RandomCrop(32, padding=4)   ImageOps.expand(border=4, fill=0) then Image.crop at a random offset
    RandomHorizontalFlip()      Image.transpose(FLIP_LEFT_RIGHT) with p = 1/2
    ToTensor + Normalize        numpy, then torch

    python benchmarks/supervised.py --models resnet32,resnet18 --steps 30 --out benchmarks/results/x.json
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from imbssl.augment import PadCropFlip
from imbssl.config import LossConfig, ModelConfig
from imbssl.engine.supervised import LongTailClassifier
from imbssl.engine.trainer import optimizer_step
from imbssl.models import build_backbone
from imbssl.pipelines.common import describe_hardware

MEAN, STD = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])


class PadCropFlipPIL(Dataset):
    def __init__(self, images: np.ndarray, pad: int = 4) -> None:
        self.images, self.pad, self.rng = images, pad, random.Random(0)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = ImageOps.expand(Image.fromarray(self.images[index]), border=self.pad, fill=0)
        top, left = self.rng.randint(0, 2 * self.pad), self.rng.randint(0, 2 * self.pad)
        img = img.crop((left, top, left + 32, top + 32))
        if self.rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - MEAN[:, None, None]) / STD[:, None, None], index


def build(model: str, labels: torch.Tensor) -> tuple[LongTailClassifier, torch.optim.Optimizer]:
    classifier = LongTailClassifier(build_backbone(ModelConfig(backbone=model), 3), labels, 10, LossConfig())
    return classifier.train(), torch.optim.SGD(classifier.param_groups(), lr=0.1, momentum=0.9, weight_decay=2e-4)


def time_ours(model: str, images: torch.Tensor, labels: torch.Tensor, batch: int, steps: int, warmup: int) -> float:
    classifier, optimizer = build(model, labels)
    augment, gen = PadCropFlip(MEAN, STD), torch.Generator().manual_seed(0)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        indices = torch.randint(0, len(images), (batch,), generator=gen)
        optimizer_step(classifier, optimizer, augment(images[indices], gen), indices)
    return steps * batch / (time.perf_counter() - start)


def time_pil(model: str, host_images: np.ndarray, labels: torch.Tensor, batch: int, steps: int, warmup: int,
             workers: int) -> float:
    classifier, optimizer = build(model, labels)
    loader = iter(DataLoader(PadCropFlipPIL(host_images), batch_size=batch, shuffle=True, num_workers=workers,
                             drop_last=True))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x, indices = next(loader)
        optimizer_step(classifier, optimizer, [x], indices)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet32,resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the baseline")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    count = args.batch_size * (args.steps + args.warmup)
    host = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    images, labels = torch.from_numpy(host).permute(0, 3, 1, 2).contiguous(), torch.arange(count) % 10
    rows = []
    for model in args.models.split(","):
        ours = time_ours(model, images, labels, args.batch_size, args.steps, args.warmup)
        pil = time_pil(model, host, labels, args.batch_size, args.steps, args.warmup, args.workers)
        rows.append({"model": model, "ours_img_s": ours, "pil_dataloader_img_s": pil, "speedup": ours / pil})
        print(f"{model}: ours {ours:.0f} img/s, PIL + DataLoader ({args.workers} workers) {pil:.0f} img/s, "
              f"x{ours / pil:.2f}")
    result = {"rows": rows, "batch_size": args.batch_size, "steps": args.steps, "workers": args.workers,
              "hardware": describe_hardware(torch.device("cpu")), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
