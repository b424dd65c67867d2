"""Run logs: a text log, metrics.jsonl and TensorBoard events in the run folder, and optionally a Weights & Biases
run (``train.wandb``)."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.tensorboard import SummaryWriter

from imbssl.configbase import ConfigError
from imbssl.engine.checkpoint import save_atomic
from imbssl.errors import naming_the_file

if TYPE_CHECKING:
    from imbssl.config import WandbConfig

WANDB_MISSING = 'train.wandb.enabled is true but wandb is not installed: pip install "imbssl[wandb]"'


class CopyLog(logging.FileHandler):
    """A file that copies the console's records: one it cannot write (a full disk) is dropped, without the traceback
    that logging prints by default and that would bury the command's own one-line error."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # its last flush
            super().close()


def file_log(run_dir: Path) -> logging.Handler:
    """A handler that appends records to ``run_dir/train.log``."""
    handler = CopyLog(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def attach_file_log(run_dir: Path) -> logging.Handler:
    """Send the package's log records to ``run_dir/train.log`` as well as the console."""
    handler = file_log(run_dir)
    logging.getLogger("imbssl").addHandler(handler)
    return handler


def check_wandb(cfg: WandbConfig) -> None:
    """Refuse W&B logging without the wandb package before anything is trained."""
    if not cfg.enabled:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(WANDB_MISSING) from None


class WandbRun:
    """A Weights & Biases run that the scalars of MetricLogger go to as well; ``run_id``, kept in the checkpoint,
    continues the run an interrupted attempt began."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, run_id: str | None, config: dict) -> None:
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(cfg.dir or run_dir),
                              name=run_dir.name, config=config, id=run_id, resume="allow" if run_id else None)

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard (and to ``wandb``)."""

    def __init__(self, run_dir: Path, purge_step: int = 0, wandb: WandbRun | None = None) -> None:
        """Records at or after ``purge_step``, the checkpoint's step (0 for a fresh start), are dropped: they
        come from epochs that are trained again."""
        self.wandb = wandb
        self.path = run_dir / "metrics.jsonl"
        tensorboard = run_dir / "tensorboard"
        if self.path.exists():
            kept = "".join(line + "\n" for line in self.path.read_text().splitlines() if _step(line) < purge_step)
            # atomic: a kill or SIGTERM during the rewrite must not lose the records that are kept
            save_atomic(kept.encode(), self.path, write=lambda data, fh: fh.write(data))
        if purge_step == 0:
            shutil.rmtree(tensorboard, ignore_errors=True)
        # TensorBoard's own purge: readers drop the earlier events at or after purge_step.
        with naming_the_file(tensorboard):  # its first event file: where a full disk fails after subset.npz
            self.tb = SummaryWriter(str(tensorboard), purge_step=purge_step or None)

    def log(self, step: int, **values: float) -> None:
        with naming_the_file(self.path), open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {key: value for key, value in values.items() if isinstance(value, (int, float))}
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, scalars)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


class SilentLogger:
    """What processes other than rank 0 log to when training is distributed: nothing (rank 0 logs the global batch)."""

    def log(self, step: int, **values: float) -> None:
        pass

    def close(self) -> None:
        pass


def _step(line: str) -> float:
    """A record's step; a line cut short by a kill counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
