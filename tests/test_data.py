"""Data sources, the decode-once cache and long-tailed subsets (all on tiny data built in tmp_path)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imbssl.config import DataConfig, SubsetConfig
from imbssl.data import (
    DataError,
    balanced_counts,
    exp_counts,
    load_index_meta,
    load_indices,
    load_splits,
    save_indices,
    select_subset,
    step_counts,
    subset_counts,
)
from imbssl.data import sources

CLASSES = ("ant", "bee", "cat")


# ------------------------------------------------------------------------------------- long tail


def test_exp_counts_match_cifar10_lt_totals():
    assert exp_counts(5000, 10, 10).sum() == 20431
    assert exp_counts(5000, 10, 100).sum() == 12406  # the paper's 12,409 is a slip
    counts = exp_counts(5000, 10, 100)
    assert counts[0] == 5000 and counts[-1] == 50 and np.all(np.diff(counts) < 0)
    assert counts.dtype == np.int64


def test_step_and_balanced_counts():
    assert step_counts(5000, 10, 10, 0.5).tolist() == [5000] * 5 + [500] * 5
    assert step_counts(1000, 10, 100, 0.3).tolist() == [1000] * 7 + [10] * 3
    assert balanced_counts(20431, 10).tolist() == [2044] + [2043] * 9
    assert balanced_counts(7, 3).tolist() == [3, 2, 2]


def test_subset_counts_profiles():
    available = np.array([5000] * 9 + [4000])
    assert subset_counts(SubsetConfig(), available).tolist() == available.tolist()
    assert subset_counts(SubsetConfig(profile="exp", imbalance=10), available)[0] == 4000  # n_max = min available
    full = np.full(10, 5000)
    assert subset_counts(SubsetConfig(profile="balanced", imbalance=10), full).sum() == 20431  # rs.20K
    assert subset_counts(SubsetConfig(profile="balanced", imbalance=100), full).sum() == 12406  # rs.12K
    assert subset_counts(SubsetConfig(profile="balanced", total=30), full).tolist() == [3] * 10
    with pytest.raises(DataError, match="class 0"):
        subset_counts(SubsetConfig(profile="balanced", total=50_001), full)


def _pool(per_class: int = 100, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(num_classes), per_class))


def test_select_subset_is_seeded():
    labels = _pool()
    cfg = SubsetConfig(profile="exp", imbalance=10, seed=1)
    idx = select_subset(labels, cfg)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=10).tolist() == exp_counts(100, 10, 10).tolist()
    np.testing.assert_array_equal(idx, select_subset(labels, cfg))
    other = select_subset(labels, cfg.model_copy(update={"seed": 2}))
    assert not np.array_equal(idx, other)
    assert np.bincount(labels[other], minlength=10).tolist() == exp_counts(100, 10, 10).tolist()
    np.testing.assert_array_equal(select_subset(labels, SubsetConfig()), np.arange(len(labels)))


def test_permute_classes_moves_the_head():
    labels = _pool()
    heads = set()
    for seed in range(5):
        cfg = SubsetConfig(profile="exp", imbalance=10, permute_classes=True, seed=seed)
        counts = np.bincount(labels[select_subset(labels, cfg)], minlength=10)
        assert sorted(counts.tolist(), reverse=True) == exp_counts(100, 10, 10).tolist()
        np.testing.assert_array_equal(counts, subset_counts(cfg, np.full(10, 100)))
        heads.add(int(counts.argmax()))
    assert len(heads) > 1
    fixed = subset_counts(SubsetConfig(profile="exp", imbalance=10), np.full(10, 100))
    assert fixed.argmax() == 0


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_save_and_load_indices(tmp_path, suffix):
    idx = np.array([3, 1, 4, 15], dtype=np.int64)
    path = tmp_path / "sub" / f"split{suffix}"
    save_indices(path, idx, {"profile": "exp", "counts": np.array([2, 2]), "seed": np.int64(3)})
    np.testing.assert_array_equal(load_indices(path), idx)
    assert load_indices(path).dtype == np.int64
    assert load_index_meta(path) == {"profile": "exp", "counts": [2, 2], "seed": 3}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    with pytest.raises(DataError, match="npz or .json"):
        save_indices(tmp_path / "split.txt", idx, {})


# ---------------------------------------------------------------------------------------- digits


def test_digits_shapes_and_balanced_test():
    splits = load_splits(DataConfig())
    train, test = splits["train"], splits["test"]
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.classes == tuple("0123456789")
    assert test.class_counts().tolist() == [50] * 10
    assert len(train.labels) + len(test.labels) == 1797
    assert train.images.max() == 255
    np.testing.assert_array_equal(load_splits(DataConfig())["test"].images, test.images)


# ----------------------------------------------------------------------------------- ImageFolder


def _pixel(split: str, cls: int, i: int) -> tuple[int, int, int]:
    return (10 * cls + i, 100 + (split != "train"), 7 * i)


def _write_tree(root: Path, n: int = 4, size: int = 8, mode: str = "RGB", test: str = "test") -> Path:
    for split in ("train", test):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                colour = _pixel(split, c, i)
                Image.new(mode, (size, size), colour[0] if mode == "L" else colour).save(folder / f"{i}.png")
    return root


def _cfg(tmp_path: Path, path: Path, **kw) -> DataConfig:
    return DataConfig(source="imagefolder", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def _check_tree_splits(splits: dict) -> None:
    for split in ("train", "test"):
        s = splits[split]
        assert s.classes == CLASSES and s.images.shape == (12, 8, 8, 3)
        assert s.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert tuple(s.images[5, 3, 3]) == _pixel(split, 1, 1)


def test_imagefolder_from_folder(tmp_path):
    _check_tree_splits(load_splits(_cfg(tmp_path, _write_tree(tmp_path / "tree"))))


def test_imagefolder_from_targz_with_top_folder_and_val(tmp_path):
    tree = _write_tree(tmp_path / "tree", test="val")
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree, arcname="mydata")
    _check_tree_splits(load_splits(_cfg(tmp_path, archive)))


def test_imagefolder_grey_and_resize(tmp_path):
    tree = _write_tree(tmp_path / "tree", mode="L")
    splits = load_splits(_cfg(tmp_path, tree))
    assert splits["train"].images.shape == (12, 8, 8, 1)
    assert splits["test"].images[5, 0, 0, 0] == _pixel("test", 1, 1)[0]
    assert load_splits(_cfg(tmp_path, tree, image_size=4))["train"].images.shape == (12, 4, 4, 1)


def test_imagefolder_decodes_straight_into_the_cache_memory_map(tmp_path):
    """A dataset larger than host memory never has to fit in it: no array of the decoded size is allocated."""
    tree = _write_tree(tmp_path / "tree", n=100, size=64)  # 600 images, 7.4 MB decoded
    tracemalloc.start()
    try:
        splits = load_splits(_cfg(tmp_path, tree))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    decoded = sum(s.images.nbytes for s in splits.values())
    assert decoded == 600 * 64 * 64 * 3 and peak < decoded / 4
    assert isinstance(splits["train"].images, np.memmap)
    assert tuple(splits["test"].images[101, 3, 3]) == _pixel("test", 1, 1)  # "1.png" sorts second


@pytest.mark.parametrize("where", ["relative", "symlinked"])
def test_decode_cache_under_a_relative_or_symlinked_folder(tmp_path, monkeypatch, where):
    """The cache keeps the map it decoded into, wherever the folder's path leads (a map opened through a symlink
    reports the resolved path)."""
    tree = _write_tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    if where == "symlinked":
        (tmp_path / "real-cache").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real-cache")
    cfg = DataConfig(source="imagefolder", path=str(tree), cache_dir="cache" if where == "relative" else "link/c")
    _check_tree_splits(load_splits(cfg))
    _check_tree_splits(load_splits(cfg))  # from the cache


def test_a_killed_decode_leaves_nothing_behind_the_next_one(tmp_path):
    """A decode's temp folder names its process; the next build of that key removes the folders of dead ones."""
    tree = _write_tree(tmp_path / "tree")
    load_splits(_cfg(tmp_path, tree))
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.name != "file-hashes"]
    shutil.rmtree(entry)
    dead = tmp_path / "cache" / f".tmp-{entry.name}-999999999-abc"
    alive = tmp_path / "cache" / f".tmp-{entry.name}-{os.getpid()}-abc"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"half")
    _check_tree_splits(load_splits(_cfg(tmp_path, tree)))
    assert not dead.exists() and alive.exists()


