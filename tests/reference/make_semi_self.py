"""Fixtures from YyzHarry/imbalanced-semi-self (Yang & Xu, "Rethinking the value of labels", NeurIPS 2020).

Run in the reference environment (torch 2.14.1, torchvision 0.29.1, numpy, matplotlib, scikit-learn and
tensorboardX, which their modules import), from the repository root:

    /work/refenv/bin/python tests/reference/make_semi_self.py /work/refs/YyzHarry+imbalanced-semi-self

It writes three fixtures, each read by tests/reference/test_ref_semi_self.py:

- ``semi_self_rotation``: one step of their Rotation pre-training (pretrain_rot.py ``train`` on their ResNet-32 with
  ``num_classes=4``, their SGD and ``adjust_learning_rate``), on views made by their ``transform_train``
  (RandomCrop(32, padding=4) + flip + Normalize), each image rotated once by their ``utils.rotation``; the crop
  offsets and flips their transform drew, and their learning rate of every epoch of a 200-epoch run.
- ``semi_self_counts``: how many labelled and unlabelled images per class their ``SemiSupervisedImbalanceCIFAR10``
  takes for CIFAR-10 at Table 1's settings (rho in 100, 50, 10; rho_U in 1, rho/2, rho, 2 rho; D_U @5x), and the
  class counts their final model's loss sees (``get_cls_num_list``: D_L's labels plus D_U's pseudo-labels).
- ``semi_self_pseudo``: their pseudo-labelling (gen_pseudolabels.py: eval-mode ResNet-32, ``torch.max`` of the
  logits) of a batch of images, for a CE and an LDAM (``use_norm``) base model, and of crafted logits with ties.

Nothing of their code enters the project: it is imported from the checkout given on the command line. What is
patched or copied here is said where it is done.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_io  # noqa: E402

REPO = "YyzHarry/imbalanced-semi-self"
PINNED = "b91ad29fd8805ddf0a146f735905b0c869e68ae4"
CIFAR_LABELS = Path("/work/shared/data/cifar10-train-official-order.txt")
#: their CIFAR normalisation (pretrain_rot.py, train_semi.py, gen_pseudolabels.py)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
ROTATION_SEED, PSEUDO_SEEDS = 0, {"ce": 10, "ldam": 11}
BATCH = 8


def shapes_of(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def seeded_model(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    model.load_state_dict(fixture_io.seeded_weights(shapes_of(model), seed))
    return model


def fingerprints(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Initial weights as fingerprints only (the test draws them again with seeded_weights and checks the draw)."""
    return {fixture_io.fingerprint_key(prefix + name): fixture_io.fingerprint(t) for name, t in state.items()}


def uint8_images(count: int, seed: int) -> np.ndarray:
    """[count, 32, 32, 3] uint8, as CIFAR's ``data`` array holds its images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()


def per_image(prefix: str, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One key per image, so that a batch stays whole under fixture_io.FULL_LIMIT."""
    return {f"{prefix}.{i}": image.contiguous() for i, image in enumerate(batch)}


