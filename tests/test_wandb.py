"""Weights & Biases logging beside TensorBoard (``train.wandb``, docs/scale-out.md): the scalars TensorBoard gets, rank
0 only, the run id kept in the checkpoint so that ``--resume`` continues the same W&B run, and an extra whose absence
is one line before anything is trained."""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from conftest import imbssl
from imbssl.augment import PadCropFlip
from imbssl.config import WandbConfig
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.runlog import WANDB_MISSING, read_metrics
from imbssl.engine.task import StepOutput, TrainingTask
from imbssl.engine.trainer import CHECKPOINT_FILE, Trainer, TrainSettings

STEPS_PER_EPOCH = 3  # 12 images in batches of 4


class Toy(TrainingTask):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        loss = (views[0].mean() * self.weight).square()
        return StepOutput(loss, {"spread": loss.detach() + 1})


class FakeRun:
    def __init__(self, calls: dict, run_id: str | None) -> None:
        self.calls, self.id = calls, run_id or "drawn-id"

    def log(self, data: dict, step: int) -> None:
        self.calls["log"].append((step, dict(data)))

    def finish(self) -> None:
        self.calls["finish"].append(self.id)


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module that records its calls: init's arguments, each log and each finish."""
    calls = {"init": [], "log": [], "finish": []}

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun(calls, kwargs.get("id"))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


def fit_toy(run_dir, epochs: int, resume: bool = False, wandb: WandbConfig = WandbConfig(enabled=True)) -> None:
    settings = TrainSettings(epochs=epochs, batch_size=4, log_every=1, progress=False, wandb=wandb,
                             run_config={"name": "toy", "optim": {"epochs": epochs}})
    toy = Toy()
    images = torch.randint(0, 256, (12, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Trainer(toy, torch.optim.SGD(toy.parameters(), lr=0.1), {"lr": np.full(epochs * STEPS_PER_EPOCH, 0.1)},
            images, PadCropFlip(torch.zeros(1), torch.ones(1), pad=0), run_dir, settings).fit(resume=resume)


def test_wandb_gets_tensorboards_scalars_and_resume_continues_its_run(fake_wandb, tmp_path):
    run = tmp_path / "toy"
    fit_toy(run, epochs=1)
    first = fake_wandb["init"][0]
    assert first["id"] is None and first["resume"] is None  # a fresh run: W&B draws the id
    assert (first["project"], first["entity"], first["mode"], first["dir"], first["name"]) == (
        "imbssl", None, "offline", str(run), "toy")
    assert first["config"] == {"name": "toy", "optim": {"epochs": 1}}
    assert load_safe(run / CHECKPOINT_FILE)["wandb_id"] == "drawn-id"
    assert fake_wandb["finish"] == ["drawn-id"]

    fit_toy(run, epochs=2, resume=True)
    assert fake_wandb["init"][1]["id"] == "drawn-id" and fake_wandb["init"][1]["resume"] == "allow"
    assert fake_wandb["finish"] == ["drawn-id", "drawn-id"]
    assert load_safe(run / CHECKPOINT_FILE)["wandb_id"] == "drawn-id"
    # the same records as metrics.jsonl (which TensorBoard mirrors), step for step
    assert [(step, sorted(data)) for step, data in fake_wandb["log"]] == [
        (r["step"], sorted(k for k in r if k != "step")) for r in read_metrics(run)]
    keys = set().union(*(data for _, data in fake_wandb["log"]))
    assert {"train/loss", "train/spread", "train/lr", "epoch/loss", "epoch/images_per_s"} <= keys
    assert [step for step, data in fake_wandb["log"] if "epoch/loss" in data] == [2, 5]


def test_wandb_is_off_by_default_and_its_keys_unread_then(fake_wandb, tmp_path):
    fit_toy(tmp_path / "toy", epochs=1, wandb=WandbConfig())
    assert fake_wandb == {"init": [], "log": [], "finish": []}
    assert load_safe(tmp_path / "toy" / CHECKPOINT_FILE)["wandb_id"] is None
    assert WandbConfig(project="other").unused_keys() == {"project", "entity", "mode", "dir"}
    assert WandbConfig(enabled=True).unused_keys() == set()


def test_only_rank_0_logs_to_wandb(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.setattr("imbssl.engine.trainer.is_main", lambda: False)
    fit_toy(tmp_path / "toy", epochs=1)
    assert fake_wandb["init"] == [] and fake_wandb["log"] == []


def test_a_grid_reuses_a_finished_run_whatever_train_wandb_says():
    from imbssl.config import RunConfig
    from imbssl.recipes.grid import what_changed

    plain = RunConfig()
    logged = RunConfig.model_validate({"train": {"wandb": {"enabled": True, "mode": "online", "project": "p"}}})
    assert what_changed(plain, logged, evaluated=False) == {}
    other = RunConfig.model_validate({"seed": 1, "train": {"wandb": {"enabled": True}}})
    assert what_changed(plain, other, evaluated=False) == {"seed": (0, 1)}


@pytest.mark.slow
def test_wandb_without_the_package_is_refused_in_one_line_before_training(tmp_path):
    done = imbssl("pretrain", "simsiam-digits", "--set", "train.wandb.enabled=true", "--run-dir", tmp_path / "run",
                  cwd=tmp_path, prelude="import sys; sys.modules['wandb'] = None")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"Error: {WANDB_MISSING}"]
    assert 'pip install "imbssl[wandb]"' in WANDB_MISSING
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason='wandb is an optional extra (pip install "imbssl[wandb]"); CI does not install it')
def test_a_real_offline_wandb_run_is_continued_by_resume(tiny_cfg, tmp_path, monkeypatch):
    from imbssl.pipelines.pretrain import pretrain

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb = {"enabled": True, "project": "imbssl-test", "dir": str(tmp_path / "wandb-dir")}
    run = pretrain(tiny_cfg(optim={"epochs": 1}, train={"progress": False, "wandb": wandb}), tmp_path / "run")
    run_id = load_safe(run / CHECKPOINT_FILE)["wandb_id"]
    assert run_id
    pretrain(tiny_cfg(optim={"epochs": 2}, train={"progress": False, "wandb": wandb}), run, resume=True)
    assert load_safe(run / CHECKPOINT_FILE)["wandb_id"] == run_id
    offline_runs = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(path.name.endswith(f"-{run_id}") for path in offline_runs)
    assert all((path / f"run-{run_id}.wandb").stat().st_size > 0 for path in offline_runs)
