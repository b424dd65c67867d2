"""Evaluate a pre-trained backbone (``imbssl evaluate``): the k-means of its features, which needs no labels, and
the linear probe, k-NN, few-shot probes and fine-tuning on a balanced labelled set.

Protocol (offline-clustering paper, Sec. 2.3): the labelled set is balanced and, by default, as large as
the pre-training set N. A held-out part of it selects the probe's hyper-parameters; the balanced test
split is predicted once, with the selected probe. The labelled set comes from the run's own train split, or from
``eval.labelled_data`` (by default its whole train split); a run without labels and without it skips the probes.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imbssl.augment import Normalize
from imbssl.config import (EvalConfig, FeatureClustersConfig, FinetuneConfig, LossConfig, RunConfig, SupervisedConfig,
                           SupervisedOptimConfig, TrainConfig, few_shot_name, is_split_file)
from imbssl.data import DataError, ImageSet, load_indices, load_splits, read_split_file
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.divergence import divergence_signs, probe_disagreement, weight_norm
from imbssl.engine.supervised import LongTailClassifier
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.eval import (accuracy_report, balanced_labelled_split, check_cluster_count, cluster_statistics,
                         extract_features, feature_clusters, few_shot_set, knn_predict, linear_probe, relative_sizes,
                         shots_per_class, split_per_class)
from imbssl.methods import METHODS, build_method
from imbssl.models import build_backbone
from imbssl.pipelines.common import (PretrainData, load_backbone, load_pretrain_data, resolve_device, seed_everything,
                                     to_tensor_nchw, training_precision, written_by_pretraining)
from imbssl.pipelines.pretrain import BACKBONE_FILE
from imbssl.pipelines.runfolder import RUN_CONFIG, read_saved_config
from imbssl.pipelines.train import LabelledData, fit_stage, predict
from imbssl.records import EvalRecord
from imbssl.report import plot_cluster_sizes, plot_sorted_sizes

log = logging.getLogger(__name__)

EVAL_FILE = EvalRecord.FILE
CLUSTER_FIGURE = "cluster_sizes.png"
FEATURE_CLUSTER_FIGURE = "feature_clusters.png"
#: the fine-tuning's run folder inside the run's: checkpoints/best.pt holds the selected model
FINETUNE_DIR = "finetune"

Features = Callable[[np.ndarray], torch.Tensor]


@dataclass
class ProbeData:
    """The labelled images the probes train and select on (drawn from ``pool``) and are tested on, and the class
    counts that define their head and tail."""

    pool: ImageSet
    test: ImageSet
    head_tail_counts: np.ndarray
    size: int | None  # of the balanced labelled set; None = all of ``pool``


def load_run_config(run_dir: Path) -> RunConfig:
    return read_saved_config(Path(run_dir) / RUN_CONFIG, RunConfig)


def evaluate_run(run_dir: Path, eval_cfg: EvalConfig | None = None) -> EvalRecord:
    """The feature clusters and the probes of ``run_dir``'s backbone under ``eval_cfg`` (by default its config's eval
    section), written to its eval.json."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    eval_cfg = eval_cfg or cfg.eval
    if not (run_dir / BACKBONE_FILE).exists():
        raise FileNotFoundError(f"{run_dir / BACKBONE_FILE} not found: pre-training has not finished")
    device = resolve_device(cfg.train.device)
    with written_by_pretraining(run_dir):
        subset = load_indices(run_dir / "subset.npz")
    data = load_pretrain_data(cfg.data, subset)
    with written_by_pretraining(run_dir):
        backbone, normalize = load_backbone(cfg.model, data.train.images.shape[-1], run_dir / BACKBONE_FILE)
    backbone.to(device)

    def features(images: np.ndarray) -> torch.Tensor:
        return extract_features(backbone, images, lambda x: normalize(x.to(device)), device=device)

    probes = checked_probes(eval_cfg, data)  # before the k-means: a labelled set that does not fit fails at once
    images = data.images
    clustered = feature_cluster_report(features(images), data, eval_cfg.feature_clusters, run_dir)
    if probes is None:
        results = skipped_probes(cfg)
        log.info("%s: probes skipped: %s", run_dir.name, results["probes_skipped"])
    else:
        results = run_probes(cfg, eval_cfg, probes, features, run_dir, device)
    clusters = (final_clusters(run_dir, cfg, images, data.labels, normalize, device)
                if METHODS[cfg.method.name].learns_clusters else None)
    warnings = divergence_warnings(results["linear"], results["knn"], backbone, cfg, data.train.images.shape[-1])
    counts = data.class_counts
    record = EvalRecord(**results, pretrain_class_counts=None if counts is None else counts.tolist(),
                        feature_clusters=clustered, clusters=clusters, warnings=warnings,
                        settings=eval_cfg.model_dump(mode="json"), wall_s=time.perf_counter() - start)
    record.write(run_dir)
    if record.linear is not None:
        log.info("%s: linear top-1 %.2f, %s", run_dir.name, record.linear.top1,
                 ", ".join(f"knn{k} {report.top1:.2f}" for k, report in record.knn.items()))
    for warning in record.warnings:
        log.warning("%s: %s", run_dir.name, warning)
    return record


