"""What a run reports, as typed records: the files a run folder ends with, and what the recipes and the CLI read.

    eval.json            EvalRecord          ``imbssl evaluate``: feature clusters, linear, few-shot, k-NN, fine-tune
    pretrain.json        PretrainRecord      ``imbssl pretrain``: the last epoch's figures, the optimizer, the cost
    train.json           TrainRecord         ``imbssl train``: the test report of each stage, the selected epochs
    self_training.json   SelfTrainingRecord  the self-training pipeline: both classifiers, the pseudo-labels
    pipeline.json        BudgetRecord        the offline-clustering pipeline: images seen per stage
    divide/report.json   DivideRecord        its divide stage: the k-means clusters against the labels

Every file carries ``format_version``. A file written before there was one (format 0) loads through its record's
``from_format_0``; a file of a newer format, or one that is not the record it should be, is refused in one line.
Accuracies are in percent throughout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imbssl.errors import ImbsslError

#: the layout every record file is written in; 0 is the unversioned layout of the files written before
FORMAT_VERSION = 1

RecordT = TypeVar("RecordT", bound="Record")


class RecordError(ImbsslError, ValueError):
    """A record file that this imbssl cannot read: another format, or not the record it should be."""


class Part(BaseModel):
    """A part of a record: its keys are fixed, an unknown one is an error."""

    model_config = ConfigDict(extra="forbid")


class Thirds(Part):
    """Mean per-class accuracy of the classes cut into thirds by their training count (eval/metrics.py)."""

    major: float | None
    minor: float | None
    rare: float | None


class AccuracyReport(Part):
    """eval/metrics.accuracy_report: top-1 over the test images; the groups average per-class accuracies, None when
    the group holds no (tested) class; many > 100, medium 20-100, few < 20 training images."""

    top1: float
    per_class: dict[str, float | None]
    many: float | None
    medium: float | None
    few: float | None
    thirds: Thirds
    thirds_std: float | None = Field(description="population std of the three thirds: SDCLR's balancedness")
    groups: dict[str, list[str]] = Field(description="the class names in each group")


class ProbeReport(AccuracyReport):
    """A linear probe's test report with its validation accuracy and the settings selected on it (lr, wd, epoch)."""

    val_top1: float
    selected: dict[str, float]


class PrecisionUsed(Part):
    """``train.precision`` as set (``asked``) and as the run trained (engine/precision.py resolves auto)."""

    asked: Literal["fp32", "bf16", "auto"]
    precision: Literal["fp32", "bf16"]
    channels_last: bool
    why: str = Field(description="auto's reason: the CPU flag, the GPU's compute capability or IMBSSL_AUTO_PRECISION")


class FinetuneReport(ProbeReport):
    """The fine-tuned backbone's test report, and the precision it trained at (``train.precision``, auto resolved on
    the evaluating machine)."""

    precision: PrecisionUsed | None = Field(None, description="None in a file written before it was recorded")


class FewShotReport(ProbeReport):
    shots_per_class: int = Field(description="the rarest class's labelled images")
    labelled_train: int


class ClusterReport(Part):
    """The final clustering of the pre-training images (ExCB's and MSN's centroids, no balancing) against the prior:
    relative sizes are shares over target shares, KL(sizes || prior), purity and NMI against the labels (None when
    the run has none)."""

    cluster_size_min: float
    cluster_size_max: float
    empty_clusters: int
    purity: float | None = None
    nmi: float | None = None
    kl_to_prior: float
    sorted_relative_sizes: list[float]
    sorted_shares: list[float]
    sorted_prior: list[float]


class SizeProfile(Part):
    """The sizes of the groups of a partition of the pre-training images (k-means clusters, or classes) and how
    unequal they are, from the shares p_k = n_k / N (eval/clusters.size_profile; docs/protocol.md)."""

    sorted_sizes: list[int] = Field(description="largest first")
    imbalance: float = Field(description="largest / smallest non-empty size: rho = n_max / n_min of a long-tailed set")
    effective_number: float = Field(description="exp(H(p)): K when the K sizes are equal, 1 when one group holds all")
    normalised_entropy: float = Field(description="H(p) / log K, 1 when the sizes are equal")
    empty: int = Field(description="groups of size 0, left out of the imbalance")


class FeatureClusterReport(Part):
    """A view of the representation that needs no labels: k-means of the l2-normalised backbone features of the
    pre-training images; with the run's labels, the classes beside it and how well the clusters follow them."""

    k: int
    seed: int
    images: int
    clusters: SizeProfile
    classes: SizeProfile | None = Field(None, description="the pre-training class counts; None without labels")
    nmi: float | None = Field(None, description="of the clusters against the classes; None without labels")
    purity: float | None = None


