"""Typed run configuration: YAML in, validated pydantic models out, ``--set`` overrides.

Every section forbids unknown keys, so a typo such as ``optim.base_lr`` -> ``optim.baselr``
fails loudly with the offending key in the message instead of silently using a default.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from imbssl.configbase import ConfigError, Section, deep_merge, load_yaml, parse_overrides
from imbssl.errors import naming_the_file
from imbssl.methods import DEFAULT_METHOD, SECTIONS, MethodConfig


ConfigT = TypeVar("ConfigT", bound=BaseModel)

#: where a trained SSL model's representation is read: the backbone's features f(x), the projector's output
#: z = g(f(x)), or the predictor's p = h(z) (SimSiam). The papers' "output of SimSiam" reads as z (d = 512, Table 1).
Space = Literal["backbone", "projector", "predictor"]
SPACES: tuple[Space, ...] = ("backbone", "projector", "predictor")


MISSING_DATA_PATH = ("data.path is required when data.source is 'imagefolder': pass --data PATH (an ImageFolder "
                     "folder or .tar.gz), or --set data.source=cifar10 to download CIFAR-10")


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
_OFFICIAL_ORDER = ("is the official python archive, whose training images are in the official order already (train "
                   "index i is its image i)")
#: why data.train_order has nothing to do for a source other than imagefolder
ORDERED_SOURCES = {"cifar10": _OFFICIAL_ORDER, "cifar100": _OFFICIAL_ORDER,
                   "filelist": "keeps data.train_list's order, which train indices follow already",
                   "inat": "keeps the image-id order of data.train_list, which train indices follow already",
                   "images": "keeps its sorted path order (or data.train_list's), which train indices follow already"}
#: the subset profiles that draw images per class, which a source without labels cannot
PER_CLASS_PROFILES = ("exp", "step", "balanced")


class DataConfig(Section):
    source: Literal["digits", "cifar10", "cifar100", "imagefolder", "filelist", "inat", "images"] = Field(
        "digits", description="images: a folder or .tar(.gz) of images in any layout, without labels or splits")
    path: str | None = Field(None, description="archive or folder; CIFAR archives are downloaded when absent; for "
                                               "filelist and inat, the root the listed paths are relative to")
    train_list: str | None = Field(None, description="filelist: `relative/path label` lines (ImageNet_LT_train.txt); "
                                                     "inat: an annotation JSON (train2018.json); images: image paths, "
                                                     "one per line (optional); relative to data.path")
    test_list: str | None = Field(None, description="the evaluation split's list, as train_list (ImageNet_LT_test.txt, "
                                                    "val2018.json)")
    cache_dir: str = Field("~/.cache/imbssl", description="where decoded uint8 arrays are kept")
    download: bool = True
    image_size: int | None = Field(None, ge=4, description="store ImageFolder, filelist, inat and images images at "
                                                         "this square size (see resize)")
    resize: Literal["stretch", "center_crop"] = Field(
        "stretch", description="how image_size is reached: stretch both sides to it, or scale the shorter side to it "
                               "and keep the centre square (ImageNet-size storage, aspect kept)")
    train_order: str | None = Field(None, description="imagefolder: a file listing every training image once, its "
                                                      "member path per line; line i is train index i, so split files "
                                                      "of the official CIFAR order apply (docs/data.md)")
    labels: Literal["source", "none"] = Field(
        "source", description="none: the subset is chosen by the source's labels, then the run sees none (pre-trained "
                              "and evaluated as if unlabelled); the images source has none either way")
    unreadable: Literal["refuse", "skip"] = Field(
        "refuse", description="images source: an image PIL cannot read stops the decode, naming it (refuse), or is "
                              "left out, logged and listed in the run's skipped_images.txt (skip)")
    subset: SubsetConfig = SubsetConfig()

    @model_validator(mode="after")
    def _check_lists(self) -> "DataConfig":
        listed = self.source in LISTED_SOURCES
        if self.source == "images" and self.test_list:
            raise ValueError("data.test_list: the images source has no test split (its images are all pre-training "
                             "images); leave it unset")
        if not listed and (self.test_list or (self.train_list and self.source != "images")):
            raise ValueError(f"data.train_list and data.test_list belong to the filelist and inat sources (and "
                             f"data.train_list to images), not {self.source!r}")
        if listed and not (self.train_list and self.test_list):
            raise ValueError(f"data.source {self.source!r} reads its splits from data.train_list and data.test_list: "
                             f"set both")
        if self.train_order and self.source != "imagefolder":
            raise ValueError(f"data.train_order orders an ImageFolder's training images; data.source {self.source!r} "
                             f"{ORDERED_SOURCES.get(self.source, 'has no image files to order')}: leave it unset")
        return self

    @model_validator(mode="after")
    def _check_unlabelled(self) -> "DataConfig":
        if self.source == "images" and self.subset.profile in PER_CLASS_PROFILES:
            raise ValueError(f"data.subset.profile {self.subset.profile} draws images per class, and the images source "
                             f"has no classes: use full or index_file")
        if self.unreadable == "skip" and self.source != "images":
            raise ValueError(f"data.unreadable=skip is for data.source images; {self.source!r} refuses an unreadable "
                             f"image, as leaving it out would change its labelled splits")
        return self

    @property
    def labelled(self) -> bool:
        """Whether the run sees labels: not from the images source, nor with ``labels: none``."""
        return self.source != "images" and self.labels == "source"

    def require_labels(self, what: str) -> None:
        """A ValueError (a validator's one line) where ``what`` cannot run without labels."""
        if not self.labelled:
            why = "data.source images has none" if self.source == "images" else "data.labels none hides them"
            raise ValueError(f"{what} cannot run without labels, and {why}: pre-train with imbssl pretrain, which "
                             f"needs none")

    def require_path(self) -> None:
        """Image files have no default location: a run config must name it (the data section alone may not)."""
        if self.source == "imagefolder" and not self.path:
            raise ValueError(MISSING_DATA_PATH)
        if self.source == "images" and not self.path:
            raise ValueError("data.path is required when data.source is 'images': pass --data PATH (a folder or "
                             ".tar.gz of images)")
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


class TemperatureScheduleConfig(Section):
    """TS (Kukleva et al., ICLR 2023): the contrastive temperature on a cosine between tau_min and tau_max, an
    engine-level schedule like the learning rate (engine/schedules.cosine_temperature), in the form of the authors'
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
    lr_schedule: Literal["cosine", "step", "restart"] = Field(
        "cosine", description="after the warm-up: cosine = half a cosine down to 0; step = lr x lr_factors[i] from "
                              "epoch milestones[i] on, as pretrain_rot.py trains Rotation (x0.01 at 160, x0.0001 at "
                              "180 of 200); restart = a cosine down to lr x lr_factors[0] until epoch milestones[0], "
                              "then one from lr x lr_factors[1] down to 0, as GH's code restarts it where GH joins "
                              "(milestones [500], lr_factors [0.6, 0.6]: 0.5 -> 0.3, 0.3 -> 0)")
    milestones: list[int] = Field([160, 180], description="lr_schedule step: the epochs at which the lr drops; "
                                                          "restart: the one epoch at which it restarts")
    lr_factors: list[float] = Field([0.01, 0.0001], description="lr_schedule step: the lr's factor from each "
                                                                "milestone on; restart: the first cosine's end and "
                                                                "the second's start")
    temperature_schedule: TemperatureScheduleConfig | None = Field(
        None, description="TS: a cosine schedule of the contrastive temperature (SimCLR, MoCo, SDCLR); "
                          "None = the method's fixed temperature")

    def unused_keys(self) -> set[str]:
        return {"milestones", "lr_factors"} if self.lr_schedule == "cosine" else set()

    @model_validator(mode="after")
    def _check_steps(self) -> "OptimConfig":
        if self.lr_schedule == "restart":
            if len(self.milestones) != 1 or len(self.lr_factors) != 2:
                raise ValueError(f"lr_schedule restart takes one milestone (the restart's epoch) and two lr_factors "
                                 f"(the first cosine's end, the second's start), got milestones {self.milestones} "
                                 f"and lr_factors {self.lr_factors}")
            if not self.warmup_epochs < self.milestones[0] < self.epochs:
                raise ValueError(f"the restart at epoch {self.milestones[0]} must fall after the warm-up "
                                 f"({self.warmup_epochs:g} epochs) and before epochs={self.epochs}")
        if self.lr_schedule == "step":
            if len(self.milestones) != len(self.lr_factors):
                raise ValueError(f"{len(self.milestones)} milestones but {len(self.lr_factors)} lr_factors")
            if self.milestones != sorted(self.milestones):
                raise ValueError(f"milestones {self.milestones} must increase")
            if late := [m for m in self.milestones if m >= self.epochs]:
                raise ValueError(f"milestones {late} are not before epochs={self.epochs}")
        return self


class WandbConfig(Section):
    """Weights & Biases logging beside TensorBoard (docs/scale-out.md): an extra, ``pip install "imbssl[wandb]"``."""

    enabled: bool = False
    project: str = Field("imbssl", min_length=1)
    entity: str | None = Field(None, description="the W&B user or team (None = your default entity)")
    mode: Literal["offline", "online"] = Field("offline", description="offline: written under dir only, to "
                                                                      "`wandb sync` later; online: streamed")
    dir: str | None = Field(None, description="where W&B writes its wandb/ folder (None = the run folder)")

    def unused_keys(self) -> set[str]:
        return set() if self.enabled else {"project", "entity", "mode", "dir"}


class TrainConfig(Section):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto", description="auto: bf16 autocast + channels_last where the hardware computes bf16 natively (a CPU with "
                            "AMX or avx512_bf16, a CUDA GPU of compute capability 8.0 or more), else fp32; resolved "
                            "when the run starts, recorded in pretrain.json and train.json; IMBSSL_AUTO_PRECISION="
                            "fp32|bf16 overrides the detection (engine/precision.py)")
    channels_last: bool = Field(False, description="the model and views in channels_last layout (auto sets it where "
                                                   "it picks bf16)")
    compile: bool = Field(False, description="torch.compile each part of the model (backbone, heads) in place; "
                                             "the first steps then take a while (docs/benchmarks.md)")
    data_on_device: bool | Literal["auto"] = Field(
        "auto", description="true: the training images live on the device; false: they stay a memory map on disk "
                            "and each batch is read into pinned memory and copied (data/stream.py); auto: on the "
                            "device when they fill at most a quarter of its free memory")
    prefetch_batches: int = Field(2, ge=0, le=16, description="streamed images (data_on_device false): batches a "
                                                               "background thread reads ahead of the step (0: read "
                                                               "each in the step); the same batches either way")
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
    wandb: WandbConfig = WandbConfig()

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


class FeatureClustersConfig(Section):
    """The label-free view of the representation (docs/protocol.md): k-means of the backbone features of the
    pre-training images, and how unequal its cluster sizes are."""

    k: int = Field(10, ge=2, description="clusters: the number of classes the collection is thought to hold, or more")
    seed: int = 0


class FinetuneConfig(Section):
    """Fine-tuning, the fourth protocol: the whole backbone and a linear head trained with cross-entropy on the probes'
    labelled train part (imbssl train's loop: SGD with momentum 0.9, a cosine lr to 0, the pad-crop-flip
    augmentation), the epoch selected on their validation part."""

    enabled: bool = False
    epochs: int = Field(30, ge=1)
    lr: float = Field(0.01, gt=0, description="the start of the cosine (no batch-size scaling)")
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=2)
    augment_pad: int = Field(4, ge=0, description="random-crop padding (pixels) of the pad-crop-flip augmentation")

    def unused_keys(self) -> set[str]:
        return set() if self.enabled else {"epochs", "lr", "weight_decay", "batch_size", "augment_pad"}


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
    labelled_data: DataConfig | None = Field(None, description="the probes' own labelled set (an imagefolder with "
                                                               "train/ and test/, or a filelist with labels), decoded "
                                                               "to the pre-training images' size; None = the run's "
                                                               "own data, whose labels the probes then need")
    finetune: FinetuneConfig = FinetuneConfig()
    feature_clusters: FeatureClustersConfig = FeatureClustersConfig()

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

    @model_validator(mode="after")
    def _check_labelled_data(self) -> "EvalConfig":
        data = self.labelled_data
        if data is None:
            return self
        data.require_path()
        if not data.labelled:
            raise ValueError("eval.labelled_data is the probes' labelled set: it needs labels (an imagefolder with "
                             "train/ and test/, or a filelist with labels), not data.source images or data.labels none")
        if data.subset != SubsetConfig():
            raise ValueError("eval.labelled_data.subset: the probes take its whole train split (or a balanced "
                             "eval.labelled_size of it); leave subset unset")
        return self


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = Field(default_factory=lambda: SECTIONS[DEFAULT_METHOD](), description="the section of the "
                                 "method that method.name names (methods/<name>.py), holding its keys alone")
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
        self.data.require_labels("a classifier (imbssl train, self-training)")
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


def _override_for(key: str, overrides: tuple[str, ...]) -> str | None:
    """The ``--set`` pair that set ``key`` (or a section above or below it), if any."""
    for pair in reversed(overrides):  # the last --set of a key wins
        set_key = pair.partition("=")[0].strip()
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return pair
    return None


#: the keys that lost their method's prefix when each method got a section of its own (issue 30): method -> old -> new
RENAMED_METHOD_KEYS: dict[str, dict[str, str]] = {
    "simclr": {"simclr_head": "head"},
    "moco": {"moco_temperature": "temperature", "moco_shuffle_bn": "shuffle_bn", "moco_bn_splits": "bn_splits"},
    "bcl-i": {"bcl_beta": "beta"},
    "bcl-d": {"bcl_beta": "beta"},
    "excb": {"excb_proj_hidden_layers": "proj_hidden_layers", "excb_head_batches": "head_batches",
             "excb_pairing": "pairing"},
    "msn": {"msn_proj_activation": "proj_activation", "msn_view_batches": "view_batches",
            "msn_clip_grad_norm": "clip_grad_norm"},
}
#: the keys of today's method sections
SECTION_KEYS = {key for section in SECTIONS.values() for key in section.model_fields}
#: and those of the sections before issue 30
METHOD_KEYS = SECTION_KEYS | {old for renamed in RENAMED_METHOD_KEYS.values() for old in renamed}


def migrate_method_section(saved: dict[str, Any]) -> dict[str, Any]:
    """A ``method`` section that imbssl saved in a run folder, in today's form: the run it describes stays the same
    run (the recipes compare a finished run's config with the one they ask for).

    Before issue 30 every run saved one flat section with the keys of all methods. Such a section keeps the keys of
    its own method, renamed, and drops those of the others:

    | section             | saved before issue 30                               | today                  |
    |---------------------|-----------------------------------------------------|------------------------|
    | simclr              | simclr_head                                         | head                   |
    | simclr              | no simclr_head (saved before it existed)            | head: simclr           |
    | moco                | moco_{temperature, shuffle_bn, bn_splits}           | the same without moco_ |
    | moco                | temperature (SimCLR's tau)                          | dropped                |
    | bcl-i, bcl-d        | bcl_beta                                            | beta                   |
    | sdclr, bcl-i, bcl-d | no reference_head (saved before issue 29)           | reference_head: false  |
    | excb                | excb_{proj_hidden_layers, head_batches, pairing}    | the same without excb_ |
    | msn                 | msn_{proj_activation, view_batches, clip_grad_norm} | the same without msn_  |
    | all                 | a key the method does not read                      | dropped                |

    SDCLR and BCL trained SimCLR's 2-layer head before issue 29 gave them their authors' heads. A section saved
    in today's form comes back unchanged; a key no method ever had stays, for validation to refuse.
    """
    name = saved.get("name", DEFAULT_METHOD)
    if name not in SECTIONS:
        return saved  # validation names the unknown method
    old_names = {new: old for old, new in RENAMED_METHOD_KEYS.get(name, {}).items()}
    section = {"simclr": {"head": "simclr"}, "sdclr": {"reference_head": False}, "bcl-i": {"reference_head": False},
               "bcl-d": {"reference_head": False}}.get(name, {})
    for key in SECTIONS[name].model_fields:
        if (old := old_names.get(key, key)) in saved or key in saved:
            section[key] = saved[old] if old in saved else saved[key]
    return {**section, **{key: value for key, value in saved.items() if key not in METHOD_KEYS}}


def migrate_saved_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree that imbssl saved (a run's config.yaml, a pipeline's pipeline.yaml) with each ``method``
    section in today's form (``migrate_method_section``)."""
    return {key: migrate_method_section(value) if key == "method" and isinstance(value, dict)
            else migrate_saved_config(value) if isinstance(value, dict) else value for key, value in tree.items()}


def method_key_problem(dotted: str, method: str) -> str:
    """Why ``dotted`` (``...method.KEY``) is no key of ``method``'s section, in words: renamed in issue 30, another
    method's key, or unknown."""
    prefix, _, key = dotted.rpartition(".")
    if new := RENAMED_METHOD_KEYS.get(method, {}).get(key):
        return f"{dotted} is now {prefix}.{new} ({method}'s section)"
    if owners := [name for name, section in SECTIONS.items() if key in section.model_fields]:
        return f"{dotted} is not a key of {method}'s section (it belongs to {', '.join(owners)})"
    if had := {name: renamed[key] for name, renamed in RENAMED_METHOD_KEYS.items() if key in renamed}:
        return (f"{dotted} is not a key of {method}'s section ({', '.join(had)} had it; it is now "
                f"{prefix}.{next(iter(had.values()))} there)")
    return f"unknown config key {dotted!r}"


def shared_method_keys(shared: dict[str, Any], method: str, where: str = "base.method") -> dict[str, Any]:
    """The keys of ``shared`` that ``method``'s section has: a grid sets ``shared`` for all of its methods
    (proj_dim, temperature, num_clusters ...), each run takes those of its own method. A key that no method's section
    has is refused in one line, as ``where``.KEY."""
    if method not in SECTIONS:
        return shared  # validation names the unknown method
    if strays := [key for key in shared if key not in SECTION_KEYS]:
        raise ConfigError(f"invalid config: {method_key_problem(f'{where}.{strays[0]}', method)}")
    return {key: value for key, value in shared.items() if key in SECTIONS[method].model_fields}


def _config_key(loc: tuple[int | str, ...]) -> tuple[str, str | None]:
    """The dotted config key of a pydantic error's location, and the method whose section holds it, if one does: the
    union of method sections puts the method's name after ``method`` (method.moco.temperature), which no key spells."""
    parts = [str(p) for p in loc]
    for i in range(1, len(parts)):
        if parts[i - 1] == "method" and parts[i] in SECTIONS:
            return ".".join(parts[:i] + parts[i + 1:]), parts[i]
    return ".".join(parts), None


def _format_errors(err: ValidationError, origin: str, overrides: tuple[str, ...] = ()) -> str:
    """One line; each problem is blamed on the ``--set`` that caused it, or else on ``origin``."""
    problems = []
    for e in err.errors():
        key, method = _config_key(e["loc"])
        if e["type"] == "method_name":  # the union's tag: the key at fault is the section's name
            key += ".name"
        message = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        if e["type"] == "extra_forbidden":
            in_section = method and key.split(".")[-2] == "method"
            problem = method_key_problem(key, method) if in_section else f"unknown config key {key!r}"
        else:
            problem = f"{key}: {message}" if key else message
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                schema: type[ConfigT] = RunConfig) -> ConfigT:
    tree = load_yaml(path) if path else {}
    tree = deep_merge(tree, parse_overrides(overrides))
    return validate_tree(schema, tree, origin=str(path) if path else "config", overrides=tuple(overrides))


def save_config(cfg: BaseModel, path: str | Path) -> None:
    with naming_the_file(path):
        Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
