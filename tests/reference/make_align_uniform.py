"""Regenerate fixtures/align_uniform.safetensors: one training step of SsnL/align_uniform's STL-10 example.

    /work/refenv/bin/python tests/reference/make_align_uniform.py /work/refs/SsnL+align_uniform

Records, from the authors' modules imported unchanged:

- ``terms.*``: ``align_uniform.align_loss`` at alpha 1, 2 and 3 and ``uniform_loss`` at t 1, 2 and 5 on fixed unit
  vectors (12 pairs in 16 dimensions), each value and its gradient;
- one step of ``examples/stl10/main.py``'s ``main()`` itself at its defaults (alpha = t = 2, both weights 1,
  ``--feat_dim 128``, SGD at its rule's lr 0.12 * 768 / 256 = 0.36, momentum 0.9, weight decay 1e-4, MultiStepLR),
  run for one epoch of one batch of 8 pairs of 16 x 16 views: the loss and its two terms (read back from its
  meters), every gradient, the weights and BatchNorm buffers after the step.

The encoder is not their SmallAlexNet, whose fc6 takes 192 x 7 x 7 maps (64 x 64 STL-10 crops) and which imbssl has
no counterpart of. ``encoder_for`` builds one that both sides can: imbssl's SmallCNN at width 0.5 (models/small.py,
written out here layer for layer) with their encoder's last block, fc8 (Linear to ``feat_dim``, with bias) and their
``L2Norm``. Its weights are ``fixture_io.seeded_weights``, not their ``init_weights_``. What the comparison covers
is the loss, its combination, the one forward of both views, the optimizer and the step; the backbone is imbssl's.

What is patched, and why: ``main.SmallAlexNet`` (the encoder above), ``main.get_data_loader`` (the one batch, already
normalised: their loader draws and normalises STL-10 crops), ``main.AverageMeter`` (kept, to read the loss back),
``parse_option`` (the devices set to the CPU: their ``--gpus`` are always CUDA devices) and ``torch.cuda.set_device``
(a no-op: nothing runs on a GPU). ``CUDA_VISIBLE_DEVICES`` is emptied so that their ``nn.DataParallel`` calls the
model itself. Their checkpoint and ``results`` folder go to a temporary directory.
"""
from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: their DataParallel then wraps the CPU model

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

REPO = "SsnL/align_uniform"
PINNED = "e256d476ddbe04873dc15a8f893d4443d1f81671"
NAME = "align_uniform"
SEED = 32
BATCH, SIZE, WIDTHS = 8, 16, (16, 32, 64, 128)  # imbssl's SmallCNN at width 0.5
TERM_ROWS, TERM_DIM, ALPHAS, TS = 12, 16, (1.0, 2.0, 3.0), (1.0, 2.0, 5.0)


def small_cnn_body() -> nn.Sequential:
    """imbssl's SmallCNN at width 0.5 written out (models/small.py): four Conv-BN-ReLU-MaxPool blocks, ceil mode,
    global average pool."""
    layers, in_ch = [], 3
    for out_ch in WIDTHS:
        layers += [nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2, ceil_mode=True)]
        in_ch = out_ch
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))


def encoder_for(l2norm: type[nn.Module], feat_dim: int) -> nn.Sequential:
    """imbssl's SmallCNN under ``body``, then their fc8: a Linear to ``feat_dim`` and their L2Norm."""
    return nn.Sequential(OrderedDict(body=small_cnn_body(), flatten=nn.Flatten(), fc=nn.Linear(WIDTHS[-1], feat_dim),
                                     norm=l2norm()))


def terms(align_loss, uniform_loss) -> dict[str, torch.Tensor]:
    """Their two losses and their gradients on fixed unit vectors."""
    gen = torch.Generator().manual_seed(SEED)
    x, y = (nn.functional.normalize(torch.randn(TERM_ROWS, TERM_DIM, generator=gen), dim=1) for _ in range(2))
    tensors = {"terms.x": x, "terms.y": y}
    for alpha in ALPHAS:
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        loss = align_loss(xg, yg, alpha=alpha)
        loss.backward()
        tensors.update({f"terms.align.a{alpha:g}": loss.detach(), f"terms.align.a{alpha:g}.grad_x": xg.grad,
                        f"terms.align.a{alpha:g}.grad_y": yg.grad})
    for t in TS:
        xg = x.clone().requires_grad_()
        loss = uniform_loss(xg, t=t)
        loss.backward()
        tensors.update({f"terms.uniform.t{t:g}": loss.detach(), f"terms.uniform.t{t:g}.grad": xg.grad})
    return tensors


