"""Training images that stay on disk: memory-mapped rows served batch by batch to the device.

The decode-once cache keeps a split as a uint8 NHWC ``.npy`` memory map (``cache.py``). A dataset that
fits the device is copied there once (``train.data_on_device: true``). One that does not stays where it
is: each batch's rows are read by index, in file order, transposed to NCHW into a (pinned, on a GPU) host
buffer and copied to the device without blocking. The views (random-resized crop, jitter and the rest) then
run batched on the device as for in-memory data, so the two paths give the same batches for the same seed.

An epoch's batches are known when it starts, so a background thread reads them ahead of the step
(``train.prefetch_batches``, 2 by default): while the device computes step i, the thread reads batch i + 1
and i + 2 into buffers of their own. The batches come in the epoch's order, whatever the thread's timing;
a failed read stops the run with one line. Under torchrun each process reads its own rows of each global
batch, and no other image.
"""
from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from imbssl.data.sources import DataError

log = logging.getLogger(__name__)

#: auto keeps the images on the device while they fill at most this share of its free memory
DEVICE_SHARE = 0.25
#: rows read per chunk where the whole set is walked (channel statistics, the copy to the device)
CHUNK_ROWS = 1024
#: seconds the reader waits at a time for room in its queue before it checks whether the epoch was stopped
POLL_S = 0.1
#: seconds an epoch's end waits for the reader thread to finish its read
JOIN_S = 60.0


