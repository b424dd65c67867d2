"""ImageNet-stem ResNets under torchvision's names, ``imbssl export``, its input transform and the torch.hub entry
point (docs/export.md)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from conftest import imbssl
from imbssl.augment import Normalize
from imbssl.config import ConfigError, save_config
from imbssl.data.longtail import load_index_meta
from imbssl.data.sources import _resized
from imbssl.engine.checkpoint import load_safe
from imbssl.models import build_backbone, build_resnet, torchvision_state_dict
from imbssl.pipelines.common import save_backbone
from imbssl.pipelines.export import (SAFETENSORS_FILE, TORCHVISION_FILE, InputTransform, export_run, load_exported,
                                     load_for_inference, run_backbone)
from imbssl.pipelines.pretrain import BACKBONE_FILE
from imbssl.pipelines.runfolder import RUN_CONFIG

REPO = Path(__file__).resolve().parents[1]

#: torchvision.models.resnet18 / resnet50 parameter counts (fc included), as its model cards give them
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "resnet50": 25_557_032}


def torchvision_shapes(depth: str, width: float = 1.0, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of torchvision's ResNet (torchvision/models/resnet.py), written out independently."""
    bottleneck, blocks = {"resnet18": (False, (2, 2, 2, 2)), "resnet50": (True, (3, 4, 6, 3))}[depth]
    planes_of = [max(8, round(c * width)) for c in (64, 128, 256, 512)]
    shapes = {"conv1.weight": (planes_of[0], 3, 7, 7)}

    def bn(name: str, channels: int) -> None:
        shapes.update({f"{name}.weight": (channels,), f"{name}.bias": (channels,), f"{name}.running_mean": (channels,),
                       f"{name}.running_var": (channels,), f"{name}.num_batches_tracked": ()})

    bn("bn1", planes_of[0])
    inplanes = planes_of[0]
    for stage, (planes, count) in enumerate(zip(planes_of, blocks), start=1):
        for j in range(count):
            block, stride = f"layer{stage}.{j}", 2 if stage > 1 and j == 0 else 1
            if bottleneck:
                out = planes * 4
                convs = [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (out, planes, 1, 1)]
            else:
                out = planes
                convs = [(planes, inplanes, 3, 3), (planes, planes, 3, 3)]
            for k, shape in enumerate(convs, start=1):
                shapes[f"{block}.conv{k}.weight"] = shape
                bn(f"{block}.bn{k}", shape[0])
            if stride != 1 or inplanes != out:
                shapes[f"{block}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{block}.downsample.1", out)
            inplanes = out
    shapes.update({"fc.weight": (num_classes, inplanes), "fc.bias": (num_classes,)})
    return shapes


@pytest.mark.slow
@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_imagenet_resnets_export_torchvisions_names_and_shapes(depth):
    model = build_resnet(depth, stem="imagenet")
    state = torchvision_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == torchvision_shapes(depth)
    trainable = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert trainable == TORCHVISION_PARAMETERS[depth]
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, model.feature_dim)  # 64 px: 16 after the stem, 2 at the end
    assert model.stem(torch.zeros(1, 3, 224, 224)).shape[-1] == 56  # the 7x7 stride-2 conv and the max-pool


@pytest.mark.slow
def test_export_round_trip_of_an_unlabelled_run_reproduces_the_features(tiny_cfg, tmp_path):
    """A run pre-trained as if its data had no labels (no class counts, no eval.json) exports and reloads, through
    load_exported and torch.hub, with the training images' size recorded."""
    from imbssl.pipelines.pretrain import pretrain

    cfg = tiny_cfg(data={"labels": "none"}, model={"backbone": "resnet18", "width": 0.25, "stem": "imagenet"},
                   optim={"epochs": 1})
    run = pretrain(cfg, tmp_path / "run")
    assert "class_counts" not in load_index_meta(run / "subset.npz") and not (run / "eval.json").exists()
    done = imbssl("export", run, "--out", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == 2
    _, trained, normalize = run_backbone(run)
    exported, exported_normalize = load_exported(tmp_path / "out" / SAFETENSORS_FILE)
    hub_model, hub_transform = torch.hub.load(str(REPO), "backbone", run=str(tmp_path / "out"), source="local")
    assert exported_normalize.image_size == hub_transform.image_size == (8, 8)  # digits
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(exported(exported_normalize(images)), trained(normalize(images)))
        assert torch.equal(hub_model(hub_transform(images)), trained(normalize(images)))
    torchvision = load_safe(tmp_path / "out" / TORCHVISION_FILE)
    shapes = torchvision_shapes("resnet18", width=0.25)
    shapes["conv1.weight"] = (16, 1, 7, 7)  # digits have one channel
    assert {k: tuple(v.shape) for k, v in torchvision.items()} == shapes
    assert torch.equal(torchvision["layer4.1.conv2.weight"], trained.state_dict()["layers.7.conv2.weight"])


def test_exported_normalize_takes_uint8_and_float_unit_images(tiny_cfg, tmp_path):
    """Float [0, 1] images (what ToTensor gives) get the features of the same uint8 images, not those of images 255
    times darker; float images in [0, 255] are refused in one line. A run folder as pre-training leaves it."""
    cfg = tiny_cfg()
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / RUN_CONFIG)
    save_backbone(build_backbone(cfg.model, 1), Normalize(torch.tensor([0.3]), torch.tensor([0.2])),
                  tmp_path / "run" / BACKBONE_FILE)
    export_run(tmp_path / "run", tmp_path / "out")
    exported, normalize = load_exported(tmp_path / "out" / SAFETENSORS_FILE)
    images = torch.randint(0, 256, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    unit = images.float() / 255
    with torch.no_grad():
        assert torch.equal(exported(normalize(unit)), exported(normalize(images)))
    assert torch.equal(unit, images.float() / 255)  # the caller's tensor is not normalised in place
    with pytest.raises(ValueError, match=r"Normalize takes float images in \[0, 1\] .*: divide them by 255"):
        normalize(images.float())


MEAN, STD = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])


