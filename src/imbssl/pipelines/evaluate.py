"""Evaluate a pre-trained backbone: linear probe and k-NN on a balanced labelled set (``imbssl evaluate``).

Protocol (offline-clustering paper, Sec. 2.3): the labelled set is balanced and, by default, as large as
the pre-training set N. A held-out part of it selects the probe's hyper-parameters; the balanced test
split is predicted once, with the selected probe.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from imbssl.augment import Normalize
from imbssl.config import EvalConfig, RunConfig, few_shot_name, is_split_file
from imbssl.data import DataError, load_indices, load_splits, read_split_file
from imbssl.engine.checkpoint import CheckpointError, load_safe
from imbssl.engine.divergence import divergence_signs, probe_disagreement, weight_norm
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.eval import (accuracy_report, balanced_labelled_split, cluster_statistics, extract_features, few_shot_set,
                         knn_predict, linear_probe, relative_sizes, shots_per_class, split_per_class)
from imbssl.methods import METHODS, build_method
from imbssl.models import build_backbone
from imbssl.pipelines.common import load_backbone, resolve_device
from imbssl.pipelines.pretrain import BACKBONE_FILE
from imbssl.pipelines.runfolder import RUN_CONFIG, read_saved_config
from imbssl.records import EvalRecord
from imbssl.report import plot_cluster_sizes

log = logging.getLogger(__name__)

EVAL_FILE = EvalRecord.FILE
CLUSTER_FIGURE = "cluster_sizes.png"


def load_run_config(run_dir: Path) -> RunConfig:
    return read_saved_config(Path(run_dir) / RUN_CONFIG, RunConfig)


def evaluate_run(run_dir: Path, eval_cfg: EvalConfig | None = None) -> EvalRecord:
    """The probes of ``run_dir``'s backbone under ``eval_cfg`` (by default its config's eval section), written to
    its eval.json."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    eval_cfg = eval_cfg or cfg.eval
    if not (run_dir / BACKBONE_FILE).exists():
        raise FileNotFoundError(f"{run_dir / BACKBONE_FILE} not found: pre-training has not finished")
    device = resolve_device(cfg.train.device)
    splits = load_splits(cfg.data)
    train, test = splits["train"], splits["test"]
    try:
        subset = load_indices(run_dir / "subset.npz")
        backbone, normalize = load_backbone(cfg.model, train.images.shape[-1], run_dir / BACKBONE_FILE)
    except (CheckpointError, DataError) as err:
        if not (run_dir / CHECKPOINT_FILE).exists():  # a pipeline folder: its files come from the distill stage
            raise
        raise type(err)(f"{err}; `imbssl pretrain {run_dir / RUN_CONFIG} --run-dir {run_dir} --resume --no-eval` "
                        f"writes it again from the checkpoint") from None
    pretrain_counts = np.bincount(train.labels[subset], minlength=len(train.classes))
    backbone.to(device)

    train_idx, val_idx = labelled_split(eval_cfg, train.labels, eval_cfg.labelled_size or len(subset))

    def features(images: np.ndarray) -> torch.Tensor:
        return extract_features(backbone, images, lambda x: normalize(x.to(device)), device=device)

    train_x, val_x, test_x = features(train.images[train_idx]), features(train.images[val_idx]), features(test.images)
    train_y, val_y = train.labels[train_idx], train.labels[val_idx]
    num_classes = len(train.classes)

    probe = linear_probe(train_x, train_y, val_x, val_y, test_x, num_classes, eval_cfg.linear, eval_cfg.seed, device)
    few_shot = {}
    for spec in eval_cfg.few_shot:
        few_idx = few_shot_indices(spec, train.labels, num_classes, val_idx, eval_cfg.seed)
        shots = int(np.bincount(train.labels[few_idx], minlength=num_classes).min())
        few = linear_probe(features(train.images[few_idx]), train.labels[few_idx], val_x, val_y, test_x, num_classes,
                           eval_cfg.linear, eval_cfg.seed, device)
        few_shot[few_shot_name(spec)] = {
            **accuracy_report(few.test_pred, test.labels, pretrain_counts, train.classes), "shots_per_class": shots,
            "labelled_train": len(few_idx), "val_top1": few.val_acc, "selected": few.best}
    knn = {k: accuracy_report(knn_predict(train_x, train_y, test_x, num_classes, k, eval_cfg.knn_temperature),
                              test.labels, pretrain_counts, train.classes) for k in eval_cfg.knn_k}
    linear = {**accuracy_report(probe.test_pred, test.labels, pretrain_counts, train.classes),
              "val_top1": probe.val_acc, "selected": probe.best}
    clusters = (final_clusters(run_dir, cfg, train.images[subset], train.labels[subset], normalize, device)
                if METHODS[cfg.method.name].learns_clusters else None)
    warnings = divergence_warnings(linear["top1"], knn, backbone, cfg, train.images.shape[-1])
    record = EvalRecord(labelled_train=len(train_idx), labelled_val=len(val_idx), test=len(test.labels),
                        pretrain_class_counts=pretrain_counts.tolist(), classes=list(train.classes), linear=linear,
                        few_shot=few_shot, knn=knn, clusters=clusters, warnings=warnings,
                        settings=eval_cfg.model_dump(mode="json"), wall_s=time.perf_counter() - start)
    record.write(run_dir)
    log.info("%s: linear top-1 %.2f, %s", run_dir.name, record.linear.top1,
             ", ".join(f"knn{k} {report.top1:.2f}" for k, report in record.knn.items()))
    for warning in record.warnings:
        log.warning("%s: %s", run_dir.name, warning)
    return record


