"""k-means for the divide stage: Lloyd's iterations by faiss on the CPU or by torch on a GPU.

k-means minimises the inertia sum_i ||x_i - c_a(i)||^2. Each of ``n_init`` restarts is seeded by
k-means++ and refined by ``niter`` Lloyd iterations; the restart with the lowest inertia is kept.
Seeding and restarts are shared, so the engines differ only in who runs the iterations (faiss's
own seeding is uniform sampling, which misses small clusters). ``spherical`` clusters by cosine
similarity: points and centroids are l2-normalised, where the squared distance is 2 - 2 cos.
faiss iterates on every point (by default it subsamples 256 per centroid), like scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F

Engine = Literal["auto", "faiss", "torch"]

#: rows per distance block, so N x k distances never need more than a few hundred MB.
CHUNK_ROWS = 65536


@dataclass
class KMeansResult:
    assignments: np.ndarray  # int64 [N]: cluster of each point
    centroids: np.ndarray  # float32 [k, D]
    inertia: float  # sum of squared distances to the assigned centroids (of the normalised points if spherical)
    engine: str  # who ran the iterations: "faiss" or "torch" (on the device named after it, "torch:cuda")


def kmeans(features: np.ndarray | torch.Tensor, k: int, *, spherical: bool = False, n_init: int = 10,
           niter: int = 50, seed: int = 0, engine: Engine = "faiss") -> KMeansResult:
    """Cluster ``features`` [N, D] into ``k`` groups.

    faiss, the default, clusters a seed the same way on every machine; "auto" is torch on a CUDA device, else
    faiss, so its result depends on the hardware. The result names the engine that ran.
    """
    if engine == "auto":
        engine = "torch" if torch.cuda.is_available() else "faiss"
    device = "cuda" if engine == "torch" and torch.cuda.is_available() else "cpu"
    x = torch.as_tensor(features, dtype=torch.float32).to(device)
    if len(x) < k:
        raise ValueError(f"cannot make {k} clusters of {len(x)} points")
    if spherical:
        x = F.normalize(x, dim=1)
    lloyd = _faiss_lloyd if engine == "faiss" else _torch_lloyd
    generator = torch.Generator(device=device).manual_seed(seed)
    best = None
    for _ in range(n_init):
        centroids = lloyd(x, _kmeans_plus_plus(x, k, generator), niter, spherical)
        assignments, sq_dist = nearest_centroid(x, centroids)
        inertia = sq_dist.double().sum().item()
        if best is None or inertia < best.inertia:
            best = KMeansResult(assignments.cpu().numpy(), centroids.cpu().numpy(), inertia,
                                engine if engine == "faiss" else f"torch:{device}")
    return best


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each point's nearest centroid and the squared distance to it, block by block.

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped at 0 against rounding.
    """
    c_sq = (centroids * centroids).sum(1)
    indices, distances = [], []
    for block in x.split(CHUNK_ROWS):
        sq = ((block * block).sum(1, keepdim=True) - 2 * block @ centroids.T + c_sq).clamp_min_(0)
        dist, idx = sq.min(1)
        indices.append(idx)
        distances.append(dist)
    return torch.cat(indices), torch.cat(distances)


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Seeding by D^2 sampling: each next centroid is a point drawn with probability ~ its squared
    distance to the nearest centroid so far (Arthur & Vassilvitskii, 2007)."""
    first = torch.randint(len(x), (1,), generator=generator, device=x.device)
    centroids = x[first]
    sq_dist = ((x - centroids) ** 2).sum(1)
    for _ in range(1, k):
        pick = torch.multinomial(sq_dist / sq_dist.sum(), 1, generator=generator)
        centroids = torch.cat([centroids, x[pick]])
        sq_dist = torch.minimum(sq_dist, ((x - x[pick]) ** 2).sum(1))
    return centroids


def _faiss_lloyd(x: torch.Tensor, init: torch.Tensor, niter: int, spherical: bool) -> torch.Tensor:
    k = len(init)
    # min_points_per_centroid only gates faiss's warning about small N / k; ExCB's centroid initialisation
    # (K = 512 on 12K images) means it.
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=spherical, max_points_per_centroid=-(-len(x) // k),
                      min_points_per_centroid=1)
    km.train(x.numpy(), init_centroids=init.numpy())
    return torch.from_numpy(km.centroids)


def _torch_lloyd(x: torch.Tensor, init: torch.Tensor, niter: int, spherical: bool) -> torch.Tensor:
    """Each iteration moves every centroid to the mean of its points (then onto the sphere); an empty one stays."""
    centroids = init
    for _ in range(niter):
        assignments = nearest_centroid(x, centroids)[0]
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
        counts = torch.bincount(assignments, minlength=len(centroids)).unsqueeze(1)
        means = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        centroids = F.normalize(means, dim=1) if spherical else means
    return centroids
