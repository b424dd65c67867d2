"""One training loop for every task, SSL method or classifier: batches of indices -> views -> ``training_step``.

The dataset lives on the device as a uint8 tensor and views are made there, so an epoch costs no
per-image Python work. Randomness is drawn from generators seeded by (seed, epoch): a run resumed
from an epoch checkpoint replays exactly the batches and views an uninterrupted run would see.

Under torchrun every process draws the same global batches, reads only its own rows of each and views them as
they are viewed in the whole batch (engine/distributed.py), so a run's numbers do not depend on the number of
processes; rank 0 alone writes. A streamed set's batches are read ahead in a background thread (data/stream.py).
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.optim import Optimizer
from tqdm import tqdm

from imbssl.augment import MultiCrop, PadCropFlip
from imbssl.augment import BatchRows
from imbssl.config import ConfigError, WandbConfig
from imbssl.data.stream import StreamedImages, read_batches
from imbssl.engine.checkpoint import CheckpointError, load_safe, save_atomic
from imbssl.engine.distributed import (batchnorm_per_process, broadcast_from_main, is_main, rank_rows, sum_gradients,
                                       sum_over_processes, world_size)
from imbssl.engine.runlog import MetricLogger, SilentLogger, WandbRun
from imbssl.engine.schedules import Schedules
from imbssl.errors import ImbsslError
from imbssl.engine.task import StepOutput, TrainingTask

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]
#: (epoch, the epoch's summary) -> figures added to it before the checkpoint is written, e.g. a validation score
EpochEvaluator = Callable[[int, dict], dict]

#: the run's checkpoint, relative to its folder: the state after the last epoch saved.
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"


class NonFiniteLossError(ImbsslError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    checkpoint_every: int = 1
    checkpoint_every_s: float = 300.0
    collapse_warn_below: float = 0.1
    log_every: int = 10
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    #: the run's resolved config: what a W&B run records as its config
    run_config: dict = field(default_factory=dict)


def _duration(seconds: float) -> str:
    """'42s', '7m05s', '3h12m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def check_collapse(std: float, dim: int, warn_below: float) -> float:
    """std * sqrt(d) of l2-normalised outputs: about 1 when spread out, 0 when collapsed (SimSiam Sec. 4.1)."""
    ratio = std * math.sqrt(dim)
    if ratio < warn_below:
        log.warning("possible collapse: output std %.4f is %.3f x 1/sqrt(d) (d=%d); the representation is "
                    "concentrating on a point", std, ratio, dim)
    return ratio


def optimizer_step(method: TrainingTask, optimizer: Optimizer, views: list[torch.Tensor], indices: torch.Tensor,
                   precision: str = "fp32", channels_last: bool = False, share: float = 1.0) -> StepOutput:
    """Forward (bf16 autocast when asked), backward and one optimizer step; returns the detached float32 loss.

    ``share`` is this process's part of the global batch (1 on one process). A method's loss is a mean over its
    rows, so weighting it by the share and summing the gradients over processes gives the gradient of the global
    batch's mean loss, whatever the split; the loss and statistics returned are the global batch's the same way.
    A weighted mean (``StepOutput.weight``) is shared by its part of the global weight instead.
    """
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = method.training_step(views, indices)
    loss = out.loss.float()
    loss_share = share if out.weight is None else out.weight.float() / sum_over_processes(out.weight.float())
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_share).backward()
    sum_gradients(p for group in optimizer.param_groups for p in group["params"])
    clip_gradients(method)
    optimizer.step()
    # One all-reduce for the figures together: every process then sees the same loss and stops together on a NaN.
    figures = sum_over_processes(torch.stack([loss.detach() * loss_share,
                                              *(v.float() * share for v in out.stats.values())]))
    return StepOutput(figures[0], dict(zip(out.stats, figures[1:])))


