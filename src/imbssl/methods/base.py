"""What every SSL method gives the training engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from imbssl.cluster import KMeansResult, kmeans
from imbssl.configbase import MethodSection
from imbssl.engine.task import MakeView, StepOutput, TrainingTask

#: StepOutput is re-exported: what every method module's step returns
__all__ = ["OptimDefaults", "SSLMethod", "StepOutput", "kmeans_of_one_view", "output_std", "weight_decay_groups"]

#: images per forward pass when the initial projections are clustered (``kmeans_of_one_view``)
INIT_BATCH_SIZE = 512


@dataclass(frozen=True)
class OptimDefaults:
    """A method's optimizer settings from the papers (Table 1 of the offline-clustering paper)."""

    name: str
    base_lr: float
    weight_decay: float


class SSLMethod(TrainingTask):
    """A backbone plus heads, trained without labels. Beyond the engine's hooks (``TrainingTask``) a method names
    its Table 1 optimizer settings, how many views it takes and what is saved and evaluated after training.
    ExCB uses the hooks for its EMA teacher, centroid initialisation (``on_train_start``'s ``make_view`` makes one
    global view) and weight-decay schedule. The labels ``epoch_stats`` receives are for monitoring only: no method
    trains on them.
    """

    name: ClassVar[str]
    display_name: ClassVar[str]  # as tables and reports name it ("MoCo v2")
    config_class: ClassVar[type[MethodSection]]  # its ``method`` section, whose name Literal is ``name``
    defaults: ClassVar[OptimDefaults]
    num_views: ClassVar[int] = 2  # global views per image
    uses_local_crops: ClassVar[bool] = False  # whether training_step accepts multi-crop local views
    learns_clusters: ClassVar[bool] = False  # whether it has a ``clusterer`` and a ``cluster_target`` (ExCB, MSN)

    def __init__(self, backbone: nn.Module, output_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.output_dim = output_dim

    @property
    def eval_backbone(self) -> nn.Module:
        """The backbone that is saved and evaluated (an EMA teacher's, for methods that keep one)."""
        return self.backbone

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        """The heads saved beside ``eval_backbone``, named by the space they output (config.SPACES), in the order
        they follow it: what lets a pipeline read the method's outputs, not only its features."""
        return {}

    @property
    def clusterer(self) -> nn.Module:
        """Images -> their similarity to each learned cluster, as evaluated (no balancing); ``learns_clusters``."""
        raise NotImplementedError(f"{self.name} learns no clusters")

    @property
    def cluster_target(self) -> torch.Tensor:
        """The share of the data each cluster is meant to hold: the cluster prior (1/K unless set)."""
        raise NotImplementedError(f"{self.name} learns no clusters")


def weight_decay_groups(params: list[nn.Parameter]) -> list[dict]:
    """Two optimizer groups: weights (>1-d) with the optimizer's decay, biases and normalisation weights (1-d)
    without, as DINO's, ExCB's and MSN's code split them."""
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


@torch.no_grad()
def output_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of l2-normalised outputs (SimSiam, Sec. 4.1).

    About 1/sqrt(d) for well spread outputs, 0 when every image maps to one point (collapse).
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def kmeans_of_one_view(encoder: nn.Module, images: torch.Tensor, make_view: MakeView, generator: torch.Generator,
                       k: int) -> KMeansResult:
    """Spherical k-means on ``encoder``'s projections of one global view of every image, at the start of training:
    how ExCB's official code initialises its centroids, and where the priors measured on the data come from
    (priors.FROM_DATA).

    The projections are the ones the encoder gives during training, where its BatchNorm normalises with batch
    statistics; its running statistics are restored afterwards, so this pass over the data leaves no trace.
    (With the running statistics of an untrained network instead, eval mode, ExCB's centroids land where no
    training-time projection goes: 17-19 of 32 clusters stayed empty in the digits test, none this way.)
    """
    buffers = {name: buffer.clone() for name, buffer in encoder.named_buffers()}
    projections = torch.cat([encoder(make_view(batch, generator)) for batch in images.split(INIT_BATCH_SIZE)])
    for name, buffer in encoder.named_buffers():
        buffer.copy_(buffers[name])
    return kmeans(projections, k, spherical=True, n_init=1, seed=generator.initial_seed())
