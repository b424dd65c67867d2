"""Streamed training (``train.data_on_device: false``): what each process reads, and whether reads overlap the step.

Every figure comes from real ``imbssl`` training (``pipelines.pretrain.train_method``: SimSiam, the small CNN, the
engine's views) on uint8 NHWC memory maps of random images, written once per size into ``--work``:

    img/s           the timed epoch's images per second (the global batch's, as the trainer counts them)
    MB read         bytes this process read of the images in that epoch: copied out of the memory map (counted by
                    the map itself) and read by system calls (/proc/self/io rchar; imbssl reads rows with pread)
    MB from disk    bytes the kernel read from storage for this process in that epoch (/proc/self/io read_bytes)
    read ms/batch   (``--read-alone``) one batch read from the map with no training: its rows, then NCHW

``--code`` names source trees to compare in one run (``name=path/to/src``, e.g. ``before=/tmp/old/src``): each
configuration runs in fresh processes (``RANK``/``WORLD_SIZE`` set as torchrun sets them) with that tree on
PYTHONPATH. ``cold`` drops the map's pages from the page cache before each epoch (madvise + posix_fadvise
DONTNEED), so every read is a disk read; ``warm`` leaves them cached. Epoch 1 warms up; epoch 2 is reported.
Processes on one machine share its page cache, so which of them reads a page from disk is chance; ``--private``
gives each process its own copy of the map, as processes on separate nodes have, so that "MB from disk" is what
each process alone makes its disk read.
Run ``python benchmarks/stream_reads.py --help``; results in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class CountingMap(np.ndarray):
    """A memory map that counts the bytes each index-array read copies out of it."""

    copied = 0

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if isinstance(key, np.ndarray):
            CountingMap.copied += out.nbytes
        return out


def io_count(field: str = "read_bytes") -> int:
    """/proc/self/io's ``field``: read_bytes (from storage) or rchar (by read system calls)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/io")


def drop_cached(source: np.memmap, path: Path) -> None:
    """The map's pages out of this process's page tables and out of the page cache (every process calls it, then
    waits for the others before the next epoch reads)."""
    import torch.distributed as dist
    source._mmap.madvise(mmap.MADV_DONTNEED)
    if dist.is_initialized():
        dist.barrier()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if dist.is_initialized():
        dist.barrier()


def worker(args: argparse.Namespace) -> None:
    """One process of one configuration: trains ``--epochs`` epochs and writes its figures of the last one."""
    import torch

    from imbssl.config import build_config
    from imbssl.data import StreamedImages, stream
    from imbssl.engine.distributed import process_group, rank
    from imbssl.methods import build_method
    from imbssl.models import build_backbone
    from imbssl.pipelines.common import normalizer_for
    from imbssl.pipelines.pretrain import train_method, view_maker

    torch.set_num_threads(args.threads)
    path = Path(args.map)
    if args.private:
        path = path.with_suffix(f".rank{os.environ.get('RANK', '0')}.npy")
    mapped = np.load(path, mmap_mode="r")
    if args.advice == "normal":  # through the memory map, with the kernel's read-ahead (as code before 2026-12-07)
        stream.RowFile.behind = staticmethod(lambda array: None)
    source = mapped.view(CountingMap)
    cfg = build_config({"name": "bench", "data": {"source": "digits"}, "model": {"backbone": "small_cnn"},
                        "method": {"name": "simsiam"}, "optim": {"batch_size": args.batch_size, "epochs": args.epochs},
                        "train": {"progress": False, "precision": "fp32", "log_every": 1000}})
    rows = np.arange(len(mapped))
    with process_group("cpu", 600):
        if args.mode == "memory":
            images = torch.from_numpy(np.ascontiguousarray(mapped.transpose(0, 3, 1, 2)))
        else:
            images = StreamedImages(source, rows, "cpu", **({} if args.prefetch < 0 else
                                                           {"prefetch_batches": args.prefetch}))
        normalize = normalizer_for(images)
        torch.manual_seed(0)
        method = build_method(cfg.method, build_backbone(cfg.model, in_channels=3))
        epochs: list[dict] = []

        def measure(epoch: int, summary: dict) -> None:
            epochs.append({"images_per_s": summary["images_per_s"],
                           "copied": CountingMap.copied + io_count("rchar") - start[1],
                           "from_disk": io_count() - start[0]})
            if args.cache == "cold":
                drop_cached(mapped, path)
            CountingMap.copied, start[:] = 0, [io_count(), io_count("rchar")]

        if args.cache == "cold":
            drop_cached(mapped, path)
        CountingMap.copied, start = 0, [io_count(), io_count("rchar")]
        with tempfile.TemporaryDirectory() as run_dir:
            train_method(cfg, method, images, view_maker(cfg, method, normalize, images), normalize, Path(run_dir),
                         resume=False, callbacks=[measure])
        Path(f"{args.result}.rank{rank()}").write_text(json.dumps(epochs[-1]))


