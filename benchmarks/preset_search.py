"""The search behind the CPU preset: SimSiam on balanced rs.12K CIFAR-10, linear top-1 against pre-training time.

Each variant is one ``imbssl pretrain`` run (the library's own pipeline) of experiment I's ``cpu`` preset,
SimSiam on rs.12K at seed 0, with the variant's ``KEY=VALUE`` changes on top; ``--eval-at`` epochs also keep
that epoch's checkpoint and evaluate it with experiment I's protocol, which gives the accuracy-vs-epochs curve
*within* one cosine schedule. One JSON line per evaluation goes to ``--out``. Finished variants are skipped,
interrupted ones resumed.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/preset_search.py \
        --data ../shared/data/cifar10-jpg.tar.gz --set optim.epochs=8 \
        --variant e8-lr03 optim.base_lr=0.03 --variant e8-lr12 optim.base_lr=0.12
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from imbssl.config import build_config, deep_merge, parse_overrides
from imbssl.engine.checkpoint import load_safe, save_atomic
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.pipelines.evaluate import EVAL_FILE, evaluate_run
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.recipes import load_preset
from imbssl.records import EvalRecord, PretrainRecord


def preset_run(data: str, cache_dir: str) -> dict:
    """Experiment I's cpu preset, as its grid would run SimSiam on rs.12K at seed 0."""
    preset = load_preset("experiment-1", "cpu")
    return deep_merge(preset["base"], {
        "name": "search", "seed": 0, "method": {"name": "simsiam"},
        "optim": preset.get("method_settings", {}).get("simsiam", {}).get("optim", {}),
        "data": {"path": data, "cache_dir": cache_dir, "subset": {"profile": "balanced", "imbalance": 100}}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache-dir", default=".cache/imbssl")
    parser.add_argument("--root", default="runs/preset-search")
    parser.add_argument("--out", default="benchmarks/results/preset-search.jsonl")
    parser.add_argument("--set", dest="common", action="append", default=[], help="KEY=VALUE for every variant")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"))
    parser.add_argument("--eval-at", type=int, nargs="*", default=[], help="also evaluate after these epochs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name, *pairs in args.variant:
        tree = deep_merge(preset_run(args.data, args.cache_dir), parse_overrides(args.common))
        tree = deep_merge(tree, parse_overrides(pairs))
        run_variant(name, build_config(tree, origin=f"variant {name}"), Path(args.root) / name, args)


def run_variant(name: str, cfg, run_dir: Path, args: argparse.Namespace) -> None:
    if (run_dir / EVAL_FILE).exists():
        return
    snapshots, started, wall_at = run_dir / "snapshots", time.perf_counter(), {}

    def snapshot(epoch: int, summary: dict) -> None:
        """The trainer has just saved this epoch's checkpoint (checkpoint_every=1): keep a copy of it."""
        if epoch in args.eval_at and epoch < cfg.optim.epochs:
            snapshots.mkdir(exist_ok=True)
            shutil.copyfile(run_dir / CHECKPOINT_FILE, snapshots / f"epoch{epoch}.pt")
            wall_at[epoch] = time.perf_counter() - started

    pretrain(cfg, run_dir, resume=True, callbacks=[snapshot])
    trained = PretrainRecord.read(run_dir)
    final = load_safe(run_dir / BACKBONE_FILE)
    for path in sorted(snapshots.glob("epoch*.pt"), key=lambda p: int(p.stem[5:])) if snapshots.exists() else []:
        folder = snapshots / path.stem
        folder.mkdir(exist_ok=True)
        for file in ("config.yaml", "subset.npz"):
            shutil.copyfile(run_dir / file, folder / file)
        method = load_safe(path)["method"]
        backbone = {k.removeprefix("backbone."): v for k, v in method.items() if k.startswith("backbone.")}
        save_atomic({"backbone": backbone, "mean": final["mean"], "std": final["std"]}, folder / BACKBONE_FILE)
        record(args.out, name, cfg, int(path.stem[5:]), evaluate_run(folder), wall_at.get(int(path.stem[5:])), trained)
    record(args.out, name, cfg, cfg.optim.epochs, evaluate_run(run_dir), trained.wall_s_this_call, trained)


def record(out: str, name: str, cfg, epoch: int, result: EvalRecord, wall_s: float | None,
           pretrain: PretrainRecord) -> None:
    line = {"variant": name, "epoch": epoch, "epochs": cfg.optim.epochs, "linear_top1": result.linear.top1,
            "knn20_top1": result.knn[20].top1, "pretrain_wall_s": wall_s,
            "images_per_s": pretrain.images_per_s, "hardware": pretrain.hardware,
            "config": {"model": cfg.model.model_dump(), "optim": cfg.optim.model_dump(),
                       "method": cfg.method.model_dump(), "train": cfg.train.model_dump()}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    print(json.dumps({k: line[k] for k in ("variant", "epoch", "linear_top1", "knn20_top1", "pretrain_wall_s")}),
          flush=True)


if __name__ == "__main__":
    main()
