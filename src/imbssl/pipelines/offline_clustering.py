"""The offline-clustering pipeline (paper Sec. 3.1): base -> divide -> experts -> distill.

    base     SimSiam_base on all of D for M_base epochs                       base/backbone.pt
    divide   k-means on the base features of D: K subsets D^k                  divide/clusters.pt
    experts  SimSiam_expert(k) on D^k for M_expert epochs, k = 0..K-1          experts/expert-k/backbone.pt
    distill  a student from the base and the experts (Eq. 2), M_distill epochs  distill/, then backbone.pt

Each stage writes to its own subfolder and is finished when its output file (right) exists; the
files are written atomically and last, so a run killed anywhere resumes at the first unfinished
stage or expert, and a training stage resumes from its last epoch checkpoint. The pipeline folder
ends up as an evaluable run (config.yaml, subset.npz, backbone.pt of the student) beside
pipeline.yaml (the resolved pipeline config) and pipeline.json (images seen per stage).

Experts are independent jobs. Started by ``torchrun`` (RANK, WORLD_SIZE), rank 0 trains the base
and divides while the other ranks wait; rank r then trains experts r, r + W, ...; rank 0 waits for
all experts and distils. ``expert=k`` trains expert k alone, for any other launcher.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, get_args

import torch

from imbssl.config import ConfigError, OfflineClusteringConfig
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.trainer import EpochCallback
from imbssl.pipelines.distill import distill
from imbssl.pipelines.divide import CLUSTERS_FILE, divide
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.pipelines.runfolder import PIPELINE_CONFIG, run_folder
from imbssl.records import BudgetRecord, DivideRecord, PretrainRecord

log = logging.getLogger(__name__)

Stage = Literal["base", "divide", "experts", "distill"]
STAGES: tuple[Stage, ...] = get_args(Stage)
#: seconds between looks for files that another process is writing
POLL_S = 10.0


@dataclass(frozen=True)
class Shard:
    """This process's share of the experts when several processes train them side by side."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Shard":
        """torchrun's (or any launcher's) RANK and WORLD_SIZE; one process alone is rank 0 of 1."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def experts(self, k: int) -> list[int]:
        return list(range(self.rank, k, self.world_size))

    def use_local_gpu(self) -> None:
        """One GPU per process: "cuda" then means LOCAL_RANK's device."""
        if self.world_size > 1 and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", self.rank)) % torch.cuda.device_count())


def wait_for(paths: list[Path], what: str) -> None:
    """Block until every path exists: other processes are writing them."""
    if not all(p.exists() for p in paths):
        log.info("waiting for %s", what)
    while not all(p.exists() for p in paths):
        time.sleep(POLL_S)


