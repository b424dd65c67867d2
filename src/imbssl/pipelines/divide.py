"""Divide (step 2 of the offline-clustering pipeline, paper Sec. 3.1): k-means on the base model's features.

The features are the base model's outputs for the un-augmented images of D, in the space ``kmeans.space``
names: by default the projector's z, the paper's "output representation of SimSiam_base" (512-d in Fig. 3).
Labels are read only for the report (sizes, purity, NMI, the class panel of the plot).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from imbssl.cluster import kmeans
from imbssl.config import OfflineClusteringConfig, RunConfig, Space
from imbssl.data import load_indices
from imbssl.engine.checkpoint import save_atomic
from imbssl.eval import cluster_report, extract_features
from imbssl.pipelines.common import PretrainData, encoder, load_encoder, load_pretrain_data, resolve_device
from imbssl.pipelines.pretrain import BACKBONE_FILE
from imbssl.records import DivideRecord
from imbssl.report import plot_clusters_pca

log = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.pt"


def divide(cfg: OfflineClusteringConfig, base_run: Path, out_dir: Path) -> Path:
    """Cluster the base run's images; writes report.json, clusters.png and, last, the clusters file.

    The clusters file holds ``indices`` (of D in the train split), ``assignments`` (cluster of each)
    and ``centroids``; it exists only once the stage is complete.
    """
    start = time.perf_counter()
    km = cfg.kmeans
    features, data = run_features(cfg.base, base_run, km.space)
    result = kmeans(features, cfg.k, spherical=km.spherical, n_init=km.n_init, niter=km.niter, seed=cfg.base.seed,
                    engine=km.engine)
    labels = data.labels  # None for a run without labels: sizes and inertia alone
    report = DivideRecord(**cluster_report(result.assignments, cfg.k, labels, data.train.classes),
                          inertia=result.inertia, kmeans={**km.model_dump(), "engine_used": result.engine},
                          wall_s=time.perf_counter() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write(out_dir)
    plot_clusters_pca(features.numpy(), result.assignments, out_dir / "clusters.png", labels, data.train.classes,
                      title=f"k-means (K={cfg.k}) of the base model's {km.space} outputs, PCA")
    judged = "" if labels is None else f": purity {report.purity:.3f}, NMI {report.nmi:.3f}"
    log.info("divided %d images into %d clusters of sizes %s%s", len(data.indices), cfg.k, report.sizes, judged)
    return save_atomic({"indices": torch.from_numpy(data.indices), "assignments": torch.from_numpy(result.assignments),
                        "centroids": torch.from_numpy(result.centroids)}, out_dir / CLUSTERS_FILE)


def run_features(cfg: RunConfig, run_dir: Path, space: Space) -> tuple[torch.Tensor, PretrainData]:
    """The run's model, up to ``space``, applied to its own training images, un-augmented and standardised as in
    training."""
    data = load_pretrain_data(cfg.data, load_indices(run_dir / "subset.npz"))
    device = resolve_device(cfg.train.device)
    backbone, heads, normalize = load_encoder(cfg, data.train.images.shape[-1], run_dir / BACKBONE_FILE, space)
    model = encoder(backbone, heads).to(device)
    return extract_features(model, data.images, lambda x: normalize(x.to(device)), device=device), data
