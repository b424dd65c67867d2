"""torch.hub entry points of imbssl (docs/export.md)::

    model, transform = torch.hub.load("path/to/imbssl", "backbone", run="runs/my-run", source="local")
    features = model(transform(images))  # images: uint8 [0, 255] or float [0, 1], NCHW or NHWC

The code is this repository's own (its src/), so that the entry point and the package come from one commit; without
a src/ beside this file, the installed imbssl.
"""
import sys
from pathlib import Path

# torch.hub checks that these import before it calls an entry point: what importing imbssl's export needs
dependencies = ["torch", "numpy", "PIL", "safetensors", "pydantic", "yaml", "sklearn", "faiss", "tqdm", "tensorboard"]

_SRC = Path(__file__).resolve().parent / "src"
if (_SRC / "imbssl").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


def backbone(run: str):
    """A pre-trained imbssl backbone, in eval mode, and its input transform, from ``run``: a run folder (its
    backbone.pt, or a classifier run's model.pt), an ``imbssl export`` folder or a backbone.safetensors.

    The transform takes uint8 images in [0, 255] or float ones in [0, 1], NCHW or NHWC (one image CHW or HWC),
    resizes them to the training images' size and normalises them with the run's mean and std (docs/export.md).
    """
    from imbssl.pipelines.export import load_for_inference

    return load_for_inference(run)
