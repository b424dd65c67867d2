"""Typed run configuration: YAML in, validated pydantic models out, ``--set`` overrides.

Every section forbids unknown keys, so a typo such as ``optim.base_lr`` -> ``optim.baselr``
fails loudly with the offending key in the message instead of silently using a default.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imbssl.errors import ImbsslError


ConfigT = TypeVar("ConfigT", bound=BaseModel)

#: where a trained SSL model's representation is read: the backbone's features f(x), the projector's output
#: z = g(f(x)), or the predictor's p = h(z) (SimSiam). The papers' "output of SimSiam" reads as z (d = 512, Table 1).
Space = Literal["backbone", "projector", "predictor"]
SPACES: tuple[Space, ...] = ("backbone", "projector", "predictor")


class ConfigError(ImbsslError, ValueError):
    """A configuration file or override that cannot be used as given."""


MISSING_DATA_PATH = ("data.path is required when data.source is 'imagefolder': pass --data PATH (an ImageFolder "
                     "folder or .tar.gz), or --set data.source=cifar10 to download CIFAR-10")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def unused_keys(self) -> set[str]:
        """Fields whose values this section's other settings leave unread, so that a run folder saved under other
        defaults for them is still the same run."""
        return set()


class SubsetConfig(Section):
    """Which images of the training pool are used for pre-training (data/longtail.py)."""

    profile: Literal["full", "exp", "step", "balanced", "index_file"] = "full"
    imbalance: float = Field(10.0, ge=1.0, description="p (or rho): largest / smallest class count")
    minority_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="step profile: share of minority classes")
    total: int | None = Field(None, ge=1, description="balanced profile: total N (None = match the exp profile)")
    head_count: int | None = Field(None, ge=1, description="n_max, the head class's count (None = the pool's smallest "
                                                         "class count, Cao et al.'s CIFAR-LT)")
    permute_classes: bool = Field(False, description="draw which classes are the head at random")
    index_file: str | None = Field(None, description="index_file profile: indices into the train split, as SDCLR's "
                                                     "and BCL's split files (.npy, .txt one per line, or imbssl's "
                                                     ".npz / .json); docs/longtail-ssl.md")
    seed: int = 0

    @model_validator(mode="after")
    def _check_index_file(self) -> "SubsetConfig":
        if (self.profile == "index_file") != (self.index_file is not None):
            raise ValueError("profile index_file and the index_file key go together: set both or neither")
        return self


#: sources whose images are files under data.path, listed by data.train_list and data.test_list
LISTED_SOURCES = ("filelist", "inat")


class DataConfig(Section):
    source: Literal["digits", "cifar10", "cifar100", "imagefolder", "filelist", "inat"] = "digits"
    path: str | None = Field(None, description="archive or folder; CIFAR archives are downloaded when absent; for "
                                               "filelist and inat, the root the listed paths are relative to")
    train_list: str | None = Field(None, description="filelist: `relative/path label` lines (ImageNet_LT_train.txt); "
                                                     "inat: an annotation JSON (train2018.json); relative to data.path")
    test_list: str | None = Field(None, description="the evaluation split's list, as train_list (ImageNet_LT_test.txt, "
                                                    "val2018.json)")
    cache_dir: str = Field("~/.cache/imbssl", description="where decoded uint8 arrays are kept")
    download: bool = True
    image_size: int | None = Field(None, ge=4, description="store ImageFolder, filelist and inat images at this "
                                                         "square size (see resize)")
    resize: Literal["stretch", "center_crop"] = Field(
        "stretch", description="how image_size is reached: stretch both sides to it, or scale the shorter side to it "
                               "and keep the centre square (ImageNet-size storage, aspect kept)")
    subset: SubsetConfig = SubsetConfig()

    @model_validator(mode="after")
    def _check_lists(self) -> "DataConfig":
        listed = self.source in LISTED_SOURCES
        if not listed and (self.train_list or self.test_list):
            raise ValueError(f"data.train_list and data.test_list belong to the filelist and inat sources, not "
                             f"{self.source!r}")
        if listed and not (self.train_list and self.test_list):
            raise ValueError(f"data.source {self.source!r} reads its splits from data.train_list and data.test_list: "
                             f"set both")
        return self

    def require_path(self) -> None:
        """Image files have no default location: a run config must name it (the data section alone may not)."""
        if self.source == "imagefolder" and not self.path:
            raise ValueError(MISSING_DATA_PATH)
        if self.source in LISTED_SOURCES and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}: the root folder its lists' "
                             f"paths are relative to")


class AugmentConfig(Section):
    """SimSiam/SimCLR views for small images (augment/views.py), or the supervised pad-crop-flip (``crop: pad``,
    augment/supervised.py), which Yang & Xu's pretrain_rot.py feeds its Rotation pre-training."""

    crop: Literal["resized", "pad"] = Field(
        "resized", description="resized: a random resized crop of crop_scale of the image, then the colour "
                               "operations below (SimSiam, SimCLR); pad: RandomCrop(size, padding=crop_pad) + flip "
                               "and nothing else, the CIFAR crop of pretrain_rot.py (Rotation's reference form)")
    crop_pad: int = Field(4, ge=0, description="crop pad: the zero padding in pixels (pretrain_rot.py: 4)")
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_prob: float = Field(0.5, ge=0, le=1)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_prob: float = Field(0.8, ge=0, le=1)
    gray_prob: float = Field(0.2, ge=0, le=1)
    blur_prob: float = Field(0.0, ge=0, le=1)
    normalize: bool = True
    local_crops: int = Field(0, ge=0, description="multi-crop: small views per image besides the global ones")
    local_size: int | None = Field(None, ge=2, description="local view side (None = half the image side)")
    local_scale: tuple[float, float] = (0.05, 0.2)

    def unused_keys(self) -> set[str]:
        if self.crop == "pad":
            return {"crop_scale", "jitter", "local_size", "local_scale"}
        return {"crop_pad"}

    @model_validator(mode="after")
    def _check_pad_crop(self) -> "AugmentConfig":
        colour = {"jitter_prob": self.jitter_prob, "gray_prob": self.gray_prob, "blur_prob": self.blur_prob,
                  "local_crops": self.local_crops}
        if self.crop == "pad" and (ignored := [f"{key}={value:g}" for key, value in colour.items() if value]):
            raise ValueError(f"crop pad is pretrain_rot.py's crop and flip alone; {', '.join(ignored)} would not be "
                             f"applied: set them to 0")
        return self