def test_imagefolder_second_load_hits_cache(tmp_path, monkeypatch):
    tree = _write_tree(tmp_path / "tree")
    first = load_splits(_cfg(tmp_path, tree))

    def refuse(*args):
        raise AssertionError("decoded twice")

    monkeypatch.setattr(sources, "_decode_imagefolder", refuse)
    second = load_splits(_cfg(tmp_path, tree))
    assert isinstance(second["train"].images, np.memmap) and not second["train"].images.flags.writeable
    np.testing.assert_array_equal(first["train"].images, second["train"].images)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(AssertionError, match="decoded twice"):  # a different decode option is a new key
        load_splits(_cfg(tmp_path, tree, image_size=4))


def test_corrupt_image_names_the_file(tmp_path):
    tree = _write_tree(tmp_path / "tree")
    (tree / "train" / "bee" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bee[/\\]2\.png"):
        load_splits(_cfg(tmp_path, tree))


def test_size_mismatch_names_file_and_sizes(tmp_path):
    tree = _write_tree(tmp_path / "tree")
    Image.new("RGB", (9, 8)).save(tree / "test" / "cat" / "1.png")
    with pytest.raises(DataError, match=r"cat[/\\]1\.png is 9x8 .* 8x8"):
        load_splits(_cfg(tmp_path, tree))


def test_missing_class_folder_is_named(tmp_path):
    tree = _write_tree(tmp_path / "tree")
    for f in (tree / "test" / "bee").iterdir():
        f.unlink()
    (tree / "test" / "bee").rmdir()
    with pytest.raises(DataError, match="test/bee"):
        load_splits(_cfg(tmp_path, tree))


def test_tar_path_traversal_is_rejected(tmp_path):
    archive = tmp_path / "evil.tar"
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with tarfile.open(archive, "w") as tf:
        for name in ("train/ant/0.png", "test/ant/0.png", "../escape.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png.getvalue())
            tf.addfile(info, io.BytesIO(png.getvalue()))
    with pytest.raises(DataError, match=r"\.\./escape\.png"):
        load_splits(_cfg(tmp_path, archive))
    assert not (tmp_path / "escape.png").exists()


# ------------------------------------------------------------------- the official order: data.train_order


def _ordered_tree(tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    """An ImageFolder (a folder, or a tar with a top folder) and a shuffled "official" order of its 12 training
    images, as the paths an order file names: line i is train index i."""
    tree = _write_tree(tmp_path / "tree")
    members = [f"train/{name}/{i}.png" for name in CLASSES for i in range(4)]
    order = [members[i] for i in np.random.default_rng(3).permutation(len(members))]
    if kind == "folder":
        return tree, order
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree, arcname="top")
    return archive, [f"top/{member}" for member in order]


def _write_order(tmp_path: Path, lines: list[str], name: str = "order.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _member_pixel(member: str) -> tuple[int, int, int]:
    """The pixel _write_tree gave the training image at ``member`` ('[top/]train/<class>/<i>.png')."""
    *_, name, file = member.split("/")
    return _pixel("train", CLASSES.index(name), int(file.removesuffix(".png")))


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_train_order_makes_split_file_indices_select_the_listed_images(tmp_path, kind):
    """Index i of a split file is the image on line i of the order file, not the i-th in path order; the test split
    keeps its own order."""
    path, order = _ordered_tree(tmp_path, kind)
    cfg = _cfg(tmp_path, path, train_order=str(_write_order(tmp_path, order)))
    splits = load_splits(cfg)
    train = splits["train"]
    assert [tuple(image[0, 0]) for image in train.images] == [_member_pixel(m) for m in order]
    assert train.labels.tolist() == [CLASSES.index(m.split("/")[-2]) for m in order]
    split_file = tmp_path / "split1_D_i.npy"
    np.save(split_file, np.array([7, 0, 5], dtype=np.int64))
    chosen = select_subset(train.labels, SubsetConfig(profile="index_file", index_file=str(split_file)))
    assert [tuple(train.images[i, 0, 0]) for i in chosen] == [_member_pixel(order[i]) for i in (0, 5, 7)]
    in_path_order = load_splits(_cfg(tmp_path, path))["train"]  # what the indices selected before the order file
    assert [tuple(in_path_order.images[i, 0, 0]) for i in chosen] != [_member_pixel(order[i]) for i in (0, 5, 7)]
    _check_tree_splits({"test": splits["test"], "train": in_path_order})


@pytest.mark.parametrize("kind", ["folder", "tar"])
@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda o: ["train/bee/9.png", *o[1:]],
                 r"line 1: (top/)?train/bee/9\.png is not a training image of .*named like", id="not-in-archive"),
    pytest.param(lambda o: [*o[:-1], o[-1].replace("train/", "test/")], r"line 12: .*test/.* is not a training image",
                 id="a-test-image"),
    pytest.param(lambda o: [*o[:-1], o[0]], r"line 12: .* is listed on line 1 already", id="duplicate"),
    pytest.param(lambda o: o[:-1], r"lists 11 images, but .* has 12 training images; .* is one it leaves out",
                 id="count"),
    pytest.param(lambda o: [*o[:-1], "../escape.png"], r"line 12: refusing path '\.\./escape\.png' .*path traversal",
                 id="dot-dot"),
    pytest.param(lambda o: ["/etc/passwd", *o[1:]], r"line 1: refusing path '/etc/passwd' \(absolute", id="absolute"),
    pytest.param(lambda o: [o[0], "", *o[1:]], r"line 2 is empty", id="empty-line"),
])
def test_a_bad_train_order_is_one_line_naming_what(tmp_path, kind, edit, message):
    """A member not among the training images, a repeat, a wrong count, a path out of the archive: one line before
    anything trains, and no image dropped or listed twice without a word."""
    path, order = _ordered_tree(tmp_path, kind)
    with pytest.raises(DataError, match=message) as err:
        load_splits(_cfg(tmp_path, path, train_order=str(_write_order(tmp_path, edit(order)))))
    assert "\n" not in str(err.value) and "data.train_order" in str(err.value)