def normalised(unit: torch.Tensor) -> torch.Tensor:
    return (unit - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def test_input_transform_takes_uint8_and_float_images_in_either_layout_and_resizes_them():
    """uint8 [0, 255] and float [0, 1] give the same output; NHWC, one image (CHW, HWC), numpy and PIL are read;
    another size is stretched to the training size, bilinear with antialiasing."""
    transform = InputTransform(MEAN, STD, image_size=(8, 8))
    images = torch.randint(0, 256, (4, 3, 12, 10), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    unit = images.float() / 255
    out = transform(images)
    assert torch.equal(transform(unit), out)
    torch.testing.assert_close(out, normalised(F.interpolate(unit, (8, 8), mode="bilinear", antialias=True)))
    nhwc = images.permute(0, 2, 3, 1).contiguous()
    torch.testing.assert_close(transform(nhwc), out)
    torch.testing.assert_close(transform(nhwc.float() / 255), out)
    for one in (images[1], nhwc[1].numpy(), Image.fromarray(nhwc[1].numpy())):
        torch.testing.assert_close(transform(one), out[1])
    at_size = images[..., :8, :8]
    assert torch.equal(transform(at_size), Normalize(MEAN, STD)(at_size))  # the training size: not resampled


def test_input_transform_resizes_as_the_decode_cache_stored_the_training_images():
    """Stretched, or the shorter side scaled and the centre kept (data.resize=center_crop): within a level of what
    data/sources.py's PIL resize gave the training images."""
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for resize in ("stretch", "center_crop"):
        stored = np.array(_resized(Image.fromarray(image), 8, resize))
        ours = InputTransform(torch.zeros(3), torch.ones(3), (8, 8), resize)(image)
        torch.testing.assert_close(ours, torch.from_numpy(stored).permute(2, 0, 1) / 255, atol=1.01 / 255, rtol=0)


def test_input_transform_refuses_what_it_cannot_read_in_one_line():
    transform = InputTransform(MEAN, STD, image_size=(8, 8))
    with pytest.raises(ValueError, match="integer images must be uint8 levels in \\[0, 255\\], not torch.int32"):
        transform(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \(2, 5, 8, 8\): the backbone takes 3-channel images, NCHW or NHWC"):
        transform(torch.zeros(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"Normalize takes float images in \[0, 1\]"):
        transform(torch.full((2, 3, 16, 16), 255.0))


def test_torch_hub_loads_the_backbone_and_transform_of_a_run_its_export_and_its_file(tiny_cfg, tmp_path):
    """hubconf.py's ``backbone`` from a run folder as pre-training leaves it, its export folder and the
    backbone.safetensors: the same eval-mode backbone, whose transform resizes images of twice the training size
    and gives uint8 and float [0, 1] images the same features."""
    cfg = tiny_cfg()
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / RUN_CONFIG)
    save_backbone(build_backbone(cfg.model, 1), Normalize(torch.tensor([0.3]), torch.tensor([0.2])),
                  tmp_path / "run" / BACKBONE_FILE, image_size=(8, 8))
    export_run(tmp_path / "run", tmp_path / "out")
    images = torch.randint(0, 256, (5, 16, 16, 1), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    features = []
    for run in (tmp_path / "run", tmp_path / "out", tmp_path / "out" / SAFETENSORS_FILE):
        model, transform = torch.hub.load(str(REPO), "backbone", run=str(run), source="local")
        assert not model.training and transform.image_size == (8, 8)
        with torch.no_grad():
            features.append(model(transform(images)))
            assert torch.equal(model(transform(images.float() / 255)), features[-1])
    assert features[0].shape == (5, model.feature_dim) and features[0].std() > 0
    assert all(torch.equal(f, features[0]) for f in features)


@pytest.mark.slow
def test_hubconf_takes_imbssl_from_a_source_checkout_or_else_the_installed_one(tiny_cfg, tmp_path):
    """From a checkout (hubconf.py beside src/) the checkout's package, so both come from one commit; from a folder
    with hubconf.py alone, the installed imbssl."""
    cfg = tiny_cfg()
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / RUN_CONFIG)
    save_backbone(build_backbone(cfg.model, 1), Normalize(torch.tensor([0.3]), torch.tensor([0.2])),
                  tmp_path / "run" / BACKBONE_FILE)
    checkout, hub_only = tmp_path / "checkout", tmp_path / "hub-only"
    shutil.copytree(REPO / "src" / "imbssl", checkout / "src" / "imbssl", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in (checkout, hub_only):
        folder.mkdir(exist_ok=True)
        shutil.copy(REPO / "hubconf.py", folder)
    load = ("import sys, torch; model, transform = torch.hub.load(sys.argv[1], 'backbone', run=sys.argv[2], "
            "source='local'); import imbssl; print(imbssl.__file__)")
    installed = Path(sys.modules["imbssl"].__file__).parent
    for folder, package in ((checkout, checkout / "src" / "imbssl"), (hub_only, installed)):
        done = subprocess.run([sys.executable, "-c", load, str(folder), str(tmp_path / "run")], capture_output=True,
                              text=True, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr
        assert Path(done.stdout.strip()).parent == package


@pytest.mark.slow
def test_export_metadata_names_the_run_without_its_path(tiny_cfg, tmp_path):
    """A shared backbone.safetensors does not show the folders of whoever exported it."""
    cfg, run = tiny_cfg(), tmp_path / "private" / "my-run"
    run.mkdir(parents=True)
    save_config(cfg, run / RUN_CONFIG)
    save_backbone(build_backbone(cfg.model, 1), Normalize(torch.tensor([0.3]), torch.tensor([0.2])), run / BACKBONE_FILE)
    res = imbssl("export", run, "--out", tmp_path / "out", cwd=tmp_path)  # the absolute path
    assert res.returncode == 0, res.stderr
    with safe_open(str(tmp_path / "out" / SAFETENSORS_FILE), framework="pt") as exported:
        metadata = exported.metadata()
    assert metadata["run"] == "my-run"
    assert not [key for key, value in metadata.items() if "private" in value]


def test_export_names_what_is_missing(tmp_path, tiny_cfg):
    from imbssl.config import save_config

    save_config(tiny_cfg(), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="holds neither backbone.pt nor model.pt"):
        run_backbone(tmp_path)
    (tmp_path / "fake.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ConfigError, match="is not an imbssl backbone export"):
        load_exported(tmp_path / "fake.safetensors")
    with pytest.raises(ConfigError, match="elsewhere is neither a run folder \\(no config.yaml\\) nor an export"):
        load_for_inference(tmp_path / "elsewhere")


def test_the_imagenet_stem_is_for_resnets_only():
    from imbssl.config import ModelConfig

    with pytest.raises(ValueError, match="stem imagenet is for resnet18, resnet34 and resnet50, not small_cnn"):
        ModelConfig(backbone="small_cnn", stem="imagenet")


@pytest.mark.slow
def test_vit_s16_has_the_size_of_deits_vit_small_at_224px():
    from imbssl.config import ModelConfig
    from imbssl.models import build_backbone

    vit = build_backbone(ModelConfig(backbone="vit_s16"), 3)
    # timm's vit_small_patch16_224 has 22,050,664 parameters: ours less its 1000-class head (384 x 1000 + 1000)
    # and its learned position embedding (197 x 384), which the fixed sine-cosine positions replace.
    assert sum(p.numel() for p in vit.parameters()) == 22_050_664 - 385_000 - 197 * 384
    images = torch.randn(2, 3, 224, 224)
    assert vit.tokens(images).shape == (2, 196, 384)
    keep = torch.stack([torch.randperm(196)[:49] for _ in range(2)])  # MSN's masking drops 3 of 4 tokens
    assert vit(images).shape == vit(images, keep).shape == (2, 384)
