"""The streaming path (train.data_on_device: false): memory-mapped batches equal the in-memory ones."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from imbssl.augment import channel_stats
from imbssl.data import DataError, StreamedImages, training_images
from imbssl.data import stream
from imbssl.engine.checkpoint import load_safe
from imbssl.pipelines.common import normalizer_for
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.pipelines.train import MODEL_FILE, TRAIN_FILE, train


@pytest.fixture
def memmap(tmp_path):
    """A uint8 NHWC memory map of 50 random 6x5 RGB images, as the decode cache writes it."""
    images = np.random.default_rng(0).integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    return np.load(tmp_path / "images.npy", mmap_mode="r")


def test_streamed_rows_equal_the_in_memory_tensor(memmap):
    rows = np.random.default_rng(1).permutation(50)[:31]  # a subset, in no order
    in_memory = training_images(memmap, rows, torch.device("cpu"), on_device=True)
    streamed = training_images(memmap, rows, torch.device("cpu"), on_device=False)
    assert isinstance(streamed, StreamedImages) and isinstance(in_memory, torch.Tensor)
    assert streamed.shape == in_memory.shape == (31, 3, 6, 5) and len(streamed) == 31
    batch = torch.tensor([30, 2, 2, 17, 0, 5])  # unsorted, with a repeat: a batch index as the trainer draws it
    assert torch.equal(streamed[batch], in_memory[batch]) and streamed[batch].is_contiguous()
    assert torch.equal(streamed[3:9], in_memory[3:9]) and torch.equal(streamed[[4, 1]], in_memory[[4, 1]])
    assert torch.equal(streamed[np.array([7])], in_memory[7:8])
    assert torch.equal(streamed[::-5], in_memory[list(range(30, -1, -5))])
    with pytest.raises(TypeError, match="a slice or a 1-D list of indices"):
        streamed[3]
    assert all(torch.equal(a, b) for a, b in zip(streamed.split(8), in_memory.split(8)))
    assert [len(c) for c in streamed.split(8)] == [8, 8, 8, 7]
    from_disk, from_memory = normalizer_for(streamed), normalizer_for(in_memory)
    assert torch.equal(from_disk.mean, from_memory.mean) and torch.equal(from_disk.std, from_memory.std)
    assert torch.equal(from_disk.mean.flatten(), channel_stats(memmap[rows])[0])


def test_auto_streams_what_would_fill_more_than_a_quarter_of_free_memory(memmap, monkeypatch):
    rows = np.arange(50)
    nbytes = 50 * 6 * 5 * 3
    monkeypatch.setattr(stream, "_free_bytes", lambda device: 4 * nbytes)
    assert isinstance(training_images(memmap, rows, torch.device("cpu"), "auto"), torch.Tensor)
    monkeypatch.setattr(stream, "_free_bytes", lambda device: 4 * nbytes - 1)
    assert isinstance(training_images(memmap, rows, torch.device("cpu"), "auto"), StreamedImages)


def test_read_ahead_gives_the_batches_in_order_with_bounded_buffers(memmap):
    """The same batches in the same order, whatever the reader thread's lead; it reads ``prefetch_batches`` ahead and
    no further, and stops when the epoch is left early."""
    rows = np.random.default_rng(2).permutation(50)[:40]
    in_memory = training_images(memmap, rows, torch.device("cpu"), on_device=True)
    batches = list(torch.randperm(40, generator=torch.Generator().manual_seed(0)).tensor_split(7))
    for ahead in (0, 1, 2, 5):
        streamed = StreamedImages(memmap, rows, "cpu", prefetch_batches=ahead)
        got = list(streamed.read_ahead(batches))
        assert len(got) == 7 and all(torch.equal(g, in_memory[b]) for g, b in zip(got, batches))
        assert streamed.rows_read == 40
    streamed = StreamedImages(memmap, rows, "cpu", prefetch_batches=2)
    reader = streamed.read_ahead(batches)
    next(reader)
    deadline = time.monotonic() + 10
    while streamed.rows_read < sum(len(b) for b in batches[:4]) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time to read further, had it been unbounded
    # one batch taken, two waiting in the queue, one read and waiting for room
    assert streamed.rows_read == sum(len(b) for b in batches[:4])
    reader.close()
    assert not any(t.name == "imbssl-reader" for t in threading.enumerate())


def test_a_failed_read_stops_the_epoch_with_one_line(memmap, tmp_path, monkeypatch):
    reads, pread = [], os.preadv

    def failing(fd, buffers, offset):  # the third read fails, as a disk error would
        reads.append(offset)
        if len(reads) == 3:
            raise OSError(5, "Input/output error")
        return pread(fd, buffers, offset)

    monkeypatch.setattr(stream.os, "preadv", failing)
    batches = list(torch.arange(50).tensor_split(5))  # runs of consecutive rows: one read a batch
    reader = StreamedImages(memmap, np.arange(50), "cpu").read_ahead(batches)
    assert len(next(reader)) == 10 and len(next(reader)) == 10
    with pytest.raises(DataError) as err:
        next(reader)
    assert str(err.value) == (f"reading training images from {tmp_path / 'images.npy'} failed: "
                              "OSError: [Errno 5] Input/output error")
    assert not any(t.name == "imbssl-reader" for t in threading.enumerate())


def test_rows_are_read_from_the_file_alone_each_run_in_one_read(memmap, monkeypatch):
    """An epoch's rows are read with pread, consecutive rows in one call and no other byte (a page fault on the map
    would read megabytes of other images around each); a view of the map reads from its own first row on."""
    reads, pread = [], os.preadv
    monkeypatch.setattr(stream.os, "preadv", lambda fd, buffers, offset: reads.append(
        (offset, sum(memoryview(b).nbytes for b in buffers))) or pread(fd, buffers, offset))
    row = 6 * 5 * 3
    images = StreamedImages(memmap, np.arange(50), "cpu")
    assert torch.equal(images[torch.tensor([7, 3, 4, 5, 20, 7])], torch.from_numpy(
        np.ascontiguousarray(memmap[[7, 3, 4, 5, 20, 7]].transpose(0, 3, 1, 2))))
    header = memmap.offset
    assert reads == [(header + 3 * row, 3 * row), (header + 7 * row, row), (header + 7 * row, row),
                     (header + 20 * row, row)]
    reads.clear()
    part = StreamedImages(memmap[10:], np.arange(40), "cpu")  # the view's row 0 is the map's row 10
    assert torch.equal(part[2:4], torch.from_numpy(np.ascontiguousarray(memmap[12:14].transpose(0, 3, 1, 2))))
    assert reads == [(header + 12 * row, 2 * row)]
    assert stream.RowFile.behind(np.array(memmap)) is None  # in memory: indexed


def streamed_reads(monkeypatch) -> list[int]:
    """The number of rows each StreamedImages read served, from now on."""
    reads, read = [], StreamedImages.host_rows
    monkeypatch.setattr(StreamedImages, "host_rows", lambda self, positions: reads.append(len(positions))
                        or read(self, positions))
    return reads


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "simsiam"}, {"name": "excb", "proj_hidden": 64, "pred_hidden": 64,
                                                         "num_clusters": 16}])
def test_streamed_pretraining_trains_the_same_model(tiny_cfg, tmp_path, method, monkeypatch):
    """The same seed gives the same views, losses and weights from disk as from memory (ExCB's k-means
    initialisation reads the whole set through ``split``)."""
    reads = streamed_reads(monkeypatch)
    runs = []
    for on_device, ahead in ((True, 2), (False, 0), (False, 2)):  # streamed: read in the step, and read ahead
        runs.append(pretrain(tiny_cfg(method=method, optim={"epochs": 2},
                                      train={"data_on_device": on_device, "prefetch_batches": ahead}),
                             tmp_path / f"{on_device}-{ahead}"))
        assert bool(reads) != on_device  # the False runs really streamed, the True one did not
    first, *others = (load_safe(run / BACKBONE_FILE)["backbone"] for run in runs)
    assert all(torch.equal(first[k], other[k]) for other in others for k in first)


@pytest.mark.slow
def test_streamed_supervised_training_trains_the_same_model(sup_cfg, tmp_path, monkeypatch):
    reads = streamed_reads(monkeypatch)
    runs = []
    for on_device in (True, False):
        runs.append(train(sup_cfg(optim={"epochs": 2, "milestones": [1]}, train={"data_on_device": on_device}),
                          tmp_path / str(on_device)))
        assert bool(reads) != on_device
    a, b = (load_safe(run / MODEL_FILE)["model"] for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((run / TRAIN_FILE).read_text()) for run in runs]
    assert results[0]["test"] == results[1]["test"]
