"""Faults and bad input, through the real ``imbssl`` command (docs/reliability.md lists what each test covers).

Every failure must end in one ``Error:`` line and a non-zero exit, without a traceback, and leave the run
folder so that the fixed (or resumed) command goes on. Runs are tiny SimSiam runs on digits.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import shlex
import shutil
import signal
import subprocess
import struct
import tarfile
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import imbssl, imbssl_command, with_sections
from test_unlabelled import TOLERANCE, _independent_rgb, _save
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.schedules import cosine_schedule
from imbssl.engine.trainer import steps_per_epoch

TINY = {
    "name": "tiny",
    "data": {"source": "digits"},
    "augment": {"crop_scale": [0.4, 1.0]},
    "model": {"backbone": "small_cnn", "width": 0.25},
    "method": {"name": "simsiam", "proj_hidden": 32, "proj_dim": 32, "pred_hidden": 16},
    "optim": {"batch_size": 128, "epochs": 2},
    "train": {"progress": True, "log_every": 1},
    "eval": {"linear": {"epochs": 3, "lrs": [1.0], "weight_decays": [0.0]}, "knn_k": [20]},
}
STEPS_PER_EPOCH = steps_per_epoch(1297, 128)  # the digits train pool at batch 128: 11 near-equal batches
FORBIDDEN_ADVICE = ("weights_only=False", "allow_pickle", "pickle.load")


def error_line(res: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The one ``Error:`` line, last on stderr; asserts the exit code, the fragments and no traceback."""
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and res.stderr.rstrip().endswith(errors[0]), res.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not any(advice in res.stdout + res.stderr for advice in FORBIDDEN_ADVICE)
    return errors[0]


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and lock files: none may outlive a command, however it ended."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")
            or p.name == ".lock"]


