"""Pre-train one method on one subset: the ``imbssl pretrain`` command."""
from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imbssl.augment import MultiCrop, Normalize, PadCropFlip
from imbssl.config import ConfigError, OptimConfig, RunConfig
from imbssl.data import StreamedImages, save_indices, training_images
from imbssl.engine.distributed import barrier, is_main, main_first, world_size
from imbssl.engine.divergence import DivergenceWatch
from imbssl.engine.optim import build_optimizer, resolve_optim
from imbssl.engine.precision import auto_override
from imbssl.engine.runlog import check_wandb
from imbssl.engine.schedules import cosine_schedule, restart_schedule, step_schedule, ts_temperature_schedule
from imbssl.engine.trainer import EpochCallback, Trainer, TrainSettings, steps_per_epoch
from imbssl.methods import SSLMethod, build_method
from imbssl.models import build_backbone
from imbssl.pipelines.common import (PretrainData, describe_hardware, determinism, load_backbone, load_pretrain_data,
                                     normalizer_for, ready_for_training, resolve_device, save_backbone, seed_everything,
                                     record_precision, set_determinism, training_precision)
from imbssl.pipelines.runfolder import run_folder, save_run_config
from imbssl.records import PretrainRecord

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pt"
#: the images that data.unreadable=skip left out, one per line
SKIPPED_FILE = "skipped_images.txt"
SUMMARY_FILE = PretrainRecord.FILE


def pretrain(cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
             callbacks: list[EpochCallback] = (), indices: np.ndarray | None = None,
             init_from: Path | None = None, check_data: Callable[[PretrainData], object] | None = None) -> Path:
    """Train ``cfg.method``; returns the run folder holding backbone.pt.

    ``indices`` (into the train split) replaces the configured subset, e.g. one cluster of a
    pipeline; ``init_from`` is a backbone.pt to start from instead of a random initialisation;
    ``check_data`` refuses, before training, data that what follows it (an evaluation) cannot use.
    """
    check_wandb(cfg.train.wandb)  # before a folder is made or the data loaded
    auto_override()  # a bad IMBSSL_AUTO_PRECISION, refused as early
    run_dir = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    with run_folder(cfg, run_dir, resume):
        data, images = load_run_images(cfg, run_dir, indices)
        if check_data is not None:
            check_data(data)
        if init_from is None:
            backbone, normalize = build_backbone(cfg.model, images.shape[1]), normalizer_for(images)
        else:  # weights that were trained on inputs standardised one way keep being fed them that way
            backbone, normalize = load_backbone(cfg.model, images.shape[1], init_from)
        method = build_method(cfg.method, backbone).to(images.device)
        if cfg.augment.local_crops and not method.uses_local_crops:
            raise ConfigError(f"method {cfg.method.name!r} takes no local crops; set augment.local_crops=0")
        make_views = view_maker(cfg, method, normalize, images)
        train_method(cfg, method, images, make_views, normalize, run_dir, resume, callbacks, labels=data.labels)
    return run_dir


def view_maker(cfg: RunConfig, method: SSLMethod, normalize: Normalize, images: torch.Tensor
               ) -> MultiCrop | PadCropFlip:
    """The method's training views, by ``augment.crop``: resized crops with the colour operations (MultiCrop), or
    pad: the zero-padded random crop and flip of supervised CIFAR training, with which pretrain_rot.py trains
    Rotation (PadCropFlip)."""
    mean, std = normalize.mean.to(images.device), normalize.std.to(images.device)
    if cfg.augment.crop == "resized":
        return MultiCrop(cfg.augment, mean, std, image_size=images.shape[-1], num_global=method.num_views)
    if cfg.method.name in ("bcl-i", "bcl-d"):  # its views() boosts each resized view (RandAugment)
        raise ConfigError(f"augment.crop=pad: {cfg.method.name} boosts its resized views itself; use crop resized")
    return PadCropFlip(mean, std, cfg.augment.crop_pad, cfg.augment.flip_prob, num_views=method.num_views)


def lr_schedule(lr: float, optim: OptimConfig, steps: int) -> np.ndarray:
    """The lr at every step, from ``lr`` (the optimizer's, scaled by the batch), ``steps`` steps an epoch:
    ``optim.lr_schedule`` after ``optim.warmup_epochs``, the cosine of SSL pre-training to 0; step,
    pretrain_rot.py's decays at ``optim.milestones``; or restart, GH's cosine restarted at ``optim.milestones[0]``."""
    total_steps, warmup_steps = optim.epochs * steps, round(optim.warmup_epochs * steps)
    if optim.lr_schedule == "step":
        return step_schedule(lr, total_steps, steps, optim.warmup_epochs, optim.milestones, optim.lr_factors)
    if optim.lr_schedule == "restart":
        stage1_final, stage2_base = (lr * factor for factor in optim.lr_factors)
        return restart_schedule(lr, total_steps, warmup_steps, optim.milestones[0] * steps, stage1_final, stage2_base)
    return cosine_schedule(lr, 0.0, total_steps, warmup_steps)


