"""Unlabelled data: the images source (a folder, tar or path list in any layout), ``data.labels: none``, pre-training
without labels, ``imbssl data describe`` of unlabelled images, and the bad input a user's own folder brings."""
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import imbssl
from imbssl.config import ConfigError, DataConfig, SupervisedConfig, build_config, validate_tree
from imbssl.data import DataError, ImageSet, load_splits
from imbssl.data.cache import CacheSpaceError
from imbssl.data.sources import _images_source, _load_digits, guess_source
from imbssl.engine.checkpoint import load_safe
from imbssl.pipelines.common import load_pretrain_data
from imbssl.pipelines.pretrain import BACKBONE_FILE, SKIPPED_FILE, pretrain
from imbssl.recipes.experiment_1 import Experiment1Config


def _save(path: Path, image: Image.Image | np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **options)
    return path


def _shade(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def _cfg(tmp_path: Path, path: Path, **kw) -> DataConfig:
    return DataConfig(source="images", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def _nested_folder(root: Path) -> Path:
    """Four images at three depths, with a hidden file and a note that are not images."""
    for name, value in {"b/deep/x.png": 30, "b/y.png": 20, "a.png": 10}.items():
        _save(root / name, _shade(value))
    _save(root / "c" / "z.jpeg", _shade(40), quality=100)
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


SORTED = ["a.png", "b/deep/x.png", "b/y.png", "c/z.jpeg"]  # path order, component by component


def _check_unlabelled(splits: dict, count: int) -> None:
    train, test = splits["train"], splits["test"]
    assert not train.labelled and train.classes == () and train.labels.tolist() == [-1] * count
    assert test.images.shape == (0, *train.images.shape[1:]) and len(test.labels) == 0
    with pytest.raises(DataError, match="class counts need labels"):
        train.class_counts()


# ------------------------------------------------------------------------------------------ the source


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_images_source_reads_any_layout_in_sorted_path_order(tmp_path, kind):
    root = _nested_folder(tmp_path / "imgs")
    if kind == "tar":
        with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tf:
            tf.add(root, arcname="imgs")
        root = tmp_path / "imgs.tar.gz"
    splits = load_splits(_cfg(tmp_path, root))
    _check_unlabelled(splits, 4)
    assert splits["train"].images[:, 0, 0, 0].tolist()[:3] == [10, 30, 20]  # a, b/deep/x, b/y
    assert abs(int(splits["train"].images[3, 0, 0, 0]) - 40) <= 2  # the JPEG, last


def test_describe_reads_a_path_without_a_source_as_an_imagefolder_only_when_it_has_train_class_folders(tmp_path):
    _nested_folder(tmp_path / "flat")
    for top in ("tree", "tree-top/cifar"):
        for split in ("train", "test"):
            _save(tmp_path / top / split / "cat" / "1.png", _shade(5))
    for name in ("flat", "tree", "tree-top"):
        with tarfile.open(tmp_path / f"{name}.tar.gz", "w:gz") as tf:
            tf.add(tmp_path / name, arcname=".")
    guesses = {name: guess_source(tmp_path / name) for name in ("flat", "tree", "tree-top", "flat.tar.gz",
                                                                 "tree.tar.gz", "tree-top.tar.gz")}
    assert guesses == {"flat": "images", "tree": "imagefolder", "tree-top": "imagefolder",
                       "flat.tar.gz": "images", "tree.tar.gz": "imagefolder", "tree-top.tar.gz": "imagefolder"}


def test_a_path_list_gives_its_order_and_refuses_traversal_and_missing_files(tmp_path):
    root = _nested_folder(tmp_path / "imgs")
    (root / "list.txt").write_text("b/y.png\na.png\n")
    splits = load_splits(_cfg(tmp_path, root, train_list="list.txt"))
    assert splits["train"].images[:, 0, 0, 0].tolist() == [20, 10]
    _check_unlabelled(splits, 2)
    (root / "list.txt").write_text("a.png\n../outside.png\n")
    with pytest.raises(DataError, match=r"data.train_list .*list.txt line 2: refusing path '../outside.png'"):
        load_splits(_cfg(tmp_path, root, train_list="list.txt"))
    (root / "list.txt").write_text("a.png\nb/gone.png\n")
    with pytest.raises(DataError, match="image b/gone.png not found under"):
        load_splits(_cfg(tmp_path, root, train_list="list.txt"))


def test_the_cache_key_follows_content_size_options_and_the_unreadable_choice(tmp_path):
    root = _nested_folder(tmp_path / "imgs")
    key = lambda **kw: _images_source(_cfg(tmp_path, root, **kw), tmp_path / "cache")[0]  # noqa: E731
    keys = {key(), key(image_size=16), key(image_size=16, resize="center_crop"), key(unreadable="skip")}
    assert len(keys) == 4 and key() == key()
    _save(root / "new.png", _shade(50))
    assert key() not in keys


@pytest.mark.parametrize("settings, message", [
    ({"test_list": "t.txt"}, "data.test_list: the images source has no test split"),
    ({"subset": {"profile": "exp"}}, "data.subset.profile exp draws images per class"),
    ({"subset": {"profile": "balanced"}}, "data.subset.profile balanced draws images per class"),
])
def test_what_needs_labels_or_a_test_split_is_refused_in_one_line(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_config({"data": {"source": "images", "path": str(tmp_path), **settings}})
    assert "\n" not in str(err.value)


def test_unreadable_skip_belongs_to_the_images_source():
    with pytest.raises(ValueError, match="data.unreadable=skip is for data.source images"):
        DataConfig(source="digits", unreadable="skip")


def test_an_unlabelled_image_set_has_no_classes_and_every_label_minus_one():
    images = np.zeros((3, 8, 8, 1), np.uint8)
    assert ImageSet.unlabelled(images).labels.tolist() == [-1, -1, -1]
    with pytest.raises(DataError, match="every label -1"):
        ImageSet(images, np.zeros(3, np.int64), ())
    with pytest.raises(DataError, match="labels outside"):
        ImageSet(images, np.full(3, -1, np.int64), ("a",))


# ------------------------------------------------------------------------------------- labels: none


def test_labels_none_chooses_the_subset_by_the_labels_then_hides_them(tmp_path):
    subset = {"profile": "exp", "imbalance": 10}
    labelled = load_pretrain_data(DataConfig(subset=subset))
    hidden = load_pretrain_data(DataConfig(subset=subset, labels="none"))
    np.testing.assert_array_equal(hidden.indices, labelled.indices)
    np.testing.assert_array_equal(hidden.images, labelled.images)
    assert labelled.labels is not None and labelled.class_counts.tolist()[0] > labelled.class_counts.tolist()[-1]
    assert hidden.labels is None and hidden.class_counts is None
    _check_unlabelled(hidden.splits, len(labelled.train.labels))


def test_pipelines_that_learn_from_labels_refuse_an_unlabelled_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot run without labels, and data.labels none hides them"):
        validate_tree(SupervisedConfig, {"data": {"labels": "none"}})
    with pytest.raises(ValueError, match="cannot run without labels, and data.source images has none"):
        Experiment1Config.model_validate({"base": {"data": {"source": "images", "path": str(tmp_path)}}})


# ---------------------------------------------------------------------------- modes and the decode


#: the PIL modes a user's folder can hold
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F")


def _paletted(mode: str, planes: np.ndarray, palette: np.ndarray) -> Image.Image:
    image = Image.frombytes(mode, (8, 8), planes.tobytes())
    image.putpalette(palette.ravel().tolist())
    return image


def _ycbcr_as_rgb(ycc: np.ndarray) -> np.ndarray:
    """JFIF's YCbCr -> RGB in floating point (PIL's fixed point is within 1 of it)."""
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
                   axis=2)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _by_range(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.rint((values - values.min()) * 255 / (values.max() - values.min())).astype(np.uint8)


#: the independent conversion of YCbCr is JFIF's exact formula, which PIL's fixed point misses by at most 1
TOLERANCE = {"ycbcr.tif": 1}


def _independent_rgb() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """One image per PIL mode a user's folder holds (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, I, F; I and F
    once in each of their scaling rules), and its RGB computed here with numpy alone."""
    rng = np.random.default_rng(0)
    rgb, grey = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (8, 8), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    sixteen = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    cmyk = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    bits = rng.integers(0, 2, (8, 8)).astype(bool)
    wide = rng.integers(-2 ** 31, 2 ** 31, (8, 8), dtype=np.int32)
    unit, floats = rng.random((8, 8), dtype=np.float32), rng.uniform(-50, 300, (8, 8)).astype(np.float32)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    repeat = lambda plane: np.repeat(plane[..., None], 3, axis=2)  # noqa: E731
    as_16_bit = lambda values: repeat(np.rint(values / 257).astype(np.uint8))  # noqa: E731
    return {
        "bits.png": (Image.fromarray(bits), repeat(bits.astype(np.uint8) * 255)),
        "palette-alpha.tif": (_paletted("PA", np.concatenate([indices[..., None], alpha], 2), palette),
                              palette[indices]),
        "ycbcr.tif": (Image.frombytes("YCbCr", (8, 8), rgb.tobytes()), _ycbcr_as_rgb(rgb)),
        # 32-bit integer: 16-bit values as 16-bit ones, others by their range; floats in [0, 1] as v * 255, others
        # by their range
        "int-16.tif": (Image.fromarray(sixteen.astype(np.int32)), as_16_bit(sixteen)),
        "int-wide.tif": (Image.fromarray(wide), repeat(_by_range(wide))),
        "float-unit.tif": (Image.fromarray(unit), repeat(np.rint(unit.astype(np.float64) * 255).astype(np.uint8))),
        "float-wide.tif": (Image.fromarray(floats), repeat(_by_range(floats))),
        "rgb.png": (Image.frombytes("RGB", (8, 8), rgb.tobytes()), rgb),
        "grey.png": (Image.frombytes("L", (8, 8), grey.tobytes()), repeat(grey)),
        "rgba.png": (Image.frombytes("RGBA", (8, 8), np.concatenate([rgb, alpha], 2).tobytes()), rgb),
        "la.png": (Image.frombytes("LA", (8, 8), np.stack([grey, alpha[..., 0]], 2).tobytes()), repeat(grey)),
        # 16-bit: scaled to 8 bits (v / 257), not clipped to white as PIL's convert does
        "sixteen.png": (Image.fromarray(sixteen), as_16_bit(sixteen)),
        "cmyk.tif": (Image.frombytes("CMYK", (8, 8), cmyk.tobytes()),
                     np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)),
        "palette.png": (_paletted("P", indices, palette), palette[indices]),
    }


def test_mixed_modes_in_one_folder_decode_to_rgb_as_an_independent_conversion(tmp_path):
    cases = _independent_rgb()
    for name, (image, _) in cases.items():
        _save(tmp_path / "imgs" / name, image)
    assert Image.open(tmp_path / "imgs" / "sixteen.png").mode == "I;16"  # what a 16-bit PNG opens as
    assert {Image.open(tmp_path / "imgs" / name).mode for name in cases} == set(MODES)
    train = load_splits(_cfg(tmp_path, tmp_path / "imgs"))["train"]
    for row, name in enumerate(sorted(cases)):
        np.testing.assert_allclose(train.images[row], cases[name][1], atol=TOLERANCE.get(name, 0), rtol=0,
                                   err_msg=name)


def test_unreadable_images_are_refused_by_name_or_skipped_and_listed(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        _save(root / f"{i}.png", _shade(10 * (i + 1)))
    (root / "1-text.jpg").write_text("not a JPEG")  # its header is unreadable
    whole = (root / "2.png").read_bytes()
    (root / "2-cut.png").write_bytes(whole[:len(whole) // 2])  # its header reads; its pixels do not
    with pytest.raises(DataError, match=r"1-text.jpg: not in an image format PIL reads.*set data.unreadable=skip"):
        load_splits(_cfg(tmp_path, root))
    train = load_splits(_cfg(tmp_path, root, unreadable="skip"))["train"]
    assert train.images[:, 0, 0, 0].tolist() == [10, 20, 30] and train.labels.tolist() == [-1] * 3
    assert [Path(name).name for name in train.skipped] == ["1-text.jpg", "2-cut.png"]
    again = load_splits(_cfg(tmp_path, root, unreadable="skip"))["train"]  # a cache hit names them too
    assert again.skipped == train.skipped


def test_an_image_under_8_px_is_refused_by_name_unless_image_size_is_set(tmp_path, caplog):
    root = tmp_path / "imgs"
    _save(root / "big.png", _shade(10, 16))
    _save(root / "tiny.png", _shade(20, 4))
    with pytest.raises(DataError, match=r"tiny.png is 4x4, under 8 px on a side.*set data.image_size"):
        load_splits(_cfg(tmp_path, root))
    with caplog.at_level("INFO"):
        train = load_splits(_cfg(tmp_path, root, image_size=16))["train"]
    assert train.images.shape == (2, 16, 16, 3) and (train.images[1] == 20).all()
    assert "1 image(s) have a side under data.image_size=16 and are upscaled to it (the smallest: " in caplog.text



@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_images_of_two_sizes_are_refused_by_name_unless_image_size_is_set(tmp_path, kind):
    root = tmp_path / "imgs"
    _save(root / "a.png", _shade(10, 12))
    _save(root / "b.png", _shade(20, 9))
    path = root
    if kind == "tar":
        path = tmp_path / "imgs.tar"
        with tarfile.open(path, "w") as tar:
            tar.add(root, arcname="imgs")
    with pytest.raises(DataError, match=r"b.png is 9x9 but \S*a.png is 12x12; set data.image_size to resize"):
        load_splits(_cfg(tmp_path, path))
    train = load_splits(_cfg(tmp_path, path, image_size=12))["train"]
    assert train.images.shape == (2, 12, 12, 3) and train.images[:, 0, 0, 0].tolist() == [10, 20]
def test_a_decode_larger_than_the_free_disk_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    for i in range(3):
        _save(tmp_path / "imgs" / f"{i}.png", _shade(i, 100))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 6, 10 ** 6 - 50_000, 50_000))
    with pytest.raises(CacheSpaceError, match=r"decoding needs 90.0 kB .*has 50.0 kB free: set data.image_size"):
        load_splits(_cfg(tmp_path, tmp_path / "imgs"))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "file-hashes"]  # nothing half-written left
    assert load_splits(_cfg(tmp_path, tmp_path / "imgs", image_size=16))["train"].images.shape == (3, 16, 16, 3)


# --------------------------------------------------------------------------- pre-training without labels


def _digits_as_pngs(folder: Path) -> Path:
    """The digits train split as PNG files whose sorted path order is the split's order (zero-padded index names)."""
    for i, image in enumerate(_load_digits()["train"].images):
        _save(folder / f"{i:05d}.png", image[..., 0])
    return folder


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_safe(run / BACKBONE_FILE)["backbone"]


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "simsiam"},
                                    {"name": "excb", "proj_hidden": 64, "pred_hidden": 64, "num_clusters": 16,
                                     "prior": {"kind": "estimated"}}])
