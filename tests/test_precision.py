"""train.precision: auto (engine/precision.py): bf16 autocast + channels_last where the hardware computes bf16
natively, fp32 elsewhere; the environment override; the record; the recipe presets pinned."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

from conftest import imbssl
from imbssl.config import RunConfig, TrainConfig
from imbssl.configbase import ConfigError, deep_merge
from imbssl.engine import precision as precision_module
from imbssl.engine import trainer
from imbssl.engine.precision import AUTO_PRECISION_ENV, resolve_precision
from imbssl.pipelines.pretrain import pretrain
from imbssl.pipelines.runfolder import read_saved_config, run_changes
from imbssl.pipelines.train import train
from imbssl.recipes import RECIPES, load_preset, recipe
from imbssl.records import PretrainRecord, TrainRecord

CPU = torch.device("cpu")
#: /proc/cpuinfo flags: a Zen 4 or Sapphire Rapids (native bf16) and an older EPYC (AVX2 alone)
ZEN4 = {"fpu", "avx2", "avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"}
OLD_EPYC = {"fpu", "avx2", "sse4_2"}


@pytest.fixture
def detected(monkeypatch):
    """The detection alone decides: no override, and the CPU flags ``set_flags(flags)`` gives."""
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)

    def set_flags(flags: set[str]) -> None:
        monkeypatch.setattr(precision_module, "cpu_flags", lambda: flags)
    return set_flags


def test_auto_is_the_default():
    assert TrainConfig().precision == "auto"


NEITHER = "the CPU has neither amx_bf16 nor avx512_bf16"


@pytest.mark.parametrize("flags, expected, why", [(ZEN4, "bf16", "the CPU has avx512_bf16"),
                                                  (SAPPHIRE_RAPIDS, "bf16", "the CPU has amx_bf16"),
                                                  (OLD_EPYC, "fp32", NEITHER), (set(), "fp32", NEITHER)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_auto_picks_bf16_and_channels_last_on_a_cpu_with_native_bf16_and_fp32_elsewhere(detected, flags, expected,
                                                                                        why, channels_last):
    detected(flags)
    used = resolve_precision("auto", channels_last, CPU)
    assert (used.asked, used.precision, used.why) == ("auto", expected, why)
    assert used.channels_last == (True if expected == "bf16" else channels_last)  # fp32 keeps the setting


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(detected, monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    used = resolve_precision("auto", False, torch.device("cuda", 0))
    assert used.precision == expected and used.channels_last == (expected == "bf16")
    assert "compute capability" in used.why


def test_auto_is_fp32_on_mps(detected):
    detected(ZEN4)  # the CPU beside the device does not decide
    assert resolve_precision("auto", False, torch.device("mps")).precision == "fp32"


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_a_set_precision_is_kept_whatever_the_hardware_or_the_override(detected, monkeypatch, asked):
    detected(OLD_EPYC if asked == "bf16" else ZEN4)
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp32" if asked == "bf16" else "bf16")
    assert resolve_precision(asked, False, CPU)[:3] == (asked, asked, False)


@pytest.mark.parametrize("forced, flags", [("bf16", OLD_EPYC), ("fp32", ZEN4)])
def test_the_environment_overrides_the_detection(detected, monkeypatch, forced, flags):
    """A machine whose detection is wrong (a VM that hides the CPU's flags) sets IMBSSL_AUTO_PRECISION."""
    detected(flags)
    monkeypatch.setenv(AUTO_PRECISION_ENV, forced)
    used = resolve_precision("auto", False, CPU)
    assert (used.precision, used.channels_last) == (forced, forced == "bf16")
    assert used.why == f"{AUTO_PRECISION_ENV}={forced}"


def test_a_bad_override_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(ConfigError, match=f"^{AUTO_PRECISION_ENV}='fp16' is not a precision; use fp32 or bf16$"):
        resolve_precision("auto", False, CPU)


@pytest.mark.slow
def test_the_command_refuses_a_bad_override_in_one_line(tmp_path):
    res = imbssl("pretrain", "simsiam-digits", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                 "--run-dir", tmp_path / "run", "--no-eval", cwd=tmp_path, env={AUTO_PRECISION_ENV: "fp16"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"Error: {AUTO_PRECISION_ENV}='fp16' is not a precision; use fp32 or "
                                               f"bf16"]
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


@pytest.fixture
def steps_seen(monkeypatch) -> list[tuple[str, bool]]:
    """(precision, channels_last) of every optimizer step the Trainer takes."""
    seen = []

    def spy(task, optimizer, views, indices, precision="fp32", channels_last=False, **kwargs):
        seen.append((precision, channels_last))
        return step(task, optimizer, views, indices, precision, channels_last, **kwargs)
    step = trainer.optimizer_step
    monkeypatch.setattr(trainer, "optimizer_step", spy)
    return seen


@pytest.mark.slow
def test_a_digits_run_with_auto_trains_and_records_what_auto_chose(tiny_cfg, tmp_path, detected, steps_seen, caplog):
    detected(ZEN4)
    caplog.set_level("INFO", logger="imbssl")
    run = pretrain(tiny_cfg(optim={"epochs": 1}), tmp_path / "run")
    assert set(steps_seen) == {("bf16", True)}
    tree = json.loads((run / PretrainRecord.FILE).read_text())
    assert tree["precision"] == {"asked": "auto", "precision": "bf16", "channels_last": True,
                                 "why": "the CPU has avx512_bf16"}
    assert PretrainRecord.read(run).precision.precision == "bf16"
    assert "precision: bf16 autocast + channels_last (auto: the CPU has avx512_bf16)" in caplog.text
    assert "precision: bf16 autocast + channels_last" in (run / "train.log").read_text()
    train_section = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (train_section["precision"], train_section["channels_last"]) == ("bf16", True)  # what auto chose


@pytest.mark.slow
def test_a_run_trained_before_auto_resumes_and_is_reused_at_its_own_precision(tiny_cfg, tmp_path, detected,
                                                                               steps_seen):
    """A run folder from before auto was the default (config.yaml: fp32) resumed by the same command, now auto on a
    CPU where auto means bf16: it goes on in fp32, as it was trained; auto accepts it as the same run."""
    detected(ZEN4)
    started = pretrain(tiny_cfg(optim={"epochs": 1}, train={"precision": "fp32"}), tmp_path / "run")
    steps_seen.clear()
    pretrain(tiny_cfg(optim={"epochs": 2}), started, resume=True)
    assert steps_seen and set(steps_seen) == {("fp32", False)}
    assert yaml.safe_load((started / "config.yaml").read_text())["train"]["precision"] == "fp32"
    used = PretrainRecord.read(started).precision
    assert (used.asked, used.precision, used.why) == ("auto", "fp32", "as the run was started")
    saved = read_saved_config(started / "config.yaml", RunConfig)
    assert run_changes(saved, tiny_cfg(optim={"epochs": 2})) == {}  # a grid reuses it
    assert set(run_changes(saved, tiny_cfg(optim={"epochs": 2}, train={"precision": "bf16"}))) == {"train.precision"}


@pytest.mark.slow
def test_a_classifier_run_records_the_precision_it_trained_with(sup_cfg, tmp_path, detected, steps_seen):
    detected(OLD_EPYC)
    run = train(sup_cfg(optim={"epochs": 2, "warmup_epochs": 0, "milestones": [], "lr_factors": []},
                        train={"channels_last": True, "progress": False}), tmp_path / "run")
    assert set(steps_seen) == {("fp32", True)}  # fp32 keeps channels_last as set
    used = TrainRecord.read(run).precision
    assert (used.asked, used.precision, used.channels_last) == ("auto", "fp32", True)


def test_records_written_before_auto_still_load(tmp_path):
    """pretrain.json and train.json of earlier runs have no precision: read as None."""
    for record in (PretrainRecord, TrainRecord):
        tree = json.loads((Path(__file__).parent / "data" / "format-0" / record.FILE).read_text())
        assert record.from_tree(tree, record.FILE).precision is None


# -- the presets that reproduce tables keep a pinned precision ----------------------------------------------
def train_sections(config: BaseModel) -> list[TrainConfig]:
    """Every TrainConfig in ``config`` (a pipeline's base, a self-training run's stages share the run's)."""
    if isinstance(config, TrainConfig):
        return [config]
    found = []
    for name in type(config).model_fields:
        if isinstance(value := getattr(config, name), BaseModel):
            found += train_sections(value)
    return found


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("preset", ["demo", "cpu", "paper"])
def test_every_recipe_preset_trains_each_cell_at_a_pinned_precision(name, preset):
    """auto would make a grid's runs differ by machine, and an earlier run folder (trained at the old default, fp32)
    another run than the cell's: every cell of every preset sets its precision."""
    schema = recipe(name)
    tree = deep_merge(load_preset(schema.PRESETS, preset), {"base": {"data": {"path": "data.tar.gz"}}})
    cells = schema.model_validate(tree).cells(Path("out"))
    precisions = {(str(cell.run_dir), train.precision) for cell in cells for train in train_sections(cell.config)}
    assert cells and not {run for run, precision in precisions if precision == "auto"}
