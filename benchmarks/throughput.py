"""SimSiam pre-training throughput: the step alone, an epoch with our pipeline, an epoch with the PIL baseline.

Every figure is images per second, each image counted once (both of its views):

    step          forward + backward + optimizer step on two pre-made view batches
    epoch, ours   uint8 images on the device -> ViewAugment per batch (two calls, one generator) -> step,
                  as ``imbssl.engine.trainer.Trainer`` does
    epoch, streamed  (``--stream``) the same, the images read batch by batch from a uint8 memory map on
                  disk (``imbssl.data.StreamedImages``, ``train.data_on_device: false``)
    epoch, PIL    the same images, model, batch size and step fed by ``make_pil_loader`` (per-image PIL
                  in DataLoader workers, as the papers' code), once per ``--workers`` count

Each measurement builds a fresh, seeded model and optimizer and runs ``--warmup`` steps before the
clock starts. Run ``python benchmarks/throughput.py --help``; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imbssl.augment import ViewAugment, channel_stats
from imbssl.config import AugmentConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from imbssl.data import DataError, StreamedImages, load_splits
from imbssl.engine.optim import build_optimizer
from imbssl.engine.precision import resolve_precision
from imbssl.engine.trainer import optimizer_step
from imbssl.launcher import loaded as tcmalloc_loaded
from imbssl.methods import build_method
from imbssl.methods.simsiam import SimSiamConfig
from imbssl.models import build_backbone
from imbssl.pipelines.common import describe_hardware, ready_for_training, resolve_device, to_tensor_nchw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pil_baseline import make_pil_loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = {"small_cnn": 16384, "resnet18": 4096}


class Bench:
    """One model at one precision: a fresh seeded SimSiam + optimizer and the Trainer's step."""

    def __init__(self, args: argparse.Namespace, model: str, precision: str, device: torch.device):
        torch.manual_seed(args.seed)
        width = args.resnet_width if model == "resnet18" else 1.0
        backbone = build_backbone(ModelConfig(backbone=model, width=width), in_channels=3)
        self.method = build_method(SimSiamConfig(), backbone).to(device).train()
        used = resolve_precision(precision, precision == "bf16", device)
        self.precision, self.channels_last, self.device = used.precision, used.channels_last, device
        self.method = ready_for_training(self.method, TrainConfig(compile=args.compile), device, self.channels_last)
        self.optimizer = build_optimizer(self.method, OptimConfig(), self.method.defaults, args.batch_size)

    def step(self, views: list[torch.Tensor], indices: torch.Tensor) -> float:
        """The Trainer's optimizer step, without its LR schedule, NaN check and checkpoints."""
        out = optimizer_step(self.method, self.optimizer, views, indices, self.precision, self.channels_last)
        return out.loss.item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(bench: Bench, views: list[torch.Tensor], steps: int, warmup: int) -> float:
    indices = torch.arange(len(views[0]), device=bench.device)
    for _ in range(warmup):
        bench.step(views, indices)
    sync(bench.device)
    start = time.perf_counter()
    for _ in range(steps):
        bench.step(views, indices)
    sync(bench.device)
    return steps * len(views[0]) / (time.perf_counter() - start)


def time_epoch_ours(bench: Bench, images: torch.Tensor, augment: ViewAugment, batch_size: int, warmup: int,
                    seed: int) -> float:
    gen = torch.Generator(device=images.device).manual_seed(seed)
    steps = len(images) // batch_size  # full batches only: each timed step has the same size

    def run(order: torch.Tensor, count: int) -> None:
        for i in range(count):
            indices = order[i % steps * batch_size:(i % steps + 1) * batch_size]
            batch = images[indices]
            bench.step([augment(batch, gen), augment(batch, gen)], indices)

    run(torch.randperm(len(images), generator=gen, device=images.device), warmup)
    sync(bench.device)
    start = time.perf_counter()
    run(torch.randperm(len(images), generator=gen, device=images.device), steps)  # one epoch
    sync(bench.device)
    return steps * batch_size / (time.perf_counter() - start)


def time_epoch_pil(bench: Bench, host_images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
                   workers: int, warmup: int, seed: int) -> float:
    loader = make_pil_loader(host_images, batch_size, workers, mean, std, seed=seed)

    def run(batches) -> int:
        seen = 0
        for view1, view2 in batches:
            views = [view1.to(bench.device), view2.to(bench.device)]
            bench.step(views, torch.arange(seen, seen + len(view1), device=bench.device))
            seen += len(view1)
        return seen

    run(itertools.islice(loader, warmup))  # also starts the (persistent) workers
    sync(bench.device)
    start = time.perf_counter()
    seen = run(loader)
    sync(bench.device)
    rate = seen / (time.perf_counter() - start)
    del loader  # shuts the workers down before the next measurement
    return rate


def load_images(args: argparse.Namespace, count: int) -> tuple[np.ndarray, str]:
    """``count`` uint8 NHWC training images (a seeded random sample) and where they came from."""
    rng = np.random.default_rng(args.seed)
    if args.data == "cifar10":
        try:
            cfg = DataConfig(source="imagefolder", path=args.data_path, cache_dir=args.cache_dir, download=False)
            train = load_splits(cfg)["train"].images
            picked = rng.choice(len(train), size=min(count, len(train)), replace=False)
            return np.ascontiguousarray(train[picked]), f"CIFAR-10 train ({args.data_path})"
        except (DataError, OSError) as err:
            note = f"SYNTHETIC random uint8 images: CIFAR-10 unavailable ({err})"
    else:
        note = "SYNTHETIC random uint8 images (--data synthetic)"
    print(f"NOTE: {note}", file=sys.stderr)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), note