def test_the_unlabelled_paths_train_the_same_weights_as_the_labelled_one(tiny_cfg, tmp_path, method):
    folder = _digits_as_pngs(tmp_path / "pngs")
    sections = {"method": method, "optim": {"epochs": 1}}
    runs = {"labelled": pretrain(tiny_cfg(**sections), tmp_path / "labelled"),
            "labels none": pretrain(tiny_cfg(data={"labels": "none"}, **sections), tmp_path / "none"),
            "images": pretrain(tiny_cfg(data={"source": "images", "path": str(folder)}, **sections),
                               tmp_path / "images")}
    reference = _weights(runs["labelled"])
    for name, run in runs.items():
        weights = _weights(run)
        assert all(torch.equal(weights[key], reference[key]) for key in reference), name
    meta = dict(np.load(runs["images"] / "subset.npz"))
    assert "class_counts" not in json.loads(str(meta["meta"]))
    assert "class_counts" in json.loads(str(np.load(runs["labelled"] / "subset.npz")["meta"]))


# ------------------------------------------------------------------------------- the command: bad input


def _pretrain_images(tmp_path: Path, folder: Path, *settings: str):
    """``imbssl pretrain`` of a one-epoch SimSiam on ``folder`` as the images source, without evaluation."""
    sets = [arg for s in ("data.source=images", "data.subset.profile=full", f"data.cache_dir={tmp_path / 'cache'}",
                          "optim.epochs=1", *settings) for arg in ("--set", s)]
    return imbssl("pretrain", "simsiam-digits", "--data", folder, "--run-dir", tmp_path / "run", "--no-eval", *sets,
                  cwd=tmp_path)


