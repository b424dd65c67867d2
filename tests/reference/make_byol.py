"""Regenerate fixtures/byol.safetensors: one training step of deepmind-research's BYOL (JAX), and lightly's BYOL
pieces on the same inputs.

    /work/refenv/bin/python tests/reference/make_byol.py DEEPMIND_RESEARCH_GIT --jax-python /work/jaxenv/bin/python

DEEPMIND_RESEARCH_GIT is any git clone of deepmind/deepmind-research (a bare mirror will do): the script checks that
its HEAD is the pinned commit and exports ``byol/`` from it to a temporary folder. Their code is JAX, so it runs in a
second environment (``--jax-python``: jax, jaxlib, dm-haiku, optax, dm-tree, numpy, safetensors; ``pip install``
from the package registry), through byol_reference_step.py, which lists what it patches around their modules. This
script (torch 2.14.1, lightly 1.6.0) draws the inputs, hands them over, and records:

- their step, ``ByolExperiment`` at configs/byol.py's 1000-epoch values for a batch of 4096 (LARS, lr 0.2 * 4096 /
  256 = 3.2 on a cosine after 10 warm-up epochs, weight decay 1.5e-6, eta 1e-3, momentum 0.9, tau_base 0.996,
  4096-256 projector, 4096 predictor), on one batch of 8 pairs of 16 x 16 views at global step ``STEP`` (a quarter
  into the run, where the lr and tau are both on their cosines): ``loss_fn``'s BYOL loss and the gradient of every
  online weight (``jax.grad`` of their ``loss_fn``), then ``_update_fn`` itself, which takes the LARS step and the
  target's EMA: the online and target weights after it (``after.*``, ``update.*``), their BatchNorm moving averages
  (``state.*``), their lr and tau at the step, and the online network's outputs (``forward.*``);
- their ``regression_loss`` on fixed vectors (value per row and gradient of the mean; ``terms.*``), and their
  ``learning_schedule`` and ``target_ema`` at a few steps (``schedule.*``);
- lightly: ``NegativeCosineSimilarity`` on the same vectors, ``BYOLProjectionHead`` / ``BYOLPredictionHead`` on the
  online encoder's features of view 1 with the fixture's head weights, ``cosine_schedule`` at the step, and one step
  of a BYOL built from lightly's parts as its example builds it (their symmetrised loss 0.5 (D(p1, z2') + D(p2, z1')),
  the target by ``copy.deepcopy`` and ``update_momentum``) with plain SGD (lr ``LIGHTLY_LR``, momentum 0.9): the
  loss, the gradients, the weights and the target after (``lightly.*``). lightly's heads put the bias on the last
  Linear where their MLP (and imbssl) has it on the first, which the BatchNorm after it cancels: the first Linear's
  bias is left out, the last one's starts at 0.

The encoder is imbssl's SmallCNN at width 0.5 on both sides (make_align_uniform's ``small_cnn_body``, in haiku in
byol_reference_step.py): their ResNet-50 needs 224 px crops. All weights, the target's apart from the online
network's (their target is drawn from its own seed), are ``fixture_io.seeded_weights`` from the names and shapes of
imbssl's BYOL, which the metadata keeps. Haiku's BatchNorm keeps moving averages of the biased batch variance where
torch keeps the unbiased one; ``state.*.running_var`` is what their moving average gives in torch's convention
(``torch_running_var``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
from make_align_uniform import SIZE, WIDTHS, small_cnn_body  # noqa: E402

REPO = "deepmind/deepmind-research"
PINNED = "d8df4155dc72fc3dfff9f857412168993348ca23"
NAME = "byol"
SEED = 33
BATCH = 8
NUM_EPOCHS, BATCH_SIZE = 1000, 4096  # configs/byol.py's presets: the paper's 1000 epochs at its batch of 4096
PROJ_HIDDEN, PROJ_DIM, PRED_HIDDEN = 4096, 256, 4096  # their network_config
TERM_ROWS, TERM_DIM = 12, 16
LIGHTLY_LR = 0.5


def their_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """Their networks.MLP's weights in torch's layout: Linear (with bias), BatchNorm, ReLU, Linear (without)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out, bias=False))


def online_network() -> nn.Module:
    """The online network under imbssl's BYOL names: ``backbone.body``, ``projector``, ``predictor``."""
    backbone = nn.Module()
    backbone.body = small_cnn_body()
    return nn.Sequential(OrderedDict(backbone=backbone, projector=their_mlp(WIDTHS[-1], PROJ_HIDDEN, PROJ_DIM),
                                     predictor=their_mlp(PROJ_DIM, PRED_HIDDEN, PROJ_DIM)))


def weight_shapes() -> dict[str, list[int]]:
    """imbssl's BYOL state names and shapes: the online network, then the target's encoder and projector."""
    online = {k: list(v.shape) for k, v in online_network().state_dict().items()}
    return {**online, **{f"target.{k}": shape for k, shape in online.items() if not k.startswith("predictor.")}}