def load_run_images(cfg: RunConfig, run_dir: Path, indices: np.ndarray | None
                    ) -> tuple[PretrainData, torch.Tensor | StreamedImages]:
    """Seed everything, record the training subset in run_dir/subset.npz and put its images on the device (or
    stream them from disk, ``train.data_on_device``)."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.seed)
    set_determinism(cfg.train.deterministic)
    with main_first():  # rank 0 decodes into the cache, the other processes then read it
        data = load_pretrain_data(cfg.data, indices)
    profile = cfg.data.subset.profile if indices is None else "given"
    counts = data.class_counts
    if is_main():
        known = {} if counts is None else {"class_counts": counts.tolist()}
        save_indices(run_dir / "subset.npz", data.indices, {"profile": profile, "classes": list(data.train.classes),
                                                             **known})
        record_skipped(data.train.skipped, run_dir / SKIPPED_FILE)
    images = training_images(data.train.images, data.indices, device, cfg.train.data_on_device,
                             cfg.train.prefetch_batches)
    log.info("training %s: %s on the %s subset (%d images %s, %s), seed %d, device %s", cfg.name,
             cfg.method.name, describe_subset(cfg, indices), len(images), tuple(images.shape[1:]),
             "unlabelled" if counts is None else f"class counts {counts.tolist()}", cfg.seed, device)
    return data, images


def record_skipped(skipped: tuple[str, ...], path: Path) -> None:
    """The unreadable images that the decode left out (data.unreadable=skip), listed in ``path``: none is lost
    without a word, on a cache hit too."""
    if skipped:
        path.write_text("".join(f"{name}\n" for name in skipped))
        log.warning("%d unreadable image(s) were left out (data.unreadable=skip): listed in %s", len(skipped), path)


def describe_subset(cfg: RunConfig, indices: np.ndarray | None) -> str:
    """'exp p=100', 'balanced N=1,234', 'full' or 'given' (a pipeline's cluster), for the logs."""
    subset = cfg.data.subset
    if indices is not None:
        return "given"
    if subset.profile in ("exp", "step"):
        return f"{subset.profile} p={subset.imbalance:g}"
    if subset.profile == "index_file":
        return f"index file {Path(subset.index_file).name}"
    if subset.profile == "balanced":
        return f"balanced N={subset.total:,}" if subset.total else f"balanced (rs. of p={subset.imbalance:g})"
    return "full"


def run_schedules(cfg: RunConfig, method: SSLMethod, lr: float, steps: int) -> dict[str, np.ndarray]:
    """The run's own schedules (engine/schedules.py), ``steps`` steps an epoch: the lr, and TS's temperature in
    place of the method's constant one when ``optim.temperature_schedule`` is set."""
    schedules = {"lr": lr_schedule(lr, cfg.optim, steps)}
    if cfg.optim.temperature_schedule is not None:
        if "temperature" not in method.schedules(cfg.optim.epochs * steps, steps):
            raise ConfigError(f"optim.temperature_schedule: {cfg.method.name} has no contrastive temperature; the "
                              f"schedule applies to simclr, moco, sdclr, bcl-i and bcl-d")
        schedules["temperature"] = temperature_schedule(cfg.optim, steps)
    return schedules


def temperature_schedule(optim: OptimConfig, steps: int) -> np.ndarray:
    """``optim.temperature_schedule`` at every step, ``steps`` steps an epoch: per epoch from the 1-based epoch number
    unless ``update: step``."""
    ts = optim.temperature_schedule
    return ts_temperature_schedule(ts.tau_min, ts.tau_max, ts.t_max_epochs, optim.epochs * steps, steps,
                                   per_epoch=ts.update == "epoch")


def train_method(cfg: RunConfig, method: SSLMethod, images: torch.Tensor, make_views: MultiCrop,
                 normalize: Normalize, run_dir: Path, resume: bool, callbacks: list[EpochCallback],
                 labels: np.ndarray | None = None) -> None:
    """``cfg.optim``'s optimizer and lr schedule, the Trainer loop, then backbone.pt and pretrain.json.

    ``labels`` of ``images``, when known, only feed the method's epoch statistics (e.g. cluster purity).
    """
    used = training_precision(cfg.train, images.device, run_dir if resume else None)
    recorded = record_precision(cfg, used, run_dir, resume)
    method = ready_for_training(method, cfg.train, images.device, used.channels_last)
    settings = TrainSettings(epochs=cfg.optim.epochs, batch_size=cfg.optim.batch_size, seed=cfg.seed,
                             precision=used.precision, channels_last=used.channels_last,
                             checkpoint_every=cfg.train.checkpoint_every,
                             checkpoint_every_s=cfg.train.checkpoint_every_s,
                             collapse_warn_below=cfg.train.collapse_warn_below, log_every=cfg.train.log_every,
                             progress=cfg.train.progress, wandb=cfg.train.wandb, run_config=cfg.model_dump(mode="json"))
    batch_size = min(settings.batch_size, len(images))
    optimizer = build_optimizer(method, cfg.optim, method.defaults, batch_size)
    steps = steps_per_epoch(len(images), batch_size)
    schedules = run_schedules(cfg, method, optimizer.defaults["lr"], steps)
    trainer = Trainer(method, optimizer, schedules, images, make_views, run_dir, settings,
                      [DivergenceWatch(method), *callbacks], labels)
    start = time.perf_counter()
    summary = trainer.fit(resume=resume, resumed=partial(save_run_config, recorded, run_dir))
    if is_main():
        name, base_lr, weight_decay = resolve_optim(cfg.optim, method.defaults)
        PretrainRecord(
            **summary, optimizer=name, base_lr=base_lr, weight_decay=weight_decay, batch_size=batch_size,
            processes=world_size(), num_images=len(images), images_seen_total=cfg.optim.epochs * len(images),
            wall_s_this_call=time.perf_counter() - start, device=str(images.device),
            hardware=describe_hardware(images.device), torch=torch.__version__, determinism=determinism(),
            precision=used._asdict()
        ).write(run_dir)
        # last: its presence marks the run done
        save_backbone(method.eval_backbone, normalize, run_dir / BACKBONE_FILE, method.eval_heads,
                      image_size=tuple(images.shape[-2:]))
    barrier()  # no process returns before the run's files are complete
