"""The ``imbssl`` command: data | pretrain | evaluate | pipeline | reproduce | demo."""
from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Callable

import click
from pydantic import BaseModel, ValidationError

from imbssl.config import ConfigError, OfflineClusteringConfig, build_config, deep_merge, load_config, parse_overrides
from imbssl.data import DataError
from imbssl.engine.trainer import NonFiniteLossError
from imbssl.pipelines.offline_clustering import STAGES

log = logging.getLogger("imbssl")

set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="override a config key, e.g. --set optim.epochs=5 (repeatable)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports each CPU-feature probe at INFO


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool) -> None:
    """Self-supervised pre-training on class-imbalanced image data."""
    _setup_logging(verbose)


# -- data -------------------------------------------------------------------------------------
@cli.group()
def data() -> None:
    """Inspect data sources and long-tailed subsets."""


@data.command("describe")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="a run config (its data section)")
@set_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--plot", type=click.Path(dir_okay=False), default="data-distributions.png", show_default=True,
              help="where to save the Figure-1-style plot")
def data_describe(config_path: str | None, overrides: tuple[str, ...], as_json: bool, plot: str) -> None:
    """Per-class counts of the paper's five subsets and of the configured one."""
    from imbssl.recipes.experiment_1 import NamedSubset, describe_subsets, paper_subsets
    from imbssl.report import plot_class_distributions

    cfg = load_config(config_path, overrides)
    subsets = paper_subsets(cfg.data.subset.seed)
    if cfg.data.subset.profile != "full" or config_path:
        subsets.append(NamedSubset(key="configured", title=f"configured ({cfg.data.subset.profile})",
                                   subset=cfg.data.subset))
    classes, counts = describe_subsets(cfg, subsets)
    plot_class_distributions(counts, classes, plot, title=f"Images per class of each subset ({cfg.data.source})")
    if as_json:
        click.echo(json.dumps({"source": cfg.data.source, "classes": classes,
                               "subsets": {t: {"counts": c, "total": sum(c)} for t, c in counts.items()},
                               "plot": str(plot)}, indent=2))
        return
    width = max(len(t) for t in counts)
    click.echo(f"source: {cfg.data.source}   classes: {', '.join(classes)}")
    for title, c in counts.items():
        click.echo(f"{title:<{width}}  total {sum(c):>7,}  per class {c}")
    click.echo(f"plot: {plot}")


# -- pretrain / evaluate ------------------------------------------------------------------------
@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@set_option
@click.option("--run-dir", type=click.Path(file_okay=False), help="default: <out_dir>/<name>")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last checkpoint")
@click.option("--eval/--no-eval", "then_eval", default=True, show_default=True, help="evaluate when done")
def pretrain(config_path: str, overrides: tuple[str, ...], run_dir: str | None, resume: bool, then_eval: bool) -> None:
    """Pre-train one method on one subset."""
    from imbssl.pipelines.evaluate import evaluate_run
    from imbssl.pipelines.pretrain import pretrain as run_pretrain

    cfg = load_config(config_path, overrides)
    out = run_pretrain(cfg, Path(run_dir) if run_dir else None, resume=resume)
    click.echo(f"run folder: {out}")
    if then_eval:
        _echo_eval(evaluate_run(out))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@set_option
def evaluate(run_dir: str, overrides: tuple[str, ...]) -> None:
    """Linear probe and k-NN of a finished run (writes RUN_DIR/eval.json)."""
    from imbssl.pipelines.evaluate import evaluate_run, load_run_config

    cfg = load_run_config(Path(run_dir))
    if overrides:
        cfg = build_config(deep_merge(cfg.model_dump(mode="json"), parse_overrides(overrides)), origin="--set")
    _echo_eval(evaluate_run(Path(run_dir), cfg.eval))


def _echo_eval(result: dict) -> None:
    lin = result["linear"]
    knn = ", ".join(f"{k} {v['top1']:.2f}" for k, v in result.items() if k.startswith("knn"))
    click.echo(f"linear top-1 {lin['top1']:.2f} (val {lin['val_top1']:.2f}); {knn}")
    groups = " / ".join("n/a" if lin[g] is None else f"{lin[g]:.2f}" for g in ("many", "medium", "few"))
    thirds = " / ".join(f"{lin['thirds'][g]:.2f}" for g in ("major", "minor", "rare"))
    click.echo(f"many/medium/few: {groups}; major/minor/rare: {thirds} (std {lin['thirds_std']:.2f})")
    if "clusters" in result:
        clusters = result["clusters"]
        click.echo(f"clusters: {clusters['empty_clusters']} of {len(clusters['sorted_relative_sizes'])} empty, "
                   f"largest {clusters['cluster_size_max']:.2f}x the target size; purity {clusters['purity']:.3f}, "
                   f"NMI {clusters['nmi']:.3f}")


# -- pipeline ---------------------------------------------------------------------------------
@cli.group()
def pipeline() -> None:
    """Multi-stage pre-training pipelines."""


