"""Pre-train one method on one subset: the ``imbssl pretrain`` command."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from imbssl.augment import MultiCrop
from imbssl.config import ConfigError, RunConfig, load_yaml, save_config
from imbssl.data import save_indices
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.optim import build_optimizer, cosine_schedule, resolve_optim
from imbssl.engine.runlog import attach_file_log
from imbssl.engine.trainer import EpochCallback, Trainer, TrainSettings
from imbssl.methods import build_method
from imbssl.models import build_backbone
from imbssl.pipelines.common import (describe_hardware, load_pretrain_data, normalizer_for, resolve_device, save_backbone,
                                     seed_everything, to_tensor_nchw)

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pt"


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Create the run folder; refuse to overwrite a finished or different run."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        if not resume:
            raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it or pick another name")
        if load_yaml(saved) != cfg.model_dump(mode="json"):
            raise ConfigError(f"--resume with a config that differs from the one saved in {saved}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)


def pretrain(cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
             callbacks: list[EpochCallback] = (), indices: np.ndarray | None = None,
             init_from: Path | None = None) -> Path:
    """Train ``cfg.method``; returns the run folder holding backbone.pt.

    ``indices`` (into the train split) replaces the configured subset, e.g. one cluster of a
    pipeline; ``init_from`` is a backbone.pt to start from instead of a random initialisation.
    """
    run_dir = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    prepare_run_dir(cfg, run_dir, resume)
    handler = attach_file_log(run_dir)
    try:
        return _pretrain(cfg, run_dir, resume, callbacks, indices, init_from)
    finally:
        logging.getLogger("imbssl").removeHandler(handler)
        handler.close()


def _pretrain(cfg: RunConfig, run_dir: Path, resume: bool, callbacks: list[EpochCallback],
              indices: np.ndarray | None, init_from: Path | None) -> Path:
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.seed)
    data = load_pretrain_data(cfg.data, indices)
    save_indices(run_dir / "subset.npz", data.indices,
                 {"profile": cfg.data.subset.profile if indices is None else "given", "class_counts": data.class_counts.tolist(),
                  "classes": list(data.train.classes)})
    host_images = data.images
    normalize = normalizer_for(host_images)
    images = to_tensor_nchw(host_images, device)
    log.info("pre-training %s on %d images %s, class counts %s, device %s", cfg.method.name, len(images),
             tuple(images.shape[1:]), data.class_counts.tolist(), device)

    backbone = build_backbone(cfg.model, images.shape[1])
    if init_from is not None:
        backbone.load_state_dict(load_safe(init_from)["backbone"])
    method = build_method(cfg.method, backbone).to(device)
    if cfg.augment.local_crops and not method.uses_local_crops:
        raise ConfigError(f"method {cfg.method.name!r} takes no local crops; set augment.local_crops=0")
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    make_views = MultiCrop(cfg.augment, normalize.mean.to(device), normalize.std.to(device),
                           image_size=images.shape[-1], num_global=method.num_views)
    settings = TrainSettings(epochs=cfg.optim.epochs, batch_size=cfg.optim.batch_size, seed=cfg.seed,
                             precision=cfg.train.precision, channels_last=cfg.train.channels_last,
                             checkpoint_every=cfg.train.checkpoint_every,
                             collapse_warn_below=cfg.train.collapse_warn_below, log_every=cfg.train.log_every,
                             progress=cfg.train.progress)
    batch_size = min(settings.batch_size, len(images))
    optimizer = build_optimizer(method, cfg.optim, method.defaults, batch_size)
    steps_per_epoch = len(images) // batch_size
    scheduler = cosine_schedule(optimizer, cfg.optim.epochs * steps_per_epoch,
                                round(cfg.optim.warmup_epochs * steps_per_epoch))
    trainer = Trainer(method, optimizer, scheduler, images, make_views, run_dir, settings, callbacks)
    start = time.perf_counter()
    summary = trainer.fit(resume=resume)
    save_backbone(method.backbone, normalize, run_dir / BACKBONE_FILE)
    name, base_lr, weight_decay = resolve_optim(cfg.optim, method.defaults)
    (run_dir / "pretrain.json").write_text(json.dumps({
        **summary, "optimizer": name, "base_lr": base_lr, "weight_decay": weight_decay, "batch_size": batch_size,
        "num_images": len(images), "images_seen_total": cfg.optim.epochs * steps_per_epoch * batch_size,
        "wall_s_this_call": time.perf_counter() - start, "device": str(device),
        "hardware": describe_hardware(device), "torch": torch.__version__}, indent=2))
    return run_dir
