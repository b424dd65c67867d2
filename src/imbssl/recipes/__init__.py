"""Grids that reproduce the papers' tables; each composes pipelines, never reaches inside them."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from imbssl.config import deep_merge


#: what ``base_from`` takes from the other experiment's preset: whatever makes a run the same run.
SHARED_KEYS = ("base", "seeds", "method_optim")


def preset_path(experiment: str, preset: str) -> Path:
    path = Path(str(resources.files("imbssl") / "configs" / experiment / f"{preset}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"no preset {preset!r} for {experiment}; available: {available}")
    return path


def load_preset(experiment: str, preset: str) -> dict:
    """The preset's tree. ``base_from: OTHER`` in it stands for the ``base``, ``seeds`` and ``method_optim`` of
    OTHER's preset of the same name (the file's own keys win), so two experiments share runs and one can reuse
    the other's."""
    tree = yaml.safe_load(preset_path(experiment, preset).read_text()) or {}
    if source := tree.pop("base_from", None):
        shared = load_preset(source, preset)
        tree = deep_merge({key: shared[key] for key in SHARED_KEYS if key in shared}, tree)
    return tree