class StreamedImages:
    """Rows ``rows`` of the uint8 NHWC array ``source`` (a memory map), as the engine reads training images:
    ``len``, ``shape`` (N, C, H, W), ``device``, ``images[indices]`` -> a uint8 NCHW batch on the device,
    ``split(size)``, and ``read_ahead(batches)``, which reads batches in a background thread.

    ``prefetch_batches``: how many batches ``read_ahead`` reads ahead of the one in use (0: each batch is read
    when it is asked for). ``rows_read`` counts the images read for training, to show what each process reads."""

    def __init__(self, source: np.ndarray, rows: np.ndarray, device: torch.device | str,
                 prefetch_batches: int = 2) -> None:
        self.source, self.rows, self.device = source, np.asarray(rows, dtype=np.int64), _indexed(device)
        height, width, channels = source.shape[1:]
        self.shape = torch.Size((len(self.rows), channels, height, width))
        self.prefetch_batches, self.rows_read = prefetch_batches, 0
        self.file = RowFile.behind(source)  # None: an array in memory, indexed
        self.pinned = self.device.type == "cuda"
        # Pinned buffers written in turn: the one in use, the ones read ahead, and the one whose copy to the
        # device may still run; each is overwritten only once that copy has finished.
        self._buffers: list[Tensor] = [torch.empty(0, dtype=torch.uint8)] * (prefetch_batches + 2)
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._buffers)
        self._turns = 0  # batches read by indexing, whose buffers take turns as read_ahead's do

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: Tensor | np.ndarray | list[int] | slice) -> Tensor:
        if isinstance(indices, slice):
            positions = np.arange(len(self))[indices]
        else:
            positions = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
            if positions.ndim != 1:
                raise TypeError(f"StreamedImages takes a slice or a 1-D list of indices, not {indices!r}")
        turn, self._turns = self._turns, self._turns + 1
        return self._to_device(self._host_batch(positions, turn), turn)

    def read_ahead(self, batches: list[Tensor]) -> Iterator[Tensor]:
        """``self[indices]`` for each of ``batches`` in turn, read ``prefetch_batches`` ahead by a background
        thread while the caller computes. Close the iterator (``contextlib.closing``) to stop the thread early."""
        positions = _on_host(batches)
        if self.prefetch_batches == 0:
            for turn, where in enumerate(positions):
                yield self._to_device(self._host_batch(where, turn), turn)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stopped = threading.Event()
        reader = threading.Thread(target=self._read, args=(positions, ready, stopped), name="imbssl-reader",
                                  daemon=True)
        reader.start()
        try:
            for turn in range(len(positions)):
                batch = ready.get()
                if isinstance(batch, BaseException):
                    raise DataError(f"reading training images from {self._file()} failed: "
                                    f"{type(batch).__name__}: {batch}") from batch
                yield self._to_device(batch, turn)
        finally:
            stopped.set()
            reader.join(JOIN_S)
            if reader.is_alive():  # a read that hangs (a lost network file system): the daemon thread is left
                log.warning("the image reader thread is still in a read after %.0f s; leaving it", JOIN_S)

    def _read(self, positions: list[np.ndarray], ready: queue.Queue, stopped: threading.Event) -> None:
        """The reader thread: each batch into its buffer, then into ``ready``; an error goes there instead. It stops
        once ``stopped`` is set, whether or not the queue has room."""
        def hand_over(item: Tensor | BaseException) -> None:
            while not stopped.is_set():
                try:
                    return ready.put(item, timeout=POLL_S)
                except queue.Full:
                    continue

        try:
            for turn, where in enumerate(positions):
                if stopped.is_set():
                    return
                hand_over(self._host_batch(where, turn))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it as one line
            hand_over(err)

    def split(self, size: int) -> Iterator[Tensor]:
        for start in range(0, len(self), size):
            yield self[start:start + size]

    def host_rows(self, positions: np.ndarray) -> np.ndarray:
        """The images at ``positions`` (into this set), NCHW on the host; read in file order, then put back."""
        rows = self.rows[positions]
        order = np.argsort(rows, kind="stable")
        batch = np.empty((len(rows), *self.source.shape[1:]), dtype=np.uint8)
        if self.file is None:
            batch[order] = self.source[rows[order]]
        else:
            in_file_order = np.empty_like(batch)
            self.file.read(rows[order], in_file_order)
            batch[order] = in_file_order
        return batch.transpose(0, 3, 1, 2)

    def host_chunks(self, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """Every image once, NHWC on the host, ``size`` rows at a time."""
        for start in range(0, len(self), size):
            yield self.source[np.sort(self.rows[start:start + size])]

    def _host_batch(self, positions: np.ndarray, turn: int) -> Tensor:
        """The images at ``positions``, NCHW in host memory: on a GPU in pinned buffer ``turn`` of the ring, once
        the copy out of it has finished (the non-blocking copy of one batch may still run while the next is read)."""
        batch = self.host_rows(positions)
        self.rows_read += len(positions)
        if not self.pinned:
            return torch.from_numpy(np.ascontiguousarray(batch))
        slot = turn % len(self._buffers)
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        if self._buffers[slot].shape[0] < len(batch):  # batches of one size, give or take tensor_split's row
            self._buffers[slot] = torch.empty(batch.shape, dtype=torch.uint8).pin_memory()
        buffer = self._buffers[slot][:len(batch)]
        buffer.numpy()[...] = batch  # the transpose to NCHW happens in this one copy
        return buffer

    def _to_device(self, batch: Tensor, turn: int = 0) -> Tensor:
        if not self.pinned:
            return batch.to(self.device)
        slot = turn % len(self._buffers)
        with torch.cuda.device(self.device):  # the event must be on the stream the copy runs on
            out = batch.to(self.device, non_blocking=True)
            self._copied[slot] = torch.cuda.Event()
            self._copied[slot].record(torch.cuda.current_stream(self.device))
        return out

    def _file(self) -> str:
        return getattr(self.source, "filename", None) or "memory"


class RowFile:
    """The rows of a memory-mapped uint8 array read with ``os.preadv``: each run of consecutive rows in one system
    call, straight into the batch, and no other byte. The descriptor has the kernel's read-ahead off
    (POSIX_FADV_RANDOM): an epoch reads rows in no order, and a page fault on the map would read up to the disk's
    read_ahead_kb (8 MB on this project's machines) of other images around each one, where MADV_RANDOM would read
    each 4 KB page in a fault of its own, 9x slower at 224 px (docs/benchmarks.md)."""

    def __init__(self, path: str, first_row_at: int, row_bytes: int) -> None:
        self.row_bytes, self.first_row_at = row_bytes, first_row_at
        self.fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        weakref.finalize(self, os.close, self.fd)

    @classmethod
    def behind(cls, array: np.ndarray) -> "RowFile | None":
        """The file of ``array``, a C-contiguous np.memmap or a view of one (where its first row lies in the file: the
        map starts at np.memmap's page-aligned offset); None for an array in memory."""
        owner = array
        while owner is not None and not isinstance(getattr(owner, "_mmap", None), mmap.mmap):
            owner = getattr(owner, "base", None)
        if owner is None or not array.flags.c_contiguous or not getattr(owner, "filename", None):
            return None
        mapped_at = np.frombuffer(owner._mmap, dtype=np.uint8).ctypes.data
        map_start = owner.offset - owner.offset % mmap.ALLOCATIONGRANULARITY
        return cls(owner.filename, map_start + array.ctypes.data - mapped_at, array[0].nbytes)

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows ``rows`` (ascending) into ``out``: consecutive rows in one read."""
        runs = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, stop in zip([0, *runs], [*runs, len(rows)]):
            want = (stop - start) * self.row_bytes
            got = os.preadv(self.fd, [memoryview(out[start:stop]).cast("B")],
                            self.first_row_at + int(rows[start]) * self.row_bytes)
            if got != want:
                raise OSError(f"read {got} of {want} bytes: the file is shorter than its rows")


def _on_host(batches: list[Tensor]) -> list[np.ndarray]:
    """Batches of indices as host arrays, in one device-to-host copy for them all (one sync an epoch)."""
    if not batches:
        return []
    flat = torch.cat(batches).cpu().numpy()
    return np.split(flat, np.cumsum([len(b) for b in batches[:-1]]))


def read_batches(images: Tensor | StreamedImages, batches: list[Tensor]) -> Iterator[Tensor]:
    """``images[indices]`` for each of ``batches``, in order: a streamed set's read ahead in a background thread."""
    if isinstance(images, StreamedImages):
        return images.read_ahead(batches)
    return (images[indices] for indices in batches)


def training_images(source: np.ndarray, rows: np.ndarray, device: torch.device,
                    on_device: bool | Literal["auto"], prefetch_batches: int = 2) -> Tensor | StreamedImages:
    """Rows ``rows`` of ``source`` as the trainer reads them: one uint8 NCHW tensor on ``device``, or streamed (read
    ``prefetch_batches`` ahead)."""
    if on_device == "auto":
        on_device = _fits(len(rows) * int(np.prod(source.shape[1:])), device)
    if not on_device:
        log.info("streaming the %d training images (%.1f GB) from %s; free on %s: %s", len(rows),
                 len(rows) * np.prod(source.shape[1:]) / 1e9, getattr(source, "filename", None) or "memory",
                 device, _gigabytes(_free_bytes(device)))
        return StreamedImages(source, rows, device, prefetch_batches)
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