def clip_gradients(method: TrainingTask) -> None:
    """Clip the gradient norm of the parameters the task names, if it names any: ``method.gradient_clipping()``
    returns (parameters, max norm) or None (MSN: its encoder at ``method.clip_grad_norm``, as msn_train.py), and
    ``method.clips_each_tensor`` whether the norm bounds each parameter's gradient alone (DINO: ``--clip_grad``).
    The gradients are summed over processes by then, so the norm is the global batch's and every process scales
    alike; the clipping keeps no state, so a resumed run clips as an uninterrupted one."""
    if (clipped := method.gradient_clipping()) is not None:
        parameters, max_norm = clipped
        for group in ([p] for p in parameters) if method.clips_each_tensor else [parameters]:
            torch.nn.utils.clip_grad_norm_(group, max_norm)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Batches per epoch: every image once, so a small cluster's last partial batch is not lost (Sec. 3.2's budget)."""
    return math.ceil(num_images / min(batch_size, num_images))


def trained_on(device: torch.device) -> dict:
    """What decides a run's numbers beside its config and seed: a checkpoint records it (the version as a str:
    weights_only loading refuses torch's TorchVersion)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"processes": world_size(), "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "device": name}


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


class Trainer:
    def __init__(self, method: TrainingTask, optimizer: Optimizer, schedules: dict[str, np.ndarray],
                 images: torch.Tensor | StreamedImages, make_views: MultiCrop | PadCropFlip, run_dir: Path,
                 settings: TrainSettings, callbacks: Iterable[EpochCallback] = (), labels: np.ndarray | None = None,
                 evaluators: Iterable[EpochEvaluator] = ()) -> None:
        """``schedules``: the run's own per-step values by name, one for each of its steps (the lr: "lr"), beside
        the method's (``method.schedules``); engine/schedules.Schedules sets them all before each step.
        ``labels`` of ``images``, when known, only reach ``method.epoch_stats`` (monitoring, never the loss).

        ``evaluators`` run after each epoch and before its checkpoint, so whatever they save (a model selected
        on validation) is never behind the checkpoint a resumed run starts from; ``callbacks`` run after it.
        """
        self.method, self.optimizer = method, optimizer
        self.images, self.make_views, self.settings, self.labels = images, make_views, settings, labels
        self.run_dir = Path(run_dir)
        self.checkpoint_path = self.run_dir / CHECKPOINT_FILE
        self.callbacks, self.evaluators = list(callbacks), list(evaluators)
        self.device = images.device
        self.batch_size = min(settings.batch_size, len(images))
        if self.batch_size < settings.batch_size:
            log.warning("batch size %d exceeds the %d training images; using %d", settings.batch_size, len(images),
                        self.batch_size)
        self.steps_per_epoch = steps_per_epoch(len(images), self.batch_size)
        if len(images) // self.steps_per_epoch < world_size():
            raise ConfigError(f"the smallest batch, {len(images) // self.steps_per_epoch} images, cannot be shared "
                              f"by {world_size()} processes; raise optim.batch_size")
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.schedules = Schedules(method, optimizer, schedules, self.total_steps, self.steps_per_epoch)
        self.epoch = 0
        self.summary: dict = {}  # the last finished epoch's figures
        self.wandb_id: str | None = None  # the W&B run this training logs to, kept in the checkpoint
        self.bar: tqdm | None = None  # the whole run's progress, on a terminal

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """No schedule state: the step count (epoch x steps per epoch) determines every scheduled value."""
        return {"epoch": self.epoch, "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "summary": self.summary, "wandb_id": self.wandb_id, "trained_on": trained_on(self.device)}

    def save_checkpoint(self) -> None:
        if is_main():  # every process holds the same state
            save_atomic(self.state_dict(), self.checkpoint_path)

    def load_checkpoint(self) -> None:
        try:
            state = load_safe(self.checkpoint_path)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; delete it to train the run again from the start") from None
        self.method.load_state_dict(state["method"])
        # Checkpoints from before engine/schedules.py also hold a "scheduler" (a LambdaLR's state): not needed, as
        # every scheduled value is set anew from the step count before each step, on the new total's schedules
        # when a run is resumed with more epochs.
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.summary, self.wandb_id = state["epoch"], state["summary"], state.get("wandb_id")
        self.check_trained_on(state.get("trained_on", {}))
        log.info("resumed from %s after epoch %d of %d", self.checkpoint_path, self.epoch, self.settings.epochs)

    def check_trained_on(self, recorded: dict) -> None:
        """Refuse another process count where BatchNorm normalises each process's part of the batch (the run would
        equal neither); warn of any other difference from what wrote the checkpoint (none recorded before
        2026-12-07): the run goes on, but its numbers are no longer those of an uninterrupted run."""
        now = trained_on(self.device)
        differ = {key: (recorded[key], now[key]) for key in now if recorded.get(key, now[key]) != now[key]}
        if "processes" in differ and batchnorm_per_process(self.method):
            raise ConfigError(f"{self.checkpoint_path} was trained on {differ['processes'][0]} process(es) and this "
                              f"run has {differ['processes'][1]}: BatchNorm normalises each process's part of the "
                              f"batch (train.sync_batchnorm: false), so the run would equal neither; resume on "
                              f"{differ['processes'][0]} process(es), or train afresh in another --run-dir")
        if differ and is_main():  # the other processes log warnings too: one line for the job
            log.warning("resuming on another setup than the checkpoint was written on (%s): the run goes on, but "
                        "will not replay an uninterrupted run exactly",
                        ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differ.items()))

    # -- training ------------------------------------------------------------------------------
    def fit(self, resume: bool = False, resumed: Callable[[], None] = lambda: None) -> dict:
        """``resumed`` runs once a resumed run's checkpoint has loaded (or none was found), before training."""
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
        elif resume:
            log.info("no checkpoint at %s: starting from scratch", self.checkpoint_path)
        if resume:
            resumed()
        if self.epoch == 0:  # a fresh run; epoch index `epochs` is one that no training epoch draws views from
            self.method.on_train_start(self.images, self.make_views.global_view,
                                       epoch_generator(self.settings.seed, self.settings.epochs, self.device))
        broadcast_from_main(self.method)
        logger = self._logger()
        first_epoch, start, saved_at = self.epoch, time.perf_counter(), time.perf_counter()
        self.bar = tqdm(total=self.total_steps, initial=first_epoch * self.steps_per_epoch, unit="step",
                        desc=self.run_dir.name, disable=None if self.settings.progress and is_main() else True,
                        dynamic_ncols=True)
        try:
            while self.epoch < self.settings.epochs:
                self.summary = self._train_epoch(logger)
                self.epoch += 1
                for evaluate in self.evaluators:
                    figures = evaluate(self.epoch, self.summary)
                    self.summary.update(figures)
                    logger.log(self.epoch * self.steps_per_epoch - 1, **{f"epoch/{k}": v for k, v in figures.items()})
                if self._checkpoint_due(saved_at):
                    self.save_checkpoint()
                    saved_at = time.perf_counter()
                self._log_epoch(eta_s=(time.perf_counter() - start) / (self.epoch - first_epoch)
                                * (self.settings.epochs - self.epoch))
                for callback in self.callbacks:
                    callback(self.epoch, self.summary)
        finally:
            self.bar.close()
            logger.close()
        return self.summary

    def _logger(self) -> MetricLogger | SilentLogger:
        """Rank 0's logs; records after the checkpoint come from epochs that are trained again: dropped, as if never
        written. A W&B run (``settings.wandb``) continues the checkpoint's."""
        if not is_main():
            return SilentLogger()
        wandb = None
        if self.settings.wandb.enabled:
            wandb = WandbRun(self.settings.wandb, self.run_dir, self.wandb_id, self.settings.run_config)
            self.wandb_id = wandb.id
        return MetricLogger(self.run_dir, purge_step=self.epoch * self.steps_per_epoch, wandb=wandb)

    def _checkpoint_due(self, saved_at: float) -> bool:
        """Every ``checkpoint_every`` epochs, after an epoch that ends ``checkpoint_every_s`` after the last
        checkpoint, and after the last epoch."""
        s = self.settings
        return (self.epoch % s.checkpoint_every == 0 or self.epoch == s.epochs
                or time.perf_counter() - saved_at >= s.checkpoint_every_s)

    def _log_epoch(self, eta_s: float) -> None:
        """One line per epoch: what a log file (or a non-terminal stderr) shows instead of the progress bar."""
        s = self.summary
        figures = " ".join(f"{key} {s[key]:.4f}" for key in ("loss", "output_std", "train_acc", "val_acc") if key in s)
        log.info("epoch %d/%d %s %.0f img/s, eta %s", self.epoch, self.settings.epochs, figures, s["images_per_s"],
                 _duration(eta_s))

    def _train_epoch(self, logger: MetricLogger) -> dict:
        s, epoch = self.settings, self.epoch
        self.method.train()
        self.method.on_epoch_start(epoch)
        gen = epoch_generator(s.seed, epoch, self.device)
        batches = self.method.epoch_batches(len(self.images), self.steps_per_epoch, epoch, gen)
        parts = [rank_rows(len(indices)) for indices in batches]
        window: list[dict[str, torch.Tensor]] = []  # step figures kept on the device until the next sync
        totals: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        # each process reads its own rows of each global batch, and nothing else
        with closing(read_batches(self.images, [indices[part.slice] for indices, part in zip(batches, parts)])) as mine:
            for step, (indices, part, images) in enumerate(zip(batches, parts, mine, strict=True)):
                window.append(self._step(indices, part, images, gen, epoch * self.steps_per_epoch + step))
                seen += len(indices)
                self.bar.update()
                if len(window) == s.log_every or step == self.steps_per_epoch - 1:
                    # One host-device sync per window, not per step: the NaN check and the logs read it together.
                    means = self._flush(window, epoch * self.steps_per_epoch + step, logger)
                    for key, value in means.items():
                        totals[key] = totals.get(key, 0.0) + value * len(window)
                    window = []
                    self.bar.set_postfix(epoch=f"{epoch + 1}/{s.epochs}", loss=f"{means['loss']:.4f}",
                                         img_s=f"{seen / (time.perf_counter() - start):.0f}")
        summary = {"epoch": epoch + 1, **{k: v / self.steps_per_epoch for k, v in totals.items()},
                   "images_per_s": seen / (time.perf_counter() - start), "images_seen": seen,
                   **self.method.epoch_stats(self.labels)}
        if "output_std" in summary:
            summary["collapse_ratio"] = check_collapse(summary["output_std"], self.method.output_dim,
                                                       s.collapse_warn_below)
        logger.log((epoch + 1) * self.steps_per_epoch - 1, **{f"epoch/{k}": v for k, v in summary.items()})
        return summary

    def _flush(self, window: list[dict[str, torch.Tensor]], global_step: int, logger: MetricLogger) -> dict[str, float]:
        stacked = {key: torch.stack([w[key] for w in window]) for key in window[0]}
        if not torch.isfinite(stacked["loss"]).all():
            kept = self.checkpoint_path if self.checkpoint_path.exists() else "none written yet"
            remedy = "a lower learning rate" + (" or train.precision=fp32" if self.settings.precision != "fp32" else "")
            raise NonFiniteLossError(
                f"loss is {stacked['loss'][-1].item()} at epoch {self.epoch + 1}; training stopped. "
                f"Last good checkpoint: {kept}. Try {remedy}.")
        means = {key: value.mean().item() for key, value in stacked.items()}
        logger.log(global_step, **{f"train/{k}": v for k, v in means.items()},
                   **{f"train/{k}": v for k, v in self.schedules.at(global_step).items()})
        return means

    def _step(self, indices: torch.Tensor, part: BatchRows, images: torch.Tensor, gen: torch.Generator,
              global_step: int) -> dict[str, torch.Tensor]:
        """One step on ``images``, this process's ``part`` of the global batch ``indices``, with the views they get
        in the whole batch's (the generator advances as on one process)."""
        self.schedules.apply(global_step)  # the one place every scheduled value is set
        views, mine = self.method.views(self.make_views, images, gen, part, indices), indices[part.slice]
        out = optimizer_step(self.method, self.optimizer, views, mine, self.settings.precision,
                             self.settings.channels_last, share=len(mine) / len(indices))
        self.method.on_step_end()
        return {"loss": out.loss, **out.stats}