@pipeline.command("offline-clustering")
@click.argument("config_path", type=click.Path(dir_okay=False))
@set_option
@click.option("--run-dir", type=click.Path(file_okay=False), help="default: <base.out_dir>/<base.name>")
@click.option("--resume", is_flag=True, help="continue at the first unfinished stage or expert")
@click.option("--expert", type=int, help="train only expert K of a divided pipeline (one job per expert)")
@click.option("--until", type=click.Choice(STAGES), default="distill", show_default=True, help="stop after this stage")
@click.option("--eval/--no-eval", "then_eval", default=True, show_default=True, help="evaluate the student when done")
def offline_clustering(config_path: str, overrides: tuple[str, ...], run_dir: str | None, resume: bool,
                       expert: int | None, until: str, then_eval: bool) -> None:
    """Base -> divide -> experts -> distill (paper Sec. 3); the folder ends up an evaluable run.

    Under torchrun (RANK, WORLD_SIZE) the processes share the experts; see docs/offline-clustering.md.
    """
    from imbssl.pipelines.evaluate import evaluate_run
    from imbssl.pipelines.offline_clustering import Shard, run_pipeline
    from imbssl.pipelines.pretrain import BACKBONE_FILE

    cfg = load_config(config_path, overrides, schema=OfflineClusteringConfig)
    root = run_pipeline(cfg, Path(run_dir) if run_dir else Path(cfg.base.out_dir) / cfg.base.name, resume, expert,
                        until)
    click.echo(f"pipeline folder: {root}")
    if then_eval and Shard.from_env().rank == 0 and (root / BACKBONE_FILE).exists():
        _echo_eval(evaluate_run(root))


# -- reproduce / demo ---------------------------------------------------------------------------
@cli.group()
def reproduce() -> None:
    """Reproduce a paper's table with one command."""


def _load_grid(experiment: str, schema: type[BaseModel], preset: str, overrides: tuple[str, ...],
               data_path: str | None) -> BaseModel:
    """``experiment``'s preset with --data and --set applied, validated as ``schema``."""
    from imbssl.recipes import load_preset

    tree = load_preset(experiment, preset)
    if data_path:
        tree = deep_merge(tree, {"base": {"data": {"path": data_path}}})
    tree = deep_merge(tree, parse_overrides(overrides))
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid {experiment} preset {preset!r}: {err}") from None


def _command_line() -> str:
    return "imbssl " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _grid_options(experiment: str) -> Callable[[Callable], Callable]:
    """--preset, --set, --out and --data of a ``reproduce`` command; reports go to reports/EXPERIMENT-PRESET."""
    options = [
        click.option("--preset", type=click.Choice(["demo", "cpu", "paper"]), default="demo", show_default=True),
        set_option,
        click.option("--out", type=click.Path(file_okay=False),
                     help=f"report folder (default reports/{experiment}-PRESET)"),
        click.option("--data", "data_path", type=click.Path(), help="data archive or folder (sets base.data.path)"),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def _experiment_1(preset: str, overrides: tuple[str, ...], out: str | None, data_path: str | None) -> Path:
    from imbssl.recipes.experiment_1 import Experiment1Config, run_grid, write_report

    exp = _load_grid("experiment-1", Experiment1Config, preset, overrides, data_path)
    out_dir = Path(out or f"reports/experiment-1-{preset}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_report(exp, run_grid(exp, out_dir), out_dir, _command_line())


@reproduce.command("experiment-1")
@_grid_options("experiment-1")
def reproduce_experiment_1(preset: str, overrides: tuple[str, ...], out: str | None, data_path: str | None) -> None:
    """Table 2: SimCLR and SimSiam on imbalanced vs balanced CIFAR-10 subsets."""
    table = _experiment_1(preset, overrides, out, data_path)
    click.echo(table.read_text())
    click.echo(f"report: {table.parent}")


@reproduce.command("excb")
@_grid_options("excb")
def reproduce_excb(preset: str, overrides: tuple[str, ...], out: str | None, data_path: str | None) -> None:
    """ExCB, ExCB without balancing and DINO centring on CIFAR-10-LT p=100, p=10 and rs.12K; a K ablation."""
    from imbssl.recipes.excb import ExcbExperimentConfig, run_experiment

    exp = _load_grid("experiment-excb", ExcbExperimentConfig, preset, overrides, data_path)
    table = run_experiment(exp, Path(out or f"reports/excb-{preset}"), _command_line())
    click.echo(table.read_text())
    click.echo(f"report: {table.parent}")


@reproduce.command("experiment-2")
@_grid_options("experiment-2")
@click.option("--baselines-from", type=click.Path(file_okay=False),
              help="an experiment-1 report folder of the same preset: its runs are the baselines (missing ones are "
                   "trained there)")
def reproduce_experiment_2(preset: str, overrides: tuple[str, ...], out: str | None, data_path: str | None,
                           baselines_from: str | None) -> None:
    """Table 3: SimSiam+C+D and SimSiam+D (offline clustering) against the SimCLR and SimSiam baselines."""
    from imbssl.recipes.experiment_2 import Experiment2Config, run_experiment, write_report

    exp = _load_grid("experiment-2", Experiment2Config, preset, overrides, data_path)
    out_dir = Path(out or f"reports/experiment-2-{preset}")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = run_experiment(exp, out_dir, Path(baselines_from) if baselines_from else None)
    table = write_report(exp, records, out_dir, _command_line())
    click.echo(table.read_text())
    click.echo(f"report: {out_dir}")


@cli.command()
@set_option
@click.option("--out", type=click.Path(file_okay=False), default="reports/demo", show_default=True)
def demo(overrides: tuple[str, ...], out: str) -> None:
    """Experiment I on scikit-learn's digits: a few minutes on a laptop CPU."""
    table = _experiment_1("demo", overrides, out, None)
    click.echo(table.read_text())
    click.echo(f"report: {table.parent} (table.md, distributions.png, per_class_accuracy-*.png, runs/)")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except (ConfigError, DataError, FileNotFoundError, NonFiniteLossError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
