"""Linear probe on frozen features with hyper-parameter and epoch selection on a validation split."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # config.py builds its method sections from the methods, which import this module
    from imbssl.config import LinearEvalConfig

ArrayLike = np.ndarray | Tensor
MOMENTUM = 0.9


@dataclass
class LinearProbeResult:
    """Test predictions of the selected classifier, its validation accuracy (%) and what was selected.

    ``best`` holds ``lr``, ``wd`` and ``epoch`` (1-based: the weights after that many epochs).
    """

    test_pred: np.ndarray
    val_acc: float
    best: dict


class _LinearGrid:
    """G linear classifiers, one per (lr, wd) of the grid, trained in lock-step.

    The G weight matrices sit side by side in one ``[D, G*C]`` matrix, so a step of the whole
    grid is two plain GEMMs; this is what makes an 8-config x 100-epoch grid take seconds. The
    softmax cross-entropy gradient is written out (``x^T (softmax - onehot) / B``) rather than
    taken from autograd: it is exact for a linear layer and avoids graph overhead on these tiny
    steps. The update is ``torch.optim.SGD``'s (momentum, no dampening, weight decay added to
    the gradient of weight and bias alike). All G classifiers start from the same weights and
    see the same mini-batches, so configs differ only in their hyper-parameters.
    """

    def __init__(self, dim: int, num_classes: int, grid: list[tuple[float, float]], gen: torch.Generator,
                 device: torch.device) -> None:
        self.size, self.num_classes = len(grid), num_classes
        init = torch.randn(dim, 1, num_classes, generator=gen) * 0.01
        self.weight = init.expand(-1, self.size, -1).reshape(dim, -1).to(device)
        self.bias = torch.zeros(self.size * num_classes, device=device)
        lrs, wds = (torch.tensor(v, dtype=torch.float32, device=device) for v in zip(*grid))
        self.lr = lrs.repeat_interleave(num_classes)
        self.wd = wds.repeat_interleave(num_classes)
        self.buf_weight = torch.zeros_like(self.weight)
        self.buf_bias = torch.zeros_like(self.bias)

    def logits(self, x: Tensor) -> Tensor:
        """``[N, G, C]`` logits of every classifier on ``x`` ``[N, D]``."""
        return torch.addmm(self.bias, x, self.weight).view(len(x), self.size, self.num_classes)

    def classifier(self, index: int) -> tuple[Tensor, Tensor]:
        """Copies of the ``[D, C]`` weight and ``[C]`` bias of classifier ``index``."""
        cols = slice(index * self.num_classes, (index + 1) * self.num_classes)
        return self.weight[:, cols].clone(), self.bias[cols].clone()

    def step(self, x: Tensor, onehot: Tensor, lr_scale: float) -> None:
        """One SGD step of every classifier on the mini-batch ``x`` with one-hot targets ``onehot``."""
        dlogits = (_softmax(self.logits(x)) - onehot[:, None, :]).view(len(x), -1) / len(x)
        grads = (x.T @ dlogits, dlogits.sum(0))
        params = (self.weight, self.bias)
        bufs = (self.buf_weight, self.buf_bias)
        for param, grad, buf in zip(params, grads, bufs):
            buf.mul_(MOMENTUM).add_(grad.addcmul_(self.wd, param))
            param.addcmul_(self.lr, buf, value=-lr_scale)


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over the last axis with probabilities floored near 2e-9 (exponents clamped at -20).

    A confident classifier drives ``exp`` and then the gradients and momentum buffers into float32
    denormals, which run up to ~100x slower on CPUs (measured: 10x on the whole probe). A floor far
    below float32's resolution of ``1 - p`` (6e-8) leaves training unchanged in practice. Written
    out because ``Tensor.softmax`` over a last axis of ~10 is itself slow on CPU.
    """
    shifted = (logits - logits.amax(-1, keepdim=True)).clamp_min_(-20.0).exp_()
    return shifted.div_(shifted.sum(-1, keepdim=True))


def _accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Accuracy in percent of each classifier from ``[N, G, C]`` logits."""
    return (logits.argmax(-1) == target[:, None]).float().mean(0) * 100.0


def _standardise(train_x: Tensor, *others: Tensor) -> list[Tensor]:
    """Scale every split with the *train* mean / std, so no statistic leaks from val or test."""
    mean = train_x.mean(0)
    std = train_x.std(0, correction=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train_x, *others)]


def _cosine(epoch: int, epochs: int) -> float:
    """Per-epoch cosine lr factor, as in the SimSiam / MoCo linear-classification scripts."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    val_x: ArrayLike,
    val_y: ArrayLike,
    test_x: ArrayLike,
    num_classes: int,
    cfg: LinearEvalConfig,
    seed: int,
    device: torch.device | str = "cpu",
) -> LinearProbeResult:
    """Train one linear layer per (lr, wd) in the grid, select (lr, wd, epoch) by val accuracy, predict test.

    Test labels are deliberately not a parameter: selection can only ever see the validation
    split, and the test set is predicted once, with the selected weights. Ties in validation
    accuracy keep the earliest epoch, then the first config in ``lrs x weight_decays`` order.
    """
    grid = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    if not grid or cfg.epochs < 1:
        raise ValueError("linear_probe needs at least one epoch, one lr and one weight decay")
    device = torch.device(device)
    train_x, val_x, test_x = _standardise(
        *(torch.as_tensor(x, dtype=torch.float32).to(device) for x in (train_x, val_x, test_x))
    )
    train_y, val_y = (torch.as_tensor(y, dtype=torch.long).to(device) for y in (train_y, val_y))
    train_onehot = F.one_hot(train_y, num_classes).float()
    gen = torch.Generator().manual_seed(seed)
    model = _LinearGrid(train_x.shape[1], num_classes, grid, gen, device)
    best_acc, best = -1.0, {}
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train_x), generator=gen).to(device)
        batches = zip(train_x[order].split(cfg.batch_size), train_onehot[order].split(cfg.batch_size))
        for x, onehot in batches:
            model.step(x, onehot, _cosine(epoch, cfg.epochs))
        val_acc = _accuracy(model.logits(val_x), val_y)
        top = int(val_acc.argmax())
        if float(val_acc[top]) > best_acc:
            best_acc = float(val_acc[top])
            best = {"lr": grid[top][0], "wd": grid[top][1], "epoch": epoch + 1}
            weight, bias = model.classifier(top)
    test_pred = (test_x @ weight + bias).argmax(1).cpu().numpy()
    return LinearProbeResult(test_pred=test_pred, val_acc=best_acc, best=best)