def resized(host: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images bilinearly resized to ``size`` x ``size`` (CIFAR at ImageNet-like sizes)."""
    if host.shape[1] == size:
        return host
    x = torch.from_numpy(host).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def streamed(host: np.ndarray, path: Path, device: torch.device) -> StreamedImages:
    """``host`` written as the .npy ``path`` and read back as the memory map the decode cache serves."""
    np.save(path, host)
    memmap = np.load(path, mmap_mode="r")
    return StreamedImages(memmap, np.arange(len(memmap)), device)


def images_per_model(spec: str, models: list[str]) -> dict[str, int]:
    """``"4096"`` for every model, or ``"small_cnn=16384,resnet18=4096"``; unnamed models use the defaults."""
    counts = {m: DEFAULT_IMAGES.get(m, 4096) for m in models}
    for item in filter(None, spec.split(",")):
        name, _, value = item.rpartition("=")
        counts.update({name: int(value)} if name else {m: int(value) for m in models})
    return counts


def environment(device: torch.device) -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": describe_hardware(device),
            "torch": torch.__version__, "tcmalloc": tcmalloc_loaded(),
            "device": str(device)}


def markdown(rows: list[dict], workers: list[int]) -> str:
    stream = "epoch_streamed" in rows[0]
    head = ["model", "precision", "size", "images", "step img/s", "ours epoch img/s",
            *(["streamed epoch img/s"] if stream else []), *[f"PIL w={w} img/s" for w in workers], "ours / best PIL",
            *(["streamed / best PIL"] if stream else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        best_pil = max(r["epoch_pil"].values())
        cells = [r["model"], r["precision"], f"{r['size']} px", str(r["images"]), f"{r['step']:,.0f}",
                 f"{r['epoch_ours']:,.0f}", *([f"{r['epoch_streamed']:,.0f}"] if stream else []),
                 *[f"{r['epoch_pil'][str(w)]:,.0f}" for w in workers], f"{r['ours_over_best_pil']:.2f}x",
                 *([f"{r['epoch_streamed'] / best_pil:.2f}x"] if stream else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,resnet18", help="comma-separated backbones")
    parser.add_argument("--resnet-width", type=float, default=1.0, help="width multiplier of resnet18")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated; bf16 = autocast + channels_last; "
                                                                  "auto = train.precision: auto on this machine")
    parser.add_argument("--images", default="", help="images per epoch: N, or model=N,... "
                        f"(default {','.join(f'{k}={v}' for k, v in DEFAULT_IMAGES.items())})")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sizes", default="32", help="comma-separated image sizes (CIFAR resized bilinearly)")
    parser.add_argument("--stream", action="store_true", help="also time the epoch streamed from a memory map")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model's parts (train.compile); "
                                                                 "the warm-up steps absorb the compilation")
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts for the baseline")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the step-alone measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    parser.add_argument("--data", choices=("cifar10", "synthetic"), default="cifar10")
    parser.add_argument("--data-path", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"), help="decoded-array cache of imbssl.data")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/throughput-<date>.json)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    models, precisions = args.models.split(","), args.precision.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    counts = images_per_model(args.images, models)
    if min(counts.values()) < args.batch_size:
        parser.error(f"--images {counts} must be at least --batch-size {args.batch_size}")
    env = environment(device)
    print(f"# SimSiam throughput, {env['date']} | {env['hardware']} | torch {env['torch']}"
          f" | tcmalloc {'preloaded' if env['tcmalloc'] else 'not preloaded'} | batch {args.batch_size}")
    if "auto" in precisions:
        print(f"# precision auto = {resolve_precision('auto', False, device).describe()}")

    host_all, source = load_images(args, max(counts.values()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="imbssl-throughput-") as scratch:
        for model, size in itertools.product(models, [int(v) for v in args.sizes.split(",")]):
            host = resized(host_all[:counts[model]], size)
            mean, std = channel_stats(host)
            images = to_tensor_nchw(host, device)
            augment = ViewAugment(AugmentConfig(), mean.to(device), std.to(device))
            gen = torch.Generator(device=device).manual_seed(args.seed)
            views = [augment(images[:args.batch_size], gen) for _ in range(2)]
            from_disk = streamed(host, Path(scratch) / f"{model}-{size}px.npy", device) if args.stream else None
            for precision in precisions:
                label = f"  {model} {size}px {precision}:"
                print(f"{label} step ...", file=sys.stderr, flush=True)
                row = {"model": model, "precision": precision, "size": size, "images": len(host),
                       "step": time_step(Bench(args, model, precision, device), views, args.steps, args.warmup)}
                print(f"{label} epoch, ours ...", file=sys.stderr, flush=True)
                row["epoch_ours"] = time_epoch_ours(Bench(args, model, precision, device), images, augment,
                                                    args.batch_size, args.warmup, args.seed)
                if args.stream:
                    print(f"{label} epoch, streamed ...", file=sys.stderr, flush=True)
                    row["epoch_streamed"] = time_epoch_ours(Bench(args, model, precision, device), from_disk,
                                                            augment, args.batch_size, args.warmup, args.seed)
                row["epoch_pil"] = {}
                for w in workers:
                    print(f"{label} epoch, PIL, {w} workers ...", file=sys.stderr, flush=True)
                    row["epoch_pil"][str(w)] = time_epoch_pil(Bench(args, model, precision, device), host, mean, std,
                                                              args.batch_size, w, args.warmup, args.seed)
                row["ours_over_best_pil"] = row["epoch_ours"] / max(row["epoch_pil"].values())
                rows.append(row)

    print(f"\nData: {source}. Images per second, each image counted once (two views); batch {args.batch_size}.\n")
    print(markdown(rows, workers))
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"throughput-{env['date'][:10]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "data": source, "args": vars(args), "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
