"""Long-tailed supervised training: the ``imbssl train`` command.

A classifier is trained on a long-tailed subset with its labels, from scratch or from any imbssl run's
backbone.pt (self-supervised pre-training, SSP: "Rethinking the value of labels", Sec. 4). The epoch is
selected on a balanced validation set held out of the training pool; the balanced test split is predicted
once per reported model. With ``crt.enabled`` a second stage re-trains the classifier on the frozen
backbone (cRT). The run folder holds:

    subset.npz              the training images (indices into the train split) and the validation images
    checkpoints/last.pt     the main stage's resumable state; checkpoints/best.pt the model selected on validation
    crt/                    the cRT stage's own checkpoints and logs
    model.pt                the reported model (backbone, classifier, input normalisation)
    train.json              test top-1 / error, per-class, many/medium/few and thirds of each reported model

Under torchrun every process trains its part of each global batch (engine/distributed.py); rank 0 alone writes
the folder and tests the models.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imbssl.augment import Normalize, PadCropFlip
from imbssl.config import ConfigError, LossConfig, ModelConfig, SupervisedConfig
from imbssl.data import ImageSet, StreamedImages, load_splits, save_indices, select_subset, training_images
from imbssl.engine.checkpoint import load_safe, save_atomic
from imbssl.engine.distributed import barrier, is_main, main_first, world_size
from imbssl.engine.precision import Precision, auto_override
from imbssl.engine.runlog import check_wandb
from imbssl.engine.schedules import cosine_schedule, step_schedule
from imbssl.engine.supervised import LongTailClassifier
from imbssl.engine.trainer import EpochCallback, Trainer, TrainSettings, steps_per_epoch
from imbssl.eval import accuracy_report, balanced_accuracy, extract_features, held_out_validation
from imbssl.losses import posthoc_logit_adjustment
from imbssl.models import build_backbone
from imbssl.pipelines.common import (describe_hardware, determinism, load_backbone, normalizer_for, resolve_device,
                                     ready_for_training, seed_everything, set_determinism, to_tensor_nchw,
                                     record_precision, training_precision)
from imbssl.pipelines.runfolder import run_folder, save_run_config
from imbssl.records import TrainRecord

log = logging.getLogger(__name__)

TRAIN_FILE = TrainRecord.FILE
MODEL_FILE = "model.pt"
BEST_FILE = Path("checkpoints") / "best.pt"
CRT_DIR = "crt"


@dataclass
class LabelledData:
    """The long-tailed training images (on the device) with their labels, the validation and the test split.

    Self-training adds pseudo-labelled images: ``sample_weight`` gives each training image its loss weight (None =
    1), and ``labeled_counts`` the per-class counts of the truly labelled ones, which define head and tail.
    """

    train_images: torch.Tensor | StreamedImages
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: np.ndarray
    test: ImageSet
    classes: tuple[str, ...]
    sample_weight: torch.Tensor | None = None
    labeled_counts: np.ndarray | None = None

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train_labels.cpu().numpy(), minlength=len(self.classes))

    @property
    def head_tail_counts(self) -> np.ndarray:
        """The counts that the many/medium/few and thirds groups are drawn by."""
        return self.labeled_counts if self.labeled_counts is not None else self.class_counts


def train(cfg: SupervisedConfig, run_dir: Path | None = None, resume: bool = False,
          callbacks: list[EpochCallback] = ()) -> Path:
    """Train, select, test; returns the run folder holding train.json."""
    check_init_from(cfg)  # before the data is loaded or a folder made
    check_wandb(cfg.train.wandb)
    auto_override()  # a bad IMBSSL_AUTO_PRECISION, refused before a folder is made
    run_dir = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    with run_folder(cfg, run_dir, resume):
        fit_and_report(cfg, load_labelled_data(cfg, run_dir), run_dir, resume, callbacks)
    return run_dir


def check_init_from(cfg: SupervisedConfig) -> None:
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise ConfigError(f"init_from={cfg.init_from}: no such file (a backbone.pt of a finished imbssl run)")


def fit_and_report(cfg: SupervisedConfig, data: LabelledData, run_dir: Path, resume: bool,
                   callbacks: list[EpochCallback] = ()) -> None:
    """Train on ``data`` in the open run folder ``run_dir``; write model.pt and, last, train.json."""
    start = time.perf_counter()
    seed_everything(cfg.seed)  # here, so the initial weights do not depend on what ran before in this process
    backbone, normalize = initial_backbone(cfg, data.train_images)
    model = LongTailClassifier(backbone, data.train_labels, len(data.classes), cfg.loss,
                               sample_weight=data.sample_weight).to(data.train_images.device)
    used = training_precision(cfg.train, data.train_images.device, run_dir if resume else None)
    selected = fit_stage(cfg, model, data, normalize, run_dir, resume, callbacks, cfg.optim.epochs, used)
    # cRT freezes the selected backbone as it is, so the main stage is tested as well afterwards
    reported = (retrain_classifier(cfg, selected, data, normalize, run_dir, resume, used) if cfg.crt.enabled
                else selected)
    if is_main():
        write_results(cfg, data, normalize, model, selected, reported, run_dir, start, used)
    barrier()  # no process returns before train.json is written


def write_results(cfg: SupervisedConfig, data: LabelledData, normalize: Normalize, last: LongTailClassifier,
                  selected: LongTailClassifier, reported: LongTailClassifier, run_dir: Path, start: float,
                  used: Precision) -> None:
    """model.pt (the reported model) and train.json: the test report of the selected model, the last epoch's,
    with post-hoc logit adjustment, and of the cRT stage when there is one."""
    results = {"main": report_stage(selected, data, normalize, cfg),
               "main_last_epoch": {"test": test_report(last, data, normalize, cfg)},
               "posthoc_logit_adjusted": {"test": test_report(selected, data, normalize, cfg, adjust_prior=True)}}
    if cfg.crt.enabled:
        results["crt"] = report_stage(reported, data, normalize, cfg)
    headline = "crt" if cfg.crt.enabled else "main"
    save_atomic({"model": reported.state_dict(), "loss": reported.cfg.model_dump(), "mean": normalize.mean.cpu(),
                 "std": normalize.std.cpu(), "image_size": list(data.train_images.shape[-2:])}, run_dir / MODEL_FILE)
    TrainRecord(test=results[headline]["test"], reported=headline, **results,
                train_class_counts=data.class_counts.tolist(), labeled_class_counts=data.head_tail_counts.tolist(),
                val_images=len(data.val_labels), init_from=cfg.init_from, processes=world_size(),
                wall_s_this_call=time.perf_counter() - start, hardware=describe_hardware(data.train_images.device),
                torch=torch.__version__, determinism=determinism(), precision=used._asdict()).write(run_dir)


def load_classifier(model_cfg: ModelConfig, in_channels: int, num_classes: int, path: Path
                    ) -> tuple[LongTailClassifier, Normalize]:
    """The reported model of a finished run (its model.pt) with the input normalisation it was trained with."""
    state = load_safe(path)
    labels = torch.arange(num_classes)  # any labels that hold every class: the loss buffers are not used here
    model = LongTailClassifier(build_backbone(model_cfg, in_channels), labels, num_classes, LossConfig(**state["loss"]))
    model.load_state_dict(state["model"])
    return model.eval(), Normalize(state["mean"], state["std"])


def load_labelled_data(cfg: SupervisedConfig, run_dir: Path) -> LabelledData:
    """The configured long-tailed subset, less the validation images it gives up, on the device."""
    set_determinism(cfg.train.deterministic)
    with main_first():  # rank 0 decodes into the cache, the other processes then read it
        splits = load_splits(cfg.data)
    pool = splits["train"]
    train_idx, val_idx = held_out_validation(pool.labels, select_subset(pool.labels, cfg.data.subset),
                                             cfg.eval.val_per_class, cfg.seed)
    return labelled_data(cfg, pool, splits["test"], train_idx, val_idx, run_dir)


def labelled_data(cfg: SupervisedConfig, pool: ImageSet, test: ImageSet, train_idx: np.ndarray, val_idx: np.ndarray,
                  run_dir: Path, train_labels: np.ndarray | None = None, sample_weight: np.ndarray | None = None,
                  labeled_counts: np.ndarray | None = None) -> LabelledData:
    """``pool``'s images ``train_idx`` (labelled ``train_labels``, by default their own) and ``val_idx`` on the
    device, the training images saved in run_dir/subset.npz."""
    device = resolve_device(cfg.train.device)
    labels = pool.labels[train_idx] if train_labels is None else train_labels
    counts = np.bincount(labels, minlength=len(pool.classes))
    if is_main():
        save_indices(run_dir / "subset.npz", train_idx, {
            "profile": cfg.data.subset.profile, "class_counts": counts.tolist(), "classes": list(pool.classes),
            "val_indices": val_idx.tolist()})
    log.info("training %s: %s loss%s on %d images (class counts %s), validation %d images, seed %d, device %s",
             cfg.name, cfg.loss.name, f" with {cfg.loss.deferral.upper()}" if cfg.loss.deferral != "none" else "",
             len(train_idx), counts.tolist(), len(val_idx), cfg.seed, device)
    return LabelledData(train_images=training_images(pool.images, train_idx, device, cfg.train.data_on_device,
                                                     cfg.train.prefetch_batches),
                        train_labels=torch.as_tensor(labels, device=device),
                        val_images=to_tensor_nchw(pool.images[val_idx], device), val_labels=pool.labels[val_idx],
                        test=test, classes=pool.classes,
                        sample_weight=None if sample_weight is None else torch.as_tensor(sample_weight, device=device),
                        labeled_counts=labeled_counts)


def initial_backbone(cfg: SupervisedConfig, images: torch.Tensor | StreamedImages) -> tuple[nn.Module, Normalize]:
    """A random backbone fed ``images`` standardised by their own channel statistics, or ``init_from``'s weights
    with the input normalisation they were trained with."""
    in_channels = images.shape[1]
    if cfg.init_from is None:
        return build_backbone(cfg.model, in_channels), normalizer_for(images)
    path = Path(cfg.init_from)
    try:
        return load_backbone(cfg.model, in_channels, path)
    except RuntimeError as err:  # load_state_dict: missing, unexpected or differently shaped weights
        raise ConfigError(f"init_from={path} does not fit model.backbone={cfg.model.backbone} width {cfg.model.width}"
                          f" ({str(err).splitlines()[0].rstrip(':')}); set model to the pre-trained backbone's"
                          ) from None


def fit_stage(cfg: SupervisedConfig, model: LongTailClassifier, data: LabelledData, normalize: Normalize,
              run_dir: Path, resume: bool, callbacks: list[EpochCallback], epochs: int, used: Precision,
              cosine_lr: float | None = None) -> LongTailClassifier:
    """Train ``model`` in ``run_dir`` at precision ``used`` and return a copy of it at the epoch selected on
    validation. The lr follows ``cfg.optim``'s warm-up and steps, or a cosine from ``cosine_lr`` to 0 (cRT,
    fine-tuning)."""
    settings = TrainSettings(epochs=epochs, batch_size=cfg.optim.batch_size, seed=cfg.seed,
                             precision=used.precision, channels_last=used.channels_last,
                             checkpoint_every=cfg.train.checkpoint_every,
                             checkpoint_every_s=cfg.train.checkpoint_every_s, log_every=cfg.train.log_every,
                             progress=cfg.train.progress, wandb=cfg.train.wandb, run_config=cfg.model_dump(mode="json"))
    recorded = record_precision(cfg, used, run_dir, resume)
    batch_size = min(settings.batch_size, len(data.train_images))
    optimizer = torch.optim.SGD(model.param_groups(), lr=cosine_lr or cfg.optim.lr,
                                momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    steps = steps_per_epoch(len(data.train_images), batch_size)
    lr, total_steps = optimizer.defaults["lr"], epochs * steps
    lr_schedule = cosine_schedule(lr, 0.0, total_steps) if cosine_lr else \
        step_schedule(lr, total_steps, steps, cfg.optim.warmup_epochs, cfg.optim.milestones, cfg.optim.lr_factors)
    model = ready_for_training(model, cfg.train, data.train_images.device, used.channels_last)
    selector = SelectOnValidation(model, data, normalize, run_dir / BEST_FILE, cfg.eval.batch_size)
    make_views = PadCropFlip(normalize.mean, normalize.std, cfg.augment_pad)
    trainer = Trainer(model, optimizer, {"lr": lr_schedule}, data.train_images, make_views, run_dir, settings,
                      callbacks, evaluators=[selector])
    trainer.fit(resume=resume, resumed=partial(save_run_config, recorded, run_dir))
    return selector.selected()


class SelectOnValidation:
    """After each epoch: balanced accuracy on the validation set, and ``path`` <- the model when it is the best yet.

    The earliest epoch wins a tie. Called before the epoch's checkpoint, so a resumed run never lacks a candidate.
    Every process selects (they hold the same model); rank 0 alone saves.
    """

    def __init__(self, model: LongTailClassifier, data: LabelledData, normalize: Normalize, path: Path,
                 batch_size: int) -> None:
        self.model, self.data, self.normalize, self.path, self.batch_size = model, data, normalize, path, batch_size
        self.best = load_safe(path) if path.exists() else {"val_acc": -1.0, "epoch": 0}

    def __call__(self, epoch: int, summary: dict) -> dict:
        logits = predict(self.model, self.data.val_images, self.normalize, self.batch_size)
        acc = balanced_accuracy(logits.argmax(1).numpy(), self.data.val_labels)
        if acc > self.best["val_acc"]:
            # A copy: state_dict() shares memory with the weights, which the next optimizer steps change in place.
            weights = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
            self.best = {"val_acc": acc, "epoch": epoch, "model": weights}
            if is_main():
                save_atomic(self.best, self.path)
        return {"val_acc": acc, "selected_epoch": self.best["epoch"]}

    def selected(self) -> LongTailClassifier:
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.best["model"])
        model.selected_epoch, model.val_acc = self.best["epoch"], self.best["val_acc"]
        return model


def predict(model: nn.Module, images: torch.Tensor | np.ndarray, normalize: Normalize, batch_size: int) -> torch.Tensor:
    """Logits of ``images`` (uint8 NCHW tensor or NHWC array) in eval mode, on the CPU."""
    device = next(model.parameters()).device
    return extract_features(model, images, normalize, batch_size, device)


def test_report(model: LongTailClassifier, data: LabelledData, normalize: Normalize, cfg: SupervisedConfig,
                adjust_prior: bool = False) -> dict:
    """accuracy_report on the test split plus its error; ``adjust_prior``: post-hoc logit adjustment first."""
    logits = predict(model, data.test.images, normalize, cfg.eval.batch_size)
    if adjust_prior:
        logits = posthoc_logit_adjustment(logits, model.prior.cpu(), cfg.loss.la_tau)
    report = accuracy_report(logits.argmax(1).numpy(), data.test.labels, data.head_tail_counts, data.classes)
    return {"top1": report["top1"], "error": 100.0 - report["top1"], **report}


def report_stage(model: LongTailClassifier, data: LabelledData, normalize: Normalize, cfg: SupervisedConfig) -> dict:
    return {"selected_epoch": model.selected_epoch, "val_acc": model.val_acc,
            "test": test_report(model, data, normalize, cfg)}


def retrain_classifier(cfg: SupervisedConfig, trained: LongTailClassifier, data: LabelledData, normalize: Normalize,
                       run_dir: Path, resume: bool, used: Precision) -> LongTailClassifier:
    """cRT: ``trained``'s backbone frozen, a new linear classifier trained with plain CE on class-balanced batches
    and a cosine lr (Kang et al. 2020, Sec. 4), at the main stage's precision ``used``."""
    model = LongTailClassifier(trained.backbone, data.train_labels, len(data.classes), LossConfig(),
                               freeze_backbone=True, balanced_sampling=True,
                               sample_weight=data.sample_weight).to(data.train_images.device)
    with run_folder(cfg, run_dir / CRT_DIR, resume):
        return fit_stage(cfg, model, data, normalize, run_dir / CRT_DIR, resume, [], cfg.crt.epochs, used,
                         cosine_lr=cfg.crt.lr)
