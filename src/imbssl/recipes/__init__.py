"""Grids that reproduce the papers' tables (``imbssl reproduce NAME``); each composes pipelines, never reaches inside
them. A recipe is its preset's schema, the cells it asks for and its report, on the one mechanism of grid.py."""
from __future__ import annotations

from importlib import import_module, resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from imbssl.configbase import deep_merge

if TYPE_CHECKING:
    from imbssl.recipes.grid import GridConfig

#: ``imbssl reproduce NAME``: the recipe's schema (module.Class under imbssl.recipes) and what it reproduces
RECIPES: dict[str, tuple[str, str]] = {
    "experiment-1": ("experiment_1.Experiment1Config", "Table 2: SimCLR and SimSiam, imbalanced vs balanced."),
    "experiment-2": ("experiment_2.Experiment2Config", "Table 3: offline clustering vs the baselines."),
    "excb": ("excb.ExcbExperimentConfig", "ExCB beside its baselines; a K ablation."),
    "priors": ("priors.PriorsExperimentConfig", "Uniform vs power-law cluster priors: MSN/PMSN, ExCB."),
    "longtail-ssl": ("longtail_ssl.LongtailSSLConfig", "SimCLR, Focal, SDCLR, BCL (+GH), BYOL, DINO, BT, VICReg."),
    "ssp": ("ssp.SSPExperimentConfig", "Rethinking's Table 2: LT losses, scratch vs SSP."),
    "semi-supervised": ("semi_supervised.SemiSupervisedExperimentConfig",
                        "Rethinking's Table 1: LT losses with self-training on D_U."),
}


#: what ``base_from`` takes from the other experiment's preset: whatever makes a run the same run.
SHARED_KEYS = ("base", "seeds", "method_settings")


def preset_path(experiment: str, preset: str) -> Path:
    path = Path(str(resources.files("imbssl") / "configs" / experiment / f"{preset}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"no preset {preset!r} for {experiment}; available: {available}")
    return path


def load_preset(experiment: str, preset: str) -> dict:
    """The preset's tree. ``base_from: OTHER`` in it stands for the ``base``, ``seeds`` and ``method_settings`` of
    OTHER's preset of the same name (the file's own keys win), so two experiments share runs and one can reuse
    the other's."""
    tree = yaml.safe_load(preset_path(experiment, preset).read_text()) or {}
    if source := tree.pop("base_from", None):
        shared = load_preset(source, preset)
        tree = deep_merge({key: shared[key] for key in SHARED_KEYS if key in shared}, tree)
    return tree


def recipe(name: str) -> type[GridConfig]:
    """The schema of the recipe ``name`` (a key of RECIPES)."""
    module, schema = RECIPES[name][0].rsplit(".", 1)
    return getattr(import_module(f"imbssl.recipes.{module}"), schema)