def labelled_split(eval_cfg: EvalConfig, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The full-shot probe's (train, val) indices into the train split: a balanced set of ``size`` images cut per
    class (the seeds' protocol), or split files (SDCLR's and BCL's: the labelled list, and their validation list
    or a per-class cut of the labelled one)."""
    if eval_cfg.labelled_index_file is None:
        return balanced_labelled_split(labels, size, eval_cfg.linear.val_fraction, eval_cfg.seed)
    labelled = read_split_file(eval_cfg.labelled_index_file, len(labels))
    if eval_cfg.val_index_file is None:
        return split_per_class(labels, labelled, eval_cfg.linear.val_fraction, eval_cfg.seed)
    val = read_split_file(eval_cfg.val_index_file, len(labels))
    _check_disjoint(labelled, val, f"eval.labelled_index_file {eval_cfg.labelled_index_file}")
    return labelled, val


def few_shot_indices(spec: str, labels: np.ndarray, num_classes: int, val_idx: np.ndarray, seed: int) -> np.ndarray:
    """A few-shot probe's labelled images: a split file's, or a balanced set drawn outside the validation part."""
    if is_split_file(spec):
        few = read_split_file(spec, len(labels))
        _check_disjoint(few, val_idx, f"the few-shot split file {spec}")
        return few
    return few_shot_set(labels, shots_per_class(spec, len(labels), num_classes), val_idx, seed)


def _check_disjoint(labelled: np.ndarray, val: np.ndarray, what: str) -> None:
    """A probe never selects its settings on its own training images."""
    if (shared := np.intersect1d(labelled, val)).size:
        raise DataError(f"{what} shares {shared.size} images with the probes' validation part (index "
                        f"{int(shared[0])}): a probe would be selected on its own training images")


def divergence_warnings(linear_top1: float, knn: dict[int, dict], backbone: torch.nn.Module, cfg: RunConfig,
                        in_channels: int) -> list[str]:
    """Signs that pre-training diverged without a NaN (engine/divergence.py), measured on the saved backbone
    against a freshly initialised one."""
    signs = divergence_signs(backbone, weight_norm(build_backbone(cfg.model, in_channels)))
    gap = probe_disagreement(linear_top1, {f"knn{k}": report["top1"] for k, report in knn.items()})
    signs += [gap] if gap else []
    return [f"pre-training looks diverged: {sign}" for sign in signs]


def final_clusters(run_dir: Path, cfg: RunConfig, images: np.ndarray, labels: np.ndarray, normalize: Normalize,
                   device: torch.device) -> dict:
    """The final clustering of the pre-training images (ExCB paper, Fig. 5): each image's most similar centroid
    (ExCB's teacher, MSN's target prototypes), without balancing, against the cluster prior. Draws the sorted
    relative sizes to RUN_DIR/cluster_sizes.png."""
    method = build_method(cfg.method, build_backbone(cfg.model, images.shape[-1]))
    method.load_state_dict(load_safe(run_dir / CHECKPOINT_FILE)["method"])
    similarities = extract_features(method.clusterer.to(device), images, lambda x: normalize(x.to(device)),
                                    device=device)
    assignments = similarities.argmax(1).numpy()
    target = method.cluster_target.cpu().numpy()
    sizes = relative_sizes(assignments, target)
    plot_cluster_sizes({cfg.name: sizes}, run_dir / CLUSTER_FIGURE,
                       title="Final relative cluster sizes of the teacher (no balancing)")
    shares = np.bincount(assignments, minlength=len(target)) / len(assignments)
    filled = shares > 0
    kl_to_prior = float(np.sum(shares[filled] * np.log(shares[filled] / target[filled])))  # KL(sizes || prior)
    return {**cluster_statistics(assignments, target, labels), "kl_to_prior": kl_to_prior,
            "sorted_relative_sizes": np.sort(sizes)[::-1].tolist(), "sorted_shares": np.sort(shares)[::-1].tolist(),
            "sorted_prior": np.sort(target)[::-1].tolist()}
