import pytest
import torch

from imbssl.config import build_config

torch.set_num_threads(2)


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
        for section, values in sections.items():
            if isinstance(values, dict):
                tree[section] = {**tree.get(section, {}), **values}
            else:
                tree[section] = values
        return build_config(tree)
    return make
