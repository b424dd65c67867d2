"""Self-training with imbalanced unlabeled data ("Rethinking the value of labels", Sec. 3.1): four stages.

    split    D_L (data.subset), a validation set and D_U, disjoint parts of the training pool    split.npz
    base     f_B, a classifier on D_L with any loss of ``imbssl train``                           base/train.json
    pseudo   f_B's hard labels on D_U with their confidences, and which are kept                  pseudo_labels.pt
    final    a classifier on D_L + the kept D_U, trained on L(D_L) + omega L(D_U)                 final/train.json

With ``pseudo_labels.labeller: ce`` and a loss other than plain CE, a CE classifier trained on D_L as f_B is
(labeller/train.json, or the CE run's base when a grid shares it) gives the pseudo-labels instead of f_B: the seed's
released pseudo-labels come from a CE base model (its README), whatever the loss of the final model.

and then self_training.json: both classifiers' test reports and the pseudo-labels' accuracy per class against
D_U's true labels, with pseudo_label_confusion.png. That report is the one place D_U's labels are read; the
split reads them only to give D_U its class profile, as the seed selects its 80M Tiny Images per class.

Each stage is finished when its file exists, and the classifier stages resume from their last epoch, so a run
killed anywhere continues where it stopped. D_L and the validation set do not depend on D_U's settings, so runs
that differ only in rho_U may share one base classifier (``base_dir``), and runs that differ only in the loss one
CE labeller (``labeller_dir``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from imbssl.config import ConfigError, PseudoLabelConfig, SelfTrainingConfig, SupervisedConfig
from imbssl.data import ImageSet, labeled_unlabeled_split, load_splits, save_indices
from imbssl.engine.checkpoint import load_safe, save_atomic
from imbssl.engine.trainer import EpochCallback
from imbssl.pipelines.common import resolve_device, set_determinism
from imbssl.pipelines.runfolder import PIPELINE_CONFIG, RUN_CONFIG, read_saved_config, run_changes, run_folder
from imbssl.pipelines.train import (MODEL_FILE, TRAIN_FILE, LabelledData, check_init_from, fit_and_report,
                                    labelled_data, load_classifier, predict)
from imbssl.records import SelfTrainingRecord, TrainRecord
from imbssl.report import plot_confusion

log = logging.getLogger(__name__)

SPLIT_FILE = "split.npz"
PSEUDO_FILE = "pseudo_labels.pt"
LABELLER_DIR = "labeller"
REPORT_FILE = SelfTrainingRecord.FILE
CONFUSION_PLOT = "pseudo_label_confusion.png"


def self_train(cfg: SelfTrainingConfig, run_dir: Path | None = None, resume: bool = False,
               base_dir: Path | None = None, callbacks: Mapping[str, list[EpochCallback]] = {},
               labeller_dir: Path | None = None) -> Path:
    """Run (or continue) the stages in ``run_dir``; returns it. ``base_dir``: the base classifier's folder when
    it is shared (default run_dir/base); ``labeller_dir``: the CE labeller's, when it is shared (default
    run_dir/labeller; unused when f_B labels D_U); ``callbacks``: epoch callbacks by stage ("base", "labeller",
    "final")."""
    check_init_from(cfg)
    root = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    base_dir = Path(base_dir or root / "base")
    labeller_dir = base_dir if cfg.labels_with_base() else Path(labeller_dir or root / LABELLER_DIR)
    with run_folder(cfg, root, resume, config_file=PIPELINE_CONFIG):
        start = time.perf_counter()
        set_determinism(cfg.train.deterministic)
        splits = load_splits(cfg.data)
        pool, test = splits["train"], splits["test"]
        labeled, unlabeled, val = split_pool(cfg, pool, root / SPLIT_FILE)
        base, final, final_dir = cfg.stage("base"), cfg.stage("final"), root / "final"
        if not finished(base, base_dir):
            train_stage(base, base_dir, labelled_data(base, pool, test, labeled, val, base_dir),
                        callbacks.get("base", []))
        labeller = cfg.stage("labeller")
        if not cfg.labels_with_base() and not finished(labeller, labeller_dir):
            train_stage(labeller, labeller_dir, labelled_data(labeller, pool, test, labeled, val, labeller_dir),
                        callbacks.get("labeller", []))
        pseudo = pseudo_labels(cfg, labeller_dir, pool, unlabeled, root / PSEUDO_FILE)
        if not finished(final, final_dir):
            train_stage(final, final_dir, final_data(cfg, pool, test, (labeled, unlabeled, val), pseudo, final_dir),
                        callbacks.get("final", []))
        write_report(root, (base_dir, labeller_dir, final_dir), pool, unlabeled, pseudo, time.perf_counter() - start)
    return root


def split_pool(cfg: SelfTrainingConfig, pool: ImageSet, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D_L, D_U, validation) indices into the pool, drawn from the seed and recorded in ``path``.

    Drawing is cheap and the same on every call; once a stage has written a file, the pipeline folder's config
    check refuses settings that would draw another split."""
    labeled, unlabeled, val = labeled_unlabeled_split(pool.labels, cfg.data.subset, cfg.unlabeled,
                                                      cfg.eval.val_per_class, pool.classes)
    counts = {name: np.bincount(pool.labels[part], minlength=len(pool.classes)).tolist()
              for name, part in (("labeled", labeled), ("unlabeled", unlabeled))}
    log.info("self-training split: D_L %d images %s, D_U %d images %s (rho_U=%g), validation %d", len(labeled),
             counts["labeled"], len(unlabeled), counts["unlabeled"], cfg.unlabeled.imbalance, len(val))
    save_indices(path, labeled, {"unlabeled_indices": unlabeled.tolist(), "val_indices": val.tolist(),
                                 "classes": list(pool.classes), "labeled_class_counts": counts["labeled"],
                                 "unlabeled_class_counts": counts["unlabeled"]})
    return labeled, unlabeled, val