def _one_line_error(res, *fragments: str) -> None:
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), res.stderr


@pytest.mark.slow
def test_cli_an_empty_folder_is_one_line(tmp_path):
    (tmp_path / "imgs").mkdir()
    _one_line_error(_pretrain_images(tmp_path, tmp_path / "imgs"), "imgs: no files at all (an empty folder)")


@pytest.mark.slow
def test_cli_a_folder_of_text_files_is_one_line(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "imgs" / name).write_text("words")
    res = imbssl("data", "describe", "--data", tmp_path / "imgs", "--set", "data.source=images", cwd=tmp_path)
    _one_line_error(res, "no image files among its 2 files", ".txt", ".png")


@pytest.mark.slow
def test_cli_an_unreadable_image_is_refused_by_name_or_skipped_into_the_run_folder(tmp_path):
    folder = _digits_as_pngs(tmp_path / "imgs")
    (folder / "00003.png").write_bytes(b"not a PNG")
    _one_line_error(_pretrain_images(tmp_path, folder), "00003.png", "set data.unreadable=skip")
    assert not (tmp_path / "run" / BACKBONE_FILE).exists()
    res = _pretrain_images(tmp_path, folder, "data.unreadable=skip")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / SKIPPED_FILE).read_text() == f"{folder / '00003.png'}\n"
    assert "00003.png" in res.stderr and "left out (data.unreadable=skip)" in res.stderr
    described = imbssl("data", "describe", "--data", folder, "--set", "data.source=images", cwd=tmp_path)
    assert f"unreadable: {folder / '00003.png'}: not in an image format PIL reads" in described.stdout