def test_a_decode_is_not_reused_under_another_train_order(tmp_path, monkeypatch):
    """The order's content enters the cache key: another order decodes again, the same order (at any path) hits."""
    tree, order = _ordered_tree(tmp_path, "folder")
    first = load_splits(_cfg(tmp_path, tree, train_order=str(_write_order(tmp_path, order))))
    reversed_order = load_splits(_cfg(tmp_path, tree, train_order=str(_write_order(tmp_path, order[::-1], "r.txt"))))
    np.testing.assert_array_equal(reversed_order["train"].images, first["train"].images[::-1])
    monkeypatch.setattr(sources, "_decode_imagefolder", lambda *args: pytest.fail("decoded twice"))
    copy = _write_order(tmp_path, order, "copy.txt")
    np.testing.assert_array_equal(load_splits(_cfg(tmp_path, tree, train_order=str(copy)))["train"].images,
                                  first["train"].images)


@pytest.mark.parametrize("source, why", [("cifar100", "in the official order already"),
                                         ("cifar10", "in the official order already"),
                                         ("digits", "no image files")])
def test_train_order_is_refused_where_the_order_is_the_official_one(source, why):
    with pytest.raises(ValueError, match=f"data.train_order orders an ImageFolder's training images; .*{why}"):
        DataConfig(source=source, train_order="cifar100-train-official-order.txt")
    with pytest.raises(ValueError, match="keeps data.train_list's order"):
        DataConfig(source="filelist", path="x", train_list="a.txt", test_list="b.txt", train_order="o.txt")