class Record(Part):
    """A record file of a run folder: ``read`` and ``write`` it by the folder (or the file)."""

    FILE: ClassVar[str]
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_format_0(cls, tree: dict[str, Any]) -> dict[str, Any]:
        """The tree of a file written before ``format_version`` existed, in this format's layout."""
        return tree

    @classmethod
    def read(cls: type[RecordT], path: Path) -> RecordT:
        """The record in ``path``: its file, or the run folder that holds it."""
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILE
        try:
            tree = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: not JSON ({err.msg} at line {err.lineno}); a truncated {cls.FILE}?") from None
        return cls.from_tree(tree, str(path))

    @classmethod
    def from_tree(cls: type[RecordT], tree: Any, origin: str) -> RecordT:
        """``tree`` (a record as JSON holds it, of any format this imbssl reads) as the record."""
        version = tree.get("format_version", 0) if isinstance(tree, dict) else 0
        if version not in (0, FORMAT_VERSION):
            raise RecordError(f"{origin} has format {version}; this imbssl reads formats 0 to {FORMAT_VERSION}: "
                              f"update imbssl to read it")
        try:
            if version == 0:
                tree = {**cls.from_format_0(tree), "format_version": FORMAT_VERSION}
            return cls.model_validate(tree)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the top level"
            raise RecordError(f"{origin}: not {cls.FILE} as imbssl writes it ({where}: {first['msg']})") from None
        except (TypeError, KeyError, AttributeError) as err:  # a format-0 tree of another shape
            raise RecordError(f"{origin}: not {cls.FILE} as imbssl writes it ({type(err).__name__}: {err})") from None

    def write(self, run_dir: Path) -> Path:
        """Write the record into ``run_dir`` (whole: the file is replaced, never left half-written)."""
        path = Path(run_dir) / self.FILE
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(self.model_dump_json(indent=2))
        partial.replace(path)
        return path


# -- eval.json ------------------------------------------------------------------------------------
class EvalRecord(Record):
    """``imbssl evaluate`` (pipelines/evaluate.py): the probes of a pre-trained backbone on a balanced labelled set,
    and the counts they were measured on; the k-means of its features, which needs no labels."""

    FILE: ClassVar[str] = "eval.json"
    labelled_train: int = Field(description="images that train the full-shot probe (0: probes skipped)")
    labelled_val: int = Field(description="images that select the probes' settings")
    test: int = Field(description="test images")
    pretrain_class_counts: list[int] | None = Field(description="None when the run has no labels")
    classes: list[str] = Field(description="the probes' classes: eval.labelled_data's when set")
    head_tail_counts: list[int] | None = Field(None, description="the per-class counts that define the probes' "
                                               "many/medium/few groups and thirds: pretrain_class_counts, or "
                                               "eval.labelled_data's train split's; None where no probe ran (and in "
                                               "files from before it, where they are pretrain_class_counts)")
    probes_skipped: str | None = Field(None, description="why no probe ran (a run without labels and no "
                                                         "eval.labelled_data); None when they ran")
    linear: ProbeReport | None = Field(description="None when the probes were skipped")
    few_shot: dict[str, FewShotReport] = Field({}, description="by eval.few_shot entry ('1%', '100-shot', a file)")
    knn: dict[int, AccuracyReport] = Field({}, description="k-NN by k")
    finetune: FinetuneReport | None = Field(None, description="the whole backbone and a linear head fine-tuned "
                                                           "(eval.finetune), the epoch selected on validation")
    feature_clusters: FeatureClusterReport | None = Field(None, description="k-means of the backbone features of "
                                                                            "the pre-training images; None in files "
                                                                            "from before it")
    clusters: ClusterReport | None = Field(None, description="for the methods that learn clusters")
    warnings: list[str] = []
    settings: dict[str, Any] | None = Field(None, description="the eval section it was measured with; None in a "
                                                              "format-0 file: the run's config.yaml's")
    wall_s: float

    @classmethod
    def from_format_0(cls, tree: dict[str, Any]) -> dict[str, Any]:
        """k-NN sat at the top level as knn20, knn200, ...; now under knn by k."""
        knn = {int(key.removeprefix("knn")): value for key, value in tree.items() if key.startswith("knn")}
        return {**{key: value for key, value in tree.items() if not key.startswith("knn")}, "knn": knn}