# -- Rotation ----------------------------------------------------------------------------------------------------
def reference_views(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pretrain_rot.py's training views of ``images``, with the crop offsets (top, left) and flips they drew.

    ``transform_train`` is a local variable of their ``main_worker``: its four lines are copied here. The crop's
    ``get_params`` and ``functional.hflip`` are wrapped to record what each image got; both still run."""
    import torchvision.transforms as transforms
    import torchvision.transforms.functional as TF

    transform_train = transforms.Compose([  # copied from pretrain_rot.py main_worker
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    ])
    drawn = {}
    get_params, hflip = transforms.RandomCrop.get_params, TF.hflip

    def recording_get_params(img, output_size):
        drawn["crop"] = get_params(img, output_size)
        return drawn["crop"]

    def recording_hflip(img):
        drawn["flip"] = True
        return hflip(img)

    transforms.RandomCrop.get_params = staticmethod(recording_get_params)
    TF.hflip = recording_hflip
    try:
        torch.manual_seed(2)
        views, offsets, flips = [], [], []
        for image in images:
            drawn.clear()
            views.append(transform_train(Image.fromarray(image)))  # CIFAR10.__getitem__ makes the PIL image so
            top, left, _, _ = drawn["crop"]
            offsets.append([top, left])
            flips.append(drawn.get("flip", False))
    finally:
        transforms.RandomCrop.get_params, TF.hflip = staticmethod(get_params), hflip
    return torch.stack(views), torch.tensor(offsets), torch.tensor(flips)


#: weights after the step are stored whole up to this size, as fingerprints above it (the gradients, stored whole,
#: show any elementwise difference; this keeps the fixture under 1 MB)
AFTER_WHOLE_LIMIT = 4096


def after_step(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights after the step, under ``after.``: whole up to AFTER_WHOLE_LIMIT elements, fingerprints above."""
    stored = {}
    for name, t in state.items():
        if t.numel() > AFTER_WHOLE_LIMIT:
            stored[fixture_io.fingerprint_key(f"after.{name}")] = fixture_io.fingerprint(t)
        else:
            stored[f"after.{name}"] = t.clone()
    return stored


class RecordingLoss(torch.nn.Module):
    """Their criterion, nn.CrossEntropyLoss(weight=None) (``train_rule`` None), recording its inputs and value."""

    def __init__(self) -> None:
        super().__init__()
        self.criterion, self.seen = torch.nn.CrossEntropyLoss(weight=None), {}

    def forward(self, output, target):
        loss = self.criterion(output, target)
        self.seen.update(logits=output.detach().clone(), target=target.clone(), loss=loss.detach().clone())
        return loss


class NullWriter:
    """Stands in for tensorboardX's SummaryWriter: the step's figures are read from the recordings instead."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass


def rotation_fixture() -> None:
    import models
    import pretrain_rot
    import utils

    # Their loop moves every batch with .cuda(); on this CPU-only machine that is the identity.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    images = uint8_images(BATCH, seed=1)
    views, offsets, flips = reference_views(images)

    model = seeded_model(models.resnet32(num_classes=4, use_norm=False), ROTATION_SEED)  # as main_worker builds it
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    args = argparse.Namespace(lr=0.1, momentum=0.9, weight_decay=2e-4, print_freq=10, epochs=200)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    epoch = 5  # the first epoch after their 5 warm-up epochs: lr 0.1
    pretrain_rot.adjust_learning_rate(optimizer, epoch, args)
    lr = optimizer.param_groups[0]["lr"]

    rotated = {}

    def recording_rotation(inputs):
        image, target = utils.rotation(inputs)
        rotated.update(images=image.clone(), target=target.clone())
        return image, target

    pretrain_rot.rotation = recording_rotation  # their train() calls the name it imported from utils
    criterion = RecordingLoss()
    np.random.seed(3)  # utils.rotation draws its labels from numpy's global generator
    pretrain_rot.train([(views, torch.zeros(BATCH, dtype=torch.long))], model, criterion, optimizer, epoch, args,
                       io.StringIO(), NullWriter())

    names = [name for name, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    schedule_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    lr_per_epoch = []
    for e in range(args.epochs):  # their adjust_learning_rate, called at the start of every epoch
        utils.adjust_learning_rate(schedule_optimizer, e, args)
        lr_per_epoch.append(schedule_optimizer.param_groups[0]["lr"])

    tensors = {**per_image("input.image", torch.from_numpy(images).permute(0, 3, 1, 2)),
               **per_image("input.view", views), "input.crop_offsets": offsets, "input.flips": flips,
               "rotation.target": rotated["target"], "rotation.images": rotated["images"],
               "logits": criterion.seen["logits"], "loss": criterion.seen["loss"],
               **fingerprints("init.", initial),
               **{f"grad.{name}": params[name].grad for name in names},
               **after_step(model.state_dict()),
               **{fixture_io.fingerprint_key(f"optim.momentum_buffer.{name}"):
                  fixture_io.fingerprint(optimizer.state[params[name]]["momentum_buffer"]) for name in names},
               "schedule.lr_per_epoch": torch.tensor(lr_per_epoch, dtype=torch.float64)}
    meta = {"repo": REPO, "commit": PINNED, "seed": ROTATION_SEED, "shapes": shapes_of(models.resnet32(num_classes=4)),
            "parameters": names, "lr": lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
            "epoch": epoch, "batch": BATCH, "mean": MEAN, "std": STD,
            "configured": "pretrain_rot.py train() for one batch: resnet32(num_classes=4, use_norm=False), "
                          "nn.CrossEntropyLoss(), SGD(lr 0.1 at epoch 5 by adjust_learning_rate, momentum 0.9, "
                          "wd 2e-4); views by transform_train (torch seed 2) of seeded uint8 images; "
                          "utils.rotation with np.random.seed(3); lr per epoch of a 200-epoch run at lr 0.1"}
    path = fixture_io.save("semi_self_rotation", tensors, meta)
    print("rotation:", path, f"loss {criterion.seen['loss'].item():.6f}")


# -- D_L / D_U counts ------------------------------------------------------------------------------------------------
def cifar10_labels() -> np.ndarray:
    """The official train labels: line i is image i's path, its folder the class; classes sorted = label order."""
    names = [line.split("/")[-2] for line in CIFAR_LABELS.read_text().split()]
    classes = sorted(set(names))
    return np.array([classes.index(n) for n in names], dtype=np.int64)


#: a stand-in for their 80M Tiny Images file: this many images per class, enough for every column of Table 1
TINY_PER_CLASS = 40_000
#: the stand-in's row numbers start here, apart from CIFAR's
TINY_OFFSET = 1_000_000


def unlabeled_stand_in(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """ti_80M_selected.pickle and pseudo_labeled_cifar.pickle under ``root``, as their dataset reads them.

    The files are not available (80M Tiny Images is withdrawn): here ``data`` is each image's row number (so the
    rows taken can be read back), ``extrapolated_targets`` a class label per image, and the pseudo-labels a fixed
    relabelling of it (every 7th image one class on), so that the final class counts show where they come from."""
    truth = np.repeat(np.arange(10), TINY_PER_CLASS)
    truth = truth[np.random.default_rng(5).permutation(len(truth))]
    pseudo = np.where(np.arange(len(truth)) % 7 == 0, (truth + 1) % 10, truth)
    with open(root / "ti_80M_selected.pickle", "wb") as f:
        pickle.dump({"data": TINY_OFFSET + np.arange(len(truth))[:, None], "extrapolated_targets": truth}, f)
    with open(root / "pseudo_labeled_cifar.pickle", "wb") as f:
        pickle.dump({"extrapolated_targets": pseudo}, f)
    return truth, pseudo


def reference_split(labels: np.ndarray, root: Path, imb_factor: float, unlabel_imb_factor: float):
    """Their SemiSupervisedImbalanceCIFAR10 on the CIFAR-10 label array: torchvision's CIFAR10.__init__, which
    reads the archive, is replaced by one that sets ``data`` (each image's row number) and ``targets``; the rest
    of their __init__ runs unchanged (np.random.seed(rand_number), the counts, gen_imbalanced_data)."""
    import torchvision
    from dataset.imbalance_cifar import SemiSupervisedImbalanceCIFAR10

    def archive_free_init(self, root, train=True, transform=None, target_transform=None, download=False):
        self.root, self.train, self.transform, self.target_transform = root, train, transform, target_transform
        self.data, self.targets = np.arange(len(labels))[:, None], labels.tolist()

    original = torchvision.datasets.CIFAR10.__init__
    torchvision.datasets.CIFAR10.__init__ = archive_free_init
    try:
        with quiet():
            return SemiSupervisedImbalanceCIFAR10(str(root), imb_type="exp", imb_factor=imb_factor,
                                                  unlabel_imb_factor=unlabel_imb_factor, rand_number=0)
    finally:
        torchvision.datasets.CIFAR10.__init__ = original


@contextlib.contextmanager
def quiet():
    """Their dataset code prints every count it computes."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def counts_fixture() -> None:
    from dataset.imbalance_cifar import SemiSupervisedImbalanceCIFAR10

    labels = cifar10_labels()
    tensors, settings = {"cifar10.class_counts": torch.from_numpy(np.bincount(labels, minlength=10))}, []
    with tempfile.TemporaryDirectory() as tmp:
        truth, pseudo = unlabeled_stand_in(Path(tmp))
        for rho in (100, 50, 10):
            for rho_u in (1, rho / 2, rho, 2 * rho):
                key = f"rho{rho:g}.rhoU{rho_u:g}"
                ds = reference_split(labels, Path(tmp), 1 / rho, 1 / rho_u)
                rows = ds.data[:, 0]  # D_L's rows (CIFAR's), then D_U's (the stand-in's, from TINY_OFFSET on)
                labeled_rows, unlabeled_rows = rows[rows < TINY_OFFSET], rows[rows >= TINY_OFFSET] - TINY_OFFSET
                tensors[f"labeled.{key}"] = torch.from_numpy(np.bincount(labels[labeled_rows], minlength=10))
                tensors[f"unlabeled.{key}"] = torch.from_numpy(np.bincount(truth[unlabeled_rows], minlength=10))
                with quiet():  # their idx[:n] takes fewer where a class runs out: the stand-in must never
                    wanted = ds.get_img_num_per_cls_unlabeled(10, tensors[f"labeled.{key}"].tolist(), 1 / rho_u)
                assert tensors[f"unlabeled.{key}"].tolist() == wanted, (key, wanted)
                tensors[f"pseudo.{key}"] = torch.from_numpy(np.bincount(pseudo[unlabeled_rows], minlength=10))
                tensors[f"cls_num_list.{key}"] = torch.tensor(ds.get_cls_num_list())
                tensors[fixture_io.fingerprint_key(f"labeled_rows.{key}")] = fixture_io.fingerprint(
                    torch.from_numpy(labeled_rows))
                tensors[fixture_io.fingerprint_key(f"unlabeled_rows.{key}")] = fixture_io.fingerprint(
                    torch.from_numpy(unlabeled_rows))
                settings.append({"key": key, "rho": rho, "rho_u": rho_u, "imb_factor": 1 / rho,
                                 "unlabel_imb_factor": 1 / rho_u})
    # Their count functions at imbssl's head of 600 (docs/semi-supervised.md): get_img_num_per_cls reads the head
    # from len(self.data) / cls_num, so it is called on an object holding 600 rows a class.
    at_600 = SemiSupervisedImbalanceCIFAR10.__new__(SemiSupervisedImbalanceCIFAR10)
    at_600.data = np.zeros((6000, 1))
    with quiet():
        for rho in (100, 50, 10):
            labeled = at_600.get_img_num_per_cls(10, "exp", 1 / rho)
            tensors[f"head600.labeled.rho{rho:g}"] = torch.tensor(labeled)
            for rho_u in (1, rho / 2, rho, 2 * rho):
                tensors[f"head600.unlabeled.rho{rho:g}.rhoU{rho_u:g}"] = torch.tensor(
                    at_600.get_img_num_per_cls_unlabeled(10, labeled, 1 / rho_u))
    meta = {"repo": REPO, "commit": PINNED, "settings": settings, "tiny_per_class": TINY_PER_CLASS,
            "configured": "dataset/imbalance_cifar.py SemiSupervisedImbalanceCIFAR10(imb_type='exp', rand_number=0, "
                          "unlabel_size_factor 5) on the official CIFAR-10 train labels, with a stand-in for the 80M "
                          "Tiny Images pickles (TINY_PER_CLASS images a class, pseudo-labels = the class, every 7th "
                          "one class on); head600.*: their get_img_num_per_cls(_unlabeled) at a head of 600"}
    print("counts:", fixture_io.save("semi_self_counts", tensors, meta))


# -- pseudo-labels ---------------------------------------------------------------------------------------------------
def crafted_logits() -> torch.Tensor:
    """Rows where the argmax is delicate: an exact tie, and neighbouring floats, which a softmax rounds to one
    probability (exp(x - y) is 1.0 in float32 for |x - y| below 3e-8)."""
    rows = torch.randn(6, 10, generator=torch.Generator().manual_seed(7))
    rows[0, :2] = 1.0  # exact tie between classes 0 and 1
    small = torch.tensor(0.1)
    rows[1] = -1.0
    rows[1, 3], rows[1, 4] = small, torch.nextafter(small, torch.tensor(1.0))  # 4 is larger by one float
    rows[2] = -1.0
    rows[2, 8], rows[2, 2] = small, torch.nextafter(small, torch.tensor(1.0))  # 2 is larger, 8 comes later
    rows[3] = 0.0
    rows[3, 9] = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))  # the smallest positive float wins
    return rows


def pseudo_fixture() -> None:
    import models
    import torchvision.transforms as transforms

    images = uint8_images(12, seed=4)
    transform_val = transforms.Compose([  # copied from gen_pseudolabels.py (its CIFAR mean and std)
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    batch = torch.stack([transform_val(image) for image in images])  # CIFAR10.__getitem__ would make PIL images;
    # ToTensor gives the same tensor from the uint8 HWC array
    tensors = {**per_image("input.image", torch.from_numpy(images).permute(0, 3, 1, 2)),
               fixture_io.fingerprint_key("input.batch"): fixture_io.fingerprint(batch)}
    meta = {"repo": REPO, "commit": PINNED, "seeds": PSEUDO_SEEDS, "mean": MEAN, "std": STD, "shapes": {}}
    for loss, seed in PSEUDO_SEEDS.items():
        # as gen_pseudolabels.py builds it: num_classes 10, use_norm for LDAM; then model.eval()
        model = seeded_model(models.resnet32(num_classes=10, use_norm=loss == "ldam"), seed).eval()
        tensors.update(fingerprints(f"{loss}.init.", model.state_dict()))
        with torch.no_grad():
            logits = model(batch)
            _, preds = torch.max(logits, dim=1)  # their line: `_, preds = torch.max(model(batch.cuda()), dim=1)`
        tensors.update({f"{loss}.logits": logits, f"{loss}.preds": preds})
        meta["shapes"][loss] = shapes_of(model)
    crafted = crafted_logits()
    _, crafted_preds = torch.max(crafted, dim=1)
    tensors.update({"crafted.logits": crafted, "crafted.preds": crafted_preds})
    meta["configured"] = ("gen_pseudolabels.py: resnet32(num_classes=10, use_norm=loss_type=='LDAM') in eval mode, "
                          "transform_val, hard labels torch.max(logits, dim=1), no threshold; crafted logits with ties")
    print("pseudo:", fixture_io.save("semi_self_pseudo", tensors, meta), "preds", tensors["ce.preds"].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of YyzHarry/imbalanced-semi-self at the pinned commit")
    checkout = Path(parser.parse_args().checkout).resolve()
    fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    torch.set_num_threads(1)
    rotation_fixture()
    counts_fixture()
    pseudo_fixture()


if __name__ == "__main__":
    main()