def export_byol(checkout: Path, commit: str, into: Path) -> None:
    """``byol/`` at ``commit``, file by file (a partial mirror may lack other folders' objects)."""
    files = subprocess.run(["git", "-C", str(checkout), "ls-tree", "-r", "--name-only", commit, "byol"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        path = into / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(subprocess.run(["git", "-C", str(checkout), "show", f"{commit}:{name}"],
                                        capture_output=True, check=True).stdout)


def their_step(checkout: Path, commit: str, jax_python: str, inputs: dict[str, torch.Tensor],
               settings: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """byol_reference_step.py in the JAX environment on ``inputs``: its results and metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_byol(checkout, commit, tmp / "src")
        save_file({k: v.numpy() for k, v in inputs.items()}, str(tmp / "in.safetensors"),
                  metadata={"settings": json.dumps(settings)})
        subprocess.run([jax_python, str(Path(__file__).parent / "byol_reference_step.py"), str(tmp / "src"),
                        str(tmp / "in.safetensors"), str(tmp / "out.safetensors")], check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"})
        with safe_open(str(tmp / "out.safetensors"), framework="numpy") as f:
            results = {k: torch.from_numpy(f.get_tensor(k)) for k in f.keys()}
            meta = json.loads(f.metadata()["meta"])
    return results, meta


def torch_running_var(results: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Their moving average of the batch variance in torch's convention: after k updates from v0, haiku holds
    h_k = 0.9^k v0 + sum_j 0.1 0.9^(k-j) var_j (biased var_j), torch 0.9^k v0 + sum_j 0.1 0.9^(k-j) var_j n / (n - 1),
    which is 0.9^k v0 + (h_k - 0.9^k v0) n / (n - 1), n the values per channel of a batch."""
    module = name.removesuffix(".running_var")
    k = int(results[f"their_state.{module}.num_batches_tracked"])
    n = BATCH * values_per_row(module)
    kept = 0.9 ** k * initial[name].double()
    return (kept + (results[f"their_state.{name}"].double() - kept) * n / (n - 1)).float()


def values_per_row(module: str) -> int:
    """H x W at a BatchNorm of the SmallCNN (blocks halve 16 px), 1 in the heads."""
    if ".body." not in module:
        return 1
    block = int(module.rsplit(".", 1)[-1]) // 4
    return (SIZE // 2 ** block) ** 2


def lightly_parts(initial: dict[str, torch.Tensor], views: list[torch.Tensor], terms: dict[str, torch.Tensor],
                  step_tau: float) -> dict[str, torch.Tensor]:
    """lightly's loss, heads, schedule and one step of a BYOL built from them (see the module docstring)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    out = {}
    p = terms["terms.p"].clone().requires_grad_()
    ncs = NegativeCosineSimilarity()(p, terms["terms.z"])
    ncs.backward()
    out.update({"lightly.ncs": ncs.detach(), "lightly.ncs.grad": p.grad})

    def heads(prefix: str) -> tuple[nn.Module, nn.Module]:
        projection = BYOLProjectionHead(WIDTHS[-1], PROJ_HIDDEN, PROJ_DIM)
        prediction = BYOLPredictionHead(PROJ_DIM, PRED_HIDDEN, PROJ_DIM)
        for head, name in ((projection, f"{prefix}projector"), (prediction, "predictor")):
            state = {k: v for k, v in initial.items() if k.startswith(f"{name}.") and not k.endswith(".0.bias")}
            state = {k.removeprefix(f"{name}."): v for k, v in state.items()}
            head.layers.load_state_dict({**state, "3.bias": torch.zeros(PROJ_DIM)})
        return projection, prediction

    backbone = small_cnn_body()
    backbone.load_state_dict({k.removeprefix("backbone.body."): v for k, v in initial.items()
                              if k.startswith("backbone.body.")})
    projection, prediction = heads("")
    features = copy.deepcopy(backbone)(views[0]).flatten(1)
    z = copy.deepcopy(projection)(features)
    out.update({"lightly.projection1": z.detach(), "lightly.prediction1": copy.deepcopy(prediction)(z).detach()})

    # their examples' BYOL module: the target by deepcopy, without gradient; its weights then set to the fixture's
    target_backbone, target_projection = copy.deepcopy(backbone), copy.deepcopy(projection)
    deactivate_requires_grad(target_backbone)
    deactivate_requires_grad(target_projection)
    target_backbone.load_state_dict({k.removeprefix("target.backbone.body."): v for k, v in initial.items()
                                     if k.startswith("target.backbone.body.")})
    target_projection.layers.load_state_dict(heads("target.")[0].layers.state_dict())
    online = nn.ModuleDict(dict(backbone=backbone, projection=projection, prediction=prediction))
    optimizer = torch.optim.SGD(online.parameters(), lr=LIGHTLY_LR, momentum=0.9)
    criterion = NegativeCosineSimilarity()

    def predict(x):
        return prediction(projection(backbone(x).flatten(1)))

    def target(x):
        return target_projection(target_backbone(x).flatten(1)).detach()

    p1, p2 = predict(views[0]), predict(views[1])
    z1, z2 = target(views[0]), target(views[1])
    loss = 0.5 * (criterion(p1, z2) + criterion(p2, z1))
    loss.backward()
    out["lightly.loss"] = loss.detach()
    out.update({f"lightly.grad.{lightly_to_imbssl(k)}": v.grad.clone() for k, v in online.named_parameters()})
    optimizer.step()
    update_momentum(backbone, target_backbone, m=step_tau)  # after the step, as imbssl's on_step_end
    update_momentum(projection, target_projection, m=step_tau)
    out.update({f"lightly.after.{lightly_to_imbssl(k)}": v.detach().clone() for k, v in online.named_parameters()})
    out.update({f"lightly.after.target.{lightly_to_imbssl(k)}": v.clone()
                for k, v in {**{f"backbone.{n}": p for n, p in target_backbone.named_parameters()},
                             **{f"projection.{n}": p for n, p in target_projection.named_parameters()}}.items()})
    return out


def lightly_to_imbssl(name: str) -> str:
    """lightly's parameter names here -> imbssl's: ``backbone.*`` -> ``backbone.body.*``, ``projection.layers.*`` ->
    ``projector.*``, ``prediction.layers.*`` -> ``predictor.*``."""
    part, _, rest = name.partition(".")
    if part == "backbone":
        return f"backbone.body.{rest}"
    return {"projection": "projector", "prediction": "predictor"}[part] + "." + rest.removeprefix("layers.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a git clone of deepmind/deepmind-research at the pinned commit")
    parser.add_argument("--jax-python", required=True, help="the python of an environment with jax, dm-haiku, optax")
    args = parser.parse_args()
    checkout = Path(args.checkout)
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    from lightly.utils.scheduler import cosine_schedule

    shapes = weight_shapes()
    initial = fixture_io.seeded_weights(shapes, SEED)
    gen = torch.Generator().manual_seed(SEED)
    views = [torch.randn(BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    terms = {f"terms.{k}": torch.randn(TERM_ROWS, TERM_DIM, generator=gen) for k in ("p", "z")}
    max_steps = NUM_EPOCHS * 1281167 // BATCH_SIZE  # configs/byol.py: TRAIN_AND_VALID's images
    step = max_steps // 4
    settings = {"num_epochs": NUM_EPOCHS, "batch_size": BATCH_SIZE, "widths": list(WIDTHS), "shapes": shapes,
                "step": step, "seed": SEED, "schedule_steps": [0, 1, 3126, 3127, 3128, step, max_steps - 1]}
    inputs = {"input.view1": views[0], "input.view2": views[1], **terms,
              **{f"init.{k}": v.float() for k, v in initial.items() if not k.endswith("num_batches_tracked")}}
    results, their_meta = their_step(checkout, commit, args.jax_python, inputs, settings)
    config = their_meta["config"]
    assert config["max_steps"] == max_steps, config["max_steps"]

    tensors = {"input.view1": views[0], "input.view2": views[1], **terms,
               "schedule.steps": torch.tensor(settings["schedule_steps"]),
               **{f"init.{k}": v for k, v in initial.items()}}
    for key, value in results.items():
        if key.startswith("their_state."):
            name = key.removeprefix("their_state.")
            tensors[f"state.{name}"] = (torch_running_var(results, initial, name) if name.endswith("running_var")
                                        else value)
        else:
            tensors[key] = value
    for name in shapes:
        if f"after.{name}" in tensors:
            tensors[f"update.{name}"] = tensors[f"after.{name}"] - initial[name]
    lightly_tau = cosine_schedule(step, max_steps + 1, config["base_target_ema"], 1.0)
    tensors["lightly.tau"] = torch.tensor(lightly_tau, dtype=torch.float64)
    tensors.update(lightly_parts(initial, views, terms, lightly_tau))
    meta = {"repo": REPO, "commit": commit, "seed": SEED, "batch": BATCH, "size": SIZE, "widths": WIDTHS,
            "shapes": shapes, "step": step, "config": config, "lightly_lr": LIGHTLY_LR, "jax": their_meta["jax"],
            "haiku": their_meta["haiku"], "torch": torch.__version__,
            "configured": "byol_experiment.ByolExperiment at configs/byol.py get_config(1000, 4096), encoder: "
                          "imbssl's SmallCNN (width 0.5) in haiku; one batch of 8 pairs of 16 x 16 views at global "
                          f"step {step} of {max_steps}; seeded weights, the target's its own"}
    print(fixture_io.save(NAME, tensors, meta), f"loss {tensors['loss'].item():.7f}")


if __name__ == "__main__":
    main()