# -- pretrain.json --------------------------------------------------------------------------------
class PretrainRecord(Record):
    """``imbssl pretrain`` (pipelines/pretrain.py): the last epoch's figures, the optimizer it resolved and what the
    run cost. Beside the declared keys, each of the method's own last-epoch figures (its ``training_step`` and
    ``epoch_stats`` statistics, e.g. MSN's prior_kl, ExCB's teacher_confidence) is a number of its own name:
    ``figure(name)`` reads it."""

    model_config = ConfigDict(extra="allow")
    FILE: ClassVar[str] = "pretrain.json"
    __pydantic_extra__: dict[str, int | float] = Field(init=False)

    epoch: int = Field(description="epochs trained")
    loss: float = Field(description="the last epoch's mean loss")
    images_per_s: float
    images_seen: int = Field(description="in the last epoch")
    optimizer: str
    base_lr: float
    weight_decay: float
    batch_size: int
    processes: int
    num_images: int
    images_seen_total: int
    wall_s_this_call: float
    device: str
    hardware: str
    torch: str
    determinism: dict[str, bool | str | None]
    precision: PrecisionUsed | None = Field(None, description="None in a file written before train.precision: auto")

    def figure(self, name: str) -> int | float | None:
        """The method's last-epoch figure ``name``, or None when the method has none of that name."""
        return (self.model_extra or {}).get(name)


# -- train.json -----------------------------------------------------------------------------------
class ClassifierReport(AccuracyReport):
    """A classifier's test report: the accuracy report and its top-1 error."""

    error: float


class StageReport(Part):
    """A model of a classifier run, on the test split."""

    test: ClassifierReport


class SelectedStage(StageReport):
    """A stage's model at the epoch selected on validation."""

    selected_epoch: int
    val_acc: float


class TrainRecord(Record):
    """``imbssl train`` (pipelines/train.py): the test report of each model it can report and which one it does."""

    FILE: ClassVar[str] = "train.json"
    test: ClassifierReport = Field(description="the reported model's")
    reported: Literal["main", "crt"]
    main: SelectedStage
    main_last_epoch: StageReport
    posthoc_logit_adjusted: StageReport = Field(description="the main model with post-hoc logit adjustment")
    crt: SelectedStage | None = Field(None, description="classifier re-training on the frozen backbone, when enabled")
    train_class_counts: list[int]
    labeled_class_counts: list[int] = Field(description="the counts that define head and tail (self-training: D_L)")
    val_images: int
    init_from: str | None
    processes: int
    wall_s_this_call: float
    hardware: str
    torch: str
    determinism: dict[str, bool | str | None]
    precision: PrecisionUsed | None = Field(None, description="None in a file written before train.precision: auto")

    def stage(self, part: Literal["main", "crt", "main_last_epoch", "posthoc_logit_adjusted"]) -> StageReport:
        found = getattr(self, part)
        if found is None:
            raise RecordError(f"this train.json has no {part} model (crt.enabled was off)")
        return found


# -- self_training.json ---------------------------------------------------------------------------
class PseudoLabelClass(Part):
    images: int
    recall: float | None
    kept: int
    kept_precision: float | None


class PseudoLabelReport(Part):
    """How right the pseudo-labels of D_U are, from D_U's true labels (monitoring only)."""

    accuracy: float | None
    kept: int
    of: int
    kept_accuracy: float | None
    per_class: dict[str, PseudoLabelClass]
    confusion: list[list[int]]


class SharedLabeller(Part):
    """A CE labeller of its own folder (``pseudo_labels.labeller: ce``)."""

    dir: str
    test: ClassifierReport


class SelfTrainingRecord(Record):
    """The self-training pipeline (pipelines/self_training.py): the base and the final classifier on the test split,
    and the pseudo-labels between them."""

    FILE: ClassVar[str] = "self_training.json"
    base: ClassifierReport
    final: ClassifierReport
    gain_top1: float
    labeller: Literal["base"] | SharedLabeller = Field(description="base: f_B labelled D_U itself")
    pseudo_labels: PseudoLabelReport
    labeled_class_counts: list[int]
    unlabeled_class_counts: list[int]
    final_class_counts: list[int]
    hardware: str
    wall_s_this_call: float


# -- the offline-clustering pipeline ----------------------------------------------------------------
class BudgetRecord(Record):
    """pipeline.json: images seen per stage, also in epochs over D; wall_s adds up the divide stage and the last
    call of each training run."""

    FILE: ClassVar[str] = "pipeline.json"
    num_images: int
    images_seen: dict[str, int]
    images_seen_total: int
    epochs_of_D: dict[str, float]
    epochs_of_D_total: float
    wall_s: float


class DivideRecord(Record):
    """divide/report.json: k-means of the base model's outputs; purity, NMI and class counts judge it by the
    labels."""

    FILE: ClassVar[str] = "report.json"
    k: int
    sizes: list[int]
    purity: float | None = None
    nmi: float | None = None
    class_counts: list[dict[str, int]] | None = None
    inertia: float
    kmeans: dict[str, Any] = Field(description="the kmeans settings and the engine used")
    wall_s: float