def finished(stage: SupervisedConfig, run_dir: Path) -> bool:
    """Whether the stage's classifier is trained; a finished one trained with other settings is an error, since
    it would be paired with this run's other stage (a shared base, or a folder re-used with a new config)."""
    if not (run_dir / TRAIN_FILE).exists():
        return False
    if changed := run_changes(read_saved_config(run_dir / RUN_CONFIG, SupervisedConfig), stage):
        listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changed.items())
        raise ConfigError(f"{run_dir} holds a classifier trained with other settings: {listed}; use another run "
                          f"folder (or --out) for these settings")
    return True


def train_stage(stage: SupervisedConfig, run_dir: Path, data: LabelledData, callbacks: list[EpochCallback]) -> None:
    with run_folder(stage, run_dir, resume=True):
        fit_and_report(stage, data, run_dir, resume=True, callbacks=callbacks)


def final_data(cfg: SelfTrainingConfig, pool: ImageSet, test: ImageSet, parts: tuple[np.ndarray, ...],
               pseudo: dict[str, torch.Tensor], run_dir: Path) -> LabelledData:
    """D_L with its labels, then the kept D_U with its pseudo-labels and weight omega; head and tail are D_L's."""
    labeled, unlabeled, val = parts
    kept = pseudo["kept"].numpy()
    train_idx = np.concatenate([labeled, unlabeled[kept]])
    train_labels = np.concatenate([pool.labels[labeled], pseudo["labels"].numpy()[kept]])
    omega = np.concatenate([np.ones(len(labeled)), np.full(int(kept.sum()), cfg.pseudo_labels.weight)])
    labeled_counts = np.bincount(pool.labels[labeled], minlength=len(pool.classes))
    return labelled_data(cfg.stage("final"), pool, test, train_idx, val, run_dir, train_labels,
                         omega.astype(np.float32), labeled_counts)


def pseudo_labels(cfg: SelfTrainingConfig, labeller_dir: Path, pool: ImageSet, unlabeled: np.ndarray,
                  path: Path) -> dict[str, torch.Tensor]:
    """The labeller's (f_B's, or the CE labeller's) hard labels on D_U, their confidences and which are kept;
    saved."""
    if path.exists():
        return load_safe(path)
    device = resolve_device(cfg.train.device)
    model, normalize = load_classifier(cfg.model, pool.images.shape[-1], len(pool.classes),
                                       labeller_dir / MODEL_FILE)
    logits = predict(model.to(device), pool.images[unlabeled], normalize, cfg.eval.batch_size)
    confidence, labels = hard_labels(logits, model.logit_scale)
    kept = torch.as_tensor(select_pseudo_labels(confidence.numpy(), labels.numpy(), cfg.pseudo_labels,
                                                len(pool.classes)))
    log.info("pseudo-labels: %d of %d images of D_U kept (threshold %g%s), per pseudo-class %s", int(kept.sum()),
             len(unlabeled), cfg.pseudo_labels.threshold,
             ", class-balanced" if cfg.pseudo_labels.class_balanced else "",
             np.bincount(labels[kept].numpy(), minlength=len(pool.classes)).tolist())
    pseudo = {"indices": torch.as_tensor(unlabeled), "labels": labels, "confidence": confidence, "kept": kept}
    save_atomic(pseudo, path)
    return pseudo