class ModelConfig(Section):
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet32", "small_cnn", "vit", "vit_s16", "vit_b16"] = Field(
        "small_cnn", description="vit: the vit_* settings below; vit_s16 and vit_b16: ViT-S/16 and ViT-B/16 (DeiT's "
                                 "sizes, for 224 px images), which fix patch, dim, depth and heads")
    width: float = Field(1.0, gt=0, description="channel width multiplier (ViT: of vit_dim)")
    stem: Literal["cifar", "imagenet"] = Field("cifar", description="ResNet-18/34/50: a 3x3 stride-1 conv (cifar) or "
                                                                   "a 7x7 stride-2 conv and a max-pool (imagenet)")
    vit_patch: int = Field(4, ge=1, description="ViT: the patch side in pixels (4 on 32x32 images: 64 tokens)")
    # CPU-sized: an MSN step at 128 / 4 / 4 runs at about 2.7x the speed of one at ViT-Ti's 192 / 6 / 3 (docs/priors.md)
    vit_dim: int = Field(128, ge=8, description="ViT: the token dimension before the width multiplier")
    vit_depth: int = Field(4, ge=1, description="ViT: transformer blocks")
    vit_heads: int = Field(4, ge=1, description="ViT: attention heads")
    vit_ln_eps: float = Field(1e-5, gt=0, description="every ViT (vit, vit_s16, vit_b16): the LayerNorms' eps; 1e-5 "
                                                      "is torch's default, 1e-6 DeiT's, which MSN's and ExCB's "
                                                      "code use (docs/priors.md)")

    def unused_keys(self) -> set[str]:
        own_size = set() if self.backbone == "vit" else {"vit_patch", "vit_dim", "vit_depth", "vit_heads"}
        return own_size | (set() if self.backbone.startswith("vit") else {"vit_ln_eps"})

    @model_validator(mode="after")
    def _check_stem(self) -> "ModelConfig":
        if self.stem == "imagenet" and self.backbone not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(f"stem imagenet is for resnet18, resnet34 and resnet50, not {self.backbone}")
        return self


class PriorConfig(Section):
    """A cluster prior pi over K clusters (priors.py): the share of the data each cluster is meant to hold."""

    kind: Literal["uniform", "power_law", "given", "estimated"] = Field(
        "uniform", description="uniform 1/K (what SimCLR, SwAV, MSN and ExCB assume); power_law pi_k ∝ k^-tau "
                               "(PMSN); given (values or path); estimated from a k-means of the initial features")
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


