"""Peak memory and wall time of decoding an image tar into a fresh decode cache, for two copies of imbssl.

Each copy (``--new``, default this checkout's src/, and ``--old``, e.g. a ``git archive HEAD`` copy's src/)
decodes ``--archive`` as an ImageFolder into a fresh temporary cache folder under ``--tmp`` (deleted after), in
a fresh subprocess with that copy first on PYTHONPATH, ``--repeats`` times, alternating. Reported per run: the
wall time of ``load_splits``, the peak RSS of the process (``ru_maxrss``) and its RSS before the decode (the
interpreter and the imports), and a sha256 of the stored arrays (the two copies must store the same bytes).
Markdown table on stdout; JSON with the arguments in --out.

    .venv/bin/python benchmarks/tar_decode.py --old /tmp/old/src
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in the child: decode, then print one JSON line. Reads the stored arrays back only after the timing.
CHILD = """
import hashlib, json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np
from imbssl.config import DataConfig
from imbssl.data import load_splits
import imbssl

archive, tmp = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory(dir=tmp, prefix="tar-decode-") as cache:
    start = time.perf_counter()
    load_splits(DataConfig(source="imagefolder", path=archive, cache_dir=cache))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (entry,) = [p for p in Path(cache).iterdir() if (p / "meta.json").is_file()]
    digest = hashlib.sha256()
    for name in ("images.npy", "labels.npy"):
        digest.update(np.load(entry / name, mmap_mode="r").tobytes())
    rows = len(np.load(entry / "labels.npy"))
print(json.dumps({"code": imbssl.__file__, "seconds": seconds, "rss_before_mib": before / 1024,
                  "peak_rss_mib": peak / 1024, "images": rows, "sha256": digest.hexdigest()}))
"""


def decode(src: Path, archive: Path, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(archive), str(tmp)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared/data/cifar10-jpg.tar.gz")
    parser.add_argument("--old", type=Path, required=True, help="src/ of the copy to compare against")
    parser.add_argument("--new", type=Path, default=ROOT / "src")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"))
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the runs")
    args = parser.parse_args()
    runs = [{"copy": copy, **decode(src, args.archive, args.tmp)}
            for _ in range(args.repeats) for copy, src in (("old", args.old), ("new", args.new))]
    print(f"Archive: {args.archive} ({args.archive.stat().st_size / 2**20:.1f} MiB)\n")
    print("| copy | images | wall s | peak RSS MiB | RSS before decode MiB | sha256 of stored arrays |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['copy']} | {run['images']:,} | {run['seconds']:.1f} | {run['peak_rss_mib']:.0f} | "
              f"{run['rss_before_mib']:.0f} | {run['sha256'][:12]} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
