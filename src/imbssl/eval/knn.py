"""Weighted cosine kNN classifier (Wu et al., 2018), the usual SSL representation monitor."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ArrayLike = np.ndarray | Tensor


@torch.no_grad()
def knn_scores(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    num_classes: int,
    k: int,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Per-class vote ``sum_{i in top-k} exp(cos(x, x_i) / T)`` for every test row, ``[N_test, C]`` on CPU.

    Each row is scaled by ``exp(-max_sim / T)`` (its nearest neighbour weighs exactly 1) because
    ``exp(1 / T)`` overflows float32 for ``T < ~0.011``; the scaling does not change the argmax.
    Work runs on ``train_x``'s device, ``chunk`` test rows at a time, so the similarity matrix
    never exceeds ``chunk x N_train``.
    """
    train = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    test = F.normalize(torch.as_tensor(test_x, dtype=torch.float32, device=train.device), dim=1)
    labels = torch.as_tensor(train_y, dtype=torch.long, device=train.device)
    k = min(k, len(train))
    scores = []
    for query in test.split(chunk):
        sim, idx = (query @ train.T).topk(k, dim=1)
        weight = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(query), num_classes, device=train.device)
        scores.append(votes.scatter_add_(1, labels[idx], weight).cpu())
    return torch.cat(scores)


def knn_predict(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    num_classes: int,
    k: int,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Predicted class (int64) of each test row by temperature-weighted cosine kNN."""
    return knn_scores(train_x, train_y, test_x, num_classes, k, temperature, chunk).argmax(1).numpy()