def write_config(folder: Path, **sections) -> Path:
    tree = with_sections(with_sections(TINY, {"data": {"cache_dir": str(folder / "cache")}}), sections)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def pretrain(config: Path, run: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return imbssl("pretrain", config, "--run-dir", run, "--no-eval", *extra, cwd=config.parent, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run: (config file, run folder, the pretrain command's stderr)."""
    folder = tmp_path_factory.mktemp("finished")
    config = write_config(folder)
    res = pretrain(config, folder / "run")
    assert res.returncode == 0, res.stderr
    return config, folder / "run", res.stderr


@pytest.fixture
def copy_of(tmp_path, finished):
    """A copy of the finished run to break, and its config file."""
    config, run, _ = finished
    shutil.copytree(run, tmp_path / "run")
    return config, tmp_path / "run"


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None:
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def image_tree(root: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    for split, classes in (("train", train), ("test", test)):
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return root


# -- a failed attempt never blocks its retry ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("bad_setting, message", [
    (("--set", "data.source=imagefolder", "--data", "no-such-archive.tar.gz"), "imagefolder path not found"),
    pytest.param(("--set", "train.device=cuda"), "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_failed_first_attempt_does_not_block_its_retry(tmp_path, bad_setting, message):
    config = write_config(tmp_path, optim={"epochs": 1}, train={"progress": False})
    error_line(pretrain(config, tmp_path / "run", *bad_setting), 2, message)
    assert not leftovers(tmp_path / "run")
    retry = pretrain(config, tmp_path / "run")
    assert retry.returncode == 0, retry.stderr
    assert "starting it afresh" in retry.stderr and (tmp_path / "run" / "backbone.pt").exists()


# -- resume: more epochs, nothing else --------------------------------------------------------------
@pytest.mark.slow
def test_resume_extends_epochs_on_the_new_cosine(copy_of):
    config, run = copy_of
    res = pretrain(config, run, "--resume", "--set", "optim.epochs=3")
    assert res.returncode == 0, res.stderr
    assert "extending the run from 2 to 3 epochs" in res.stderr
    assert load_safe(run / "checkpoints" / "last.pt")["epoch"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch/epoch"] for r in records if "epoch/epoch" in r] == [1, 2, 3]
    # The third epoch's lr follows the cosine over 3 epochs (the first two followed the one over 2); each record
    # holds the lr its step ran at.
    summary = json.loads((run / "pretrain.json").read_text())
    lr = summary["base_lr"] * summary["batch_size"] / 256
    total = 3 * STEPS_PER_EPOCH
    third = [r for r in records if "train/lr" in r and r["step"] >= 2 * STEPS_PER_EPOCH]
    assert len(third) == STEPS_PER_EPOCH
    assert all(r["train/lr"] == pytest.approx(cosine_schedule(lr, 0.0, total)[r["step"]]) for r in third)


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    (("--set", "optim.base_lr=0.1", "--set", "seed=3"), "optim.base_lr (None -> 0.1), seed (0 -> 3)"),
    (("--set", "optim.epochs=1"), "optim.epochs (2 -> 1)"),
])
def test_resume_refuses_other_changes_naming_the_keys(copy_of, change, named):
    config, run = copy_of
    before = (run / "config.yaml").read_text()
    error_line(pretrain(config, run, "--resume", *change), 2, named, "only optim.epochs may grow")
    assert (run / "config.yaml").read_text() == before and not leftovers(run)


@pytest.mark.slow
def test_resume_may_change_where_the_run_reads_writes_and_reports(copy_of, tmp_path):
    """Issue 33 item 11: the README moves the cache with --set data.cache_dir; none of these settings changes the
    weights (the grid reuses finished runs by the same list, pipelines/runfolder.py WHERE_NOT_WHAT)."""
    config, run = copy_of
    moved = {"data.cache_dir": str(tmp_path / "moved-cache"), "train.progress": False, "train.checkpoint_every": 2,
             "train.checkpoint_every_s": 60.0, "train.device": "cpu", "train.log_every": 5,
             "train.wandb.project": "elsewhere"}
    res = pretrain(config, run, "--resume", "--set", "optim.epochs=3",
                   *(arg for key, value in moved.items() for arg in ("--set", f"{key}={value}")))
    assert res.returncode == 0, res.stderr
    assert "resuming with data.cache_dir (" in res.stderr and load_safe(run / "checkpoints" / "last.pt")["epoch"] == 3
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {key: saved[key.split(".")[0]][key.split(".")[1]] for key in moved if "wandb" not in key} == \
        {key: value for key, value in moved.items() if "wandb" not in key}
    assert saved["train"]["wandb"]["project"] == "elsewhere"


def _doctor_checkpoint(run: Path, **trained_on) -> None:
    """Make the run's checkpoint say it was written by another setup (what a resume elsewhere meets)."""
    path = run / "checkpoints" / "last.pt"
    state = load_safe(path)
    state.setdefault("trained_on", {}).update(trained_on)
    torch.save(state, path)


@pytest.mark.slow
def test_resume_on_another_process_count_is_refused_naming_both(copy_of):
    """Issue 33 item 7: BatchNorm over each process's part of the batch makes such a run equal neither run;
    nothing in the folder changes (item 13: config.yaml keeps the epochs the run was trained with)."""
    config, run = copy_of
    _doctor_checkpoint(run, processes=2)
    before = (run / "config.yaml").read_text()
    error_line(pretrain(config, run, "--resume", "--set", "optim.epochs=3"), 2,
               "last.pt was trained on 2 process(es) and this run has 1", "train.sync_batchnorm: false")
    assert (run / "config.yaml").read_text() == before and not leftovers(run)


@pytest.mark.slow
def test_resume_on_another_process_count_with_global_batchnorm_goes_on_with_a_warning(tmp_path):
    """With train.sync_batchnorm the run does not depend on the process count (docs/scale-out.md): item 7's
    refusal does not apply, item 8's warning does."""
    config = write_config(tmp_path, optim={"epochs": 1}, train={"progress": False, "sync_batchnorm": True})
    assert pretrain(config, tmp_path / "run").returncode == 0
    _doctor_checkpoint(tmp_path / "run", processes=2)
    res = pretrain(config, tmp_path / "run", "--resume", "--set", "optim.epochs=2")
    assert res.returncode == 0, res.stderr
    assert "(processes 2 -> 1): the run goes on, but will not replay an uninterrupted run exactly" in res.stderr


@pytest.mark.slow
def test_resume_with_another_thread_count_warns_in_one_line(copy_of):
    """Issue 33 item 8: OMP_NUM_THREADS on resume changes the sums' order, so the run no longer replays
    exactly; the checkpoint records the threads, torch and the device, and the resume says so."""
    config, run = copy_of
    recorded = load_safe(run / "checkpoints" / "last.pt")["trained_on"]
    assert recorded["torch"] == torch.__version__ and recorded["device"] == "cpu"
    threads = 1 if recorded["threads"] > 1 else 2  # torch caps OMP_NUM_THREADS at the cores: going up may not move
    res = pretrain(config, run, "--resume", "--set", "optim.epochs=3", env={"OMP_NUM_THREADS": str(threads)})
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if "will not replay" in line]
    assert len(warned) == 1 and f"threads {recorded['threads']} -> {threads}" in warned[0], res.stderr
    assert load_safe(run / "checkpoints" / "last.pt")["trained_on"]["threads"] == threads


@pytest.mark.slow
def test_resume_failing_on_a_corrupt_checkpoint_leaves_config_yaml_as_it_was(copy_of):
    """Issue 33 item 13: the config is rewritten (to more epochs) only once the checkpoint has loaded, so that
    the run's own command, without the new epochs, still continues it after the checkpoint is dealt with."""
    config, run = copy_of
    before = (run / "config.yaml").read_text()
    (run / "checkpoints" / "last.pt").write_bytes(os.urandom(4096))
    error_line(pretrain(config, run, "--resume", "--set", "optim.epochs=3"), 2, "last.pt", "delete it to train")
    assert (run / "config.yaml").read_text() == before


@pytest.mark.slow
def test_resume_without_checkpoint_starts_afresh_and_keeps_one_set_of_metrics(copy_of):
    """As after an attempt killed before its first checkpoint: config.yaml and two epochs of metrics."""
    config, run = copy_of
    shutil.rmtree(run / "checkpoints")
    (run / "backbone.pt").unlink()
    steps = _metric_steps(run)
    res = pretrain(config, run, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"no checkpoint at {run / 'checkpoints' / 'last.pt'}: starting from scratch" in res.stderr
    assert _metric_steps(run) == steps  # the new run's records only, once each
    assert _tensorboard_steps(run) == list(range(2 * STEPS_PER_EPOCH))


def _metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- the shipped configs --------------------------------------------------------------------------
@pytest.mark.slow
def test_shipped_cifar_config_asks_for_the_data_from_any_folder(tmp_path):
    error_line(imbssl("pretrain", "simsiam-cifar10-lt", cwd=tmp_path), 2, "data.path is required", "--data PATH",
               "data.source=cifar10")
    error_line(imbssl("pretrain", "simsiam-cifar10-lt", "--data", tmp_path / "nowhere.tar.gz",
                      "--set", f"data.cache_dir={tmp_path}", cwd=tmp_path), 2,
               f"imagefolder path not found: {tmp_path / 'nowhere.tar.gz'}")
    assert not (tmp_path / "runs" / "simsiam-cifar10-lt100" / ".lock").exists()


def test_shipped_configs_hold_no_relative_paths_and_checkpoint_every_epoch():
    configs = Path(__file__).resolve().parents[1] / "src" / "imbssl" / "configs"

    def keys(tree, prefix=""):
        for key, value in tree.items():
            yield from keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]

    for path in configs.rglob("*.yaml"):
        for key, value in keys(yaml.safe_load(path.read_text())):
            assert not key.endswith(("data.path", "cache_dir")), (path, key)
            assert not (key.endswith("checkpoint_every") and value > 1), (path, key)


# -- one process per run folder ----------------------------------------------------------------
@pytest.mark.slow
def test_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    config = write_config(tmp_path, optim={"epochs": 500}, train={"progress": False})
    first = subprocess.Popen(imbssl_command("pretrain", config, "--run-dir", tmp_path / "run", "--no-eval"),
                             cwd=tmp_path, stderr=subprocess.DEVNULL)
    try:
        wait_for(tmp_path / "run" / "metrics.jsonl", first)
        second = pretrain(config, tmp_path / "run", "--resume")
        error_line(second, 2, f"run folder {tmp_path / 'run'} is in use by imbssl process {first.pid}")
        assert first.poll() is None  # undisturbed
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    config = write_config(tmp_path, optim={"epochs": 1}, train={"progress": False})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("imbssl process 999999 on elsewhere (since 00:00:00)")
    res = pretrain(config, tmp_path / "run")
    assert res.returncode == 0, res.stderr
    assert not leftovers(tmp_path / "run")


# -- bad input: one line each ---------------------------------------------------------------------
@pytest.mark.slow
def test_yaml_syntax_error_in_a_config_file_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim: {epochs: 3\n")
    line = error_line(imbssl("pretrain", bad, cwd=tmp_path), 2, f"{bad}: not valid YAML (line 3")
    assert "<unicode string>" not in line


@pytest.mark.slow
def test_yaml_syntax_error_in_a_set_value_names_the_override(tmp_path):
    error_line(imbssl("pretrain", "simsiam-digits", "--set", "augment.crop_scale=[0.2, 1.0", cwd=tmp_path), 2,
               "--set augment.crop_scale=[0.2, 1.0: the value is not valid YAML")


@pytest.mark.slow
def test_set_mistakes_are_blamed_on_the_override_not_the_file(tmp_path):
    line = error_line(imbssl("pretrain", "simsiam-digits", "--set", "optim.epochs=many", "--set", "train.fast=1",
                             cwd=tmp_path), 2, "--set optim.epochs=many: optim.epochs:",
                      "--set train.fast=1: unknown config key 'train.fast'")
    assert "simsiam-digits.yaml" not in line


@pytest.mark.slow
@pytest.mark.parametrize("device, message", [
    ("gpu", "'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    pytest.param("cuda", "train.device=cuda but this machine has no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_unusable_device_is_one_line(tmp_path, device, message):
    config = write_config(tmp_path)
    error_line(pretrain(config, tmp_path / "run", "--set", f"train.device={device}"), 2, message)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


BREAKAGES = {
    "empty": lambda path: path.write_bytes(b""),
    "truncated": _truncate,
    "random": lambda path: path.write_bytes(random.Random(0).randbytes(4000)),
    "objects": lambda path: torch.save({"backbone": _Evil()}, path),
}


@pytest.mark.slow
@pytest.mark.parametrize("name, breakage, command, message", [
    ("checkpoints/last.pt", "empty", "resume", "is empty (0 bytes)"),
    ("checkpoints/last.pt", "truncated", "resume", "is truncated or corrupt"),
    ("checkpoints/last.pt", "random", "resume", "is not a torch checkpoint"),
    ("backbone.pt", "empty", "evaluate", "is empty (0 bytes)"),
    ("backbone.pt", "truncated", "evaluate", "is truncated or corrupt"),
    ("backbone.pt", "objects", "evaluate", "holds objects other than tensors"),
    ("subset.npz", "empty", "evaluate", "empty, truncated or not an index file"),
    ("subset.npz", "random", "evaluate", "empty, truncated or not an index file"),
    ("config.yaml", "empty", "evaluate", "is empty"),
    ("config.yaml", "random", "resume", "cannot be read"),
])
def test_broken_run_file_is_named_in_one_line(copy_of, name, breakage, command, message):
    config, run = copy_of
    BREAKAGES[breakage](run / name)
    if command == "resume":  # one more epoch, so that the checkpoint must be read
        res = pretrain(config, run, "--resume", "--set", "optim.epochs=3")
    else:
        res = imbssl("evaluate", run, cwd=run.parent)
    assert "unpickled" not in res.stdout
    error_line(res, 2, f"{run / name}", message)
    assert not leftovers(run)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_broken_backbone_is_written_again_by_the_command_the_message_gives(copy_of, command):
    _, run = copy_of
    (run / "backbone.pt").write_bytes(b"")
    line = error_line(imbssl(command, run, cwd=run.parent), 2, f"{run / 'backbone.pt'} is empty",
                      "writes it again from the checkpoint")
    fix = shlex.split(line.split("`")[1])
    assert fix[0] == "imbssl" and imbssl(*fix[1:], cwd=run.parent).returncode == 0
    assert imbssl(command, run, cwd=run.parent).returncode == 0


WRITE_FAILS = """
import errno, io, os
import imbssl.engine.checkpoint as checkpoint
class FullDisk(io.FileIO):
    def write(self, data):
        if os.path.exists(os.environ["FULL_AFTER"]):
            super().write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)
checkpoint.open = lambda path, mode: FullDisk(path, mode)
"""


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    """The disk fills up once the first checkpoint is written: the second write fails."""
    config = write_config(tmp_path, optim={"epochs": 3}, train={"progress": False})
    run = tmp_path / "run"
    res = pretrain(config, run, prelude=WRITE_FAILS, env={"FULL_AFTER": str(run / "checkpoints" / "last.pt")})
    error_line(res, 1, f"{run / 'checkpoints' / 'last.pt'}: not written: No space left on device",
               f"; continue with `imbssl pretrain {config} --run-dir {run} --no-eval --resume`")
    assert not leftovers(run)
    assert load_safe(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert "run stopped by OSError" in (run / "train.log").read_text()
    again = pretrain(config, run, "--resume")  # space freed
    assert again.returncode == 0, again.stderr
    assert load_safe(run / "checkpoints" / "last.pt")["epoch"] == 3


@pytest.mark.slow
def test_disk_full_when_writing_backbone_pt_names_it(tmp_path):
    """The disk fills up once the last checkpoint and pretrain.json are written: backbone.pt is what fails."""
    config = write_config(tmp_path, optim={"epochs": 1}, train={"progress": False})
    run = tmp_path / "run"
    res = pretrain(config, run, prelude=WRITE_FAILS, env={"FULL_AFTER": str(run / "pretrain.json")})
    line = error_line(res, 1, f"{run / 'backbone.pt'}: not written: No space left on device", "--resume`")
    assert "checkpoint" not in line.split(";")[0] and not leftovers(run)
    again = pretrain(config, run, "--resume")  # space freed
    assert again.returncode == 0, again.stderr
    assert load_safe(run / "backbone.pt")["backbone"]


DISK_FULL_AT_START = {  # a write that fails as on a full disk: the error carries no file name
    "the lock's note": "import errno, os\ndef full(fd, data): raise OSError(errno.ENOSPC, 'No space left on device')"
                       "\nos.write = full",
    "config.yaml": "import errno, pathlib\ndef full(self, *a, **k): raise OSError(errno.ENOSPC, 'No space left on "
                   "device')\npathlib.Path.write_text = full",
}


@pytest.mark.slow
@pytest.mark.parametrize("failing, file", [("the lock's note", ".lock"), ("config.yaml", "config.yaml")])
def test_disk_full_at_start_names_the_file(tmp_path, failing, file):
    config = write_config(tmp_path, optim={"epochs": 1})
    run = tmp_path / "run"
    error_line(pretrain(config, run, prelude=DISK_FULL_AT_START[failing]), 1, f"{run / file}: No space left on device")
    assert not leftovers(run)


CACHE_FULL = """
import errno, numpy
def full_disk(file, array, *args, **kwargs):
    with open(file, "wb") as fh:
        fh.write(b"\\x93NUMPY")
    raise OSError(errno.ENOSPC, "No space left on device")
numpy.save = full_disk
"""


@pytest.mark.slow
def test_disk_full_while_writing_the_decode_cache(tmp_path):
    image_tree(tmp_path / "tree", {"cat": 3, "dog": 3}, {"cat": 2, "dog": 2})
    source = ("data", "describe", "--set", "data.source=imagefolder", "--set", f"data.path={tmp_path / 'tree'}",
              "--set", f"data.cache_dir={tmp_path / 'cache'}")
    error_line(imbssl(*source, cwd=tmp_path, prelude=CACHE_FULL), 1,
               f"{tmp_path / 'cache'}: cannot write the decode cache", "No space left on device",
               "--set data.cache_dir=PATH")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "file-hashes"]
    assert imbssl(*source, cwd=tmp_path).returncode == 0


NO_SPACE_FOR_THE_MAP = """
import errno, os
def full_disk(fd, offset, length):
    raise OSError(errno.ENOSPC, "No space left on device")
os.posix_fallocate = full_disk
"""


@pytest.mark.slow
def test_disk_full_when_reserving_the_decode_memory_map(tmp_path):
    """The images are decoded into a memory map; its space is reserved first, so a full disk is one clear line
    (a write through an unbacked map would be SIGBUS)."""
    image_tree(tmp_path / "tree", {"cat": 3, "dog": 3}, {"cat": 2, "dog": 2})
    source = ("data", "describe", "--set", "data.source=imagefolder", "--set", f"data.path={tmp_path / 'tree'}",
              "--set", f"data.cache_dir={tmp_path / 'cache'}")
    error_line(imbssl(*source, cwd=tmp_path, prelude=NO_SPACE_FOR_THE_MAP), 1,
               f"{tmp_path / 'cache'}: cannot write the decode cache", "No space left on device")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "file-hashes"]
    assert imbssl(*source, cwd=tmp_path).returncode == 0


@pytest.mark.slow
def test_ctrl_c_exits_130_and_says_how_to_continue(tmp_path):
    config = write_config(tmp_path, optim={"epochs": 500}, train={"progress": False})
    run = tmp_path / "run"
    command = imbssl_command("pretrain", config, "--run-dir", run, "--no-eval")
    # A shell without job control starts background jobs with SIGINT ignored, and the child would inherit that:
    # restore the default so that Python turns the signal into KeyboardInterrupt wherever the tests are run from.
    proc = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(run / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1]
    error_line(subprocess.CompletedProcess(command, proc.returncode, "", stderr), 130,
               f"interrupted; continue with `imbssl pretrain {config} --run-dir {run} --no-eval --resume`")
    assert not leftovers(run)
    assert (run / "train.log").read_text().rstrip().endswith("run interrupted")
    assert load_safe(run / "checkpoints" / "last.pt")["epoch"] >= 1


@pytest.mark.slow
def test_corrupt_image_in_an_archive_names_the_member(tmp_path):
    tree = image_tree(tmp_path / "tree", {"cat": 2, "dog": 2}, {"cat": 2, "dog": 2})
    (tree / "train" / "dog" / "1.png").write_bytes(b"not a png at all")
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tf:
        tf.add(tree, arcname="images")
    res = imbssl("data", "describe", "--set", "data.source=imagefolder", "--set",
                 f"data.path={tmp_path / 'images.tar.gz'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                 cwd=tmp_path)
    line = error_line(res, 2, f"cannot decode image {tmp_path / 'images.tar.gz'}:images/train/dog/1.png")
    assert "BytesIO" not in line


@pytest.mark.slow
def test_empty_class_folder_in_train_is_called_empty(tmp_path):
    tree = image_tree(tmp_path / "tree", {"cat": 2}, {"cat": 2, "dog": 2})
    (tree / "train" / "dog").mkdir()
    res = imbssl("data", "describe", "--set", "data.source=imagefolder", "--set", f"data.path={tree}",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    error_line(res, 2, "class folder train/dog is empty (no image files)")


def describe_tree(tmp_path: Path, tree: Path, *args: str) -> subprocess.CompletedProcess:
    """``imbssl data describe`` of an ImageFolder (a folder or tar), which decodes it into ``tmp_path/cache``."""
    return imbssl("data", "describe", "--set", "data.source=imagefolder", "--set", f"data.path={tree}",
                  "--set", f"data.cache_dir={tmp_path / 'cache'}", *args, cwd=tmp_path)


@pytest.mark.slow
def test_every_pil_mode_decodes_as_an_independent_conversion_wide_ones_scaled(tmp_path):
    """16-bit, 32-bit integer and float images are scaled to 8 bits (once clipped: 16-bit to white, floats to
    black), and one log line says how."""
    cases = _independent_rgb()
    tree = image_tree(tmp_path / "tree", {}, {"a": 1})
    for name, (image, _) in cases.items():
        _save(tree / "train" / "a" / name, image)
    res = describe_tree(tmp_path, tree)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("scaled 5 image(s) of more than 8 bits to 8: 2 of 16-bit values") == 1, res.stderr
    images = np.load(next((tmp_path / "cache").glob("**/images.npy")))
    for row, name in enumerate(sorted(cases)):
        np.testing.assert_allclose(images[row], cases[name][1], atol=TOLERANCE.get(name, 0), rtol=0, err_msg=name)


@pytest.mark.slow
def test_symlinked_train_test_and_class_folders_are_followed_a_loop_once(tmp_path):
    elsewhere = image_tree(tmp_path / "elsewhere", {"dog": 3}, {"cat": 2, "dog": 2})
    real = image_tree(tmp_path / "real", {"cat": 2}, {})
    (real / "train" / "dog").symlink_to(elsewhere / "train" / "dog")
    (elsewhere / "train" / "dog" / "again").symlink_to(".")  # a loop: the folder itself
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "train").symlink_to(real / "train")
    (tree / "test").symlink_to(elsewhere / "test")
    res = describe_tree(tmp_path, tree, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["classes"] == ["cat", "dog"] and info["subsets"]["Balanced (full)"]["counts"] == [2, 3]
    assert f"{tree / 'train' / 'dog' / 'again'} links to {elsewhere / 'train' / 'dog'}, a folder it is inside: not " \
           f"followed (a loop)" in res.stderr


@pytest.mark.slow
def test_tar_links_are_resolved_inside_the_archive_and_outside_refused(tmp_path):
    tree = image_tree(tmp_path / "tree", {"cat": 2, "dog": 1}, {"cat": 1, "dog": 1})
    for i in range(10):
        os.link(tree / "train" / "cat" / "1.png", tree / "train" / "cat" / f"hard-{i}.png")
    for i in range(5):
        (tree / "train" / "dog" / f"soft-{i}.png").symlink_to(Path("..", "cat", "0.png"))
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tf:
        tf.add(tree, arcname="images")
    res = describe_tree(tmp_path, tmp_path / "images.tar.gz", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["subsets"]["Balanced (full)"]["counts"] == [12, 6]
    (tree / "train" / "dog" / "outside.png").symlink_to(tree / "train" / "cat" / "0.png")  # an absolute path
    with tarfile.open(tmp_path / "outside.tar.gz", "w:gz") as tf:
        tf.add(tree, arcname="images")
    error_line(describe_tree(tmp_path, tmp_path / "outside.tar.gz"), 2,
               "refusing link images/train/dog/outside.png -> /", "it points outside the archive")


@pytest.mark.slow
def test_a_self_looping_symlink_image_is_one_line(tmp_path):
    tree = image_tree(tmp_path / "tree", {"cat": 2}, {"cat": 2})
    (tree / "train" / "cat" / "self.png").symlink_to("self.png")
    error_line(describe_tree(tmp_path, tree), 2, f"cannot decode image {tree / 'train' / 'cat' / 'self.png'}: ",
               "Too many levels of symbolic links")


# -- what evaluation cannot use is refused before training ------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("probed", ["own labels", "eval.labelled_data"])
def test_one_class_labelled_set_is_refused_before_training(tmp_path, probed):
    tree = image_tree(tmp_path / "tree", {"cat": 4}, {"cat": 2})
    if probed == "own labels":
        data, evaluation = {"source": "imagefolder", "path": str(tree)}, {}
    else:  # unlabelled pre-training images, probed on a labelled set of one class
        data = {"source": "images", "path": str(tree / "train")}
        evaluation = {"labelled_data": {"source": "imagefolder", "path": str(tree), "cache_dir": str(tmp_path / "c")}}
    config = write_config(tmp_path, data=data, eval=evaluation)
    run = tmp_path / "run"
    res = imbssl("pretrain", config, "--run-dir", run, cwd=tmp_path)
    error_line(res, 2, f"{'the run' + chr(39) + 's train split' if probed == 'own labels' else probed} has labelled "
                       f"images of 1 class(es) (cat), and the probes need 2 or more")
    assert not (run / "checkpoints").exists() and not leftovers(run)


@pytest.mark.slow
def test_more_feature_clusters_than_images_is_refused_before_training(tmp_path):
    tree = image_tree(tmp_path / "tree", {"cat": 4}, {"cat": 2})
    config = write_config(tmp_path, data={"source": "imagefolder", "path": str(tree), "labels": "none"})
    run = tmp_path / "run"
    error_line(imbssl("pretrain", config, "--run-dir", run, cwd=tmp_path), 2,
               "eval.feature_clusters.k=10: more clusters than the 4 pre-training images; set it lower")
    assert not (run / "checkpoints").exists() and not leftovers(run)


@pytest.mark.slow
def test_subset_too_skewed_for_the_labelled_set_is_refused_before_training(tmp_path):
    config = write_config(tmp_path, data={"subset": {"profile": "exp", "imbalance": 100, "head_count": 4}})
    run = tmp_path / "run"
    res = imbssl("pretrain", config, "--run-dir", run, cwd=tmp_path)
    assert "subset profile 'exp' leaves 7 of 10 classes with 0 images (class 3, 4, 5, 6, 7, 8, 9)" in res.stderr
    error_line(res, 2, "a labelled set of 7 images leaves fewer than 2 images for some class",
               "eval.labelled_size=7 images")
    assert not (run / "checkpoints").exists() and not leftovers(run)
    assert "0 images" in (run / "train.log").read_text()


# -- guards ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_divergence_without_nan_is_warned_in_the_log_and_eval_json(tmp_path):
    config = write_config(tmp_path, optim={"base_lr": 100.0}, train={"progress": False})
    res = imbssl("pretrain", config, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "the run is diverging at epoch" in (tmp_path / "run" / "train.log").read_text()
    warnings = json.loads((tmp_path / "run" / "eval.json").read_text())["warnings"]
    assert any("BatchNorm running variance" in w for w in warnings)
    assert "warning: pre-training looks diverged" in res.stdout


@pytest.mark.slow
def test_nan_loss_stops_in_one_line_also_in_train_log(tmp_path):
    config = write_config(tmp_path, optim={"base_lr": 1e6, "epochs": 5}, train={"progress": False})
    line = error_line(pretrain(config, tmp_path / "run"), 2, "loss is nan at epoch", "Try a lower learning rate.")
    assert "precision" not in line  # the run is fp32 already
    assert "loss is nan" in (tmp_path / "run" / "train.log").read_text()


# -- the first run reads well ------------------------------------------------------------------
@pytest.mark.slow
def test_run_logs_method_and_subset_and_a_file_gets_no_progress_bar(finished):
    _, run, stderr = finished
    assert "training tiny: simsiam on the full subset" in (run / "train.log").read_text()
    assert "\r" not in stderr  # stderr is a pipe here: no bar redraws, one line per epoch
    assert "INFO epoch 2/2 loss" in stderr and ", eta 0s" in stderr


@pytest.mark.slow
def test_whole_run_progress_bar_on_a_terminal_shows_the_eta(tmp_path):
    config = write_config(tmp_path)
    primary, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(imbssl_command("pretrain", config, "--run-dir", tmp_path / "run", "--no-eval"),
                            cwd=tmp_path, stderr=replica, stdout=subprocess.DEVNULL)
    os.close(replica)
    chunks = []
    reader = threading.Thread(target=lambda: _drain(primary, chunks))
    reader.start()
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=10)
    shown = b"".join(chunks).decode(errors="replace")
    total = 2 * STEPS_PER_EPOCH
    assert f"/{total} [" in shown and "<" in shown  # steps of the whole run, elapsed<remaining
    assert "epoch=2/2" in shown and "loss=" in shown and "img_s=" in shown


def _drain(fd: int, chunks: list[bytes]) -> None:
    try:
        while data := os.read(fd, 4096):
            chunks.append(data)
    except OSError:  # the terminal closes with the process
        pass


@pytest.mark.slow
def test_evaluate_says_where_eval_json_went_the_labelled_size_and_what_na_means(copy_of):
    _, run = copy_of
    res = imbssl("evaluate", run, cwd=run.parent)
    assert res.returncode == 0, res.stderr
    result = json.loads((run / "eval.json").read_text())
    assert f"eval: {run / 'eval.json'}" in res.stdout
    labelled = f"labelled set: {result['labelled_train']} images to train the probe + {result['labelled_val']}"
    assert labelled in res.stdout
    assert "many/medium/few: " in res.stdout and "n/a: no class of the pre-training subset falls in" in res.stdout
    assert result["warnings"] == []  # a healthy run


@pytest.mark.slow
def test_evaluate_before_pretraining_has_finished_is_one_line(copy_of):
    _, run = copy_of
    (run / "backbone.pt").unlink()
    error_line(imbssl("evaluate", run, cwd=run.parent), 2, f"{run / 'backbone.pt'} not found: pre-training has not "
                                                           f"finished")


@pytest.mark.slow
def test_help_lists_shipped_configs_and_where_runs_go_without_cut_lines(tmp_path):
    wide = {"COLUMNS": "80"}
    pretrain_help = imbssl("pretrain", "--help", cwd=tmp_path, env=wide).stdout
    for name in ("simsiam-digits", "excb-digits", "simclr-cifar10-lt", "simsiam-cifar10-lt"):
        assert name in pretrain_help
    assert "runs/<name>" in pretrain_help
    pages = [pretrain_help] + [imbssl(*group, "--help", cwd=tmp_path, env=wide).stdout
                               for group in ((), ("data",), ("pipeline",), ("reproduce",))]
    for page in pages:
        assert not [line for line in page.splitlines()
                    if (line.endswith("...") and not line.startswith("Usage:")) or len(line) > 80], page
    examples = {("data", "describe"): "--set data.", ("evaluate",): "--set eval.",
                ("reproduce", "experiment-1"): "--set base.", ("pretrain",): "--set optim."}
    for command, example in examples.items():
        assert f"e.g. {example}" in " ".join(imbssl(*command, "--help", cwd=tmp_path, env=wide).stdout.split())


def test_pipeline_stage_choices_match_the_pipeline():
    from imbssl.cli import PIPELINE_STAGES
    from imbssl.pipelines.offline_clustering import STAGES

    assert PIPELINE_STAGES == STAGES


@pytest.mark.slow
def test_data_describe_writes_a_plot_only_where_asked(tmp_path):
    res = imbssl("data", "describe", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert list(tmp_path.iterdir()) == [] and "--plot FILE" in res.stdout
    res = imbssl("data", "describe", "--plot", tmp_path / "figs" / "counts.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"plot: {tmp_path / 'figs' / 'counts.png'}" in res.stdout
    assert (tmp_path / "figs" / "counts.png").stat().st_size > 0


@pytest.mark.slow
def test_debug_shows_the_traceback_before_the_one_line(tmp_path):
    res = imbssl("pretrain", tmp_path / "missing.yaml", cwd=tmp_path, env={"IMBSSL_DEBUG": "1"})
    assert res.returncode == 2 and "Traceback" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith(f"Error: config file not found: {tmp_path / 'missing.yaml'}")


#: SIGTERM on the checkpoint write of epoch 2, between its last byte and its rename
SIGTERM_IN_THE_SECOND_CHECKPOINT_WRITE = """
import os, signal
_fsync, _writes = os.fsync, []
def fsync(fd):
    _writes.append(fd)
    if len(_writes) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    _fsync(fd)
os.fsync = fsync
"""


@pytest.mark.slow
def test_sigterm_during_a_checkpoint_write_exits_143_keeps_the_last_one_and_says_how_to_continue(tmp_path):
    config = write_config(tmp_path, optim={"epochs": 3}, train={"progress": False})
    run = tmp_path / "run"
    res = pretrain(config, run, prelude=SIGTERM_IN_THE_SECOND_CHECKPOINT_WRITE)
    error_line(res, 143, f"terminated (SIGTERM); continue with `imbssl pretrain {config} --run-dir {run} --no-eval "
                         f"--resume`")
    assert not leftovers(run)  # neither the lock nor checkpoints/.last.pt.tmp
    assert (run / "train.log").read_text().rstrip().endswith("run terminated (SIGTERM)")
    assert load_safe(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert pretrain(config, run, "--resume").returncode == 0
    assert load_safe(run / "checkpoints" / "last.pt")["epoch"] == 3


GRACE_EXIT = "the cleanup did not end within"


@pytest.mark.slow
def test_a_sigterm_cleanup_that_hangs_ends_after_the_grace_period_and_the_run_resumes(tmp_path):
    """A lock left held by an exception between two bytecodes (CPython bpo-29988) must not keep a SIGTERMed run
    alive: after IMBSSL_SIGTERM_GRACE_S it exits 143 as kill -9 would, and --resume continues it."""
    config = write_config(tmp_path, optim={"epochs": 3}, train={"progress": False})
    run = tmp_path / "run"
    hang = "import time, imbssl.pipelines.runfolder as rf; rf._stop_reason = lambda err: time.sleep(600)\n"
    res = pretrain(config, run, prelude=hang + SIGTERM_IN_THE_SECOND_CHECKPOINT_WRITE,
                   env={"IMBSSL_SIGTERM_GRACE_S": "2"}, timeout=120)
    assert res.returncode == 143 and GRACE_EXIT in res.stderr.splitlines()[-1], res.stderr
    assert pretrain(config, run, "--resume").returncode == 0
    assert load_safe(run / "checkpoints" / "last.pt")["epoch"] == 3


# -- fault injection ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_kill_9_at_random_moments_then_resume_is_bit_exact(tmp_path, stop):
    """SIGTERM, unlike kill -9, must also end each attempt in the one-line message, leaving no lock file."""
    config = write_config(tmp_path, optim={"epochs": 6}, train={"progress": False})
    straight_s = _seconds_holding_the_folder(config, tmp_path / "straight")
    run, rng = tmp_path / "killed", random.Random(9)
    args = ("pretrain", config, "--run-dir", run, "--no-eval", "--resume")
    for _ in range(3):
        proc = subprocess.Popen(imbssl_command(*args), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        _wait_for_lock(run, proc)  # past the imports: the kill lands in setup, training or a checkpoint write
        # Within a third of a whole run: setup is redone each time, so three attempts cannot finish the run.
        time.sleep(rng.uniform(0.0, straight_s / 3))
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(stop)
        stderr = proc.communicate(timeout=60)[1]
        if stop == signal.SIGTERM and GRACE_EXIT not in stderr:  # else a cleanup held up ended as kill -9 would
            error_line(subprocess.CompletedProcess(args, proc.returncode, "", stderr), 143,
                       "terminated (SIGTERM); continue with")
            assert not leftovers(run)
    final = imbssl(*args, cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert not leftovers(run)
    for name in ("backbone.pt", "checkpoints/last.pt"):
        a, b = load_safe(tmp_path / "straight" / name), load_safe(run / name)
        weights = "backbone" if name == "backbone.pt" else "method"
        assert a[weights].keys() == b[weights].keys()
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights]), name
    assert _metrics(tmp_path / "straight") == _metrics(run)
    assert _tensorboard_steps(tmp_path / "straight") == _tensorboard_steps(run)


def _seconds_holding_the_folder(config: Path, run: Path) -> float:
    """Trains ``config`` in ``run``; returns the time from taking the folder's lock to the end."""
    proc = subprocess.Popen(imbssl_command("pretrain", config, "--run-dir", run, "--no-eval"), cwd=config.parent,
                            stderr=subprocess.DEVNULL)
    _wait_for_lock(run, proc)
    start = time.monotonic()
    assert proc.wait(timeout=300) == 0
    return time.monotonic() - start


def _wait_for_lock(run: Path, proc: subprocess.Popen) -> None:
    """Until ``proc`` holds the run folder (the lock file left by a killed process names another pid)."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and f"process {proc.pid} " not in _read(run / ".lock"):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ between processes."""
    return [{k: v for k, v in json.loads(line).items() if "per_s" not in k}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_steps(run: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]