def probe_data(eval_cfg: EvalConfig, data: PretrainData) -> ProbeData | None:
    """The probes' labelled images: ``eval.labelled_data``'s, else the run's own when it has labels, else None."""
    if eval_cfg.labelled_data is not None:
        splits = load_splits(eval_cfg.labelled_data)
        check_like_pretraining(splits, data.train.images.shape[1:])
        return ProbeData(splits["train"], splits["test"], splits["train"].class_counts(), eval_cfg.labelled_size)
    if data.labels is None:
        return None
    return ProbeData(data.train, data.splits["test"], data.class_counts, eval_cfg.labelled_size or len(data.indices))


def check_evaluable(eval_cfg: EvalConfig, data: PretrainData) -> None:
    """What ``evaluate_run`` would refuse about ``data`` under ``eval_cfg``, refused before training (imbssl pretrain's
    ``check_data``): the probes' labelled set and the feature clusters' k."""
    checked_probes(eval_cfg, data)
    check_cluster_count(eval_cfg.feature_clusters.k, len(data.indices))


def checked_probes(eval_cfg: EvalConfig, data: PretrainData) -> ProbeData | None:
    """``probe_data``, checked as the probes will draw from it, so that ``imbssl pretrain`` refuses before training
    what evaluation could not use: labelled images of two classes at least, and a labelled set (and few-shot sets)
    with a training and a validation image of every class."""
    probes = probe_data(eval_cfg, data)
    if probes is None:
        return None
    given = eval_cfg.labelled_data is not None
    where = "eval.labelled_data" if given else "the run's train split"
    present = np.unique(probes.pool.labels)
    if len(present) < 2:
        fix = ("give it images of more classes" if given else
               "give them eval.labelled_data, set data.labels=none (then the feature clusters alone are reported)")
        raise DataError(f"{where} has labelled images of {len(present)} class(es) "
                        f"({', '.join(probes.pool.classes[c] for c in present) or 'none'}), and the probes need 2 or "
                        f"more: {fix}, or pre-train with --no-eval")
    try:
        _, val_idx = labelled_split(eval_cfg, probes.pool.labels, probes.size)
        for spec in eval_cfg.few_shot:
            few_shot_indices(spec, probes.pool.labels, len(probes.pool.classes), val_idx, eval_cfg.seed)
    except ValueError as err:  # eval/labelled.py's: a class with too few images for its part
        size = (f"; the labelled set has eval.labelled_size={probes.size} images (by default as many as the "
                f"pre-training subset): raise it" if probes.size and eval_cfg.labelled_index_file is None else "")
        raise DataError(f"{where}: {err}{size}") from None
    return probes


def check_like_pretraining(splits: dict[str, ImageSet], shape: tuple[int, ...]) -> None:
    """The labelled set's images have the pre-training images' height, width and channels, which the backbone and its
    input normalisation expect."""
    height, width, channels = shape
    for name, split in splits.items():
        if not len(split.images):
            raise DataError(f"eval.labelled_data has no {name} images: the probes train on its train split and are "
                            f"tested on its test split")
        h, w, c = split.images.shape[1:]
        if c != channels:
            raise DataError(f"eval.labelled_data's images have {c} channel(s), the pre-training images {channels}: "
                            f"the labelled set must be greyscale where they are, colour where they are colour")
        if (h, w) != (height, width):
            raise DataError(f"eval.labelled_data's images are {h}x{w}, the pre-training images {height}x{width}: "
                            f"set eval.labelled_data.image_size={height} to decode them at that size")