def read_alone(path: Path, batch_size: int, batches: int) -> dict[str, float]:
    """Milliseconds to read one batch of random rows from the map, NCHW, with nothing else running: from the page
    cache (warm), and from disk (cold: the map's pages dropped first)."""
    sys.path.insert(0, str(ROOT / "src"))
    from imbssl.data import StreamedImages
    mapped = np.load(path, mmap_mode="r")
    images = StreamedImages(mapped, np.arange(len(mapped)), "cpu", prefetch_batches=0)
    order = np.random.default_rng(0).permutation(len(mapped))
    times = {}
    for cache in ("cold", "warm"):  # cold first: the warm pass finds every page cached by it
        if cache == "cold":
            drop_cached(mapped, path)
        start = time.perf_counter()
        for k in range(batches):
            images[order[(k * batch_size) % len(mapped):][:batch_size]]
        times[f"read_ms_per_batch_{cache}"] = (time.perf_counter() - start) / batches * 1000
    return times


def write_map(path: Path, count: int, size: int) -> None:
    if path.exists():
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    rng = np.random.default_rng(size)
    for start in range(0, count, 256):
        out[start:start + 256] = rng.integers(0, 256, out[start:start + 256].shape, dtype=np.uint8)
    out.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(args: argparse.Namespace, src: str, path: Path, mode: str, prefetch: int, cache: str,
               processes: int) -> list[dict]:
    """One configuration in ``processes`` fresh processes; each process's figures."""
    result = Path(tempfile.mkdtemp()) / "result"
    port = free_port()
    procs = []
    for r in range(processes):
        env = {**os.environ, "PYTHONPATH": src, "RANK": str(r), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads)}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--map", str(path), "--mode", mode, "--prefetch", str(prefetch),
             "--cache", cache, "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
             "--threads", str(args.threads), "--result", str(result), "--advice", args.advice,
             *(["--private"] if args.private else [])],
            env=env))
    if any(p.wait() for p in procs):
        raise SystemExit(f"a worker failed: {src} {mode} {cache}")
    return [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=f"after={ROOT / 'src'}", help="name=src,... source trees to compare")
    parser.add_argument("--sizes", default="224", help="image sizes, comma-separated")
    parser.add_argument("--images", default="224=1024", help="images per map: N or size=N,...")
    parser.add_argument("--modes", default="stream", help="memory,stream: in-memory tensor, streamed memory map")
    parser.add_argument("--prefetch", default="-1", help="prefetch_batches of the streamed runs, comma-separated; "
                                                        "-1: the code's default (the only choice of old code)")
    parser.add_argument("--cache", default="cold", help="cold,warm")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--private", action="store_true", help="each process maps its own copy of the images")
    parser.add_argument("--advice", choices=("imbssl", "normal"), default="imbssl",
                        help="imbssl: the rows read as the code reads them (since 2026-12-07 with pread, without "
                             "read-ahead); normal: indexed in the memory map, with the kernel's read-ahead")
    parser.add_argument("--read-alone", action="store_true", help="also time the read of a batch alone")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "stream-bench"), help="where the maps are written")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/stream-reads-<date>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--map", "--mode", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.prefetch = int(args.prefetch)
        return worker(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = dict(item.split("=") for item in args.images.split(",")) if "=" in args.images else {}
    rows = []
    for size in sizes:
        count = int(counts.get(str(size), args.images if not counts else 1024))
        path = Path(args.work) / f"random-{size}px-{count}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_map(path, count, size)
        for r in range(max(int(p) for p in args.processes.split(",")) if args.private else 0):
            copy = path.with_suffix(f".rank{r}.npy")
            if not copy.exists():
                copy.write_bytes(path.read_bytes())
        if args.read_alone:
            rows.append({"size": size, "batch_size": args.batch_size,
                         **read_alone(path, args.batch_size, max(1, count // args.batch_size))})
            print(json.dumps(rows[-1]), flush=True)
        configs = itertools.product(args.code.split(","), args.modes.split(","), args.prefetch.split(","),
                                    args.cache.split(","), [int(p) for p in args.processes.split(",")])
        for code, mode, prefetch, cache, processes in configs:
            if mode == "memory" and (prefetch != args.prefetch.split(",")[0] or cache == "cold"):
                continue  # the in-memory tensor reads no map: once, warm
            name, src = code.split("=")
            stream_code = (Path(src) / "imbssl" / "data" / "stream.py").read_text()
            if prefetch != "-1" and "prefetch_batches" not in stream_code:
                continue  # code from before train.prefetch_batches: its one way only
            per_process = run_config(args, src, path, mode, int(prefetch), cache, processes)
            rows.append({"size": size, "images": count, "code": name, "mode": mode, "prefetch": int(prefetch),
                         "cache": cache, "processes": processes, "per_process": per_process})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"stream-reads-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpu": os.cpu_count(), "rows": rows}, indent=1))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| px | code | mode | prefetch | cache | processes | img/s | MB read per process | MB from disk per "
             "process |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "per_process" not in row:
            continue
        pp = row["per_process"]
        copied = " / ".join(f"{p['copied'] / 1e6:.0f}" for p in pp)
        from_disk = " / ".join(f"{p['from_disk'] / 1e6:.0f}" for p in pp)
        lines.append(f"| {row['size']} | {row['code']} | {row['mode']} | {row['prefetch']} | {row['cache']} | "
                     f"{row['processes']} | {pp[0]['images_per_s']:.0f} | {copied} | {from_disk} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