class MethodConfig(Section):
    name: Literal["simsiam", "simclr", "excb", "rotation", "moco", "msn", "sdclr", "bcl-i", "bcl-d"] = "simsiam"
    proj_hidden: int = 512
    proj_dim: int = Field(512, description="output dimension d (Table 1)")
    pred_hidden: int = 128
    fix_predictor_lr: bool = Field(True, description="SimSiam: hold the predictor at the base learning rate while the "
                                                     "rest follows the cosine schedule, as both reference codes do "
                                                     "(PatrickHua/SimSiam constant_predictor_lr, "
                                                     "facebookresearch/simsiam --fix-pred-lr)")
    temperature: float = Field(0.5, gt=0, description="SimCLR NT-Xent temperature (SDCLR too; its "
                                                      "code's 0.2)")
    prune_ratio: float = Field(0.9, ge=0, lt=1, description="SDCLR: the share of weights the pruned copy zeroes, "
                                                           "by global magnitude (the paper's 90%)")
    bcl_beta: float = Field(0.97, ge=0, lt=1, description="BCL: beta of each image's momentum loss, "
                                                       "M <- (1 - beta) l + beta M (BCL's code: 0.97)")
    simclr_head: Literal["simclr", "bcl"] = Field(
        "simclr", description="SimCLR: simclr = its 2-layer MLP of proj_hidden (Table 1 of the offline-clustering "
                              "paper); bcl = the head of BCL's SimCLR baseline (models/simclr.py, heads.bn_projector "
                              "with 2 layers), which the longtail-ssl grid gives SimCLR and SimCLR+TS so that the "
                              "SimCLR family differs in the method alone")
    reference_head: bool = Field(True, description="SDCLR, BCL-I, BCL-D: the authors' projection head, every "
                                                   "Linear followed by BatchNorm, hidden width = the backbone's "
                                                   "feature size (SDCLR's code: 3 layers; BCL's: 2); false = "
                                                   "SimCLR's 2-layer head of proj_hidden, as the other SimCLR-family "
                                                   "methods")
    # ExCB (methods/excb.py, docs/excb.md): the paper's values, except K (65,536 there, for 1.28M images).
    num_clusters: int = Field(512, ge=2, description="ExCB: K, the number of learned centroids (Eq. 1); "
                                                     "512 suits 10k-50k images (docs/excb.md)")
    teacher_temperature: float = Field(0.04, gt=0, description="ExCB: tau_t of the teacher softmax (Eq. 6)")
    student_temperature: float = Field(0.1, gt=0, description="ExCB: tau_s of the student softmax (Eq. 5)")
    teacher_momentum: float = Field(0.996, ge=0, le=1,
                                    description="ExCB: EMA momentum m of the teacher, raised to 1 on a cosine schedule")
    size_momentum: float = Field(0.999, ge=0, lt=1,
                                 description="ExCB: m_s of the relative cluster sizes s (Eq. 9); 1/(1-m_s) batches")
    balancing: Literal["excb", "centering", "none"] = Field(
        "excb", description="ExCB: how the teacher avoids collapse: excb = operator B (Eq. 10), "
                            "centering = DINO's EMA centre (baseline), none = nothing (baseline)")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="ExCB, balancing=centering: DINO's centre EMA momentum")
    centroid_init: Literal["kmeans", "random"] = Field(
        "kmeans", description="ExCB: centroids from k-means on the initial teacher projections, or random directions")
    centroid_weight_decay: tuple[float, float] | None = Field(
        (1e-3, 1e-4), description="ExCB: the centroids' weight decay, cosine from the first to the second value; "
                                  "None = the optimizer's weight decay")
    # ExCB in the official code's form (ManiadisG/ExCB; docs/excb.md, "What differs"): the defaults are imbssl's.
    excb_proj_hidden_layers: int = Field(1, ge=1, description="ExCB: hidden Linear-BN-ReLU layers of the projector "
                                                              "h before its last Linear; 2 = the official code's "
                                                              "mlp_hidden_layers: 2 (the paper's '2-layer MLP')")
    excb_head_batches: Literal["by_size", "all"] = Field(
        "by_size", description="ExCB: by_size = the global views through the backbone and the heads as one batch, "
                               "the local views as another; all = the backbone on each crop size, then the heads on "
                               "all views together (the official code), so the heads' BatchNorm normalises the "
                               "global and local views as one batch. The same without local crops")
    excb_pairing: Literal["paper", "code"] = Field(
        "paper", description="ExCB: the loss's view pairs: paper = Eq. 7, teacher view x' against the projector "
                             "output of every other view, local ones included, and the predictor output of every "
                             "view, each sum averaged over its own pairs; code = the official ClusteringLoss, the "
                             "projector outputs of the other global views only, one mean over all pairs")
    rotations: Literal["all", "one"] = Field(
        "all", description="Rotation: all = each view in all four rotations, 4B images a step (RotNet's loader); "
                           "one = each image in one rotation, drawn as Yang & Xu's pretrain_rot.py (utils.rotation: "
                           "a shuffled list of 0-3 repeated over the batch), B images a step")
    # MoCo v2 (methods/moco.py, docs/ssp-methods.md): CIFAR-sized defaults, as the MoCo CIFAR-10 demo has them.
    # Its MLP head is sized by proj_hidden and proj_dim (the papers: the feature size, then 128).
    queue_size: int = Field(4096, ge=1, description="MoCo: K, negative keys in the queue; 4096 suits CIFAR-sized "
                                                    "sets (MoCo's CIFAR-10 demo), 65,536 is the ImageNet value")
    key_momentum: float = Field(0.99, ge=0, lt=1, description="MoCo: m of the key encoder, k <- m k + (1 - m) q; "
                                                              "0.99 for CIFAR-sized sets, 0.999 is the ImageNet value")
    moco_temperature: float = Field(0.2, gt=0, description="MoCo: tau of the InfoNCE loss (v2: 0.2, v1: 0.07)")
    moco_shuffle_bn: bool = Field(True, description="MoCo: shuffling BN (MoCo Sec. 3.3): the key encoder sees the "
                                                    "global batch in a random order, so an image's key and query are "
                                                    "normalised with different images (across processes as "
                                                    "moco/builder.py, within moco_bn_splits groups as the CIFAR-10 "
                                                    "demo); false = keys in the batch's own order")
    moco_bn_splits: int = Field(8, ge=1, description="MoCo: BatchNorm groups of the global batch in both encoders, "
                                                     "the GPUs emulated (the CIFAR-10 demo's --bn-splits 8); under "
                                                     "torchrun each process splits its rows into moco_bn_splits / "
                                                     "processes groups (a multiple of the process count); 1 = plain "
                                                     "BatchNorm")
    # The cluster prior (priors.py): ExCB's target sizes t of Eq. 10 and MSN's prior pi (PMSN when not uniform).
    prior: PriorConfig = PriorConfig()
    # MSN / PMSN (methods/msn.py, docs/priors.md): K = num_clusters prototypes; the target encoder is an EMA
    # with teacher_momentum, raised to 1 on a cosine as ExCB's.
    anchor_temperature: float = Field(0.1, gt=0, description="MSN: tau of the anchor predictions")
    target_temperature: float = Field(0.025, gt=0, description="MSN: tau of the sharpened target predictions "
                                                               "(0.1 sharpened with T = 0.25)")
    regularization_weight: float = Field(1.0, ge=0, description="MSN: lambda of the ME-MAX / prior-matching term")
    mask_ratio: float = Field(0.3, ge=0, lt=1, description="MSN: the share of the anchor view's patches dropped "
                                                            "(ViT tokens, or zeroed input patches of a CNN)")
    mask_patch: int = Field(4, ge=1, description="MSN on a CNN: the side of the zeroed input patches (ViT: its patch)")
    sinkhorn: bool = Field(False, description="MSN: Sinkhorn-Knopp on the targets (uniform marginals); refused "
                                              "with a non-uniform prior")
    # MSN in its code's form (facebookresearch/msn; docs/priors.md, "Differences from MSN's code"): the defaults are
    # imbssl's. The ViT's LayerNorm eps is model.vit_ln_eps.
    msn_proj_activation: Literal["relu", "gelu"] = Field(
        "relu", description="MSN: the projector's activation after each Linear-BN: relu (heads.mlp's) or gelu "
                            "(MSN's code, msn_train.init_model)")
    msn_view_batches: Literal["each", "by_size"] = Field(
        "each", description="MSN: each = every anchor and focal view through the encoder and projector as a batch "
                            "of its own; by_size = the anchor views as one batch and the focal views as another, as "
                            "MSN's code batches the views of each size, so the projector's BatchNorm normalises the "
                            "focal views together. The same with one anchor and at most one focal view")
    msn_clip_grad_norm: float | None = Field(
        None, gt=0, description="MSN: clip the encoder's gradient norm (backbone and projector together, not the "
                                "prototypes') at this before each optimizer step, as msn_train.py's clip_grad (3.0 in "
                                "its config); None = no clipping")

    def unused_keys(self) -> set[str]:
        # The MSN and ExCB forms above are read by their own method alone.
        msn = {"msn_proj_activation", "msn_view_batches", "msn_clip_grad_norm"}
        excb = {"excb_proj_hidden_layers", "excb_head_batches", "excb_pairing"}
        simclr = set() if self.name == "simclr" else {"simclr_head"}
        return (set() if self.name == "msn" else msn) | (set() if self.name == "excb" else excb) | simclr

    @model_validator(mode="after")
    def _check_prior(self) -> "MethodConfig":
        if self.prior.kind == "estimated" and self.name != "excb":
            raise ValueError(f"prior.kind=estimated comes from ExCB's k-means initialisation; {self.name} takes "
                             f"uniform, power_law or given")
        if self.sinkhorn and self.prior.kind != "uniform":
            raise ValueError(f"sinkhorn forces uniform cluster marginals, which contradicts prior.kind="
                             f"{self.prior.kind}: turn sinkhorn off for a non-uniform prior")
        return self


