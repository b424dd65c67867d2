"""k-means engines: faiss and torch (imbssl.cluster.kmeans) against scikit-learn's KMeans.

    real        the base features of CIFAR-10-LT: a run folder's backbone applied to its own training
                images (--run, e.g. a pipeline's base/ folder), or features saved as .npy (--features)
    synthetic   --synthetic N x D points (default 1,000,000 x 256) around k Gaussian centres

One run per engine with the same k, restarts (--n-init, each seeded by k-means++) and Lloyd
iterations (--niter; scikit-learn may stop earlier at its tolerance). Reported: wall time and the
inertia (sum of squared distances to the assigned centroids), recomputed the same way for every
engine. Markdown table on stdout; JSON with the environment and the arguments in --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from imbssl.cluster import kmeans, nearest_centroid
from imbssl.pipelines.common import describe_hardware
from imbssl.pipelines.divide import run_features
from imbssl.pipelines.evaluate import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """Gaussian blobs: unit-variance noise around k centres drawn with std 2 per coordinate."""
    rng = np.random.default_rng(seed)
    centres = 2 * rng.standard_normal((k, d), dtype=np.float32)
    points = rng.standard_normal((n, d), dtype=np.float32)
    points += centres[rng.integers(0, k, n)]
    return points


def cluster(engine: str, x: np.ndarray, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds, inertia) of one k-means run of ``engine`` on ``x``."""
    start = time.perf_counter()
    if engine == "sklearn":
        centroids = KMeans(args.k, init="k-means++", n_init=args.n_init, max_iter=args.niter,
                           random_state=args.seed).fit(x).cluster_centers_
    else:
        centroids = kmeans(x, args.k, n_init=args.n_init, niter=args.niter, seed=args.seed, engine=engine).centroids
    seconds = time.perf_counter() - start
    sq_dist = nearest_centroid(torch.from_numpy(x), torch.as_tensor(centroids, dtype=torch.float32))[1]
    return seconds, sq_dist.double().sum().item()


def datasets(args: argparse.Namespace) -> dict[str, np.ndarray]:
    data = {}
    if args.run:
        data[f"base features of {args.run}"] = run_features(load_run_config(Path(args.run)), Path(args.run))[0].numpy()
    if args.features:
        data[f"features {args.features}"] = np.load(args.features).astype(np.float32)
    if args.synthetic:
        n, d = (int(v) for v in args.synthetic.lower().split("x"))
        data["synthetic"] = synthetic(n, d, args.k, args.seed)
    return data


def markdown(rows: list[dict]) -> str:
    lines = ["| data | N x D | engine | seconds | inertia | / lowest |", "|---|---|---|---|---|---|"]
    for r in rows:
        lowest = min(o["inertia"] for o in rows if o["data"] == r["data"])
        lines.append(f"| {r['data']} | {r['n']:,} x {r['d']} | {r['engine']} | {r['seconds']:.3f} | "
                     f"{r['inertia']:.6g} | {r['inertia'] / lowest:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder (config.yaml, subset.npz, backbone.pt): its base features")
    parser.add_argument("--features", help="an .npy file of features [N, D]")
    parser.add_argument("--synthetic", default="1000000x256", help="NxD synthetic points; '' for none")
    parser.add_argument("--engines", default="faiss,torch,sklearn", help="comma-separated")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--n-init", type=int, default=10, help="restarts, the lowest inertia kept")
    parser.add_argument("--niter", type=int, default=50, help="Lloyd iterations per restart (sklearn: at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/kmeans-<date>.json)")
    args = parser.parse_args()

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "hardware": describe_hardware(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
           "torch": torch.__version__}
    print(f"# k-means, {env['date']} | {env['hardware']} | k={args.k}, "
          f"{args.n_init} restarts x {args.niter} iterations")
    rows = []
    for name, x in datasets(args).items():
        for engine in args.engines.split(","):
            print(f"  {name}: {engine} ...", file=sys.stderr, flush=True)
            seconds, inertia = cluster(engine, x, args)
            rows.append({"data": name, "n": len(x), "d": x.shape[1], "engine": engine, "seconds": seconds,
                         "inertia": inertia})
    print(markdown(rows))
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kmeans-{env['date'][:10]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "args": vars(args), "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