# ------------------------------------------------------------------------------- tars, read streamed


def _noise_png(rng: np.random.Generator, mode: str, size: int = 8) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size, size), dtype=np.uint16))
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


def _mixed_tree(root: Path) -> Path:
    """An ImageFolder under a top folder: images of several modes at two depths, hard and symbolic links to images,
    and, outside train/ and test/ (so only the images source reads them), an unreadable image, one whose pixels do
    not decode and a link to that one."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CLASSES:
            for i, mode in enumerate(("RGB", "L", "RGBA", "P", "I;16", "CMYK")):
                path = root / "top" / split / name / ("deep" if i % 2 else "") / f"{i}.{'jpg' if i == 5 else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                _noise_png(rng, mode).save(path)
    os.link(root / "top/train/bee/0.png", root / "top/train/ant/hard.png")
    (root / "top/test/cat/deep/soft.png").symlink_to(Path("../../../train/ant/0.png"))
    (root / "top/extra").mkdir()
    (root / "top/extra/bad.png").write_bytes(b"not a png")
    whole = (root / "top/train/ant/0.png").read_bytes()
    (root / "top/extra/cut.png").write_bytes(whole[:len(whole) // 2])
    (root / "top/extra/cut-link.png").symlink_to("cut.png")
    return root


def _shuffled_tar(tree: Path, archive: Path) -> Path:
    """``tree`` archived member by member in a shuffled order: links may come before their targets."""
    paths = sorted(tree.rglob("*"))
    np.random.default_rng(1).shuffle(paths)
    with tarfile.open(archive, "w:gz") as tf:
        for path in paths:
            tf.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    return archive


def _cache_entry(cache: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The one entry's arrays as stored (spare rows included) and its meta.json."""
    (entry,) = [p for p in cache.iterdir() if (p / "meta.json").is_file()]
    return (np.load(entry / "images.npy"), np.load(entry / "labels.npy"),
            json.loads((entry / "meta.json").read_text())["meta"])


@pytest.mark.parametrize("source", ["imagefolder", "images"])
def test_a_streamed_tar_decodes_to_the_bytes_of_its_folder(tmp_path, source):
    """The tar's members come in their own (shuffled) order, each decoded into its row; the cache holds the very
    bytes that the same tree decoded file by file from a folder gives: rows, pixels, links, the rows moved up over
    the images left out and the spare rows after them, and the skipped images' names in order."""
    tree = _mixed_tree(tmp_path / "tree")
    archive = _shuffled_tar(tree, tmp_path / "tree.tar.gz")
    with tarfile.open(archive) as tf:
        order = {m.name: (i, m.type) for i, m in enumerate(tf.getmembers())}
    assert order["top/test/cat/deep/soft.png"][1] == tarfile.SYMTYPE == order["top/extra/cut-link.png"][1]
    assert order["top/test/cat/deep/soft.png"] < order["top/train/ant/0.png"]  # a link before its target
    assert {order["top/train/ant/hard.png"][1], order["top/train/bee/0.png"][1]} == {tarfile.LNKTYPE, tarfile.REGTYPE}
    entries = {}
    for kind, path in (("folder", tree), ("tar", archive)):
        options = {"unreadable": "skip", "image_size": 6} if source == "images" else {}
        load_splits(DataConfig(source=source, path=str(path), cache_dir=str(tmp_path / kind), **options))
        entries[kind] = _cache_entry(tmp_path / kind)
    (folder_images, folder_labels, folder_meta), (tar_images, tar_labels, tar_meta) = entries["folder"], entries["tar"]
    np.testing.assert_array_equal(tar_images, folder_images)
    np.testing.assert_array_equal(tar_labels, folder_labels)
    skipped = {"folder": [str(Path(n).relative_to(tree)) for n in folder_meta.pop("skipped", [])],
               "tar": [n.removeprefix(f"{archive}:") for n in tar_meta.pop("skipped", [])]}
    assert tar_meta == folder_meta and skipped["tar"] == skipped["folder"]
    if source == "images":
        assert skipped["tar"] == ["top/extra/bad.png", "top/extra/cut-link.png", "top/extra/cut.png"]
        assert len(tar_images) == len(tar_labels) + 2 and not tar_images[len(tar_labels):].any()  # 2 spare rows
    else:
        assert tar_images.shape == (2 * 19, 8, 8, 3)  # 18 images and a link in train, 18 and a link in test
    assert len({row.tobytes() for row in tar_images}) < len(tar_images)  # a link's row repeats its target's