class TemperatureScheduleConfig(Section):
    """TS (Kukleva et al., ICLR 2023): the contrastive temperature on a cosine between tau_min and tau_max, an
    engine-level schedule like the learning rate (engine/optim.cosine_temperature), in the form of the authors'
    code: tau = tau_min + (tau_max - tau_min) (1 + cos(pi t / t_max)) / 2, the paper's cos(2 pi t / T) with
    T = 2 t_max."""

    tau_min: float = Field(0.1, gt=0, description="tau-, the low end (the paper's 0.1)")
    tau_max: float = Field(1.0, gt=0, description="tau+, the high end, where the cosine starts (the paper's 1.0)")
    t_max_epochs: float = Field(200.0, gt=0, description="t_max, the epochs from tau_max down to tau_min: half the "
                                                         "period (the reference's --t_max 200, 5 cycles in 2,000)")
    update: Literal["epoch", "step"] = Field(
        "epoch", description="epoch: t is the 1-based epoch number, tau held for the epoch (the reference's code); "
                             "step: t is step / steps per epoch from 0, for half periods of about an epoch or less")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "period_epochs" in data:
            raise ValueError("period_epochs was the full period T; the schedule now takes t_max_epochs = T / 2, the "
                             "reference's --t_max (its 200 is a 400-epoch period)")
        return data

    @model_validator(mode="after")
    def _check(self) -> "TemperatureScheduleConfig":
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min {self.tau_min} is above tau_max {self.tau_max}")
        if self.update == "epoch" and self.t_max_epochs < 1:
            raise ValueError(f"t_max_epochs {self.t_max_epochs:g} is under an epoch, which update: epoch cannot "
                             f"follow (tau is set once per epoch): use update: step")
        return self


