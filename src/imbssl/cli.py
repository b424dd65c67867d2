"""The ``imbssl`` command: data | pretrain | evaluate | train | pipeline | reproduce | demo.

Heavy modules (torch, the pipelines) are imported inside the commands, so ``--help`` and config
mistakes answer at once.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from imbssl.configbase import ConfigError, deep_merge, parse_overrides
from imbssl.errors import ImbsslError, ProcessLost, Terminated
from imbssl.recipes import RECIPES
from imbssl.records import AccuracyReport, EvalRecord, SelfTrainingRecord, SizeProfile, TrainRecord

if TYPE_CHECKING:
    from collections import Counter

    from imbssl.config import DataConfig

CONFIG_DIR = Path(__file__).parent / "configs"
#: the supervised (``imbssl train``) configs shipped with imbssl
TRAIN_CONFIG_DIR = CONFIG_DIR / "train"
#: the self-training pipeline configs shipped with imbssl
SELF_TRAINING_CONFIG_DIR = CONFIG_DIR / "self-training"
#: offline_clustering.STAGES, spelled out so that --help need not import torch (a test checks they agree)
PIPELINE_STAGES = ("base", "divide", "experts", "distill")
_RESUME_WITH = "imbssl.resume_with"  # ctx.meta key: the command line that continues an interrupted command


def set_option(example: str) -> Callable[[Callable], Callable]:
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeatable)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports each CPU-feature probe at INFO


def _command_line() -> str:
    return f"{_launcher()} " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _launcher() -> str:
    """``imbssl``, or under torchrun the torchrun command that starts it again (on one node, in full)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return "imbssl"
    nodes, per_node = os.environ.get("GROUP_WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    options = "--standalone" if nodes == "1" else f"--nnodes {nodes} <the job's rendezvous options>"
    return f"torchrun {options} --nproc-per-node {per_node} -m imbssl"


def _offer_resume(add_flag: bool) -> None:
    """Name, on an interrupt or a failed write, the command that continues this one."""
    line = _command_line()
    if add_flag and "--resume" not in sys.argv[1:]:
        line += " --resume"
    click.get_current_context().meta[_RESUME_WITH] = line


def _one_line(err: BaseException, resume_with: str | None) -> click.ClickException:
    """Exit 2 for imbssl's own errors (bad config, data, checkpoint...), 130 for Ctrl-C, 143 for SIGTERM, 1 for a
    lost torchrun process and anything else."""
    if isinstance(err, Terminated):
        message, code = "terminated (SIGTERM)", 143
    elif isinstance(err, KeyboardInterrupt):
        message, code = "interrupted", 130
    elif isinstance(err, ProcessLost):
        message, code = str(err), 1
    elif isinstance(err, ImbsslError):
        message, code = str(err), 2
    elif isinstance(err, OSError) and err.filename:  # a failed read or write: the file and the system's reason
        message, code = f"{err.filename}: {err.strerror}", 1
    elif isinstance(err, FileNotFoundError):  # raised with a message of its own: an unfinished run, a missing preset
        message, code = str(err), 2
    else:  # a bug, or a failure nobody anticipated: still one line, the traceback on request
        message, code = f"{type(err).__name__}: {' '.join(str(err).split())} (--debug shows the traceback)", 1
    if resume_with and isinstance(err, (KeyboardInterrupt, OSError, ProcessLost)):
        message += f"; continue with `{resume_with}`"
    failure = click.ClickException(message)
    failure.exit_code = code
    return failure


class OneLineErrors(click.Group):
    """The root group: a failing command prints one line and exits non-zero; --debug adds the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own usage errors and exits
        except (Exception, KeyboardInterrupt) as err:
            if ctx.params.get("debug"):
                traceback.print_exc()
            raise _one_line(err, ctx.meta.get(_RESUME_WITH)) from None


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.option("--debug", is_flag=True, envvar="IMBSSL_DEBUG",
              help="show the traceback of a failure (or IMBSSL_DEBUG=1)")
def cli(verbose: bool, debug: bool) -> None:
    """Self-supervised pre-training on class-imbalanced image data."""
    _setup_logging(verbose)


def _data_path_set(data_path: str | None) -> tuple[str, ...]:
    """``--data PATH`` as the ``--set`` it stands for; the path quoted, whatever it reads like as YAML."""
    return (f"data.path={json.dumps(data_path)}",) if data_path else ()


def _shipped_configs(pipelines: bool = False, folder: Path = CONFIG_DIR) -> str:
    """The names of the run (or pipeline) configs in ``folder``; a pipeline config has a ``base`` section."""
    import yaml

    names = [p.stem for p in sorted(folder.glob("*.yaml")) if ("base" in yaml.safe_load(p.read_text())) == pipelines]
    return ", ".join(names)


def _help_list(names: str) -> str:
    """A comma-separated list for a ``\\b`` block of a help page (click does not re-wrap it): indented, 80 columns."""
    import textwrap

    return textwrap.fill(names, width=78, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)


def _config_file(name: str, pipelines: bool = False, folder: Path = CONFIG_DIR) -> Path:
    """A config file, or the name of a config shipped in the package (``simsiam-digits``)."""
    path, shipped = Path(name), folder / f"{name.removesuffix('.yaml')}.yaml"
    if path.is_file():
        return path
    if path.name == name and shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {path} (shipped configs: {_shipped_configs(pipelines, folder)})")


# -- data -------------------------------------------------------------------------------------
@cli.group()
def data() -> None:
    """Inspect data sources and long-tailed subsets."""


@data.command("describe", short_help="Per-class counts of the subsets, or what unlabelled images hold.")
@click.option("--config", "config_path", help="a run config (its data section): a file or a shipped config's name")
@set_option("data.source=cifar10")
@click.option("--data", "data_path", type=click.Path(), help="data archive or folder (sets data.path)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--plot", type=click.Path(dir_okay=False), help="also draw the Figure-1-style plot to this file")
def data_describe(config_path: str | None, overrides: tuple[str, ...], data_path: str | None, as_json: bool,
                  plot: str | None) -> None:
    """Per-class counts of the paper's five subsets and of the configured one. For data.source images (no labels):
    the images' count, sizes and modes and the files PIL cannot read, from the image headers (nothing is decoded).
    ``--data PATH`` alone reads PATH as an ImageFolder when it holds train/<class>/ folders, else as images."""
    from imbssl.config import load_config
    from imbssl.data.sources import guess_source
    named = config_path or any(o.startswith("data.source=") for o in overrides)
    guessed = () if named or not data_path else (f"data.source={guess_source(Path(data_path))}",)
    cfg = load_config(_config_file(config_path) if config_path else None,
                      _data_path_set(data_path) + guessed + overrides)
    if cfg.data.source == "images":
        if plot:
            raise ConfigError("--plot draws images per class, and data.source images has no classes")
        _describe_images(cfg.data, as_json)
        return
    from imbssl.recipes.subsets import NamedSubset, describe_subsets, paper_subsets

    subsets = paper_subsets(cfg.data.subset.seed)
    if cfg.data.subset.profile != "full" or config_path:
        subsets.append(NamedSubset(key="configured", title=f"configured ({cfg.data.subset.profile})",
                                   subset=cfg.data.subset))
    classes, counts = describe_subsets(cfg, subsets)
    if plot:
        from imbssl.report import plot_class_distributions

        plot_class_distributions(counts, classes, plot, title=f"Images per class of each subset ({cfg.data.source})")
    if as_json:
        click.echo(json.dumps({"source": cfg.data.source, "classes": classes,
                               "subsets": {t: {"counts": c, "total": sum(c)} for t, c in counts.items()},
                               "plot": plot}, indent=2))
        return
    width = max(len(t) for t in counts)
    click.echo(f"source: {cfg.data.source}   classes: {', '.join(classes)}")
    for title, c in counts.items():
        click.echo(f"{title:<{width}}  total {sum(c):>7,}  per class {c}")
    click.echo(f"plot: {plot}" if plot else "(--plot FILE draws these counts)")


def _describe_images(data: DataConfig, as_json: bool) -> None:
    """``data describe`` of the images source: count, sizes, modes, unreadable files, and the decode's size."""
    from imbssl.data.cache import readable_size
    from imbssl.data.sources import describe_images

    summary = describe_images(data)
    stored = summary.stored
    if as_json:
        click.echo(json.dumps({"source": "images", "path": str(summary.root), "images": summary.count,
                               "sizes": {f"{w}x{h}": n for (w, h), n in summary.sizes.most_common()},
                               "modes": dict(summary.modes.most_common()),
                               "unreadable": [{"file": err.name, "reason": err.reason} for err in summary.unreadable],
                               "stored_shape": list(stored) if isinstance(stored, tuple) else None,
                               "stored_problem": stored if isinstance(stored, str) else None,
                               "cache_free_bytes": summary.cache_free}, indent=2))
        return
    click.echo(f"source: images   path: {summary.root}   images: {summary.count:,} readable, "
               f"{len(summary.unreadable):,} unreadable")
    click.echo(f"sizes: {_size_counts(summary.sizes)}")
    click.echo(f"modes: {', '.join(f'{mode} {n:,}' for mode, n in summary.modes.most_common()) or 'none'}")
    for err in summary.unreadable:
        click.echo(f"unreadable: {err.name}: {err.reason}")
    if summary.unreadable and data.unreadable == "refuse":
        click.echo("  (the decode refuses them: --set data.unreadable=skip leaves them out, listed in the run folder)")
    if isinstance(stored, str):
        click.echo(f"stored: not as they are: {stored}")
        return
    height, width, channels = stored
    click.echo(f"stored: {summary.count:,} x {height}x{width}x{channels} uint8 = "
               f"{readable_size(summary.count * height * width * channels)} in the decode cache "
               f"({readable_size(summary.cache_free)} free there)")


def _size_counts(sizes: Counter) -> str:
    """'32x32 40, 64x48 10' (width x height, images), or for many sizes their range and the commonest."""
    common = ", ".join(f"{w}x{h} {n:,}" for (w, h), n in sizes.most_common(5))
    if len(sizes) <= 5:
        return common or "none"
    smallest, largest = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return (f"{len(sizes):,} distinct, from {smallest[0]}x{smallest[1]} to {largest[0]}x{largest[1]}; the "
            f"commonest {common}")


# -- pretrain / evaluate ------------------------------------------------------------------------
PRETRAIN_HELP = f"""Pre-train one method on one subset, then evaluate it.

CONFIG is a YAML file or the name of a config shipped with imbssl:

\b
{_help_list(_shipped_configs())}

The run goes to <out_dir>/<name> (by default runs/<name> under the current folder) or to --run-dir.

\b
Examples:
  imbssl pretrain simsiam-digits --set optim.epochs=5
  imbssl pretrain simsiam-digits --resume    # on to the config's 30 epochs
  imbssl pretrain simsiam-cifar10-lt --data cifar10-jpg.tar.gz
  torchrun --nproc-per-node 2 -m imbssl pretrain simsiam-digits

Under torchrun (the last example) the run is data-parallel: optim.batch_size is the global batch, shared by the
processes (docs/scale-out.md).
"""


@cli.command(help=PRETRAIN_HELP, short_help="Pre-train one method on one subset.")
@click.argument("config")
@set_option("optim.epochs=5")
@click.option("--data", "data_path", type=click.Path(), help="data archive or folder (sets data.path)")
@click.option("--run-dir", type=click.Path(file_okay=False), help="the run folder  [default: <out_dir>/<name>]")
@click.option("--resume", is_flag=True, help="continue the run from its last checkpoint; may raise optim.epochs")
@click.option("--eval/--no-eval", "then_eval", default=True, show_default=True, help="evaluate when done")
def pretrain(config: str, overrides: tuple[str, ...], data_path: str | None, run_dir: str | None, resume: bool,
             then_eval: bool) -> None:
    from imbssl.config import load_config
    cfg = load_config(_config_file(config), _data_path_set(data_path) + overrides)
    from imbssl.engine.distributed import is_main, process_group
    from imbssl.pipelines.evaluate import EVAL_FILE, check_evaluable, evaluate_run
    from imbssl.pipelines.pretrain import pretrain as run_pretrain

    _offer_resume(add_flag=True)
    check = (lambda data: check_evaluable(cfg.eval, data)) if then_eval else None  # refused before training
    with process_group(cfg.train.device, cfg.train.dist_timeout_s):
        out = run_pretrain(cfg, Path(run_dir) if run_dir else None, resume=resume, check_data=check)
        if not is_main():  # rank 0 reports and evaluates
            return
    click.echo(f"run folder: {out}")
    if then_eval:
        _echo_eval(evaluate_run(out), out / EVAL_FILE)


@cli.command(short_help="A run's backbone as safetensors (and torchvision) files.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="the folder  [default: RUN_DIR/export]")
def export(run_dir: str, out: str | None) -> None:
    """RUN_DIR's backbone as backbone.safetensors (its architecture and input normalisation in the metadata) and,
    for ResNet-18/34/50, as a torchvision state_dict (backbone-torchvision.pt); docs/export.md."""
    from imbssl.pipelines.export import export_run

    for path in export_run(Path(run_dir), Path(out) if out else None):
        click.echo(f"wrote {path}")


@cli.command(short_help="Feature clusters, linear probe and k-NN of a run -> eval.json.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@set_option("eval.linear.epochs=20")
def evaluate(run_dir: str, overrides: tuple[str, ...]) -> None:
    """The k-means of a finished run's features (no labels needed), and its linear probe and k-NN on a balanced
    labelled set: the run's own, or eval.labelled_data (writes RUN_DIR/eval.json)."""
    from imbssl.config import validate_tree
    from imbssl.pipelines.evaluate import EVAL_FILE, evaluate_run, load_run_config

    cfg = load_run_config(Path(run_dir))
    if overrides:
        cfg = validate_tree(type(cfg), deep_merge(cfg.model_dump(mode="json"), parse_overrides(overrides)),
                            origin=str(Path(run_dir) / "config.yaml"), overrides=overrides)
    _echo_eval(evaluate_run(Path(run_dir), cfg.eval), Path(run_dir) / EVAL_FILE)


def _echo_eval(result: EvalRecord, eval_file: Path) -> None:
    if result.linear is not None:  # else the evaluation's log said in one line why the probes were skipped
        _echo_probes(result)
    if (features := result.feature_clusters) is not None:
        click.echo(f"feature clusters (k-means, K={features.k}): {_size_profile(features.clusters)}"
                   + ("" if features.classes is None else f"; classes: {_size_profile(features.classes)}, "
                      f"NMI {features.nmi:.3f}"))
    if (clusters := result.clusters) is not None:
        judged = "" if clusters.purity is None else f"; purity {clusters.purity:.3f}, NMI {clusters.nmi:.3f}"
        click.echo(f"clusters: {clusters.empty_clusters} of {len(clusters.sorted_relative_sizes)} empty, "
                   f"largest {clusters.cluster_size_max:.2f}x the target size{judged}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}")
    click.echo(f"eval: {eval_file}")


def _echo_probes(result: EvalRecord) -> None:
    lin = result.linear
    knn = ", ".join(f"knn{k} {report.top1:.2f}" for k, report in result.knn.items())
    click.echo(f"labelled set: {result.labelled_train} images to train the probe + {result.labelled_val} to "
               f"select it (balanced); test: {result.test} images")
    finetuned = "" if result.finetune is None else f"; fine-tuned top-1 {result.finetune.top1:.2f}"
    click.echo(f"linear top-1 {lin.top1:.2f} (val {lin.val_top1:.2f}); {knn}{finetuned}")
    groups = [lin.many, lin.medium, lin.few]
    click.echo(f"many/medium/few: {' / '.join('n/a' if g is None else f'{g:.2f}' for g in groups)}; major/minor/rare: "
               f"{_thirds(lin)} (std {lin.thirds_std:.2f})")
    if None in groups:
        given = (result.settings or {}).get("labelled_data")
        counted = "eval.labelled_data's train split" if given else "the pre-training subset"
        click.echo(f"  n/a: no class of {counted} falls in that group (many: over 100 images, medium: 20-100, "
                   f"few: under 20)")


def _size_profile(profile: SizeProfile) -> str:
    """'largest/smallest 12.4, effective number 6.2 of 10'."""
    return (f"largest/smallest {profile.imbalance:.1f}, effective number {profile.effective_number:.1f} of "
            f"{len(profile.sorted_sizes)}")


def _thirds(report: AccuracyReport) -> str:
    """'81.20 / 60.10 / 40.00': the major, minor and rare thirds' accuracies ('n/a' for a third with no class: fewer
    than three classes)."""
    thirds = (report.thirds.major, report.thirds.minor, report.thirds.rare)
    return " / ".join("n/a" if value is None else f"{value:.2f}" for value in thirds)


# -- train --------------------------------------------------------------------------------------
TRAIN_HELP = f"""Train a classifier on a long-tailed subset with its labels, from scratch or from a pre-trained
backbone (--init-from RUN/backbone.pt of any imbssl run), and test it on the balanced test split.

CONFIG is a YAML file or the name of a supervised config shipped with imbssl:

\b
{_help_list(_shipped_configs(folder=TRAIN_CONFIG_DIR))}

The epoch is selected on a balanced validation set held out of the training pool, never on the test set.

\b
Examples:
  imbssl train ce-digits
  imbssl train ce-digits --set loss.name=ldam --set loss.deferral=drw \\
      --set loss.defer_epoch=24
  imbssl train ldam-drw-cifar10-lt --data cifar10-jpg.tar.gz \\
      --init-from runs/rotation/backbone.pt
"""


@cli.command(help=TRAIN_HELP, short_help="Long-tailed supervised training, from scratch or SSP.")
@click.argument("config")
@set_option("loss.name=ldam")
@click.option("--data", "data_path", type=click.Path(), help="data archive or folder (sets data.path)")
@click.option("--init-from", type=click.Path(dir_okay=False), help="a backbone.pt to start from (sets init_from)")
@click.option("--run-dir", type=click.Path(file_okay=False), help="the run folder  [default: <out_dir>/<name>]")
@click.option("--resume", is_flag=True, help="continue the run from its last checkpoint; may raise optim.epochs")
def train(config: str, overrides: tuple[str, ...], data_path: str | None, init_from: str | None, run_dir: str | None,
          resume: bool) -> None:
    from imbssl.config import SupervisedConfig, load_config

    given = [f"data.path={json.dumps(data_path)}"] if data_path else []
    given += [f"init_from={json.dumps(init_from)}"] if init_from else []
    cfg = load_config(_config_file(config, folder=TRAIN_CONFIG_DIR), (*given, *overrides), schema=SupervisedConfig)
    from imbssl.engine.distributed import is_main, process_group
    from imbssl.pipelines.train import train as run_train

    _offer_resume(add_flag=True)
    with process_group(cfg.train.device, cfg.train.dist_timeout_s):
        out = run_train(cfg, Path(run_dir) if run_dir else None, resume=resume)
        if not is_main():  # rank 0 reports
            return
    result = TrainRecord.read(out)
    click.echo(f"{result.reported}: test top-1 {result.test.top1:.2f} (error {result.test.error:.2f}), epoch "
               f"{result.stage(result.reported).selected_epoch} selected on validation")
    click.echo(f"major/minor/rare: {_thirds(result.test)}")
    click.echo(f"run folder: {out} ({TrainRecord.FILE})")


# -- pipeline ---------------------------------------------------------------------------------
@cli.group()
def pipeline() -> None:
    """Multi-stage pre-training pipelines."""


OFFLINE_CLUSTERING_HELP = f"""Base -> divide -> experts -> distill (paper Sec. 3); the folder ends up an evaluable run.

CONFIG is a YAML file or the name of a pipeline config shipped with imbssl:

\b
{_help_list(_shipped_configs(pipelines=True))}

The pipeline folder is <base.out_dir>/<base.name> (runs/<base.name> by default) or --run-dir. Under torchrun
(RANK, WORLD_SIZE) the processes share the experts; see docs/offline-clustering.md.
"""


@pipeline.command("offline-clustering", help=OFFLINE_CLUSTERING_HELP,
                  short_help="Base, divide, experts, distill (paper, Sec. 3).")
@click.argument("config")
@set_option("epochs.base=10")
@click.option("--data", "data_path", type=click.Path(), help="data archive or folder (sets base.data.path)")
@click.option("--run-dir", type=click.Path(file_okay=False), help="the pipeline folder  [default: "
                                                                  "<base.out_dir>/<base.name>]")
@click.option("--resume", is_flag=True, help="continue at the first unfinished stage or expert")
@click.option("--expert", type=int, help="train only expert K of a divided pipeline (one job per expert)")
@click.option("--until", type=click.Choice(PIPELINE_STAGES), default="distill", show_default=True,
              help="stop after this stage")
@click.option("--eval/--no-eval", "then_eval", default=True, show_default=True, help="evaluate the student when done")
def offline_clustering(config: str, overrides: tuple[str, ...], data_path: str | None, run_dir: str | None,
                       resume: bool, expert: int | None, until: str, then_eval: bool) -> None:
    data_set = (f"base.data.path={json.dumps(data_path)}",) if data_path else ()
    from imbssl.config import OfflineClusteringConfig, load_config
    cfg = load_config(_config_file(config, pipelines=True), data_set + overrides, schema=OfflineClusteringConfig)
    from imbssl.pipelines.evaluate import EVAL_FILE, evaluate_run
    from imbssl.pipelines.offline_clustering import Shard, run_pipeline
    from imbssl.pipelines.pretrain import BACKBONE_FILE

    _offer_resume(add_flag=True)
    root = run_pipeline(cfg, Path(run_dir) if run_dir else Path(cfg.base.out_dir) / cfg.base.name, resume, expert,
                        until)
    click.echo(f"pipeline folder: {root}")
    if then_eval and Shard.from_env().rank == 0 and (root / BACKBONE_FILE).exists():
        _echo_eval(evaluate_run(root), root / EVAL_FILE)


SELF_TRAINING_HELP = f"""Base classifier on D_L -> pseudo-labels on D_U -> final classifier on both ("Rethinking the
value of labels", Sec. 3). D_L is data.subset (give its head with data.subset.head_count); D_U is drawn from the
rest of the training pool (unlabeled.size_factor x |D_L| images, ratio unlabeled.imbalance), and its labels are
read only to report how right the pseudo-labels are.

CONFIG is a YAML file or the name of a self-training config shipped with imbssl:

\b
{_help_list(_shipped_configs(folder=SELF_TRAINING_CONFIG_DIR))}

\b
Examples:
  imbssl pipeline self-training ce-digits
  imbssl pipeline self-training ce-digits --set unlabeled.imbalance=10 \\
      --set pseudo_labels.threshold=0.9
"""


@pipeline.command("self-training", help=SELF_TRAINING_HELP, short_help="Base, pseudo-labels, final (semi-supervised).")
@click.argument("config")
@set_option("unlabeled.imbalance=10")
@click.option("--data", "data_path", type=click.Path(), help="data archive or folder (sets data.path)")
@click.option("--run-dir", type=click.Path(file_okay=False), help="the pipeline folder  [default: <out_dir>/<name>]")
@click.option("--resume", is_flag=True, help="continue at the first unfinished stage")
def self_training(config: str, overrides: tuple[str, ...], data_path: str | None, run_dir: str | None,
                  resume: bool) -> None:
    from imbssl.config import SelfTrainingConfig, load_config

    given = (f"data.path={json.dumps(data_path)}",) if data_path else ()
    cfg = load_config(_config_file(config, folder=SELF_TRAINING_CONFIG_DIR), given + overrides,
                      schema=SelfTrainingConfig)
    from imbssl.pipelines.self_training import self_train

    _offer_resume(add_flag=True)
    root = self_train(cfg, Path(run_dir) if run_dir else None, resume=resume)
    report = SelfTrainingRecord.read(root)
    labels = report.pseudo_labels
    click.echo(f"pseudo-labels: {labels.kept} of {labels.of} kept, {labels.accuracy:.2f}% right "
               f"({labels.kept_accuracy or 0:.2f}% of the kept)")
    for stage, test in (("base", report.base), ("final", report.final)):
        click.echo(f"{stage}: test top-1 {test.top1:.2f} (error {test.error:.2f}), major/minor/rare {_thirds(test)}")
    click.echo(f"pipeline folder: {root} ({SelfTrainingRecord.FILE})")


# -- reproduce / demo ---------------------------------------------------------------------------
def _recipe_list() -> str:
    width = max(map(len, RECIPES))
    return "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in RECIPES.items())


REPRODUCE_HELP = f"""Reproduce a paper's table with one command: the grid of NAME's preset, its runs (finished ones
are reused when trained with the same settings, unfinished ones resumed) and its report (table.md, results.json,
figures) in --out.

\b
{_recipe_list()}

\b
Examples:
  imbssl reproduce experiment-1 --preset cpu --data cifar10-jpg.tar.gz
  imbssl reproduce ssp --preset demo --set 'seeds=[0]'
  imbssl reproduce experiment-2 --preset cpu \\
      --baselines-from reports/experiment-1-cpu
"""


@cli.command(help=REPRODUCE_HELP, short_help="Reproduce a paper's table with one command.")
@click.argument("name", metavar="NAME", type=click.Choice(list(RECIPES)))
@click.option("--preset", type=click.Choice(["demo", "cpu", "paper"]), default="demo", show_default=True)
@set_option("base.optim.epochs=10")
@click.option("--out", type=click.Path(file_okay=False), help="report folder (default reports/NAME-PRESET)")
@click.option("--data", "data_path", type=click.Path(), help="data archive or folder (sets base.data.path)")
@click.option("--baselines-from", type=click.Path(file_okay=False),
              help="experiment-2: an experiment-1 report folder of the same preset, whose runs are the baselines "
                   "(missing ones are trained there; sets baselines_from)")
def reproduce(name: str, preset: str, overrides: tuple[str, ...], out: str | None, data_path: str | None,
              baselines_from: str | None) -> None:
    from imbssl.recipes import recipe

    if baselines_from and "baselines_from" not in recipe(name).model_fields:
        raise ConfigError(f"--baselines-from: {name} takes no baselines from another report (experiment-2 does)")
    given = (f"baselines_from={json.dumps(baselines_from)}",) if baselines_from else ()
    _echo_report(_reproduce(name, preset, given + overrides, out, data_path))


def _reproduce(name: str, preset: str, overrides: tuple[str, ...], out: str | None, data_path: str | None
               ) -> Path | None:
    """Recipe ``name``'s preset with --data and --set applied, run into ``out``; table.md (None off rank 0)."""
    from imbssl.config import validate_tree
    from imbssl.recipes import load_preset, recipe
    from imbssl.recipes.grid import reproduce as run_recipe

    _offer_resume(add_flag=False)  # the grids resume their unfinished runs by themselves
    schema = recipe(name)
    tree = load_preset(schema.PRESETS, preset)
    if data_path:
        tree = deep_merge(tree, {"base": {"data": {"path": data_path}}})
    tree = deep_merge(tree, parse_overrides(overrides))
    grid = validate_tree(schema, tree, origin=f"the {name} preset {preset!r}", overrides=overrides)
    return run_recipe(grid, Path(out or f"reports/{name}-{preset}"), _command_line())


def _echo_report(table: Path | None) -> None:
    if table is not None:  # None on the processes other than rank 0
        click.echo(table.read_text())
        click.echo(f"report: {table.parent}")


@cli.command(short_help="Experiment I on digits, in minutes on a CPU.")
@set_option("base.optim.epochs=2")
@click.option("--out", type=click.Path(file_okay=False), default="reports/demo", show_default=True)
def demo(overrides: tuple[str, ...], out: str) -> None:
    """Experiment I on scikit-learn's digits: a few minutes on a laptop CPU."""
    if (table := _reproduce("experiment-1", "demo", overrides, out, None)) is not None:
        click.echo(table.read_text())
        click.echo(f"report: {table.parent} (table.md, distributions.png, per_class_accuracy-*.png, runs/)")


def main() -> None:
    from imbssl.launcher import relaunch_with_tcmalloc

    relaunch_with_tcmalloc()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    cli(prog_name="imbssl")


#: seconds the cleanup after a SIGTERM may take before the process exits without it
SIGTERM_GRACE_S = float(os.environ.get("IMBSSL_SIGTERM_GRACE_S", 30))


def _stop_on_sigterm(signum: int, frame) -> None:
    """Stop as Ctrl-C does (docs/reliability.md): the step is abandoned, the last checkpoint kept, the lock and any
    half-written file removed. An exception raised between two bytecodes can leave a lock held that the cleanup
    then waits on (CPython bpo-29988), so a cleanup that outlasts SIGTERM_GRACE_S ends as kill -9 would: resumable
    from the last checkpoint."""
    import threading

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut short the first one's cleanup
    grace = threading.Timer(SIGTERM_GRACE_S, _exit_after_grace)
    grace.daemon = True  # a cleanup that ends in time exits at once
    grace.start()
    raise Terminated


def _exit_after_grace() -> None:
    sys.stderr.write(f"Error: terminated (SIGTERM), and the cleanup did not end within {SIGTERM_GRACE_S:g} s: exiting "
                     f"without it; the run resumes from its last checkpoint (a stale .lock is taken over)\n")
    sys.stderr.flush()
    os._exit(143)
