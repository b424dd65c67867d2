"""Regenerate fixtures/focal.safetensors, gh.safetensors and gh_sdclr.safetensors: Focal and Geometric Harmonization
as MediaBrain-SJTU/Geometric-Harmonization's own code computes them (the reference env).

    /work/refenv/bin/python tests/reference/make_gh.py /work/refs/MediaBrain-SJTU+Geometric-Harmonization

Records, from their modules imported unchanged:

- ``terms.*`` (utils.py): ``nt_xent`` and ``focal_nt_xent`` (gamma 2, its default, and 1 and 0.5) at their t = 0.2
  on fixed projections, per image and the gradient of the mean; ``sinkhorn`` at GHLoss's l = 0.05 and 300 iterations
  with a prior (one direction empty) and without one (``stat=None``); ``GHLoss(0.05, 300)`` on two views' scores,
  its value and gradients;
- ``lr.*`` (utils.py): ``lr_scheduler_warm`` (their GH runs' restarted cosine) and ``lr_scheduler`` (their
  baselines'), the lr of each epoch at LR_ARGS;
- ``target.*``: gen_target.py's ``simplex_equiangular_tight_frame`` after ``np.random.seed(SEED)`` at their K = 100,
  d = 128 (the script's own body) and at K = 10, d = 16; the Gram matrix of their shipped target/100_128_target.npy
  (not the target itself, which imbssl does not ship);
- their train_cifar.py ``ssl_training()`` loop itself, run as written on one batch of 8 images per epoch:
  - focal.safetensors: ``--method focal`` for 1 epoch;
  - gh.safetensors, ``simclr.``: ``--method simclr_GH --bcl --warm_up 1`` for 2 epochs (the second GH's first, at
    w = 1 / --GH_warm_up 10), and ``focal.``: ``--method focal_GH --warm_up 1`` for 2 epochs;
  - gh_sdclr.safetensors: ``--method sdclr_GH --bcl --warm_up 1 --lr 0`` for 2 epochs on their SDCLR (ResNet-18,
    dual BN, BCL-D's 2-layer head; RUNS says why at lr 0).
  For each: the views and the images' shuffled indices, fingerprints of the seeded initial weights (``init.``),
  every step's loss and its terms (their meters), the lr of each epoch (their ``lr_scheduler_warm``), every gradient
  of the last step, every weight and buffer after it; for GH, the last GH step's scores, pi and allocations, and
  each image's momentum scores (``logit_momentum``) after; with ``--bcl``, each image's momentum loss after each
  epoch; for SDCLR, the masks.

The encoder of the SimCLR runs is not their ResNet-18 (models.py ``SimCLR.get_backbone``): imbssl's SmallCNN at width
0.5, as make_align_uniform.py writes it out, under their models.py ``SimCLR`` and its ``proj_head``. The SDCLR run
keeps their network. Weights: ``fixture_io.seeded_weights``.

What is patched, and why:
- ``torch.Tensor.cuda`` returns the tensor, and train_cifar.py's ``torch`` is the real one but for three names:
  ``device`` gives the CPU (their --gpus are CUDA devices), ``cuda.set_device`` does nothing, ``empty`` gives zeros
  (their memories start as ``torch.empty``; the first epoch adds to them, which a fresh CUDA allocation holds as 0
  in practice, and the CPU's does not);
- the data: ``ImbalanceCIFAR100`` and ``torchvision.datasets.CIFAR100`` (they download CIFAR-100) are stand-ins of
  8 images; ``TwoViewAugDataset_index`` and BCL's ``Memoboosed_Dataset`` give the one batch (views, labels, shuffled
  indices), the latter recording the memory it receives; ``DataLoader`` passes its dataset through;
- ``np.load`` of target/100_128_target.npy gives gen_target.py's draw at SEED, which imbssl draws too;
- gen_target.py has a syntax error (``assert k <= d + 1,`` with nothing after the comma): it runs with the comma
  removed, and its ``np.save`` is recorded, not written;
- ``wandb`` is an empty module (not installed; --wandb is off); the meters, ``GHLoss`` and ``sinkhorn`` are wrapped
  to record what they see; their log goes to a temporary folder.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
from make_align_uniform import encoder_for  # noqa: E402

REPO = "MediaBrain-SJTU/Geometric-Harmonization"
PINNED = "9f7057ce38438c53a8b4bff92b02e0cbb5f09e62"
SEED = 31
BATCH, SIZE = 8, 16
TERM_ROWS, TERM_DIM, TERM_K = 12, 16, 10
GAMMAS = (2.0, 1.0, 0.5)
TARGETS = ((100, 128), (10, 16))
#: their lr flags' defaults over a short run, the restart at --warm_up 25 of 40 epochs (README: 500 of 1,000)
LR_ARGS = dict(lr=0.5, lr_min=1e-6, lr_min_stage1=0.3, lr_max_stage2=0.3, warm_up=25, epochs=40)
#: the runs of their loop: name -> (their flags, epochs, the fixture it goes to)
RUNS = {"focal": (["--method", "focal"], 1),
        "simclr": (["--method", "simclr_GH", "--bcl", "--warm_up", "1"], 2),
        "focal_gh": (["--method", "focal_GH", "--warm_up", "1"], 2),
        # --lr 0: GH's step starts from the weights as drawn on both sides. At their lr the first step leaves the
        # two ResNets 1e-6 apart, and among ResNet-18's million activations one ReLU's input then falls on either
        # side of 0 (in layer4, whose 2 x 2 maps make that one flip 8% of a BatchNorm's gradient); the update
        # itself is compared on the small encoder's runs
        "sdclr": (["--method", "sdclr_GH", "--bcl", "--warm_up", "1", "--lr", "0"], 2)}


def generated_target(checkout: Path) -> tuple[dict[str, np.ndarray], types.FunctionType]:
    """gen_target.py run (its comma fixed) after np.random.seed(SEED): what it would save, and its function."""
    source = (checkout / "target" / "gen_target.py").read_text().replace("assert k <= d + 1, \n", "assert k <= d + 1\n")
    saved = {}
    namespace = {"__name__": "gen_target"}
    np.random.seed(SEED)
    with mock.patch.object(np, "save", lambda path, array: saved.update({path: array})):
        exec(compile(source, "gen_target.py", "exec"), namespace)
    return saved, namespace["simplex_equiangular_tight_frame"]


def targets(checkout: Path) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    saved, simplex = generated_target(checkout)
    assert list(saved) == ["100_128_target.npy"]
    tensors = {"target.k100_d128": torch.from_numpy(saved["100_128_target.npy"])}
    for k, d in TARGETS[1:]:
        np.random.seed(SEED)
        tensors[f"target.k{k}_d{d}"] = torch.from_numpy(simplex(k, d))
    shipped = np.load(checkout / "target" / "100_128_target.npy")
    tensors["target.shipped_gram"] = torch.from_numpy(shipped @ shipped.T)
    return tensors, saved["100_128_target.npy"]


def terms(utils) -> dict[str, torch.Tensor]:
    """Their losses and allocation on fixed inputs; values and gradients."""
    gen = torch.Generator().manual_seed(SEED)
    z1, z2 = (torch.randn(TERM_ROWS, TERM_DIM, generator=gen) for _ in range(2))
    tensors = {"terms.z1": z1, "terms.z2": z2}
    for name, loss_fn, gammas in (("nt_xent", utils.nt_xent, [None]), ("focal", utils.focal_nt_xent, GAMMAS)):
        for gamma in gammas:
            a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            extra = {} if gamma is None else {"gamma": gamma}
            per_image = loss_fn(a, t=0.2, features2=b, average=False, **extra)
            per_image.mean().backward()
            key = f"terms.{name}" + ("" if gamma is None else f".g{gamma:g}")
            tensors |= {key: per_image.detach(), f"{key}.grad_z1": a.grad, f"{key}.grad_z2": b.grad}
    x, y = (nn.functional.normalize(torch.randn(TERM_ROWS, TERM_K, generator=gen), dim=1) for _ in range(2))
    prior = torch.randint(1, 20, (TERM_K,), generator=gen).double()
    prior[3] = 0  # a direction that no image peaks at
    tensors |= {"terms.x": x, "terms.y": y, "terms.prior": prior,
                "terms.sinkhorn.prior": utils.sinkhorn(x, 0.05, 300, prior),
                "terms.sinkhorn.uniform": utils.sinkhorn(x, 0.05, 300)}
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = utils.GHLoss(0.05, 300)(a, b, prior)
    loss.backward()
    tensors |= {"terms.gh": loss.detach(), "terms.gh.grad_x": a.grad, "terms.gh.grad_y": b.grad}
    return tensors


def small_backbone(num_class: int, use_norm: bool = False) -> nn.Module:
    """imbssl's SmallCNN (width 0.5) with a ``fc`` head for their SimCLR to read the width from and replace."""
    return encoder_for(nn.Identity, num_class)


