"""The streaming path (train.data_on_device: false): memory-mapped batches equal the in-memory ones."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imbssl.augment import channel_stats
from imbssl.data import StreamedImages, training_images
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
    for on_device in (True, False):
        runs.append(pretrain(tiny_cfg(method=method, optim={"epochs": 2}, train={"data_on_device": on_device}),
                             tmp_path / str(on_device)))
        assert bool(reads) != on_device  # the False run really streamed, the True one did not
    a, b = (load_safe(run / BACKBONE_FILE)["backbone"] for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


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
