"""Long-tailed classification losses, each the formula of its paper.

``counts`` are the per-class image counts n_c of the training set; ``weight`` a per-class weight w_c
(None = 1 for every class); ``sample_weight`` a per-image weight omega_i (None = 1 for every image: self-training
gives its pseudo-labelled images omega, "Rethinking the value of labels", Sec. 3), which scales an image's term
but not the mean's denominator. Logits are [B, C], targets [B] class indices.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: how focal loss meets class weights (``focal_loss``): Cui et al.'s w_y FL, or the LDAM code's focal of w_y CE
FocalForm = Literal["cui", "ldam_code"]


def class_balanced_weights(counts: Tensor, beta: float = 0.9999) -> Tensor:
    """w_c = (1 - beta) / (1 - beta^n_c), the inverse effective number of samples, scaled to sum to C.

    Cui et al. 2019, "Class-balanced loss based on effective number of samples", Sec. 3 (E_n = (1 - beta^n) /
    (1 - beta)) and Sec. 4 (the class-balanced loss weighs each class by 1 / E_n). beta -> 1 is inverse frequency,
    beta = 0 no re-weighting.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    weights = (1 - beta) / (1 - beta ** counts)
    return (weights / weights.sum() * len(counts)).float()


def cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None,
                  sample_weight: Tensor | None = None) -> Tensor:
    """-log softmax(z)_y, averaged as sum_i omega_i w_yi l_i / sum_i w_yi (the weighted mean of LDAM-DRW's code)."""
    if sample_weight is None:
        return F.cross_entropy(logits, target, weight=weight)
    terms = F.cross_entropy(logits, target, weight=weight, reduction="none")  # w_yi l_i
    denominator = weight[target].sum() if weight is not None else len(target)
    return (sample_weight * terms).sum() / denominator


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 1.0, weight: Tensor | None = None,
               sample_weight: Tensor | None = None, form: FocalForm = "cui") -> Tensor:
    """FL = -(1 - p_t)^gamma log p_t (Lin et al. 2017, Eq. 4), averaged over the batch. gamma = 0 is
    cross-entropy; gamma = 1 is the LDAM code's default.

    With class weights w (CB-Focal) the two ``form``s differ; without, both are FL:

    - ``"cui"``: w_y FL, the class-balanced focal loss as Cui et al. 2019 define it (Sec. 4): the weight scales
      the term, the modulating factor is (1 - p_t)^gamma.
    - ``"ldam_code"``: (1 - e^(-w_y CE))^gamma w_y CE with CE = -log p_t, the focal of the LDAM-DRW code
      (losses.py: ``focal_loss`` of ``F.cross_entropy(..., weight=w, reduction='none')``), which Yang & Xu's
      Table 2 ran: the modulating factor sees the weighted CE, so a tail class (w_y > 1) is modulated less and a
      head class (w_y < 1) more than by (1 - p_t)^gamma.
    """
    if form == "ldam_code":
        weighted_ce = F.cross_entropy(logits.float(), target, weight=weight, reduction="none")  # w_y CE
        loss = (1 - torch.exp(-weighted_ce)) ** gamma * weighted_ce
    else:
        log_p_t = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -(1 - log_p_t.exp()) ** gamma * log_p_t
        if weight is not None:
            loss = loss * weight[target]
    if sample_weight is not None:
        loss = loss * sample_weight
    return loss.mean()


def ldam_margins(counts: Tensor, max_margin: float = 0.5) -> Tensor:
    """Delta_c = K / n_c^(1/4), with K chosen so that the largest margin (the rarest class's) is ``max_margin``.

    Cao et al. 2019, "Learning imbalanced datasets with label-distribution-aware margin loss", Sec. 3.2.
    """
    margins = 1.0 / torch.as_tensor(counts, dtype=torch.float64) ** 0.25
    return (margins * (max_margin / margins.max())).float()


def ldam_loss(cosines: Tensor, target: Tensor, margins: Tensor, scale: float = 30.0,
              weight: Tensor | None = None, sample_weight: Tensor | None = None) -> Tensor:
    """-log e^(s(z_y - Delta_y)) / (e^(s(z_y - Delta_y)) + sum_{j != y} e^(s z_j))   (Cao et al. 2019, Sec. 3.2)

    ``cosines`` z are logits of l2-normalised features and weights (``NormedLinear``); s = ``scale`` makes them
    large enough for a softmax, as in the LDAM code. ``weight`` is DRW's class-balanced weight once it is on.
    """
    shifted = cosines - F.one_hot(target, cosines.shape[1]) * margins[target][:, None]
    return cross_entropy(scale * shifted, target, weight, sample_weight)


def logit_adjusted_loss(logits: Tensor, target: Tensor, prior: Tensor, tau: float = 1.0,
                        weight: Tensor | None = None, sample_weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of z_c + tau log pi_c, the logit-adjusted loss (Menon et al. 2021, "Long-tail learning via
    logit adjustment", Sec. 5): the rare classes must win by a margin that grows with the head's prior."""
    return cross_entropy(logits + tau * prior.log(), target, weight, sample_weight)


def posthoc_logit_adjustment(logits: Tensor, prior: Tensor, tau: float = 1.0) -> Tensor:
    """z_c - tau log pi_c: a model trained with plain CE, corrected for the training prior at prediction time
    (Menon et al. 2021, Sec. 4)."""
    return logits - tau * prior.log()