def hard_labels(logits: torch.Tensor, logit_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, label) of each row of ``logits``: the label is the logits' argmax, as gen_pseudolabels.py takes
    it (``torch.max(model(batch), dim=1)``, the first of tied maxima), and its confidence the softmax probability of
    ``logit_scale`` x logits there (LDAM's cosines times its scale s, as in training).

    The argmax is taken on the logits, not on the probabilities: a softmax rounds logits one float apart to one
    probability (exp(x - y) is 1.0 in float32 for |x - y| < 3e-8), whose first maximum may then be the smaller."""
    _, labels = torch.max(logits, dim=1)
    probabilities = torch.softmax(logits.float() * logit_scale, dim=1)
    return probabilities.gather(1, labels[:, None]).squeeze(1), labels


def select_pseudo_labels(confidence: np.ndarray, labels: np.ndarray, cfg: PseudoLabelConfig,
                         num_classes: int) -> np.ndarray:
    """The mask of kept pseudo-labels: confidence above the threshold, then (class_balanced) at most as many per
    pseudo-class as the rarest non-empty one keeps, the most confident first."""
    kept = confidence > cfg.threshold
    if not cfg.class_balanced or not kept.any():
        return kept
    counts = np.bincount(labels[kept], minlength=num_classes)
    cap = counts[counts > 0].min()
    balanced = np.zeros_like(kept)
    for c in range(num_classes):
        members = np.flatnonzero(kept & (labels == c))
        balanced[members[np.argsort(-confidence[members], kind="stable")[:cap]]] = True
    return balanced


def pseudo_label_report(true: np.ndarray, pseudo: np.ndarray, kept: np.ndarray, classes: tuple[str, ...]) -> dict:
    """How right the pseudo-labels are, overall and per class, from D_U's true labels (monitoring only)."""
    num_classes = len(classes)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (true, pseudo), 1)
    correct = pseudo == true

    def percent(mask: np.ndarray) -> float | None:
        return float(100 * correct[mask].mean()) if mask.any() else None

    return {"accuracy": percent(np.ones_like(kept)), "kept": int(kept.sum()), "of": len(kept),
            "kept_accuracy": percent(kept),
            "per_class": {name: {"images": int((true == c).sum()), "recall": percent(true == c),
                                 "kept": int((kept & (pseudo == c)).sum()),
                                 "kept_precision": percent(kept & (pseudo == c))} for c, name in enumerate(classes)},
            "confusion": confusion.tolist()}


def write_report(root: Path, stage_dirs: tuple[Path, Path, Path], pool: ImageSet, unlabeled: np.ndarray,
                 pseudo: dict[str, torch.Tensor], wall_s: float) -> None:
    """self_training.json from the (base, labeller, final) folders; "labeller" is "base" when f_B labels D_U."""
    base, labeller, final = (TrainRecord.read(d) for d in stage_dirs)
    true = pool.labels[unlabeled]
    labels_report = pseudo_label_report(true, pseudo["labels"].numpy(), pseudo["kept"].numpy(), pool.classes)
    plot_confusion(np.asarray(labels_report["confusion"]), pool.classes, root / CONFUSION_PLOT,
                   title=f"Pseudo-labels of D_U ({len(unlabeled)} images): rows true class, columns pseudo-label; "
                         f"{labels_report['accuracy']:.1f}% right")
    SelfTrainingRecord(
        base=base.test, final=final.test, gain_top1=final.test.top1 - base.test.top1,
        labeller="base" if stage_dirs[1] == stage_dirs[0] else {"dir": str(stage_dirs[1]), "test": labeller.test},
        pseudo_labels=labels_report, labeled_class_counts=base.train_class_counts,
        unlabeled_class_counts=np.bincount(true, minlength=len(pool.classes)).tolist(),
        final_class_counts=final.train_class_counts, hardware=final.hardware, wall_s_this_call=wall_s).write(root)
