"""Cluster priors: the share pi_k of the data that each of K clusters (prototypes, centroids) is meant to hold.

SSL objectives with a volume-maximising regulariser (SimCLR, SwAV, MSN, VICReg) carry a hidden *uniform*
prior: they favour features that split the data into clusters of equal size (Assran et al. 2023, "The hidden
uniform cluster prior in self-supervised learning"). On long-tailed data that prior fights the classes.
PMSN matches a power-law prior instead; ExCB's balancing operator takes the same prior as its target sizes.

    uniform     pi_k = 1/K
    power_law   pi_k ∝ k^-tau, k = 1..K (PMSN; tau = 0.25 its reference setting)
    given       K numbers, inline or from a file
    estimated   the sizes of a k-means of features, largest first (+1 each, so no cluster's share is 0)
    power_law_fit  pi_k ∝ k^-tau with tau fitted to those sizes: PMSN's power law without labels

Every prior is checked (``check_prior``): K entries, each positive, summing to 1.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from imbssl.configbase import ConfigError, Section

log = logging.getLogger(__name__)

#: the priors that are measured on the data: from the k-means of the initial projections (methods/base.py)
FROM_DATA = ("estimated", "power_law_fit")
#: how far from 1 a prior's sum may be (a given prior typed with 6 decimals sums to 1 +- 5e-6)
SUM_TOLERANCE = 1e-4


class PriorConfig(Section):
    """A cluster prior pi over K clusters: the share of the data each cluster is meant to hold (``method.prior`` of
    ExCB and MSN)."""

    kind: Literal["uniform", "power_law", "given", "estimated", "power_law_fit"] = Field(
        "uniform", description="uniform 1/K (what SimCLR, SwAV, MSN and ExCB assume); power_law pi_k ∝ k^-tau "
                               "(PMSN); given (values or path); estimated from a k-means of the initial features; "
                               "power_law_fit: power_law with tau fitted to that k-means's sizes")
    tau: float = Field(0.25, gt=0, description="power_law: the exponent (PMSN's reference setting 0.25)")
    values: list[float] | None = Field(None, description="given: pi itself, K positive numbers summing to 1")
    path: str | None = Field(None, description="given: a text file of K numbers (whitespace- or comma-separated)")

    @model_validator(mode="after")
    def _check(self) -> "PriorConfig":
        if self.kind == "given" and (self.values is None) == (self.path is None):
            raise ValueError("a given prior needs exactly one of values and path")
        if self.kind != "given" and (self.values is not None or self.path is not None):
            raise ValueError(f"values and path belong to kind=given, not kind={self.kind}")
        return self

    @property
    def from_data(self) -> bool:
        """Whether the prior is measured on the data (the k-means of the initial projections) rather than set."""
        return self.kind in FROM_DATA


def uniform_prior(num_clusters: int) -> torch.Tensor:
    return torch.full((num_clusters,), 1.0 / num_clusters)


def power_law_prior(num_clusters: int, tau: float) -> torch.Tensor:
    """pi_k = k^-tau / sum_j j^-tau for k = 1..K: cluster 0 the largest."""
    weights = torch.arange(1, num_clusters + 1, dtype=torch.float64) ** -tau
    return (weights / weights.sum()).float()


def estimated_prior(assignments: np.ndarray, num_clusters: int) -> torch.Tensor:
    """(n_k + 1) / (N + K) for the k-means cluster sizes n_k sorted largest first: the data's own size profile."""
    counts = np.sort(np.bincount(assignments, minlength=num_clusters))[::-1] + 1.0
    return torch.as_tensor(counts / counts.sum(), dtype=torch.float32)


def fit_power_law(sizes: np.ndarray | torch.Tensor) -> float:
    """tau of the power law s_k ∝ k^-tau that fits ``sizes`` sorted largest first: least squares of log s_k on log k,
    tau = -slope. Sizes must be positive (``estimated_prior``'s +1 sees to that); 0 for equal sizes."""
    log_sizes = np.log(np.sort(np.asarray(sizes, dtype=np.float64))[::-1])
    slope = np.polyfit(np.log(np.arange(1, len(log_sizes) + 1)), log_sizes, 1)[0]
    return float(-slope)


def fitted_power_law_prior(assignments: np.ndarray, num_clusters: int) -> torch.Tensor:
    """The power law fitted to the k-means sizes as ``estimated_prior`` takes them: PMSN's prior, its tau
    measured on the data instead of set."""
    tau = fit_power_law(estimated_prior(assignments, num_clusters))
    log.info("power_law_fit: tau %.3f fitted to the sizes of %d k-means clusters", tau, num_clusters)
    return power_law_prior(num_clusters, tau)


def given_prior(cfg: PriorConfig) -> torch.Tensor:
    if cfg.values is not None:
        return torch.tensor(cfg.values, dtype=torch.float32)
    path = Path(cfg.path)
    try:
        text = path.read_text()
        return torch.tensor([float(v) for v in text.replace(",", " ").split()], dtype=torch.float32)
    except OSError as err:
        raise ConfigError(f"prior.path={path}: cannot be read ({err.strerror or err})") from None
    except ValueError:
        raise ConfigError(f"prior.path={path}: not a list of numbers") from None


def check_prior(prior: torch.Tensor, num_clusters: int, what: str = "prior") -> torch.Tensor:
    """``prior`` itself when it has K entries, all positive, summing to 1; else a ConfigError naming the problem."""
    if prior.ndim != 1 or len(prior) != num_clusters:
        raise ConfigError(f"{what} has {prior.numel()} entries for {num_clusters} clusters (method.num_clusters)")
    bad = ~torch.isfinite(prior) | (prior <= 0)
    if bad.any():
        first = int(torch.argmax(bad.int()))
        raise ConfigError(f"{what} must be positive and finite: entry {first} is {prior[first].item():g}")
    if abs(prior.double().sum().item() - 1.0) > SUM_TOLERANCE:
        raise ConfigError(f"{what} sums to {prior.double().sum().item():.6g}, not 1")
    return prior


def cluster_prior(cfg: PriorConfig, num_clusters: int, assignments: np.ndarray | None = None) -> torch.Tensor:
    """The prior ``cfg`` describes, checked. ``estimated`` and ``power_law_fit`` need the k-means ``assignments`` of
    the data."""
    if cfg.kind == "uniform":
        prior = uniform_prior(num_clusters)
    elif cfg.kind == "power_law":
        prior = power_law_prior(num_clusters, cfg.tau)
    elif cfg.kind == "given":
        prior = given_prior(cfg)
    elif assignments is None:
        raise ValueError(f"a {cfg.kind} prior needs the k-means assignments of the data")
    elif cfg.kind == "estimated":
        prior = estimated_prior(assignments, num_clusters)
    else:
        prior = fitted_power_law_prior(assignments, num_clusters)
    return check_prior(prior, num_clusters, f"the {cfg.kind} prior")
