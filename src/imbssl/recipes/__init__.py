"""Grids that reproduce the papers' tables; each composes pipelines, never reaches inside them."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml


def preset_path(experiment: str, preset: str) -> Path:
    path = Path(str(resources.files("imbssl") / "configs" / experiment / f"{preset}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"no preset {preset!r} for {experiment}; available: {available}")
    return path


def load_preset(experiment: str, preset: str) -> dict:
    return yaml.safe_load(preset_path(experiment, preset).read_text()) or {}
