import json
import logging

import pytest
import torch

from imbssl.engine.checkpoint import CheckpointError, load_safe, save_atomic
from imbssl.engine.runlog import read_metrics
from imbssl.engine.task import StepOutput, TrainingTask
from imbssl.engine.trainer import NonFiniteLossError, check_collapse, optimizer_step
from imbssl.methods.base import output_std
from imbssl.methods.simsiam import SimSiam
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain


def weights(run_dir):
    return load_safe(run_dir / "backbone.pt")["backbone"]


@pytest.mark.slow
def test_resume_gives_the_same_weights(tiny_cfg, interrupted_then_resumed):
    straight, resumed = interrupted_then_resumed(tiny_cfg())
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(straight)] == [r["step"] for r in read_metrics(resumed)]


@pytest.mark.slow
def test_existing_run_needs_resume(tiny_cfg, tmp_path):
    cfg = tiny_cfg(optim={"epochs": 1})
    pretrain(cfg, tmp_path / "run")
    with pytest.raises(Exception, match="--resume"):
        pretrain(cfg, tmp_path / "run")


@pytest.mark.slow
def test_loss_decreases_on_real_images(tiny_cfg, tmp_path):
    for method in ("simsiam", "simclr"):
        run = pretrain(tiny_cfg(method={"name": method}, optim={"epochs": 8}), tmp_path / method)
        epochs = [r for r in read_metrics(run) if "epoch/loss" in r]
        assert len(epochs) == 8
        assert epochs[-1]["epoch/loss"] < epochs[0]["epoch/loss"] - 0.05, method
        summary = json.loads((run / "pretrain.json").read_text())
        assert summary["images_seen"] > 0 and summary["images_per_s"] > 0


@pytest.mark.slow
def test_run_folder_contents(tiny_cfg, tmp_path):
    run = pretrain(tiny_cfg(optim={"epochs": 1}), tmp_path / "run")
    for name in ("config.yaml", "metrics.jsonl", "train.log", "subset.npz", "backbone.pt", "checkpoints/last.pt"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())


