"""Distill (step 4 of the offline-clustering pipeline, paper Sec. 3.1): one student from the base and the experts.

The student has "the same architecture and parameter as SimSiam_base": it starts from the base's
weights (backbone, and the heads up to the distillation space) and input standardisation, and trains
for ``cfg.optim.epochs`` epochs over D on one augmented view per image with the loss of Eq. 2
(methods/distill.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imbssl.augment import MultiCrop
from imbssl.config import RunConfig, Space
from imbssl.engine.trainer import EpochCallback
from imbssl.methods.distill import FrozenTeacher, MultiTeacherDistill
from imbssl.pipelines.common import encoder, load_encoder, space_dim
from imbssl.pipelines.pretrain import load_run_images, run_folder, train_method


def distill(cfg: RunConfig, run_dir: Path, indices: np.ndarray, clusters: np.ndarray, base: Path, experts: list[Path],
            head_hidden: int, target: Space, resume: bool = False, callbacks: list[EpochCallback] = ()) -> Path:
    """Train the student on the train-split images ``indices``, image i of cluster ``clusters[i]``, to regress
    the teachers' outputs in the space ``target``.

    ``base`` and ``experts`` are the teachers' backbone.pt files, expert k for cluster k. Returns
    ``run_dir``, which then holds backbone.pt like any pre-training run.
    """
    with run_folder(cfg, run_dir, resume):
        _, images = load_run_images(cfg, run_dir, indices)
        channels = images.shape[1]
        student, heads, normalize = load_encoder(cfg, channels, base, target)
        teachers = []
        for path in (base, *experts):
            backbone, teacher_heads, own = load_encoder(cfg, channels, path, target)
            teachers.append(FrozenTeacher.for_views(encoder(backbone, teacher_heads), own, normalize))
        method = MultiTeacherDistill(student, teachers[0], teachers[1:], torch.as_tensor(clusters), head_hidden,
                                     heads, space_dim(cfg, student, target))
        one_view = MultiCrop(cfg.augment, normalize.mean, normalize.std, images.shape[-1], num_global=1)
        train_method(cfg, method.to(images.device), images, one_view, normalize, run_dir, resume, callbacks)
    return run_dir