class OptimConfig(Section):
    name: Literal["sgd", "lars", "adamw"] | None = Field(None, description="None = the method's Table 1 choice")
    base_lr: float | None = Field(None, gt=0, description="lr = base_lr * batch_size / 256; None = Table 1")
    weight_decay: float | None = Field(None, ge=0, description="None = Table 1")
    momentum: float = 0.9
    batch_size: int = Field(512, ge=2)
    epochs: int = Field(100, ge=1)
    warmup_epochs: float = Field(0.0, ge=0)
    lr_schedule: Literal["cosine", "step"] = Field(
        "cosine", description="after the warm-up: cosine = half a cosine down to 0; step = lr x lr_factors[i] from "
                              "epoch milestones[i] on, as pretrain_rot.py trains Rotation (x0.01 at 160, x0.0001 at "
                              "180 of 200)")
    milestones: list[int] = Field([160, 180], description="lr_schedule step: the epochs at which the lr drops")
    lr_factors: list[float] = Field([0.01, 0.0001], description="lr_schedule step: the lr's factor from each "
                                                                "milestone on")
    temperature_schedule: TemperatureScheduleConfig | None = Field(
        None, description="TS: a cosine schedule of the contrastive temperature (SimCLR, MoCo, SDCLR); "
                          "None = the method's fixed temperature")

    def unused_keys(self) -> set[str]:
        return {"milestones", "lr_factors"} if self.lr_schedule == "cosine" else set()

    @model_validator(mode="after")
    def _check_steps(self) -> "OptimConfig":
        if self.lr_schedule == "step":
            if len(self.milestones) != len(self.lr_factors):
                raise ValueError(f"{len(self.milestones)} milestones but {len(self.lr_factors)} lr_factors")
            if self.milestones != sorted(self.milestones):
                raise ValueError(f"milestones {self.milestones} must increase")
            if late := [m for m in self.milestones if m >= self.epochs]:
                raise ValueError(f"milestones {late} are not before epochs={self.epochs}")
        return self