def skipped_probes(cfg: RunConfig) -> dict:
    """eval.json's probe fields of a run without labels and without ``eval.labelled_data``."""
    why = "data.source images has none" if cfg.data.source == "images" else "data.labels none hides them"
    return {"labelled_train": 0, "labelled_val": 0, "test": 0, "classes": [], "linear": None, "knn": {},
            "probes_skipped": f"the run has no labels ({why}) and eval.labelled_data is not set; linear, k-NN, "
                              f"few-shot and fine-tuning run on a labelled set given as eval.labelled_data (an "
                              f"imagefolder with train/ and test/, or a filelist with labels)"}


def run_probes(cfg: RunConfig, eval_cfg: EvalConfig, probes: ProbeData, features: Features, run_dir: Path,
               device: torch.device) -> dict:
    """eval.json's probe fields: linear, few-shot, k-NN and (when enabled) fine-tuning on ``probes``."""
    pool, test = probes.pool, probes.test
    train_idx, val_idx = labelled_split(eval_cfg, pool.labels, probes.size)
    train_x, val_x, test_x = features(pool.images[train_idx]), features(pool.images[val_idx]), features(test.images)
    train_y, val_y = pool.labels[train_idx], pool.labels[val_idx]
    num_classes = len(pool.classes)

    def report(pred: np.ndarray) -> dict:
        return accuracy_report(pred, test.labels, probes.head_tail_counts, pool.classes)

    probe = linear_probe(train_x, train_y, val_x, val_y, test_x, num_classes, eval_cfg.linear, eval_cfg.seed, device)
    few_shot = {}
    for spec in eval_cfg.few_shot:
        few_idx = few_shot_indices(spec, pool.labels, num_classes, val_idx, eval_cfg.seed)
        shots = int(np.bincount(pool.labels[few_idx], minlength=num_classes).min())
        few = linear_probe(features(pool.images[few_idx]), pool.labels[few_idx], val_x, val_y, test_x, num_classes,
                           eval_cfg.linear, eval_cfg.seed, device)
        few_shot[few_shot_name(spec)] = {**report(few.test_pred), "shots_per_class": shots,
                                         "labelled_train": len(few_idx), "val_top1": few.val_acc,
                                         "selected": few.best}
    knn = {k: report(knn_predict(train_x, train_y, test_x, num_classes, k, eval_cfg.knn_temperature))
           for k in eval_cfg.knn_k}
    finetuned = (finetune(cfg, eval_cfg.finetune, eval_cfg.seed, probes, train_idx, val_idx, run_dir, device)
                 if eval_cfg.finetune.enabled else None)
    return {"labelled_train": len(train_idx), "labelled_val": len(val_idx), "test": len(test.labels),
            "classes": list(pool.classes), "head_tail_counts": probes.head_tail_counts.tolist(),
            "linear": {**report(probe.test_pred), "val_top1": probe.val_acc, "selected": probe.best},
            "few_shot": few_shot, "knn": knn, "finetune": finetuned}


def feature_cluster_report(features: torch.Tensor, data: PretrainData, settings: FeatureClustersConfig,
                           run_dir: Path) -> dict:
    """k-means of the pre-training images' features, beside their classes when the run has labels; the sorted sizes
    drawn to RUN_DIR/feature_clusters.png."""
    report = feature_clusters(features, settings.k, settings.seed, data.labels, len(data.train.classes))
    sizes = {f"k-means clusters (K={settings.k})": report["clusters"]["sorted_sizes"]}
    if "classes" in report:
        sizes[f"classes (C={len(data.train.classes)})"] = report["classes"]["sorted_sizes"]
    plot_sorted_sizes(sizes, run_dir / FEATURE_CLUSTER_FIGURE,
                      title=f"{len(data.indices):,} pre-training images: k-means of the backbone features")
    return report