def one_step(main, l2norm: type[nn.Module], results: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Their ``main()`` for one epoch of one batch; what it computed and the settings it ran at."""
    built, meters, settings = [], {}, {}
    gen = torch.Generator().manual_seed(SEED)
    views = [torch.randn(BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(2)]

    def encoder(feat_dim: int) -> nn.Module:
        model = encoder_for(l2norm, feat_dim)
        settings["shapes"] = {k: list(v.shape) for k, v in model.state_dict().items()}
        model.load_state_dict(fixture_io.seeded_weights(settings["shapes"], SEED))
        built.append(model)
        return model

    def on_cpu(parse_option=main.parse_option):
        opt = parse_option()
        opt.gpus = [torch.device("cpu")]
        settings["opt"] = opt
        return opt

    def meter(name=None, fmt=".6f", real=main.AverageMeter):
        meters[name] = real(name, fmt)
        return meters[name]

    argv = ["main.py", "--epochs", "1", "--result_folder", results]
    with mock.patch.object(sys, "argv", argv), mock.patch.object(main, "SmallAlexNet", encoder), \
            mock.patch.object(main, "get_data_loader", lambda opt: [tuple(views)]), \
            mock.patch.object(main, "parse_option", on_cpu), mock.patch.object(main, "AverageMeter", meter), \
            mock.patch.object(torch.cuda, "set_device", lambda device: None), \
            contextlib.redirect_stdout(io.StringIO()):  # their progress lines
        main.main()
    model, opt = built[0], settings["opt"]
    initial = fixture_io.seeded_weights(settings["shapes"], SEED)
    tensors = {"input.view1": views[0], "input.view2": views[1], "loss": meters["total_loss"].val.detach(),
               "align": meters["align_loss"].val.detach(), "uniform": meters["uniform_loss"].val.detach(),
               **{f"init.{k}": v for k, v in initial.items()},
               **{f"grad.{k}": p.grad for k, p in model.named_parameters()},
               **{f"after.{k}": p for k, p in model.named_parameters()},
               **{f"update.{k}": p.detach() - initial[k] for k, p in model.named_parameters()},
               **{f"state.{k}": v for k, v in model.named_buffers()}}
    meta = {"shapes": settings["shapes"], "align_w": opt.align_w, "unif_w": opt.unif_w,
            "align_alpha": opt.align_alpha, "unif_t": opt.unif_t, "feat_dim": opt.feat_dim,
            "batch_size_arg": opt.batch_size, "lr": opt.lr, "momentum": opt.momentum,
            "weight_decay": opt.weight_decay, "lr_decay_rate": opt.lr_decay_rate,
            "lr_decay_epochs": opt.lr_decay_epochs}
    return tensors, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of SsnL/align_uniform at the pinned commit")
    checkout = Path(parser.parse_args().checkout)
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path[:0] = [str(checkout / "examples" / "stl10"), str(checkout)]
    torch.manual_seed(SEED)
    import main as stl10_main
    from align_uniform import align_loss, uniform_loss
    from encoder import L2Norm

    with tempfile.TemporaryDirectory() as results:
        tensors, meta = one_step(stl10_main, L2Norm, results)
    tensors.update(terms(align_loss, uniform_loss))
    meta.update(repo=REPO, commit=commit, seed=SEED, batch=BATCH, size=SIZE, widths=WIDTHS, alphas=ALPHAS, ts=TS,
                torch=torch.__version__,
                configured="examples/stl10/main.py main() at its defaults for one epoch of one batch of 8 pairs of "
                           "16 x 16 views; encoder: imbssl's SmallCNN (width 0.5) + their fc8 Linear(128, 128) and "
                           "L2Norm, seeded weights; SGD lr 0.12 * 768 / 256 = 0.36, momentum 0.9, wd 1e-4")
    print(fixture_io.save(NAME, tensors, meta), f"loss {tensors['loss'].item():.7f}")


if __name__ == "__main__":
    main()