class TrainConfig(Section):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile each part of the model (backbone, heads) in place; "
                                             "the first steps then take a while (docs/benchmarks.md)")
    data_on_device: bool | Literal["auto"] = Field(
        "auto", description="true: the training images live on the device; false: they stay a memory map on disk "
                            "and each batch is read into pinned memory and copied (data/stream.py); auto: on the "
                            "device when they fill at most a quarter of its free memory")
    deterministic: bool = Field(True, description="cuDNN without autotuning and deterministic kernels where torch "
                                                  "has them (torch.use_deterministic_algorithms, warn_only)")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints (the last epoch is always saved)")
    checkpoint_every_s: float = Field(300.0, gt=0, description="also checkpoint at the end of any epoch that ends "
                                                               "this many seconds after the last checkpoint")
    collapse_warn_below: float = Field(0.1, ge=0,
                                       description="warn when std*sqrt(d) of l2-normalised outputs falls below")
    log_every: int = Field(10, ge=1, description="steps between metric records (and NaN checks)")
    progress: bool = True
    sync_batchnorm: bool = Field(False, description="under torchrun: BatchNorm statistics over the global batch "
                                                    "(SyncBatchNorm on CUDA, engine.distributed.GlobalBatchNorm on "
                                                    "CPU) instead of each process's part; docs/scale-out.md")
    dist_timeout_s: float = Field(600.0, gt=0, description="under torchrun: seconds a process waits for the others "
                                                           "before the job stops with an error (a crashed rank)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        # Only the spelling is checked here; whether the device exists is known when the run starts.
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
            raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        return name


class LinearEvalConfig(Section):
    epochs: int = 100
    batch_size: int = 256
    lrs: list[float] = [0.1, 0.3, 1.0, 3.0]
    weight_decays: list[float] = [0.0, 1e-4]
    val_fraction: float = Field(0.1, gt=0, lt=1)


#: the split files of indices that data/longtail.read_split_file reads
SPLIT_FILE_SUFFIXES = (".npy", ".txt", ".npz", ".json")


def is_split_file(spec: str) -> bool:
    """Whether an ``eval.few_shot`` entry names a split file (BCL's ``*_test_100shot.npy``) rather than a size."""
    return Path(spec).suffix in SPLIT_FILE_SUFFIXES


def few_shot_name(spec: str) -> str:
    """The key of an ``eval.few_shot`` entry in eval.json: the entry itself, or a split file's name without its
    folder and suffix ('cifar100_split1_test_100shot')."""
    return Path(spec).stem if is_split_file(spec) else spec


class EvalConfig(Section):
    labelled_size: int | None = Field(None, description="balanced labelled set size; None = N of pre-training")
    labelled_index_file: str | None = Field(None, description="the full-shot probe's labelled images as a split "
                                                           "file of indices into the train split (BCL's "
                                                           "cifar100_trainIdxList.npy); None = a balanced set of "
                                                           "labelled_size images")
    val_index_file: str | None = Field(None, description="the images that select every probe's lr, weight decay and "
                                                      "epoch, as a split file (their valIdxList.npy); None = "
                                                      "linear.val_fraction of the labelled set, per class")
    few_shot: list[str] = Field([], description="more linear probes on balanced few-shot labelled sets, e.g. "
                                                "['1%', '100-shot', '50-shot'] (SDCLR's and BCL's protocol): "
                                                "per class, drawn outside the validation part that selects them; "
                                                "or split files (BCL's cifar100_split1_test_100shot.npy)")
    knn_k: list[int] = [20, 200]
    knn_temperature: float = 0.07
    linear: LinearEvalConfig = LinearEvalConfig()
    seed: int = 0

    @field_validator("few_shot")
    @classmethod
    def _few_shot_specs(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            if is_split_file(spec):
                continue  # a split file, read when the probe runs
            if not re.fullmatch(r"(\d+(\.\d+)?%|\d+-shot)", spec) or spec in ("0%", "0-shot"):
                raise ValueError(f"few_shot entry {spec!r} is neither a percentage ('1%'), 'N-shot' ('100-shot') nor "
                                 f"a split file (.npy, .txt, .npz, .json)")
        return specs

    @model_validator(mode="after")
    def _check_index_files(self) -> "EvalConfig":
        if self.val_index_file and not self.labelled_index_file:
            raise ValueError("eval.val_index_file holds the validation part of eval.labelled_index_file's protocol: "
                             "set labelled_index_file too")
        if self.labelled_index_file and self.labelled_size is not None:
            raise ValueError("eval.labelled_size and eval.labelled_index_file both say which images the probe "
                             "trains on: set one")
        names = [few_shot_name(s) for s in self.few_shot]
        if len(set(names)) < len(names):
            raise ValueError(f"eval.few_shot {self.few_shot}: two entries share a name in eval.json (a split file "
                             f"is named by its stem)")
        return self


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        self.data.require_path()
        return self


class StageEpochs(Section):
    """M_base, M_expert, M_distill (paper Sec. 3.2). An expert epoch is one pass over its own cluster D^k,
    so the K experts together see D once per expert epoch and the three stages add up, in images seen,
    to base + expert + distill epochs over D (docs/offline-clustering.md)."""

    base: int = Field(40, ge=1)
    expert: int = Field(180, ge=1)
    distill: int = Field(80, ge=1)


class KMeansConfig(Section):
    engine: Literal["auto", "faiss", "torch"] = Field(
        "faiss", description="faiss (the same clustering on every machine), torch (on a GPU when there is one) or "
                             "auto = torch on a GPU, else faiss; the engine used is recorded in divide/report.json")
    space: Space = Field("projector", description="the base model's output that is clustered: the paper's 'output "
                                                  "representation of SimSiam_base' (512-d, Fig. 3) is z")
    spherical: bool = Field(False, description="cluster by cosine similarity (l2-normalised features)")
    n_init: int = Field(10, ge=1, description="restarts; the one with the lowest inertia is kept")
    niter: int = Field(50, ge=1, description="Lloyd iterations per restart")


class OfflineClusteringSettings(Section):
    """The offline-clustering pipeline's own keys (paper Sec. 3)."""

    k: int = Field(5, ge=1, description="clusters K; 1 = the '+D' ablation (one expert on all of D)")
    epochs: StageEpochs = StageEpochs()
    expert_init: Literal["base", "scratch"] = Field("base",
                                                    description="experts start from the base weights or at random")
    kmeans: KMeansConfig = KMeansConfig()
    head_hidden: int = Field(512, ge=1, description="hidden width of the distillation regression heads r")
    distill_target: Space = Field("projector", description="q of Eq. 2, 'the output of SimSiam': projector z (the "
                                                           "student carries the base's projector), predictor p, or "
                                                           "backbone features")


class OfflineClusteringConfig(OfflineClusteringSettings):
    """A pipeline config file: its own keys plus ``base``, the run settings every stage shares.

    Each stage trains with ``base`` except for the epochs, which come from ``epochs``
    (``base.optim.epochs`` is not used).
    """

    base: RunConfig = RunConfig()

    def stage(self, name: str, epochs: int) -> RunConfig:
        """One stage's run config: ``base`` under the stage's name, trained for ``epochs``."""
        optim = self.base.optim.model_copy(update={"epochs": epochs})
        return self.base.model_copy(update={"name": name, "optim": optim})


class LossConfig(Section):
    """The long-tailed loss (losses/longtail.py) and when class re-balancing starts."""

    name: Literal["ce", "focal", "ldam", "logit_adjusted"] = "ce"
    reweight: Literal["none", "cb"] = Field("none", description="cb = class-balanced weights from the start "
                                                                "(CB-CE, CB-Focal; Cui et al. 2019)")
    deferral: Literal["none", "drw", "drs"] = Field(
        "none", description="from defer_epoch on: drw = class-balanced re-weighting, drs = class-balanced re-sampling "
                            "(Cao et al. 2019, Sec. 3.3)")
    defer_epoch: int = Field(160, ge=1, description="the deferral epoch (160 of 200 in the LDAM recipe)")
    beta: float = Field(0.9999, ge=0, lt=1, description="beta of the effective number (1 - beta^n) / (1 - beta)")
    focal_gamma: float = Field(1.0, ge=0, description="focal loss gamma (1 in the LDAM code)")
    focal_form: Literal["cui", "ldam_code"] = Field(
        "cui", description="focal with class weights: cui = w_y (1 - p_t)^gamma CE (Cui et al. 2019, Sec. 4), "
                           "ldam_code = (1 - exp(-w_y CE))^gamma w_y CE (the LDAM-DRW code's losses.py, which "
                           "Yang & Xu's Table 2 ran); the same without class weights")
    ldam_max_margin: float = Field(0.5, gt=0, description="LDAM: the largest margin, the rarest class's")
    ldam_scale: float = Field(30.0, gt=0, description="LDAM: s, the scale of the cosine logits")
    la_tau: float = Field(1.0, ge=0, description="logit adjustment tau (Menon et al. 2021), as a loss and post hoc")

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        if self.reweight == "cb" and self.deferral != "none":
            raise ValueError(f"reweight=cb re-weights from the start; deferral={self.deferral} would re-balance it "
                             f"again at defer_epoch: choose one")
        return self

    def unused_keys(self) -> set[str]:
        # The two focal forms are one loss unless focal meets class weights (CB from the start, or DRW's later).
        class_weighted = self.reweight == "cb" or self.deferral == "drw"
        return set() if self.name == "focal" and class_weighted else {"focal_form"}


class SupervisedOptimConfig(Section):
    """SGD with a linear warm-up and step decays: the LDAM-DRW recipe for CIFAR-LT (Cao et al. 2019, Appendix)."""

    lr: float = Field(0.1, gt=0, description="the learning rate itself (no batch-size scaling)")
    momentum: float = 0.9
    weight_decay: float = Field(2e-4, ge=0)
    batch_size: int = Field(128, ge=2)
    epochs: int = Field(200, ge=1)
    warmup_epochs: float = Field(5.0, ge=0, description="linear warm-up from 0 to lr")
    milestones: list[int] = Field([160, 180], description="epochs at which the lr drops to lr * lr_factors[i]")
    lr_factors: list[float] = Field([0.01, 0.0001], description="the lr's factor from each milestone on")

    @model_validator(mode="after")
    def _check(self) -> "SupervisedOptimConfig":
        if len(self.milestones) != len(self.lr_factors):
            raise ValueError(f"{len(self.milestones)} milestones but {len(self.lr_factors)} lr_factors")
        if self.milestones != sorted(self.milestones):
            raise ValueError(f"milestones {self.milestones} must increase")
        return self


class CRTConfig(Section):
    """Classifier re-training (Kang et al. 2020, "Decoupling representation and classifier"): after the main
    training, freeze the backbone and train a new classifier with class-balanced sampling."""

    enabled: bool = False
    epochs: int = Field(10, ge=1, description="10 in Kang et al.")
    lr: float = Field(0.1, gt=0, description="cosine from lr to 0")


class SupervisedEvalConfig(Section):
    val_per_class: int = Field(20, ge=1, description="a balanced validation set of this many images per class, drawn "
                                                     "from train-split images outside the training subset where there "
                                                     "are enough (else from the subset, which then loses them); it "
                                                     "selects the epoch, never the test set")
    batch_size: int = Field(1024, ge=1)


class SupervisedConfig(Section):
    """``imbssl train``: a classifier on a long-tailed subset, from scratch or from a pre-trained backbone."""

    name: str = "train"
    seed: int = 0
    out_dir: str = "runs"
    init_from: str | None = Field(None, description="a backbone.pt of any imbssl run (its backbone must match model)")
    data: DataConfig = DataConfig(subset=SubsetConfig(profile="exp", imbalance=100.0))
    model: ModelConfig = ModelConfig(backbone="resnet32")
    loss: LossConfig = LossConfig()
    optim: SupervisedOptimConfig = SupervisedOptimConfig()
    crt: CRTConfig = CRTConfig()
    augment_pad: int = Field(4, ge=0, description="random-crop padding (pixels) of the pad-crop-flip augmentation")
    train: TrainConfig = TrainConfig()
    eval: SupervisedEvalConfig = SupervisedEvalConfig()

    @model_validator(mode="after")
    def _check(self) -> "SupervisedConfig":
        self.data.require_path()
        if self.loss.deferral != "none" and self.loss.defer_epoch >= self.optim.epochs:
            raise ValueError(f"loss.defer_epoch={self.loss.defer_epoch} is not before the last of optim.epochs="
                             f"{self.optim.epochs}: the deferred {self.loss.deferral.upper()} would never start")
        if late := [m for m in self.optim.milestones if m >= self.optim.epochs]:
            raise ValueError(f"optim.milestones {late} are not before optim.epochs={self.optim.epochs}")
        return self


class UnlabeledConfig(Section):
    """D_U of self-training: images of the training pool outside D_L and the validation set, as DARP and CReST
    build it (the seed takes them from 80M Tiny Images); training never reads their labels."""

    size_factor: float = Field(5.0, gt=0, description="|D_U| = size_factor * |D_L|: the seed's '@5x' "
                                                       "(unlabel_size_factor in its code)")
    imbalance: float = Field(100.0, ge=1, description="rho_U: D_U's own largest / smallest class count; its head "
                                                      "class is D_L's")


class PseudoLabelConfig(Section):
    """How the base classifier's predictions on D_U become training labels (hard labels, as the seed)."""

    threshold: float = Field(0.0, ge=0, lt=1, description="keep the images whose confidence (largest softmax "
                                                          "probability) exceeds this; 0 keeps all, as the seed")
    class_balanced: bool = Field(False, description="each pseudo-class keeps at most as many images as the rarest "
                                                    "pseudo-class, its most confident ones (beyond the seed)")
    weight: float = Field(1.0, gt=0, description="omega of L(D_L) + omega L(D_U): each pseudo-labelled image's "
                                                 "loss weight (1 in the seed's code, which concatenates the sets)")
    labeller: Literal["base", "ce"] = Field(
        "base", description="the classifier whose argmax labels D_U: base = f_B itself, trained with this config's "
                            "loss (an LDAM-DRW run labels with an LDAM-DRW f_B); ce = a base classifier trained as "
                            "f_B but with plain cross-entropy, as the seed's released pseudo-labels (README: 'base "
                            "models trained with standard cross-entropy'); the two are one when the loss is plain CE")


class SelfTrainingConfig(SupervisedConfig):
    """``imbssl pipeline self-training``: a base classifier on D_L (``data.subset``), pseudo-labels on D_U, then
    the final model on D_L plus the pseudo-labelled D_U ("Rethinking the value of labels", Sec. 3). Both
    classifiers train with this config's model, loss, optim and init_from."""

    name: str = "self-training"
    unlabeled: UnlabeledConfig = UnlabeledConfig()
    pseudo_labels: PseudoLabelConfig = PseudoLabelConfig()
    base_epochs: int | None = Field(None, ge=1, description="the base classifier's epochs, when they differ from "
                                                            "optim.epochs (the final model's): its warm-up, milestones "
                                                            "and defer_epoch stretch by base_epochs / optim.epochs")
    final_batch_size: int | None = Field(None, ge=2, description="the final model's batch size, when it differs "
                                                                 "from optim.batch_size (the base classifier's): the "
                                                                 "seed trains f_B with train.py at 128 and the final "
                                                                 "model with train_semi.py at 256, both at lr 0.1")

    def stage(self, name: str) -> SupervisedConfig:
        """The config of one classifier stage ("base", "final", "labeller"): this one without the self-training
        keys, so the grids' rho_U columns can share one base, and named by the stage alone.

        The labeller (``pseudo_labels.labeller: ce``) is f_B's config with a plain CE loss, named "base": it is
        the base classifier of the CE run of the same grid, which it shares."""
        tree = self.model_dump(exclude={"unlabeled", "pseudo_labels", "base_epochs", "final_batch_size"})
        if name in ("base", "labeller") and self.base_epochs is not None:
            stretch = self.base_epochs / self.optim.epochs
            tree["optim"].update(epochs=self.base_epochs, warmup_epochs=self.optim.warmup_epochs * stretch,
                                 milestones=[round(m * stretch) for m in self.optim.milestones])
            tree["loss"]["defer_epoch"] = round(self.loss.defer_epoch * stretch)
        if name == "final" and self.final_batch_size is not None:
            tree["optim"]["batch_size"] = self.final_batch_size
        if name == "labeller":
            tree["loss"].update(name="ce", reweight="none", deferral="none")
            name = "base"
        return SupervisedConfig.model_validate({**tree, "name": name})

    def labels_with_base(self) -> bool:
        """Whether f_B itself labels D_U: ``pseudo_labels.labeller`` base, or a loss that is plain CE already."""
        return self.pseudo_labels.labeller == "base" or self.stage("labeller") == self.stage("base")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, pair: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {pair}: {key!r} is not a section")
        node = child
    node[leaf] = value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3, column 7: mapping values are not allowed here', without PyYAML's '<unicode string>' excerpt."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.epochs=5", "data.subset.profile=exp"]`` -> nested dict, values parsed as YAML."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair}: not of the form key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair}: the value is not valid YAML ({_yaml_problem(err)})") from None
        _set_dotted(tree, key.strip(), value, pair)
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _override_for(key: str, overrides: tuple[str, ...]) -> str | None:
    """The ``--set`` pair that set ``key`` (or a section above or below it), if any."""
    for pair in reversed(overrides):  # the last --set of a key wins
        set_key = pair.partition("=")[0].strip()
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return pair
    return None