@pytest.mark.slow
def test_cli_mixed_modes_are_counted_and_pretrained_on(tmp_path):
    for name, (image, _) in _independent_rgb().items():
        _save(tmp_path / "imgs" / name, image)
    res = imbssl("data", "describe", "--data", tmp_path / "imgs", "--set", "data.source=images", "--json",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["images"] == 14 and info["sizes"] == {"8x8": 14} and info["unreadable"] == []
    assert info["modes"] == {**{mode: 1 for mode in MODES}, "I": 2, "F": 2}
    assert info["stored_shape"] == [8, 8, 3]
    assert _pretrain_images(tmp_path, tmp_path / "imgs", "optim.batch_size=4").returncode == 0


@pytest.mark.slow
def test_cli_an_image_smaller_than_the_crop_is_one_line(tmp_path):
    _save(tmp_path / "imgs" / "fine.png", _shade(5, 32))
    _save(tmp_path / "imgs" / "sub" / "icon.png", _shade(9, 5))
    _one_line_error(_pretrain_images(tmp_path, tmp_path / "imgs"), "icon.png is 5x5, under 8 px on a side",
                    "set data.image_size")


@pytest.mark.slow
def test_cli_a_collection_too_large_for_the_disk_is_one_line(tmp_path):
    for i in range(4):
        _save(tmp_path / "imgs" / f"{i}.png", _shade(i, 64))
    prelude = ("import shutil, collections\nshutil.disk_usage = lambda path: collections.namedtuple("
               "'usage', 'total used free')(10 ** 9, 10 ** 9 - 10 ** 4, 10 ** 4)")
    res = imbssl("pretrain", "simsiam-digits", "--data", tmp_path / "imgs", "--run-dir", tmp_path / "run",
                 "--no-eval", "--set", "data.source=images", "--set", "data.subset.profile=full",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, prelude=prelude)
    _one_line_error(res, "decoding needs 49.2 kB", "10.0 kB free", "set data.image_size")


@pytest.mark.slow
def test_cli_describe_takes_data_and_tells_sizes_and_modes(tmp_path):
    root = _nested_folder(tmp_path / "imgs")
    _save(root / "wide.png", np.zeros((8, 20), np.uint8))
    res = imbssl("data", "describe", "--data", root, "--set", "data.source=images", "--set",
                 f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"source: images   path: {root}   images: 5 readable, 0 unreadable" in res.stdout
    assert "sizes: 8x8 4, 20x8 1" in res.stdout and "modes: RGB 4, L 1" in res.stdout
    assert "stored: not as they are: image " in res.stdout and "set data.image_size" in res.stdout
    assert not (tmp_path / "cache").exists()  # headers only: nothing decoded
    sized = imbssl("data", "describe", "--data", root, "--set", "data.source=images", "--set", "data.image_size=16",
                   cwd=tmp_path)
    assert "stored: 5 x 16x16x3 uint8 = 3.8 kB in the decode cache" in sized.stdout