class OnTheCPU(types.ModuleType):
    """train_cifar.py's ``torch``: the real one, but devices are the CPU and ``empty`` is zeros (recorded)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.created: list[torch.Tensor] = []
        self.cuda = types.SimpleNamespace(set_device=lambda device: None)

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def device(*args) -> torch.device:
        return torch.device("cpu")

    def empty(self, *shape) -> torch.Tensor:
        self.created.append(torch.zeros(*shape))
        return self.created[-1]


def run_loop(train_cifar, models, sdclr_module, utils, name: str, target: np.ndarray, log_dir: str) -> dict:
    """Their ssl_training() for one run of RUNS; what it computed."""
    flags, epochs = RUNS[name]
    args = train_cifar.parser.parse_args([*flags, "--epochs", str(epochs), "--log_folder", log_dir])
    gen = torch.Generator().manual_seed(SEED + len(name))
    scale = (lambda v: v) if name != "sdclr" else (lambda v: v.sigmoid())  # their ResNet normalises [0, 1] images
    views = [scale(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)) for _ in range(2)]
    index = torch.randperm(BATCH, generator=gen)
    batch = (views[0], views[1], torch.zeros(BATCH, dtype=torch.long), index)
    built, meters, gh_calls, allocations, boosts = [], {}, [], [], []

    def seeded(named: nn.Module) -> dict:
        shapes = {k: list(v.shape) for k, v in named.state_dict().items()
                  if not k.startswith("encoder.") and "normalize." not in k}
        missing, unexpected = named.load_state_dict(fixture_io.seeded_weights(shapes, SEED), strict=False)
        assert not unexpected and all(k.startswith("encoder.") or "normalize." in k for k in missing)
        return shapes

    class SimCLR(models.SimCLR):
        get_backbone = staticmethod(lambda network: small_backbone)

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append((self, self, seeded(self)))

    class SDCLR(sdclr_module.SDCLR):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append((self, self.backbone, seeded(self.backbone)))  # names as SDCLR's network

    class Meter(utils.AverageMeter):
        def __init__(self, name=None, fmt=".6f"):
            super().__init__(name, fmt)
            self.values = meters.setdefault(name, [])

        def update(self, val, n=1):
            super().update(val, n)
            self.values.append(torch.as_tensor(val).detach().clone().reshape(()))

    class GHLoss(utils.GHLoss):
        def forward(self, c1, c2, stat):
            loss = super().forward(c1, c2, stat)
            gh_calls.append({"t1": c1.detach().clone(), "t2": c2.detach().clone(), "prior": stat.clone(),
                             "loss": loss.detach().clone()})
            return loss

    class Boosted(list):
        def __init__(self, dataset, args):
            super().__init__([batch])

        def update_momentum_weight(self, momentum_loss, epoch):
            boosts.append(momentum_loss.detach().clone().reshape(-1))

    def sinkhorn(out, l, iterations, stat=None, real=utils.sinkhorn):
        allocations.append(real(out, l, iterations, stat))
        return allocations[-1]

    def load_target(path):
        assert path == "target/100_128_target.npy", path
        return target

    class Stand(list):  # ImbalanceCIFAR100's stand-in: 8 images of one class
        def __init__(self, *args, **kwargs):
            super().__init__()

        def get_cls_num_list(self):
            return [BATCH] + [0] * 99

    cpu = OnTheCPU()
    patches = [mock.patch.object(train_cifar, "args", args), mock.patch.object(train_cifar, "torch", cpu),
               mock.patch.object(train_cifar, "SimCLR", SimCLR), mock.patch.object(train_cifar, "SDCLR", SDCLR),
               mock.patch.object(train_cifar, "AverageMeter", Meter), mock.patch.object(train_cifar, "GHLoss", GHLoss),
               mock.patch.object(train_cifar, "ImbalanceCIFAR100", Stand),
               mock.patch.object(train_cifar, "TwoViewAugDataset_index", lambda dataset, transform: [batch]),
               mock.patch.object(train_cifar, "Memoboosed_Dataset", Boosted),
               mock.patch.object(torchvision.datasets, "CIFAR100", Stand),
               mock.patch.object(torch.utils.data, "DataLoader", lambda dataset, **kwargs: dataset),
               mock.patch.object(utils, "sinkhorn", sinkhorn), mock.patch.object(np, "load", load_target)]
    with contextlib.ExitStack() as stack, contextlib.redirect_stdout(io.StringIO()):
        for patch in patches:
            stack.enter_context(patch)
        train_cifar.ssl_training()
    model, named, shapes = built[0]
    lrs = []
    for epoch in range(epochs):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=args.lr)
        (train_cifar.lr_scheduler_warm if args.warm_up > 0 else train_cifar.lr_scheduler)(optimizer, epoch, args)
        lrs.append(optimizer.param_groups[0]["lr"])
    tensors = {"input.index": index, "lr": torch.tensor(lrs, dtype=torch.float64),
               **({"input.views": torch.stack(views, dim=1)} if name == "sdclr"  # sdclr_bcl_helpers.reference_views
                  else {"input.view1": views[0], "input.view2": views[1]}),
               **{f"loss.{k}": torch.stack(meters[k]) for k in ("loss", "loss_cl", "loss_gh") if meters.get(k)},
               # the draw, checked by its fingerprints: both sides draw it again from the seed
               **{fixture_io.fingerprint_key(f"init.{k}"): fixture_io.fingerprint(v)
                  for k, v in fixture_io.seeded_weights(shapes, SEED).items()},
               **{f"grad.{k}": p.grad for k, p in named.named_parameters()},
               **{f"after.{k}": named.state_dict()[k] for k in shapes}}
    if "--bcl" in flags:
        tensors["state.momentum_loss"] = cpu.created[1].reshape(-1)
        tensors["state.boost_memory"] = torch.stack(boosts)
    if gh_calls:
        call = gh_calls[-1]
        tensors |= {"state.logit_momentum": cpu.created[0], "gh.t1": call["t1"], "gh.t2": call["t2"],
                    "gh.prior": call["prior"], "gh.loss": call["loss"], "gh.q1": allocations[-2], "gh.q2": allocations[-1]}
    if name == "sdclr":
        tensors |= {f"state.mask.{n}": m.prune_mask.bool() for n, m in named.named_modules()
                    if hasattr(m, "prune_mask")}
    meta = dict(shapes=shapes, flags=flags, epochs=epochs, args=vars(args) | {"log_folder": None},
                normalize=None if name != "sdclr" else dict(mean=named.normalize.mean.tolist(),
                                                            std=named.normalize.std.tolist()))
    return {"tensors": tensors, "meta": meta}


def lr_schedules(utils) -> dict[str, torch.Tensor]:
    """Their two lr schedules, an epoch each, at LR_ARGS: ``lr.restart`` (``lr_scheduler_warm``, their GH runs')
    and ``lr.plain`` (``lr_scheduler``, their baselines')."""
    args = argparse.Namespace(**LR_ARGS)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=args.lr)
    schedules = {}
    for key, schedule in (("lr.restart", utils.lr_scheduler_warm), ("lr.plain", utils.lr_scheduler)):
        values = []
        for epoch in range(args.epochs):
            schedule(optimizer, epoch, args)
            values.append(optimizer.param_groups[0]["lr"])
        schedules[key] = torch.tensor(values, dtype=torch.float64)
    return schedules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of MediaBrain-SJTU/Geometric-Harmonization at the pinned commit")
    checkout = Path(parser.parse_args().checkout)
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    from torch.hub import load_state_dict_from_url  # SDCLR/'s models import it from torchvision.models.utils
    sys.modules["torchvision.models.utils"] = types.SimpleNamespace(load_state_dict_from_url=load_state_dict_from_url)
    sys.modules["wandb"] = types.ModuleType("wandb")
    with mock.patch.object(sys, "argv", ["train_cifar.py"]):
        import train_cifar
    import models
    import utils
    from SDCLR import sdclr as sdclr_module

    target_tensors, target = targets(checkout)
    term_tensors = terms(utils)
    runs = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for name in RUNS:
            runs[name] = run_loop(train_cifar, models, sdclr_module, utils, name, target, log_dir)
    common = dict(repo=REPO, commit=commit, seed=SEED, batch=BATCH, size=SIZE, torch=torch.__version__,
                  gammas=GAMMAS)
    focal = runs["focal"]["tensors"] | {k: v for k, v in term_tensors.items()
                                        if k.startswith(("terms.z", "terms.nt_xent", "terms.focal"))}
    print(fixture_io.save("focal", focal, common | runs["focal"]["meta"]), "focal",
          focal["loss.loss"].tolist())
    gh = {**{k: v for k, v in term_tensors.items() if k.startswith(("terms.x", "terms.y", "terms.prior",
                                                                     "terms.sinkhorn", "terms.gh"))},
          **target_tensors, **lr_schedules(utils),
          **{f"{name}.{k}": v for name in ("simclr", "focal_gh") for k, v in runs[name]["tensors"].items()}}
    meta = common | {name: runs[name]["meta"] for name in ("simclr", "focal_gh")} | {"lr_args": LR_ARGS}
    print(fixture_io.save("gh", gh, meta), "simclr_GH",
          gh["simclr.loss.loss"].tolist())
    sdclr = runs["sdclr"]
    print(fixture_io.save("gh_sdclr", sdclr["tensors"], common | sdclr["meta"]), "sdclr_GH",
          sdclr["tensors"]["loss.loss"].tolist())


if __name__ == "__main__":
    main()