class OfflineClustering:
    """The four stages on one pipeline folder; each skips itself when its output file exists."""

    def __init__(self, cfg: OfflineClusteringConfig, root: Path, my_experts: list[int],
                 callbacks: Iterable[EpochCallback] = ()) -> None:
        """``my_experts``: the experts this process trains (all K when it runs alone)."""
        self.cfg, self.root, self.my_experts, self.callbacks = cfg, Path(root), my_experts, list(callbacks)
        self.base_dir = self.root / "base"
        self.divide_dir = self.root / "divide"
        self.distill_dir = self.root / "distill"
        self.clusters_file = self.divide_dir / CLUSTERS_FILE

    def expert_dir(self, k: int) -> Path:
        return self.root / "experts" / f"expert-{k}"

    def expert_files(self) -> list[Path]:
        return [self.expert_dir(k) / BACKBONE_FILE for k in range(self.cfg.k)]

    def train_base(self) -> None:
        if not (self.base_dir / BACKBONE_FILE).exists():
            pretrain(self.cfg.stage("base", self.cfg.epochs.base), self.base_dir, resume=True, callbacks=self.callbacks)

    def cluster_features(self) -> None:
        if not self.clusters_file.exists():
            divide(self.cfg, self.base_dir, self.divide_dir)

    def train_experts(self) -> None:
        """This process's share of the experts, one after another."""
        for k in self.my_experts:
            self.train_expert(k)

    def train_expert(self, k: int) -> None:
        if (self.expert_dir(k) / BACKBONE_FILE).exists():
            return
        clusters = load_safe(self.clusters_file)
        members = clusters["indices"][clusters["assignments"] == k].numpy()
        if len(members) < 2:
            raise ConfigError(f"cluster {k} holds {len(members)} image(s), too few to train an expert; lower k")
        init_from = self.base_dir / BACKBONE_FILE if self.cfg.expert_init == "base" else None
        pretrain(self.cfg.stage(f"expert-{k}", self.cfg.epochs.expert), self.expert_dir(k), resume=True,
                 callbacks=self.callbacks, indices=members, init_from=init_from)

    def distill_student(self) -> None:
        if (self.root / BACKBONE_FILE).exists():
            return
        wait_for(self.expert_files(), "the experts that other processes train")
        clusters = load_safe(self.clusters_file)
        distill(self.cfg.stage("distill", self.cfg.epochs.distill), self.distill_dir, clusters["indices"].numpy(),
                clusters["assignments"].numpy(), self.base_dir / BACKBONE_FILE, self.expert_files(),
                self.cfg.head_hidden, self.cfg.distill_target, resume=True, callbacks=self.callbacks)
        self.publish_student()

    def publish_student(self) -> None:
        """Make the pipeline folder an evaluable run: the student's config, subset and, last, its backbone."""
        for name in ("config.yaml", "subset.npz", BACKBONE_FILE):
            partial = self.root / f".{name}.tmp"
            shutil.copyfile(self.distill_dir / name, partial)
            os.replace(partial, self.root / name)

    def write_budget(self) -> None:
        """Images seen per stage, also in epochs over D: the unit of the baseline's epochs.

        ``wall_s`` adds up the divide stage and the last call of each training run.
        """
        stage_runs = {"base": [self.base_dir], "experts": [self.expert_dir(k) for k in range(self.cfg.k)],
                      "distill": [self.distill_dir]}
        summaries = {stage: [PretrainRecord.read(d) for d in dirs] for stage, dirs in stage_runs.items()}
        seen = {stage: sum(s.images_seen_total for s in runs) for stage, runs in summaries.items()}
        num_images, total = summaries["base"][0].num_images, sum(seen.values())
        budget = BudgetRecord(num_images=num_images, images_seen=seen, images_seen_total=total,
                              epochs_of_D={stage: n / num_images for stage, n in seen.items()},
                              epochs_of_D_total=total / num_images,
                              wall_s=DivideRecord.read(self.divide_dir).wall_s + sum(
                                  s.wall_s_this_call for runs in summaries.values() for s in runs))
        budget.write(self.root)
        log.info("images seen per stage %s: %d in all, %.2f epochs of the %d images of D", seen, total,
                 budget.epochs_of_D_total, num_images)


def run_pipeline(cfg: OfflineClusteringConfig, root: Path, resume: bool = False, expert: int | None = None,
                 until: Stage = "distill", callbacks: Iterable[EpochCallback] = ()) -> Path:
    """Run (or resume) the pipeline in ``root`` up to and including stage ``until``; returns ``root``.

    ``expert=k`` trains only expert k of a divided pipeline. Under a launcher that sets RANK and
    WORLD_SIZE, the processes share the experts as described in the module docstring.
    """
    shard = Shard.from_env()
    shard.use_local_gpu()
    pipeline = OfflineClustering(cfg, root, [expert] if expert is not None else shard.experts(cfg.k), callbacks)
    if expert is not None or shard.rank > 0:
        if expert is None:
            wait_for([pipeline.clusters_file], "rank 0 to train the base and divide")
        elif not pipeline.clusters_file.exists():
            raise ConfigError(f"expert {expert} needs the divide stage first: run the pipeline with --until divide")
        with run_folder(cfg, pipeline.root, resume=True, config_file=PIPELINE_CONFIG):
            pipeline.train_experts()
        return pipeline.root
    stages = [pipeline.train_base, pipeline.cluster_features, pipeline.train_experts, pipeline.distill_student]
    with run_folder(cfg, pipeline.root, resume, config_file=PIPELINE_CONFIG):
        for stage in stages[:STAGES.index(until) + 1]:
            stage()
        if until == "distill":
            pipeline.write_budget()
    return pipeline.root
