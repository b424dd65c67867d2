"""Per-image PIL + DataLoader two-view pipeline: the baseline that ``ViewAugment`` replaces.

This is what the SimSiam/SimCLR reference code runs (torchvision transforms on PIL images in
DataLoader workers), rebuilt from PIL/numpy because torchvision is not a dependency:

    RandomResizedCrop(out, scale=cfg.crop_scale)    crop box as torchvision, ``Image.resize(box=)``
    RandomHorizontalFlip(cfg.flip_prob)
    RandomApply(ColorJitter(*cfg.jitter), cfg.jitter_prob)
                                                    ImageEnhance Brightness / Contrast / Color,
                                                    hue = shift of the H band of ``convert("HSV")``
                                                    (torchvision's PIL ``adjust_hue``)
    RandomGrayscale(cfg.gray_prob)                  ``convert("L")`` back to RGB
    RandomApply(GaussianBlur(sigma ~ U[.1, 2]), cfg.blur_prob)   ``ImageFilter.GaussianBlur``
    ToTensor + Normalize(mean, std)

To keep the comparison fair it uses the same parameters, distributions and jitter order
(brightness -> contrast -> saturation -> hue) as ``imbssl.augment.ViewAugment``, Python's
``random`` (cheaper per draw than torchvision's one-element torch tensors) and PIL's C
routines throughout. Run ``python benchmarks/pil_baseline.py`` to time it on random data.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import DataLoader, Dataset, get_worker_info

from imbssl.config import AugmentConfig

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
BLUR_SIGMA = (0.1, 2.0)


def random_resized_crop_box(
    rng: random.Random, height: int, width: int, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as torchvision's ``RandomResizedCrop.get_params``."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL ``adjust_hue``: shift the 8-bit H band by hue * 255 (uint8 wrap-around)."""
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray(np.asarray(h) + np.uint8(round(hue * 255) % 256))
    return Image.merge("HSV", (h, s, v)).convert("RGB")


class TwoViewPILDataset(Dataset):
    """Two independently augmented, normalised float views of each uint8 NHWC (or NHW) image."""

    def __init__(
        self,
        images: np.ndarray,
        mean: Sequence[float] | torch.Tensor,
        std: Sequence[float] | torch.Tensor,
        cfg: AugmentConfig | None = None,
        out_size: int | None = None,
        seed: int = 0,
    ):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"expected uint8 NHWC or NHW images, got {images.dtype} {images.shape}")
        self.images = images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images
        self.rgb = self.images.ndim == 4
        self.cfg = cfg or AugmentConfig()
        self.out_size = out_size or images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.fromarray(self.images[index])
        return self.view(img), self.view(img)

    def view(self, img: Image.Image) -> torch.Tensor:
        """One augmented view: PIL ops, then ToTensor + Normalize."""
        cfg, rng = self.cfg, self.rng
        top, left, h, w = random_resized_crop_box(rng, img.height, img.width, cfg.crop_scale)
        size, box = (self.out_size, self.out_size), (left, top, left + w, top + h)
        img = img.resize(size, Image.Resampling.BILINEAR, box=box)
        if rng.random() < cfg.flip_prob:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < cfg.jitter_prob:
            img = self._jitter(img)
        if self.rgb and rng.random() < cfg.gray_prob:
            img = img.convert("L").convert("RGB")
        if rng.random() < cfg.blur_prob:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_SIGMA)))
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).view(self.out_size, self.out_size, -1)
        return x.permute(2, 0, 1).float().div_(255.0).sub_(self.mean).div_(self.std)

    def _jitter(self, img: Image.Image) -> Image.Image:
        """ColorJitter with torchvision's factor ranges, in the fixed order b, c, s, h."""
        rng = self.rng
        bright, contrast, sat, hue = self.cfg.jitter
        if bright > 0:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(max(0.0, 1 - bright), 1 + bright))
        if contrast > 0:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(max(0.0, 1 - contrast), 1 + contrast))
        if sat > 0 and self.rgb:
            img = ImageEnhance.Color(img).enhance(rng.uniform(max(0.0, 1 - sat), 1 + sat))
        if hue > 0 and self.rgb:
            img = adjust_hue(img, rng.uniform(-hue, hue))
        return img


def _seed_worker(_: int) -> None:
    """Give each worker its own stream: DataLoader sets info.seed = base_seed + worker_id."""
    info = get_worker_info()
    info.dataset.rng.seed(info.seed)


def make_pil_loader(
    images: np.ndarray,
    batch_size: int,
    num_workers: int,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    seed: int,
    cfg: AugmentConfig | None = None,
    out_size: int | None = None,
) -> DataLoader:
    """Shuffled loader yielding ``[view1, view2]``, each float32 [B, C, out, out], as the papers' code.

    ``drop_last=True`` and persistent workers, as in the SimSiam reference training loop, so
    a timed epoch measures augmentation throughput rather than worker start-up.
    """
    dataset = TwoViewPILDataset(images, mean, std, cfg=cfg, out_size=out_size, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker,
        persistent_workers=num_workers > 0,
    )


def _time_loader(loader: DataLoader, epochs: int) -> float:
    """Images (pairs of views) per second over ``epochs`` passes, after one warm-up pass."""
    for _ in loader:
        pass
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for view1, _view2 in loader:
            count += view1.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="number of random images")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    shape = (args.n, args.size, args.size) + ((3,) if args.channels == 3 else ())
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    mean, std = [0.5] * args.channels, [0.25] * args.channels
    for workers in args.workers:
        loader = make_pil_loader(images, args.batch_size, workers, mean, std, seed=0)
        rate = _time_loader(loader, args.epochs)
        print(f"PIL loader, {workers} workers, batch {args.batch_size}, {args.size}px: "
              f"{rate:,.0f} images/s ({2 * rate:,.0f} views/s)")


if __name__ == "__main__":
    main()
