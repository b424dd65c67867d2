"""Training images that stay on disk: memory-mapped rows served batch by batch to the device.

The decode-once cache keeps a split as a uint8 NHWC ``.npy`` memory map (``cache.py``). A dataset that
fits the device is copied there once (``train.data_on_device: true``). One that does not stays where it
is: each batch's rows are read by index, in file order, transposed to NCHW into a pinned host buffer and
copied to the device without blocking. The views (random-resized crop, jitter and the rest) then run
batched on the device as for in-memory data, so the two paths give the same batches for the same seed.

There is no loader thread, and the read does not overlap the device's work: the trainer's batch indices
live on the device, and reading them on the host waits for the previous step's kernels. A GPU measurement
(benchmarks/gpu_check.sh) is to say whether a prefetching thread is worth its complexity.
"""
from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: auto keeps the images on the device while they fill at most this share of its free memory
DEVICE_SHARE = 0.25
#: rows read per chunk where the whole set is walked (channel statistics, the copy to the device)
CHUNK_ROWS = 1024


class StreamedImages:
    """Rows ``rows`` of the uint8 NHWC array ``source`` (a memory map), as the engine reads training images:
    ``len``, ``shape`` (N, C, H, W), ``device``, ``images[indices]`` -> a uint8 NCHW batch on the device,
    and ``split(size)``."""

    def __init__(self, source: np.ndarray, rows: np.ndarray, device: torch.device | str) -> None:
        self.source, self.rows, self.device = source, np.asarray(rows, dtype=np.int64), _indexed(device)
        height, width, channels = source.shape[1:]
        self.shape = torch.Size((len(self.rows), channels, height, width))
        self.pinned = self.device.type == "cuda"
        self._buffers: list[Tensor] = []  # two pinned buffers of the largest batch so far, written in turn
        self._copied: list[torch.cuda.Event | None] = [None, None]  # when each buffer's last copy finished
        self._turn = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: Tensor | np.ndarray | list[int] | slice) -> Tensor:
        if isinstance(indices, slice):
            positions = np.arange(len(self))[indices]
        else:
            positions = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
            if positions.ndim != 1:
                raise TypeError(f"StreamedImages takes a slice or a 1-D list of indices, not {indices!r}")
        return self._to_device(self.host_rows(positions))

    def split(self, size: int) -> Iterator[Tensor]:
        for start in range(0, len(self), size):
            yield self[start:start + size]

    def host_rows(self, positions: np.ndarray) -> np.ndarray:
        """The images at ``positions`` (into this set), NCHW on the host; read in file order, then put back."""
        rows = self.rows[positions]
        order = np.argsort(rows, kind="stable")
        batch = np.empty((len(rows), *self.source.shape[1:]), dtype=np.uint8)
        batch[order] = self.source[rows[order]]
        return batch.transpose(0, 3, 1, 2)

    def host_chunks(self, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """Every image once, NHWC on the host, ``size`` rows at a time."""
        for start in range(0, len(self), size):
            yield self.source[np.sort(self.rows[start:start + size])]

    def _to_device(self, batch: np.ndarray) -> Tensor:
        if not self.pinned:
            return torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        # A pinned buffer is overwritten only once the copy out of it has finished: the non-blocking copy
        # of one batch may still be running while the next one is read.
        turn, self._turn = self._turn, 1 - self._turn
        if len(self._buffers) < 2:
            self._buffers = [torch.empty(0, dtype=torch.uint8).pin_memory() for _ in range(2)]
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        if self._buffers[turn].shape[0] < len(batch):  # batches of one size, give or take tensor_split's row
            self._buffers[turn] = torch.empty(batch.shape, dtype=torch.uint8).pin_memory()
        buffer = self._buffers[turn][:len(batch)]
        buffer.numpy()[...] = batch  # the transpose to NCHW happens in this one copy
        with torch.cuda.device(self.device):  # the event must be on the stream the copy runs on
            out = buffer.to(self.device, non_blocking=True)
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record(torch.cuda.current_stream(self.device))
        return out


def training_images(source: np.ndarray, rows: np.ndarray, device: torch.device,
                    on_device: bool | Literal["auto"]) -> Tensor | StreamedImages:
    """Rows ``rows`` of ``source`` as the trainer reads them: one uint8 NCHW tensor on ``device``, or streamed."""
    if on_device == "auto":
        on_device = _fits(len(rows) * int(np.prod(source.shape[1:])), device)
    if not on_device:
        log.info("streaming the %d training images (%.1f GB) from %s; free on %s: %s", len(rows),
                 len(rows) * np.prod(source.shape[1:]) / 1e9, getattr(source, "filename", None) or "memory",
                 device, _gigabytes(_free_bytes(device)))
        return StreamedImages(source, rows, device)
    height, width, channels = source.shape[1:]
    images = torch.empty((len(rows), channels, height, width), dtype=torch.uint8, device=device)
    for start in range(0, len(rows), CHUNK_ROWS):  # in chunks: no second whole copy on the host
        chunk = torch.from_numpy(np.ascontiguousarray(source[rows[start:start + CHUNK_ROWS]]))
        images[start:start + CHUNK_ROWS] = chunk.permute(0, 3, 1, 2).to(device)
    return images


def _fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fill at most DEVICE_SHARE of the device's free memory."""
    free = _free_bytes(device)
    return free is None or nbytes <= DEVICE_SHARE * free


def _indexed(device: torch.device | str) -> torch.device:
    """``cuda`` as the GPU it means now (``cuda:0`` ...), so that the run's files name one device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _gigabytes(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 1e9:.1f} GB"


def _free_bytes(device: torch.device) -> int | None:
    """Free device memory (for the CPU, the RAM the kernel says is available, page cache included); None where it
    cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return None
        kib = next((line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
        return int(kib) * 1024 if kib else None
    return None
