import pytest

from imbssl.config import ConfigError, load_config, parse_overrides


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