@pytest.mark.slow
def test_checkpoint_by_wall_time(tiny_cfg, tmp_path):
    """With checkpoint_every far above the run's epochs, the time rule still saves every epoch here."""
    saved = []

    def checkpointed_epoch(epoch, summary):
        saved.append(load_safe(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"])

    pretrain(tiny_cfg(train={"checkpoint_every": 100, "checkpoint_every_s": 1e-3}), tmp_path / "run",
             callbacks=[checkpointed_epoch])
    assert saved == [1, 2, 3]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    poisoned = {"on": False}
    step = SimSiam.training_step

    def maybe_nan(self, views, indices):
        out = step(self, views, indices)
        if poisoned["on"]:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SimSiam, "training_step", maybe_nan)

    def poison(epoch, summary):
        poisoned["on"] = True

    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 2.*last.pt"):
        pretrain(tiny_cfg(), tmp_path / "run", callbacks=[poison])
    state = load_safe(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


class PartlyClipped(TrainingTask):
    """Two layers; the task names the first one's parameters for clipping at ``max_norm`` (None: no clipping)."""

    def __init__(self, max_norm: float | None) -> None:
        super().__init__()
        self.clipped, self.free, self.max_norm = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1), max_norm

    def training_step(self, views, indices):
        return StepOutput(100 * self.free(self.clipped(views[0])).pow(2).mean())

    def gradient_clipping(self):
        return None if self.max_norm is None else (list(self.clipped.parameters()), self.max_norm)


def test_optimizer_step_clips_the_gradient_norm_of_the_parameters_the_task_names():
    """MSN's code clips its encoder's gradient norm before the step (method.clip_grad_norm): the engine scales
    the named parameters' gradients together to the norm and leaves the others as the backward pass left them."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    grads, weights = {}, {}
    for max_norm in (None, 0.1):
        torch.manual_seed(0)
        task = PartlyClipped(max_norm)
        optimizer_step(task, torch.optim.SGD(task.parameters(), lr=1.0), [x], torch.arange(8))
        grads[max_norm] = {n: p.grad.clone() for n, p in task.named_parameters()}
        weights[max_norm] = {n: p.detach().clone() for n, p in task.named_parameters()}

    def clipped_norm(g):
        return torch.linalg.vector_norm(torch.stack([g[n].norm() for n in g if n.startswith("clipped.")])).item()
    raw, clipped = grads[None], grads[0.1]
    assert clipped_norm(raw) > 1.0  # well above the norm: the clipping is at work
    assert clipped_norm(clipped) == pytest.approx(0.1, rel=1e-5)
    for name in raw:
        if name.startswith("clipped."):
            assert torch.allclose(clipped[name], raw[name] * 0.1 / clipped_norm(raw), rtol=1e-5, atol=0)
        else:
            assert torch.equal(clipped[name], raw[name])
    # the optimizer stepped with the clipped gradients
    assert not torch.allclose(weights[None]["clipped.weight"], weights[0.1]["clipped.weight"])


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoints_load_weights_only(tmp_path):
    path = save_atomic({"w": torch.ones(2), "epoch": 3}, tmp_path / "ok.pt")
    assert load_safe(path)["epoch"] == 3
    assert not list(tmp_path.glob(".*.tmp"))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load it"):
        load_safe(tmp_path / "evil.pt")


def test_collapse_monitor(caplog):
    torch.manual_seed(0)
    spread = torch.randn(512, 64)
    assert output_std(spread).item() == pytest.approx(1 / 64 ** 0.5, rel=0.1)
    assert output_std(torch.ones(512, 64)).item() == pytest.approx(0.0, abs=1e-6)


def test_collapse_warning_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="imbssl"):
        assert check_collapse(1 / 64 ** 0.5, 64, warn_below=0.1) == pytest.approx(1.0)
        assert not caplog.records
        check_collapse(1e-4, 64, warn_below=0.1)
    assert "possible collapse" in caplog.text


@pytest.mark.slow
def test_every_image_is_seen_once_each_epoch(tiny_cfg, tmp_path, monkeypatch):
    """503 images at batch 128: four near-equal batches an epoch, none dropped (a partial batch used to be)."""
    seen, real_step = [], SimSiam.training_step
    monkeypatch.setattr(SimSiam, "training_step", lambda self, views, indices: (seen.append(indices.clone()),
                                                                                 real_step(self, views, indices))[1])
    run = pretrain(tiny_cfg(data={"subset": {"profile": "exp", "imbalance": 10}}, optim={"batch_size": 128,
                                                                                         "epochs": 2}), tmp_path / "r")
    assert [len(b) for b in seen] == [126, 126, 126, 125] * 2
    for epoch in (seen[:4], seen[4:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(503))
    assert json.loads((run / "pretrain.json").read_text())["images_seen_total"] == 2 * 503


@pytest.mark.slow
def test_run_sets_and_records_determinism(tiny_cfg, tmp_path):
    try:
        run = pretrain(tiny_cfg(optim={"epochs": 1}), tmp_path / "r")
        recorded = json.loads((run / "pretrain.json").read_text())["determinism"]
        assert recorded == {"deterministic_algorithms": True, "cudnn_benchmark": False, "cudnn_deterministic": True,
                            "cublas_workspace_config": ":4096:8"}
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        fast = tiny_cfg(optim={"epochs": 1}, train={"progress": False, "deterministic": False})
        recorded = json.loads((pretrain(fast, tmp_path / "fast") / "pretrain.json").read_text())["determinism"]
        assert not recorded["deterministic_algorithms"] and recorded["cudnn_benchmark"]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False


@pytest.mark.slow
def test_compiled_training_matches_eager_and_keeps_the_parameter_names(tiny_cfg, tmp_path, monkeypatch):
    """train.compile compiles each part in place: the same checkpoint keys, and the same model up to the fused
    kernels' rounding."""
    compiled_parts, compile_part = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled_parts.append(type(self).__name__)
                        or compile_part(self, *a, **k))
    runs = [pretrain(tiny_cfg(optim={"epochs": 1}, train={"compile": compiled}), tmp_path / str(compiled))
            for compiled in (False, True)]
    assert "SmallCNN" in compiled_parts
    eager, compiled = (load_safe(run / BACKBONE_FILE)["backbone"] for run in runs)
    assert list(compiled) == list(eager)
    for key, value in eager.items():
        assert torch.allclose(compiled[key], value, rtol=0, atol=1e-4), key
