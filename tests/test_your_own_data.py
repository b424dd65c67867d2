"""docs/your-own-data.md: its commands, run as written on a generated image tree, from a folder of images to weights
loaded through torch.hub."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imbssl.engine.precision import AUTO_PRECISION_ENV

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "your-own-data.md"
#: the one placeholder of the guide: the folder that holds this repository's hubconf.py
REPO_PLACEHOLDER = "path/to/imbssl"


def guide_commands() -> list[str]:
    """The lines of the bash block that follows the guide's ``<!-- guide: ... -->`` marker."""
    block = re.search(r"<!-- guide:[^>]*-->\s*```bash\n(.*?)```", GUIDE.read_text(), re.S)
    assert block, f"{GUIDE} has no bash block after a '<!-- guide: -->' marker"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _blobs(rng: np.random.Generator, count: int, centre: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` RGB images around one colour, of ``size`` (width, height): a class the backbone can tell apart."""
    return [np.clip(rng.normal(centre, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def make_tree(root: Path) -> None:
    """my-images/: 72 unlabelled images of two sizes, nested, 3:1 between two kinds; my-labelled/: train/ and test/."""
    rng = np.random.default_rng(0)
    for i, pixels in enumerate(_blobs(rng, 54, 60, (40, 30)) + _blobs(rng, 18, 190, (36, 36))):
        path = root / "my-images" / f"batch{i % 3}" / f"photo{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=95)
    for split, count in (("train", 20), ("test", 10)):
        for name, centre in (("dark", 60), ("light", 190)):
            folder = root / "my-labelled" / split / name
            folder.mkdir(parents=True)
            for i, pixels in enumerate(_blobs(rng, count, centre, (32, 32))):
                Image.fromarray(pixels).save(folder / f"{i}.png")


def shims(root: Path) -> Path:
    """``imbssl`` and ``python`` as this interpreter runs them, first on PATH: the guide runs against this checkout."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, command in (("imbssl", f'exec "{sys.executable}" -m imbssl "$@"'), ("python", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{command}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_the_guide_runs_as_written_from_a_folder_of_images_to_hub_weights(tmp_path):
    make_tree(tmp_path)
    env = {"PATH": f"{shims(tmp_path)}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           AUTO_PRECISION_ENV: os.environ[AUTO_PRECISION_ENV]}  # conftest's: auto is fp32 on every CI machine
    outputs = []
    for line in guide_commands():
        command = line.replace(REPO_PLACEHOLDER, str(REPO))
        res = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{command}\n{res.stdout}\n{res.stderr}"
        outputs.append(res.stdout + res.stderr)

    describe, pretrain, evaluate, export, hub = outputs
    assert "images: 72 readable, 0 unreadable" in describe
    assert "40x30 54" in describe and "36x36 18" in describe
    assert "probes" in pretrain and "skipped" in pretrain  # the one line that says why, not an error
    run = tmp_path / "runs" / "my-images"
    record = json.loads((run / "eval.json").read_text())
    sizes = record["feature_clusters"]["clusters"]["sorted_sizes"]
    assert sum(sizes) == 72 and record["feature_clusters"]["classes"] is None
    assert record["labelled_train"] + record["labelled_val"] == 40 and record["test"] == 20
    assert record["linear"]["top1"] > 90  # two colours 130 grey levels apart: a frozen random CNN separates them
    assert (run / "feature_clusters.png").stat().st_size > 0
    assert (run / "export" / "backbone.safetensors").is_file()
    assert hub.strip().splitlines()[-1] == str(_feature_dim(run))


def _feature_dim(run: Path) -> int:
    from imbssl.pipelines.export import run_backbone

    return run_backbone(run)[1].feature_dim