def test_a_tar_is_decoded_without_holding_its_encoded_bytes(tmp_path):
    """Only one member's bytes are in memory at a time: the peak of the whole decode (listing, headers, pixels)
    stays far under the archive's encoded size, which a listing that kept every member's bytes exceeds."""
    rng = np.random.default_rng(0)
    archive = tmp_path / "noise.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for i in range(600):
            png = io.BytesIO()
            _noise_png(rng, "RGB", 48).save(png, "PNG")  # noise: the archive does not compress it
            _add(tf, f"noise/{i:03d}.png", png.getvalue())
    encoded = archive.stat().st_size
    sources.file_digest(archive, tmp_path / "cache")  # the key's sha256 (read in 1 MiB chunks) is memoised first
    tracemalloc.start()
    try:
        images = load_splits(DataConfig(source="images", path=str(archive), cache_dir=str(tmp_path / "cache")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert images["train"].images.shape == (600, 48, 48, 3) and encoded > 4_000_000
    assert peak < encoded / 4, f"peak {peak:,} bytes for an archive of {encoded:,}"


def _cut_first(count: int) -> dict[str, bytes]:
    """``count`` 8x8 PNGs named ``bNN.png``, and before them (by name, and in a tar's order) ``a-cut.png``, one cut
    short after its header: only its decode finds it unreadable."""
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(count + 1):
        png = io.BytesIO()
        _noise_png(rng, "RGB").save(png, "PNG")
        pngs.append(png.getvalue())
    return {"a-cut.png": pngs[0][:len(pngs[0]) // 2], **{f"b{i:02d}.png": blob for i, blob in enumerate(pngs[1:])}}


def _folder_or_tar(tmp_path: Path, kind: str, files: dict[str, bytes]) -> Path:
    """``files`` written into a folder, or archived in their order into a tar."""
    if kind == "tar":
        with tarfile.open(tmp_path / "images.tar", "w") as tf:
            for name, blob in files.items():
                _add(tf, name, blob)
        return tmp_path / "images.tar"
    (tmp_path / "images").mkdir()
    for name, blob in files.items():
        (tmp_path / "images" / name).write_bytes(blob)
    return tmp_path / "images"


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_a_refused_image_stops_the_decode_at_once(tmp_path, monkeypatch, kind):
    """The refusal of the first image (in row and archive order) comes from its decode, before any image after it
    is decoded: at ImageNet scale, not hours later."""
    path = _folder_or_tar(tmp_path, kind, _cut_first(20))
    decoded, pixels = [], sources._pixels
    monkeypatch.setattr(sources, "_pixels", lambda data, name, *rest: decoded.append(name) or pixels(data, name, *rest))
    with pytest.raises(DataError, match=r"a-cut.png: .*; set data.unreadable=skip"):
        load_splits(DataConfig(source="images", path=str(path), cache_dir=str(tmp_path / "cache")))
    assert len(decoded) == 1 and decoded[0].endswith("a-cut.png")


class _CountedWrites(np.ndarray):
    """An array that counts the assignments to it (each a row, or a slice of rows, written)."""

    def __setitem__(self, key, value) -> None:
        self.writes += 1
        super().__setitem__(key, value)


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_an_image_skipped_first_moves_no_row_one_by_one(tmp_path, kind):
    """Image 0 of 21 is skipped: a folder's 20 images go straight to their rows (20 writes), a tar's to their own
    rows and then up in one slice, the spare row zeroed (22 writes), where a row-by-row move wrote 41. The error
    handed on was rebuilt from the name and the reason: no traceback whose frames hold the bytes."""
    files = _cut_first(20)
    path = _folder_or_tar(tmp_path, kind, files)
    out, skipped = [], []

    def allocate(name: str, shape: tuple[int, ...]) -> np.ndarray:
        out.append(np.zeros(shape, np.uint8).view(_CountedWrites))
        out[0].writes = 0
        return out[0]

    listed = sources._image_files(DataConfig(source="images", path=str(path)))
    images = sources._decode_images(listed, None, "stretch", allocate, skipped.append)
    assert [err.name.endswith("a-cut.png") for err in skipped] == [True] and skipped[0].__traceback__ is None
    expected = [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in list(files.values())[1:]]
    np.testing.assert_array_equal(images[:20], np.stack(expected))
    assert not images[20].any() and images.writes == {"folder": 20, "tar": 22}[kind]


def test_closing_the_gaps_moves_runs_in_bounded_slices(monkeypatch):
    """Rows after each left-out row move up by the count left out before them, whatever the slice size."""
    rows = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=1)
    for move_bytes in (1, 6, 1 << 20):
        monkeypatch.setattr(sources, "MOVE_BYTES", move_bytes)
        out = rows.copy()
        sources._close_gaps(out, [1, 2, 6])
        assert out[:, 0, 0, 0].tolist() == [0, 3, 4, 5, 7, 8, 9, 0, 0, 0]


def test_a_tar_walk_keeps_no_member_list(tmp_path):
    """``TarFile.next`` keeps every member it reads; the walk lets them go: its memory does not grow with the
    member count (here 4,000 empty members, about 2 MB of TarInfo kept otherwise)."""
    with tarfile.open(tmp_path / "many.tar", "w") as tf:
        for i in range(4000):
            _add(tf, f"empty/{i:04d}.txt", b"")
    tracemalloc.start()
    try:
        walked = sum(1 for _ in sources._walk_tar(tmp_path / "many.tar", lambda m: False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert walked == 4000 and peak < 200_000, f"peak {peak:,} bytes"


def test_a_link_target_gone_on_the_second_pass_is_one_line(tmp_path, monkeypatch):
    """A link's target whose name is not an image's has its header read in one more pass; if the archive lost the
    target in between, the error says that the archive changed."""
    png = io.BytesIO()
    _noise_png(np.random.default_rng(0), "RGB").save(png, "PNG")
    with tarfile.open(tmp_path / "linked.tar", "w") as tf:
        _add(tf, "data.bin", png.getvalue())
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "data.bin"
        tf.addfile(link)
    walks, walk = [], sources._walk_tar

    def losing_the_target(archive, read):
        walks.append(archive)
        return (found for found in walk(archive, read) if len(walks) == 1 or found[0].name != "data.bin")

    monkeypatch.setattr(sources, "_walk_tar", losing_the_target)
    with pytest.raises(DataError, match=r"linked.tar changed while it was read: .*linked.tar:data.bin is gone$"):
        load_splits(DataConfig(source="images", path=str(tmp_path / "linked.tar"), cache_dir=str(tmp_path / "c")))


# ----------------------------------------------------------------------------------------- CIFAR


def _add(tf: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tf.addfile(info, io.BytesIO(blob))


def _cifar_tar(path: Path, spec: sources.CifarArchive, poison: bytes | None = None) -> dict[str, np.ndarray]:
    """A tiny archive in the official layout; batches pickled like the originals (numpy arrays, bytes keys)."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, spec.meta_member, pickle.dumps({spec.names_key.encode(): [c.encode() for c in CLASSES]}, protocol=3))
        for member in (*spec.train_members, spec.test_member):
            data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            blob = pickle.dumps({b"data": data, spec.label_key.encode(): [0, 2, 1]}, protocol=3)
            # the real archives (Python 2, numpy 1) name the legacy module path
            legacy = blob.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")
            assert legacy != blob
            _add(tf, member, poison if poison and member == spec.test_member else legacy)
            batches[member] = data
    return batches


def _serve(monkeypatch, tmp_path: Path, source: str, poison: bytes | None = None) -> dict[str, np.ndarray]:
    """Point the download URL (and md5) of ``source`` at a tiny archive built here."""
    spec = sources.CIFAR_ARCHIVES[source]
    served = tmp_path / "served.tar.gz"
    batches = _cifar_tar(served, spec, poison)
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    monkeypatch.setitem(sources.CIFAR_ARCHIVES, source, dataclasses.replace(spec, url=served.as_uri(), md5=md5))
    return batches


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_download_and_decode(tmp_path, monkeypatch, source):
    batches = _serve(monkeypatch, tmp_path, source)
    spec = sources.CIFAR_ARCHIVES[source]
    cfg = DataConfig(source=source, cache_dir=str(tmp_path / "cache"))
    splits = load_splits(cfg)
    assert (tmp_path / "cache" / "downloads" / spec.filename).is_file()
    train, test = splits["train"], splits["test"]
    assert train.classes == CLASSES and train.images.shape == (3 * len(spec.train_members), 32, 32, 3)
    assert test.labels.tolist() == [0, 2, 1] and test.labels.dtype == np.int64
    chw = batches[spec.test_member][1].reshape(3, 32, 32)
    np.testing.assert_array_equal(test.images[1], chw.transpose(1, 2, 0))
    monkeypatch.setattr(sources, "_decode_cifar", None)  # cached now: neither decoded nor downloaded again
    assert isinstance(load_splits(cfg)["train"].images, np.memmap)


def test_a_cifar_member_archived_twice_is_its_last_copy(tmp_path):
    """As tar extracts it: a corrupt earlier copy is replaced by the last one, a corrupt last copy fails."""
    spec = sources.CIFAR_ARCHIVES["cifar10"]
    batches = _cifar_tar(tmp_path / "once.tar.gz", spec)
    with tarfile.open(tmp_path / "once.tar.gz") as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    corrupt = [(spec.test_member, b"not a pickle")]
    for name, order in (("first-corrupt.tar", corrupt + members), ("last-corrupt.tar", members + corrupt)):
        with tarfile.open(tmp_path / name, "w") as tf:
            for member, blob in order:
                _add(tf, member, blob)
    decoded = sources._decode_cifar(tmp_path / "first-corrupt.tar", spec)
    chw = batches[spec.test_member][1].reshape(3, 32, 32)
    np.testing.assert_array_equal(decoded.images[decoded.n_train + 1], chw.transpose(1, 2, 0))
    with pytest.raises(DataError, match=f"last-corrupt.tar:{spec.test_member}: not a readable CIFAR batch"):
        sources._decode_cifar(tmp_path / "last-corrupt.tar", spec)


def test_cifar_md5_mismatch_deletes_download(tmp_path, monkeypatch):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"truncated")
    spec = sources.CIFAR_ARCHIVES["cifar10"]
    monkeypatch.setitem(sources.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(spec, url=bad.as_uri()))
    downloads = tmp_path / "dl"
    with pytest.raises(DataError, match="md5 mismatch"):
        load_splits(DataConfig(source="cifar10", path=str(downloads), cache_dir=str(tmp_path / "cache")))
    assert list(downloads.iterdir()) == []


def test_cifar_missing_archive_without_download(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_splits(DataConfig(source="cifar10", download=False, cache_dir=str(tmp_path)))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _serve(monkeypatch, tmp_path, "cifar10", poison=pickle.dumps({b"data": _Exploit()}))
    with pytest.raises(DataError, match=r"test_batch: refusing to unpickle global \w+\.system"):
        load_splits(DataConfig(source="cifar10", cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "pwned").exists()


def test_head_count_sets_the_head_of_a_profile_and_must_fit_the_pool():
    available = np.array([500, 480, 450])
    assert subset_counts(SubsetConfig(profile="exp", imbalance=4, head_count=200), available).tolist() == [200, 100, 50]
    assert subset_counts(SubsetConfig(profile="exp", imbalance=4), available).tolist() == [450, 225, 112]
    with pytest.raises(DataError, match="asks for 600 images of class 0, but the pool has only 500"):
        subset_counts(SubsetConfig(profile="exp", imbalance=4, head_count=600), available)


# ------------------------------------------------------------------ file lists and iNaturalist JSON


def _listed_cfg(tmp_path: Path, source: str, train: str, test: str, **kw) -> DataConfig:
    return DataConfig(source=source, path=str(tmp_path / "tree"), train_list=train, test_list=test,
                      cache_dir=str(tmp_path / "cache"), **kw)


def _write_lists(tmp_path: Path, rows: dict[str, list[str]]) -> None:
    for name, lines in rows.items():
        (tmp_path / "tree" / name).write_text("\n".join(lines) + "\n")


def test_file_list_source_reads_paths_and_labels_in_list_order(tmp_path):
    tree = _write_tree(tmp_path / "tree")
    (tree / "train" / "cat" / "3.png").rename(tree / "train" / "cat" / "with space.png")
    train = ["train/cat/with space.png 2", "train/ant/1.png 0", "train/bee/0.png 1", "train/ant/0.png 0"]
    _write_lists(tmp_path, {"LT_train.txt": train, "LT_test.txt": ["test/bee/2.png 1", "test/ant/0.png 0",
                                                                   "", "test/cat/1.png 2"]})
    splits = load_splits(_listed_cfg(tmp_path, "filelist", "LT_train.txt", "LT_test.txt"))
    assert splits["train"].classes == ("0", "1", "2")
    assert splits["train"].labels.tolist() == [2, 0, 1, 0] and splits["test"].labels.tolist() == [1, 0, 2]
    assert tuple(splits["train"].images[0, 0, 0]) == _pixel("train", 2, 3)
    assert tuple(splits["train"].images[2, 0, 0]) == _pixel("train", 1, 0)
    assert tuple(splits["test"].images[2, 0, 0]) == _pixel("test", 2, 1)


def test_inat_json_source_maps_category_ids_to_sorted_indices(tmp_path):
    """Classes in category-id order (not by name), images in image-id order (not as listed)."""
    _write_tree(tmp_path / "tree")
    categories = [{"id": 9, "name": "ant"}, {"id": 2, "name": "cat"}, {"id": 5, "name": "bee"}]
    ids = {"ant": 9, "bee": 5, "cat": 2}

    def annotations(split: str, files: list[str]) -> dict:
        return {"images": [{"id": 200 - i, "file_name": f"{split}/{f}"} for i, f in enumerate(files)],
                "annotations": [{"id": i, "image_id": 200 - i, "category_id": ids[f.split("/")[0]]}
                                for i, f in enumerate(files)],
                "categories": categories}

    import json
    (tmp_path / "tree" / "train2018.json").write_text(json.dumps(annotations("train", ["cat/0.png", "ant/2.png",
                                                                                       "bee/1.png"])))
    (tmp_path / "tree" / "val2018.json").write_text(json.dumps(annotations("test", ["bee/3.png", "ant/1.png",
                                                                                    "cat/2.png"])))
    splits = load_splits(_listed_cfg(tmp_path, "inat", "train2018.json", "val2018.json"))
    assert splits["train"].classes == ("cat", "bee", "ant")
    # train lists cat, ant, bee as image ids 200, 199, 198: read as bee, ant, cat
    assert splits["train"].labels.tolist() == [1, 2, 0] and splits["test"].labels.tolist() == [0, 2, 1]
    assert tuple(splits["test"].images[0, 0, 0]) == _pixel("test", 2, 2)  # cat/2.png, the tree's class 2

    doc = annotations("test", ["bee/3.png", "ant/1.png", "cat/2.png"])
    doc["annotations"].pop()
    (tmp_path / "tree" / "val2018.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"val2018\.json: image id\(s\) \[198\] have no annotation"):
        load_splits(_listed_cfg(tmp_path, "inat", "train2018.json", "val2018.json"))
    doc["annotations"] += [{"id": 7, "image_id": 198, "category_id": 2}, {"id": 8, "image_id": 198, "category_id": 5}]
    (tmp_path / "tree" / "val2018.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"image id\(s\) \[198\] have more than one annotation"):
        load_splits(_listed_cfg(tmp_path, "inat", "train2018.json", "val2018.json"))


@pytest.mark.parametrize("line, message", [
    ("train/ant/0.png", r"LT_train\.txt line 2: expected 'relative/path label'"),
    ("train/ant/9.png 0", r"LT_train\.txt: image train/ant/9\.png not found under"),
    ("../outside.png 0", r"refusing .*outside\.png.*path traversal"),
    ("train/ant/0.png 3", r"LT_test\.txt: class id\(s\) \[0\] are not among the train list's classes"),
    ("train/ant/0.png ²", r"LT_train\.txt line 2: expected 'relative/path label'"),
])
def test_file_list_bad_lines_are_named(tmp_path, line, message):
    _write_tree(tmp_path / "tree")
    (tmp_path / "outside.png").write_bytes(b"")
    _write_lists(tmp_path, {"LT_train.txt": ["train/bee/0.png 1", line, "train/cat/0.png 2"],
                            "LT_test.txt": ["test/ant/0.png 0", "test/bee/0.png 1", "test/cat/0.png 2"]})
    with pytest.raises(DataError, match=message):
        load_splits(_listed_cfg(tmp_path, "filelist", "LT_train.txt", "LT_test.txt"))


def test_listed_sources_need_both_lists_and_a_root():
    with pytest.raises(ValueError, match="set both"):
        DataConfig(source="filelist", path="x", train_list="a.txt")
    with pytest.raises(ValueError, match="belong to the filelist and inat sources"):
        DataConfig(source="imagefolder", path="x", train_list="a.txt")
    with pytest.raises(ValueError, match="root folder"):
        DataConfig(source="inat", train_list="a.json", test_list="b.json").require_path()


def test_center_crop_resize_keeps_the_centre_square(tmp_path):
    tree = _write_tree(tmp_path / "tree", size=16)
    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, 4:12] = 200  # the centre square; the sides (4 columns each) stay black
    Image.fromarray(wide).save(tree / "train" / "ant" / "0.png")
    # The shorter side is already 8, so the crop is exact: the centre columns 4..11, nothing of the sides.
    cropped = load_splits(_cfg(tmp_path, tree, image_size=8, resize="center_crop"))["train"].images[0]
    stretched = load_splits(_cfg(tmp_path, tree, image_size=8))["train"].images[0]
    assert (cropped == 200).all()
    assert (stretched[:, [0, -1]] < 100).all() and (stretched[:, 3:5] == 200).all()


def test_resize_enters_the_cache_key_only_where_it_acts(tmp_path):
    """A cache decoded before data.resize existed keeps its key: stretch, or no image_size, change nothing."""
    from imbssl.data.cache import cache_key
    from imbssl.data.sources import _imagefolder_source, folder_digest

    tree = _write_tree(tmp_path / "tree")
    key = lambda **kw: _imagefolder_source(_cfg(tmp_path, tree, **kw), tmp_path)[0]  # noqa: E731
    assert key() == cache_key("imagefolder", folder_digest(tree), image_size=None)  # the key before data.resize
    assert key(resize="center_crop") == key() and key(image_size=8) == key(image_size=8, resize="stretch")
    assert key(image_size=8, resize="center_crop") != key(image_size=8)


def test_listed_sources_without_a_root_are_named():
    with pytest.raises(DataError, match="data.path \\(the root the lists are relative to\\) is required"):
        load_splits(DataConfig(source="filelist", train_list="a.txt", test_list="b.txt"))