def finetune(cfg: RunConfig, settings: FinetuneConfig, seed: int, probes: ProbeData, train_idx: np.ndarray,
             val_idx: np.ndarray, run_dir: Path, device: torch.device) -> dict:
    """The fourth protocol: the pre-trained backbone and a new linear head trained with cross-entropy on the probes'
    labelled train part by imbssl train's loop, the epoch selected on their validation part (its model in
    RUN_DIR/finetune/checkpoints/best.pt), tested on the test split as the linear probe is."""
    folder = run_dir / FINETUNE_DIR
    shutil.rmtree(folder, ignore_errors=True)  # fine-tuned afresh: a former evaluation's best.pt is never selected
    supervised = finetune_config(cfg, settings, seed)
    seed_everything(seed)  # the head's initial weights
    pool = probes.pool
    backbone, normalize = load_backbone(cfg.model, pool.images.shape[-1], run_dir / BACKBONE_FILE)
    data = LabelledData(train_images=to_tensor_nchw(pool.images[train_idx], device),
                        train_labels=torch.as_tensor(pool.labels[train_idx], device=device),
                        val_images=to_tensor_nchw(pool.images[val_idx], device), val_labels=pool.labels[val_idx],
                        test=probes.test, classes=pool.classes)
    model = LongTailClassifier(backbone, data.train_labels, len(pool.classes), LossConfig()).to(device)
    used = training_precision(supervised.train, device)
    selected = fit_stage(supervised, model, data, normalize, folder, False, [], settings.epochs, used,
                         cosine_lr=settings.lr)
    pred = predict(selected, probes.test.images, normalize, supervised.eval.batch_size).argmax(1).numpy()
    return {**accuracy_report(pred, probes.test.labels, probes.head_tail_counts, pool.classes),
            "val_top1": selected.val_acc,
            "selected": {"lr": settings.lr, "wd": settings.weight_decay, "epoch": selected.selected_epoch},
            "precision": used._asdict()}


def finetune_config(cfg: RunConfig, settings: FinetuneConfig, seed: int) -> SupervisedConfig:
    """imbssl train's settings that fine-tune under ``settings``: the run's model and device, a cosine lr (given to
    fit_stage), no W&B or compilation."""
    optim = SupervisedOptimConfig(lr=settings.lr, weight_decay=settings.weight_decay, batch_size=settings.batch_size,
                                  epochs=settings.epochs, warmup_epochs=0, milestones=[], lr_factors=[])
    train = TrainConfig(**cfg.train.model_dump(include={"device", "precision", "channels_last", "deterministic",
                                                        "progress"}))
    return SupervisedConfig(name=FINETUNE_DIR, seed=seed, model=cfg.model, optim=optim,
                            augment_pad=settings.augment_pad, train=train)


def labelled_split(eval_cfg: EvalConfig, labels: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The full-shot probe's (train, val) indices into the pool: a balanced set of ``size`` images cut per class (the
    seeds' protocol; None: the whole pool, cut per class), or split files (SDCLR's and BCL's: the labelled list, and
    their validation list or a per-class cut of the labelled one)."""
    if eval_cfg.labelled_index_file is None:
        if size is None:
            return split_per_class(labels, np.arange(len(labels)), eval_cfg.linear.val_fraction, eval_cfg.seed)
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


def divergence_warnings(linear: dict | None, knn: dict[int, dict], backbone: torch.nn.Module, cfg: RunConfig,
                        in_channels: int) -> list[str]:
    """Signs that pre-training diverged without a NaN (engine/divergence.py), measured on the saved backbone
    against a freshly initialised one, and the probes' disagreement when they ran."""
    signs = divergence_signs(backbone, weight_norm(build_backbone(cfg.model, in_channels)))
    gap = linear and probe_disagreement(linear["top1"], {f"knn{k}": report["top1"] for k, report in knn.items()})
    signs += [gap] if gap else []
    return [f"pre-training looks diverged: {sign}" for sign in signs]


def final_clusters(run_dir: Path, cfg: RunConfig, images: np.ndarray, labels: np.ndarray | None, normalize: Normalize,
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