def _format_errors(err: ValidationError, origin: str, overrides: tuple[str, ...] = ()) -> str:
    """One line; each problem is blamed on the ``--set`` that caused it, or else on ``origin``."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        problem = f"unknown config key {key!r}" if e["type"] == "extra_forbidden" else \
            f"{key}: {message}" if key else message
        pair = _override_for(key, overrides) if key else None
        problems.append(f"--set {pair}: {problem}" if pair else f"{origin}: {problem}")
    return "invalid config: " + "; ".join(problems)


def validate_tree(schema: type[ConfigT], tree: dict[str, Any], origin: str = "<dict>",
                  overrides: tuple[str, ...] = ()) -> ConfigT:
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin, tuple(overrides))) from None


def build_config(tree: dict[str, Any], origin: str = "<dict>") -> RunConfig:
    return validate_tree(RunConfig, tree, origin)


def load_yaml(path: str | Path, empty_ok: bool = True) -> dict[str, Any]:
    """A YAML mapping; ``empty_ok=False`` for files that imbssl wrote, where empty means truncated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    if tree is None and not empty_ok:
        raise ConfigError(f"{path} is empty")
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                schema: type[ConfigT] = RunConfig) -> ConfigT:
    tree = load_yaml(path) if path else {}
    tree = deep_merge(tree, parse_overrides(overrides))
    return validate_tree(schema, tree, origin=str(path) if path else "config", overrides=tuple(overrides))


def save_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
