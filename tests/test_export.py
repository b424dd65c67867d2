"""ImageNet-stem ResNets under torchvision's names, and ``imbssl export`` (docs/export.md)."""
from __future__ import annotations

import pytest
import torch

from conftest import imbssl
from imbssl.augment import Normalize
from imbssl.config import ConfigError, save_config
from imbssl.engine.checkpoint import load_safe
from imbssl.models import build_backbone, build_resnet, torchvision_state_dict
from imbssl.pipelines.common import save_backbone
from imbssl.pipelines.export import SAFETENSORS_FILE, TORCHVISION_FILE, export_run, load_exported, run_backbone
from imbssl.pipelines.pretrain import BACKBONE_FILE
from imbssl.pipelines.runfolder import RUN_CONFIG

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
def test_export_round_trip_reproduces_the_features(tiny_cfg, tmp_path):
    from imbssl.pipelines.pretrain import pretrain

    run = pretrain(tiny_cfg(model={"backbone": "resnet18", "width": 0.25, "stem": "imagenet"}, optim={"epochs": 1}),
                   tmp_path / "run")
    done = imbssl("export", run, "--out", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == 2
    _, trained, normalize = run_backbone(run)
    exported, exported_normalize = load_exported(tmp_path / "out" / SAFETENSORS_FILE)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(exported(exported_normalize(images)), trained(normalize(images)))
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


def test_export_names_what_is_missing(tmp_path, tiny_cfg):
    from imbssl.config import save_config

    save_config(tiny_cfg(), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="holds neither backbone.pt nor model.pt"):
        run_backbone(tmp_path)
    (tmp_path / "fake.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ConfigError, match="is not an imbssl backbone export"):
        load_exported(tmp_path / "fake.safetensors")


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
