"""One training loop for every method: batches of indices -> views -> ``method.training_step``.

The dataset lives on the device as a uint8 tensor and views are made there, so an epoch costs no
per-image Python work. Randomness is drawn from generators seeded by (seed, epoch): a run resumed
from an epoch checkpoint replays exactly the batches and views an uninterrupted run would see.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from imbssl.augment import MultiCrop
from imbssl.engine.checkpoint import load_safe, save_atomic
from imbssl.engine.runlog import MetricLogger
from imbssl.methods.base import SSLMethod, StepOutput

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]

#: the run's checkpoint, relative to its folder: the state after the last epoch saved.
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    checkpoint_every: int = 1
    collapse_warn_below: float = 0.1
    log_every: int = 10
    progress: bool = True


def check_collapse(std: float, dim: int, warn_below: float) -> float:
    """std * sqrt(d) of l2-normalised outputs: about 1 when spread out, 0 when collapsed (SimSiam Sec. 4.1)."""
    ratio = std * math.sqrt(dim)
    if ratio < warn_below:
        log.warning("possible collapse: output std %.4f is %.3f x 1/sqrt(d) (d=%d); the representation is "
                    "concentrating on a point", std, ratio, dim)
    return ratio


def optimizer_step(method: SSLMethod, optimizer: Optimizer, views: list[torch.Tensor], indices: torch.Tensor,
                   precision: str = "fp32", channels_last: bool = False) -> StepOutput:
    """Forward (bf16 autocast when asked), backward and one optimizer step; returns the detached float32 loss."""
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = method.training_step(views, indices)
    loss = out.loss.float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return StepOutput(loss.detach(), out.stats)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Batches per epoch: every image once, so a small cluster's last partial batch is not lost (Sec. 3.2's budget)."""
    return math.ceil(num_images / min(batch_size, num_images))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


class Trainer:
    def __init__(self, method: SSLMethod, optimizer: Optimizer, scheduler: LRScheduler, images: torch.Tensor,
                 make_views: MultiCrop, run_dir: Path, settings: TrainSettings,
                 callbacks: Iterable[EpochCallback] = (), labels: np.ndarray | None = None) -> None:
        """``labels`` of ``images``, when known, only reach ``method.epoch_stats`` (monitoring, never the loss)."""
        self.method, self.optimizer, self.scheduler = method, optimizer, scheduler
        self.images, self.make_views, self.settings, self.labels = images, make_views, settings, labels
        self.run_dir = Path(run_dir)
        self.checkpoint_path = self.run_dir / CHECKPOINT_FILE
        self.callbacks = list(callbacks)
        self.device = images.device
        self.batch_size = min(settings.batch_size, len(images))
        if self.batch_size < settings.batch_size:
            log.warning("batch size %d exceeds the %d training images; using %d", settings.batch_size, len(images),
                        self.batch_size)
        self.steps_per_epoch = steps_per_epoch(len(images), self.batch_size)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.epoch = 0
        self.summary: dict = {}  # the last finished epoch's figures

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "summary": self.summary}

    def save_checkpoint(self) -> None:
        save_atomic(self.state_dict(), self.checkpoint_path)

    def load_checkpoint(self) -> None:
        state = load_safe(self.checkpoint_path)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.summary = state["epoch"], state["summary"]
        log.info("resumed from %s after epoch %d", self.checkpoint_path, self.epoch)

    # -- training ------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
        if self.epoch == 0:  # a fresh run; epoch index `epochs` is one that no training epoch draws views from
            self.method.on_train_start(self.images, self.make_views.global_view,
                                       epoch_generator(self.settings.seed, self.settings.epochs, self.device))
        logger = MetricLogger(self.run_dir, purge_step=self.epoch * self.steps_per_epoch)
        try:
            while self.epoch < self.settings.epochs:
                self.summary = self._train_epoch(logger)
                self.epoch += 1
                if self.epoch % self.settings.checkpoint_every == 0 or self.epoch == self.settings.epochs:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self.epoch, self.summary)
        finally:
            logger.close()
        return self.summary

    def _train_epoch(self, logger: MetricLogger) -> dict:
        s, epoch = self.settings, self.epoch
        self.method.train()
        gen = epoch_generator(s.seed, epoch, self.device)
        # Near-equal batches of at most batch_size that cover every image: no image is dropped and no tail batch
        # is so small that BatchNorm statistics (or SimCLR's negatives) degenerate.
        batches = torch.randperm(len(self.images), generator=gen, device=self.device).tensor_split(self.steps_per_epoch)
        window: list[dict[str, torch.Tensor]] = []  # step figures kept on the device until the next sync
        totals: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{s.epochs}", disable=not s.progress,
                   leave=False, dynamic_ncols=True)
        for step in bar:
            indices = batches[step]
            window.append(self._step(self.images[indices], indices, gen, epoch * self.steps_per_epoch + step))
            seen += len(indices)
            if len(window) == s.log_every or step == self.steps_per_epoch - 1:
                # One host-device sync per window, not per step: the NaN check and the logs read it together.
                means = self._flush(window, epoch * self.steps_per_epoch + step, logger)
                for key, value in means.items():
                    totals[key] = totals.get(key, 0.0) + value * len(window)
                window = []
                bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
        summary = {"epoch": epoch + 1, **{k: v / self.steps_per_epoch for k, v in totals.items()},
                   "images_per_s": seen / (time.perf_counter() - start), "images_seen": seen,
                   **self.method.epoch_stats(self.labels)}
        summary["collapse_ratio"] = check_collapse(summary["output_std"], self.method.output_dim, s.collapse_warn_below)
        logger.log((epoch + 1) * self.steps_per_epoch - 1, **{f"epoch/{k}": v for k, v in summary.items()})
        log.info("epoch %d/%d loss %.4f output_std %.4f %.0f img/s", epoch + 1, s.epochs, summary["loss"],
                 summary["output_std"], summary["images_per_s"])
        return summary

    def _flush(self, window: list[dict[str, torch.Tensor]], global_step: int, logger: MetricLogger) -> dict[str, float]:
        stacked = {key: torch.stack([w[key] for w in window]) for key in window[0]}
        if not torch.isfinite(stacked["loss"]).all():
            kept = self.checkpoint_path if self.checkpoint_path.exists() else "none written yet"
            raise NonFiniteLossError(
                f"loss is {stacked['loss'][-1].item()} at epoch {self.epoch + 1}; training stopped. "
                f"Last good checkpoint: {kept}. Try a lower learning rate or precision=fp32.")
        means = {key: value.mean().item() for key, value in stacked.items()}
        logger.log(global_step, **{f"train/{k}": v for k, v in means.items()}, **{"train/lr": self._lr()})
        return means

    def _step(self, batch: torch.Tensor, indices: torch.Tensor, gen: torch.Generator,
              global_step: int) -> dict[str, torch.Tensor]:
        out = optimizer_step(self.method, self.optimizer, self.make_views(batch, gen), indices,
                             self.settings.precision, self.settings.channels_last)
        self.scheduler.step()
        self.method.on_step_end(global_step, self.total_steps, self.optimizer)
        return {"loss": out.loss, **out.stats}

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
