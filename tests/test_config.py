import re
import subprocess
import sys

import pytest
import yaml

from imbssl.config import (ConfigError, RunConfig, build_config, load_config, migrate_method_section,
                           migrate_saved_config, parse_overrides, shared_method_keys)
from imbssl.methods import METHODS, SECTIONS
from imbssl.methods.moco import MoCoConfig
from imbssl.methods.simsiam import SimSiamConfig
from imbssl.pipelines.runfolder import RUN_CONFIG, changed_keys, read_saved_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "name: x\noptim: {epochs: 3}\ndata: {subset: {profile: exp, imbalance: 100}}\n")
    cfg = load_config(path, ["optim.epochs=7", "method.name=simclr", "augment.crop_scale=[0.3, 1.0]"])
    assert cfg.optim.epochs == 7 and cfg.method.name == "simclr"
    assert cfg.data.subset.imbalance == 100 and cfg.augment.crop_scale == (0.3, 1.0)


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "optim: {epochs: 3, baselr: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.baselr'"):
        load_config(path)


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'train.fast'"):
        load_config(None, ["train.fast=true"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match="data.subset.profile"):
        load_config(None, ["data.subset.profile=zipf"])


def test_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("does-not-exist.yaml")


# -- the method sections (issue 30) ------------------------------------------------------------------------------
def test_the_method_section_is_the_one_its_name_names():
    assert type(load_config(None, ["method.name=moco"]).method) is MoCoConfig
    assert type(load_config(None, ["method.proj_dim=64"]).method) is SimSiamConfig  # no name: simsiam, as before
    assert set(load_config(None, ["method.name=moco"]).model_dump()["method"]) == set(MoCoConfig.model_fields)
    for name, method in METHODS.items():  # the registry, its sections and their names agree
        assert method.config_class.model_fields["name"].default == name and method.display_name


@pytest.mark.parametrize("overrides,message", [
    (["method.name=moco", "method.moco_temperature=0.1"],
     "--set method.moco_temperature=0.1: method.moco_temperature is now method.temperature (moco's section)"),
    (["method.name=excb", "method.excb_pairing=code"],
     "--set method.excb_pairing=code: method.excb_pairing is now method.pairing (excb's section)"),
    (["method.name=simclr", "method.num_clusters=64"],
     "--set method.num_clusters=64: method.num_clusters is not a key of simclr's section (it belongs to excb, msn)"),
    (["method.name=simclr", "method.bcl_beta=0.9"],
     "method.bcl_beta is not a key of simclr's section (bcl-i, bcl-d had it; it is now method.beta there)"),
    (["method.name=simclr", "method.size=3"], "--set method.size=3: unknown config key 'method.size'"),
    (["method.name=simclr", "method.temperature=0"], "--set method.temperature=0: method.temperature: Input should be"),
    (["method.name=swav"], "--set method.name=swav: method.name: not one of the methods simsiam, simclr"),
])
def test_a_key_outside_the_methods_section_is_refused_in_one_line_naming_it(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_switching_the_method_of_a_config_names_the_key_the_new_method_does_not_read(tmp_path):
    path = write(tmp_path, "method: {name: simsiam, proj_dim: 64, pred_hidden: 32}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: method.pred_hidden is not a key of simclr's section "
                                                    f"(it belongs to simsiam, excb, byol)")):
        load_config(path, ["method.name=simclr"])


@pytest.mark.parametrize("overrides,message", [
    (["method.name=msn", "method.sinkhorn=true", "method.prior.kind=power_law"], "method: sinkhorn forces uniform"),
    (["method.name=msn", "method.sinkhorn=true", "method.prior.kind=power_law_fit"],
     "method: sinkhorn forces uniform cluster marginals, which contradicts prior.kind=power_law_fit"),
    (["method.name=excb", "method.prior.kind=estimated", "method.centroid_init=random"],
     "method: prior.kind=estimated takes its sizes from the k-means of the centroid initialisation"),
    (["method.name=sdclr", "method.prune_ratio=1"], "method.prune_ratio: Input should be less than 1"),
])
def test_each_methods_checks_live_in_its_section_and_answer_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_a_grid_shares_method_keys_with_the_methods_that_have_them():
    shared = {"temperature": 0.2, "proj_dim": 64, "num_clusters": 32, "mask_patch": 2}
    assert shared_method_keys(shared, "simclr") == {"temperature": 0.2, "proj_dim": 64}
    assert shared_method_keys(shared, "msn") == {"proj_dim": 64, "num_clusters": 32, "mask_patch": 2}
    assert shared_method_keys(shared, "rotation") == {}
    with pytest.raises(ConfigError, match=re.escape("base.method.excb_pairing is now base.method.pairing (excb's")):
        shared_method_keys({"excb_pairing": "code"}, "excb")
    with pytest.raises(ConfigError, match="unknown config key 'base.method.tempreature'"):
        shared_method_keys({"tempreature": 0.2}, "simclr")


#: a run folder's method section as imbssl saved it before issue 30: one flat section with every method's keys (the
#: dump of the old MethodConfig(name="moco"); each test sets its own name and values)
OLD_METHOD_SECTION = yaml.safe_load("""
name: moco
proj_hidden: 512
proj_dim: 512
pred_hidden: 128
fix_predictor_lr: true
temperature: 0.5
prune_ratio: 0.9
bcl_beta: 0.97
simclr_head: simclr
reference_head: true
num_clusters: 512
teacher_temperature: 0.04
student_temperature: 0.1
teacher_momentum: 0.996
size_momentum: 0.999
balancing: excb
center_momentum: 0.9
centroid_init: kmeans
centroid_weight_decay: [0.001, 0.0001]
excb_proj_hidden_layers: 1
excb_head_batches: by_size
excb_pairing: paper
rotations: all
queue_size: 4096
key_momentum: 0.99
moco_temperature: 0.2
moco_shuffle_bn: true
moco_bn_splits: 8
prior: {kind: uniform, tau: 0.25, values: null, path: null}
anchor_temperature: 0.1
target_temperature: 0.025
regularization_weight: 1.0
mask_ratio: 0.3
mask_patch: 4
sinkhorn: false
msn_proj_activation: relu
msn_view_batches: each
msn_clip_grad_norm: null
""")


@pytest.mark.parametrize("name,saved,asked", [
    ("simsiam", {"pred_hidden": 32, "temperature": 0.2}, {"pred_hidden": 32}),
    ("simclr", {"temperature": 0.2, "simclr_head": "bcl"}, {"temperature": 0.2, "head": "bcl"}),
    ("moco", {"moco_temperature": 0.1, "moco_shuffle_bn": False, "moco_bn_splits": 1},
     {"temperature": 0.1, "shuffle_bn": False, "bn_splits": 1}),
    ("sdclr", {"temperature": 0.2, "prune_ratio": 0.8}, {"temperature": 0.2, "prune_ratio": 0.8}),
    ("bcl-d", {"bcl_beta": 0.9, "reference_head": False}, {"beta": 0.9, "reference_head": False}),
    ("excb", {"excb_proj_hidden_layers": 2, "excb_head_batches": "all", "excb_pairing": "code", "num_clusters": 64},
     {"proj_hidden_layers": 2, "head_batches": "all", "pairing": "code", "num_clusters": 64}),
    ("msn", {"msn_proj_activation": "gelu", "msn_view_batches": "by_size", "msn_clip_grad_norm": 3.0,
             "prior": {"kind": "power_law", "tau": 0.25}},
     {"proj_activation": "gelu", "view_batches": "by_size", "clip_grad_norm": 3.0, "prior": {"kind": "power_law"}}),
    ("rotation", {"rotations": "one"}, {"rotations": "one"}),
])
def test_a_run_folder_saved_before_the_sections_is_migrated_and_stays_the_same_run(tmp_path, name, saved, asked):
    tree = {**RunConfig().model_dump(mode="json"), "method": {**OLD_METHOD_SECTION, "name": name, **saved}}
    (tmp_path / RUN_CONFIG).write_text(yaml.safe_dump(tree))
    migrated = read_saved_config(tmp_path / RUN_CONFIG, RunConfig)
    today = load_config(None, [f"method.name={name}", *(f"method.{k}={v}" for k, v in asked.items())])
    assert migrated.method == today.method and changed_keys(migrated, today) == {}
    first = next(iter(asked))
    assert f"method.{first}" in changed_keys(migrated, RunConfig(method=SECTIONS[name]()))  # it tells runs apart


def test_old_sdclr_and_bcl_folders_trained_simclrs_head_and_todays_dumps_pass_unchanged():
    before_29 = {k: v for k, v in OLD_METHOD_SECTION.items() if k not in ("reference_head", "simclr_head")}
    for name in ("sdclr", "bcl-i", "bcl-d"):
        assert migrate_method_section({**before_29, "name": name})["reference_head"] is False
    assert migrate_method_section({**before_29, "name": "simclr"})["head"] == "simclr"
    for section in SECTIONS.values():
        dump = section().model_dump(mode="json")
        assert migrate_method_section(dump) == dump
    with pytest.raises(ConfigError, match="unknown config key 'method.typo'"):  # never dropped unread
        build_config({"method": migrate_method_section({"name": "simclr", "typo": 1})})
    nested = migrate_saved_config({"base": {"method": {**OLD_METHOD_SECTION, "name": "moco"}}})  # pipeline.yaml
    assert nested["base"]["method"]["temperature"] == 0.2 and "moco_temperature" not in nested["base"]["method"]


@pytest.mark.slow
def test_the_config_and_method_modules_import_in_any_order():
    """config.py builds the method union from imbssl.methods, whose modules must not import config.py at run time."""
    modules = ["imbssl.config", "imbssl.methods", "imbssl.engine.optim", "imbssl.priors", "imbssl.cli",
               "imbssl.data", "imbssl.models", "imbssl.augment", "imbssl.eval", "imbssl.methods.excb",
               "imbssl.pipelines.pretrain"]
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n"
              "    for loaded in [m for m in sys.modules if m.startswith('imbssl')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_command_line_loads_without_torch():
    """``imbssl --help`` and a mistyped ``--set`` answer at once: cli.py reaches config.py (which imports every
    method, and so torch) only inside the commands."""
    script = "import sys, imbssl.cli; print(sorted(m for m in ('torch', 'imbssl.config') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("section,key,read", [
    ({"name": "excb"}, "center_momentum", False), ({"name": "excb", "balancing": "centering"}, "center_momentum", True),
    ({"name": "simclr", "head": "bcl"}, "proj_hidden", False), ({"name": "simclr"}, "proj_hidden", True),
    ({"name": "sdclr"}, "proj_hidden", True),  # its authors' head does not read it, but SimCLR's head is still drawn
])
def test_a_sections_unread_keys_do_not_tell_runs_apart(section, key, read):
    """``unused_keys`` of the sections: DINO's centre momentum outside centering, SimCLR's hidden width under BCL's
    head, which is as wide as the features."""
    other = {**section, key: 64 if key == "proj_hidden" else 0.5}
    assert bool(changed_keys(build_config({"method": section}), build_config({"method": other}))) == read
