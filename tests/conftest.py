import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imbssl.config import SupervisedConfig, build_config, shared_method_keys, validate_tree
from imbssl.engine.precision import AUTO_PRECISION_ENV
from imbssl.eval import cluster_statistics
from imbssl.pipelines import evaluate
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain

torch.set_num_threads(2)
# train.precision: auto (the default) resolves to fp32 whatever the machine's CPU, so the suite's numbers are the same
# on every CI machine; set here, at import, so the subprocesses of the CLI tests inherit it
os.environ[AUTO_PRECISION_ENV] = "fp32"


def imbssl_command(*args, prelude: str = "") -> list[str]:
    """The command line of the real ``imbssl`` entry point in a fresh interpreter (imbssl/__main__.py's two lines);
    ``prelude`` is Python run first (to inject a fault)."""
    return [sys.executable, "-c", f"{prelude}\nfrom imbssl.cli import main\nmain()", *map(str, args)]


def imbssl(*args, cwd: Path, env: dict | None = None, prelude: str = "", timeout: float = 600,
           **popen) -> subprocess.CompletedProcess:
    """``imbssl ARGS`` run to its end in ``cwd``, output captured as text; ``env`` is added to this environment."""
    return subprocess.run(imbssl_command(*args, prelude=prelude), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **popen)


def with_sections(tree: dict, sections: dict) -> dict:
    """``tree`` with each of ``sections`` laid over the section of its name (a value that is not a dict replaces it)."""
    return {**tree, **{name: {**tree.get(name, {}), **values} if isinstance(values, dict) else values
                       for name, values in sections.items()}}


@pytest.fixture
def tiny_cfg(tmp_path):
    """A seconds-long SimSiam run on real data (digits) with a small CNN."""
    def make(**sections):
        tree = {
            "name": "tiny", "out_dir": str(tmp_path / "runs"),
            "data": {"source": "digits", "cache_dir": str(tmp_path / "cache")},
            "augment": {"crop_scale": [0.4, 1.0]},
            "model": {"backbone": "small_cnn", "width": 0.25},
            "method": {"name": "simsiam", "proj_hidden": 32, "proj_dim": 32, "pred_hidden": 16},
            "optim": {"batch_size": 128, "epochs": 3},
            "train": {"progress": False},
            "eval": {"linear": {"epochs": 10, "lrs": [0.1, 1.0], "weight_decays": [0.0]}},
        }
        if isinstance(method := sections.get("method"), dict):  # the tiny widths, where the method has them
            tree["method"] = shared_method_keys(tree["method"], method.get("name", "simsiam"), where="tiny_cfg method")
        return build_config(with_sections(tree, sections))
    return make


@pytest.fixture
def sup_cfg(tmp_path):
    """A seconds-long supervised run on digits-LT (p=10) with the small CNN (ResNet-32 learns 8x8 digits slowly)."""
    def make(**sections):
        tree = {"name": "sup", "out_dir": str(tmp_path / "runs"),
                "data": {"source": "digits", "cache_dir": str(tmp_path / "cache"),
                         "subset": {"profile": "exp", "imbalance": 10}},
                "model": {"backbone": "small_cnn", "width": 0.5},
                "optim": {"batch_size": 64, "epochs": 6, "warmup_epochs": 1, "milestones": [5], "lr_factors": [0.1]},
                "augment_pad": 0, "train": {"progress": False}, "eval": {"val_per_class": 5}}
        return validate_tree(SupervisedConfig, with_sections(tree, sections))
    return make


@pytest.fixture
def final_clustering(monkeypatch) -> dict:
    """Filled in by ``evaluate_run``: the final clustering's ``assignments`` (unsorted, each image's cluster), each
    cluster's ``target`` share (the prior) and the images' ``labels``, as evaluate passes them to its statistics."""
    seen = {}

    def spy(assignments, target, labels):
        seen.update(assignments=assignments, target=target, labels=labels)
        return cluster_statistics(assignments, target, labels)

    monkeypatch.setattr(evaluate, "cluster_statistics", spy)
    return seen


class Interrupt(Exception):
    """Raised by an epoch callback to stop a run as a crash would."""


def crash_after(last_epoch: int):
    """An epoch callback that stops the run, as a crash would, once ``last_epoch`` is trained and checkpointed."""
    def callback(epoch, summary):
        if epoch == last_epoch:
            raise Interrupt
    return callback


@pytest.fixture
def interrupted_then_resumed(tmp_path):
    """``run(cfg)`` -> (straight, resumed) run folders: ``cfg`` trained straight through, and trained again
    with a crash after epoch 2, then resumed from its checkpoint."""
    def run(cfg):
        straight = pretrain(cfg, tmp_path / "straight")

        with pytest.raises(Interrupt):
            pretrain(cfg, tmp_path / "resumed", callbacks=[crash_after(2)])
        assert not (tmp_path / "resumed" / BACKBONE_FILE).exists()  # a crashed run leaves no backbone
        return straight, pretrain(cfg, tmp_path / "resumed", resume=True)
    return run
