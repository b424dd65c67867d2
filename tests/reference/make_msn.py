"""Regenerate the facebookresearch/msn fixtures: one training step of the authors' MSN (Assran et al., ECCV 2022,
"Masked Siamese Networks for label-efficient learning"), with and without Sinkhorn on the targets.

Run in the REFERENCE environment (torch 2.14.1), never with imbssl:

    /work/refenv/bin/python tests/reference/make_msn.py /work/refs/facebookresearch+msn

It writes fixtures/msn-sinkhorn.safetensors (their ViT-S/16 config's ``use_sinkhorn: true``) and
fixtures/msn-plain.safetensors (``use_sinkhorn: false``): the views, the kept patches, the loss and its two terms,
the sharpened targets, the mean anchor prediction p_bar (their ``snn``, for the PMSN check), every gradient
(before their clipping), every weight and BatchNorm statistic after the step and its change, AdamW's moments, the
target encoder after its EMA update and the prototypes after.

Their own ``src.msn_train.main`` runs the step, on their config (configs/pretrain/msn_vits16.yaml) with a tiny model:
a ViT of width 192 (their ``emb_dim`` for a model named ``*tiny*``), depth 2, 3 heads, patch 8 on 24 x 24 views
(9 tokens; 16 x 16 focal views, 4 tokens; a view of 8 images then fits fixture_io's whole-tensor limit), a
192 -> 64 -> 64 -> 32 projector and K = 16 prototypes, batch 8, one anchor and two focal views, their lr and
weight-decay schedules as at 800 epochs of 1,251 steps. Patches, all here:

- a data loader of one batch (``init_data``), which ends the run after the first step by raising ``FirstStepDone``
  (the step and its checkpoint are done by then); ``make_transforms`` is not needed;
- ``gpu_timer`` and ``torch.cuda.max_memory_allocated`` (timing and logging) get CPU stand-ins;
- ``deit_tiny_fixture`` is their ``deit_tiny`` with depth 2 and patch 8 on 24-pixel images, added to their
  ``src.deit`` under a name containing ``tiny`` so that their ``init_model`` sizes the projector for it;
- the weights: their ``init_model`` and the prototypes' init are overwritten with ``fixture_io.seeded_weights``
  (the projector's biases before its BatchNorms start at 0, as imbssl's heads have none there: BatchNorm cancels
  them in the forward pass, and at 0 they do not shift its running mean either);
- the positions: imbssl's ViT adds fixed 2-D sine-cosine positions computed for each view's patch grid (a
  documented choice, docs/priors.md); their ViT learns ``pos_embed`` and interpolates it bicubically for the focal
  views. ``VisionTransformer.interpolate_pos_encoding`` returns imbssl's fixed positions here (0 for the class
  token), so that ``pos_embed`` is unused and gets no gradient;
- the mask: their ``forward_features`` drops patch tokens with one ``torch.randperm`` for the whole batch; the
  permutation is recorded (``torch.randperm`` wrapped), so that imbssl can be given the same kept tokens;
- ``torch.nn.utils.clip_grad_norm_`` (their clip_grad 3.0) is wrapped to record the gradient norm before clipping,
  and the gradients before it (the ones stored).
"""
from __future__ import annotations

import math
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

PINNED = "4388dc1eadbe3042b85d3296d41b9b207656e043"
REPO = "facebookresearch/msn"
SEED = 29
BATCH, SIZE, FOCAL_SIZE, FOCAL_VIEWS = 8, 24, 16, 2
PATCH, DEPTH, HEADS = 8, 2, 3
MODEL_NAME = "deit_tiny_fixture"
#: their pretraining loader's length at batch 1,024 on ImageNet: the lr / weight-decay schedules' step 1 as in a run
STEPS_PER_EPOCH = 1251
#: their configs/pretrain/msn_vits16.yaml, with the tiny model, batch and views above (and patch_drop 0.3, which
#: keeps floor(9 * 0.7) = 6 of 9 tokens, as imbssl's mask_ratio 0.3 does: 9 - round(2.7))
CONFIG = {
    "meta": {"model_name": MODEL_NAME, "output_dim": 32, "hidden_dim": 64, "load_checkpoint": False,
             "read_checkpoint": None, "copy_data": False, "use_pred_head": False, "use_bn": True,
             "drop_path_rate": 0.0, "bottleneck": 1, "use_fp16": False},
    "criterion": {"ent_weight": 0.0, "final_sharpen": 0.25, "me_max": True, "memax_weight": 1.0, "num_proto": 16,
                  "start_sharpen": 0.25, "temperature": 0.1, "batch_size": BATCH, "use_ent": True,
                  "use_sinkhorn": True},
    "data": {"color_jitter_strength": 0.5, "pin_mem": False, "num_workers": 0, "image_folder": "unused",
             "label_smoothing": 0.0, "patch_drop": 0.3, "rand_size": SIZE, "focal_size": FOCAL_SIZE,
             "rand_views": 1, "focal_views": FOCAL_VIEWS, "root_path": "unused"},
    "logging": {"folder": None, "write_tag": "fixture"},
    "optimization": {"clip_grad": 3.0, "epochs": 800, "final_lr": 1.0e-06, "final_weight_decay": 0.4, "lr": 0.001,
                     "start_lr": 0.0002, "warmup": 15, "weight_decay": 0.04},
}
CASES = {"msn-sinkhorn": True, "msn-plain": False}
#: the projector's Linear biases that feed a BatchNorm (imbssl's heads have none there): held at 0
ZEROED = ("fc.fc1.bias", "fc.fc2.bias")
#: tensors above this many elements are stored as fingerprints, so that each fixture stays near 200 KiB; the inputs
#: ("input.") whole
WHOLE_LIMIT = 4096


class FirstStepDone(Exception):
    """Raised by the one-batch loader when their loop asks for a second batch."""


def fixed_positions(height: int, width: int, dim: int) -> torch.Tensor:
    """imbssl's ``sincos_positions`` (src/imbssl/models/vit.py), written out: [height * width, dim], a quarter of
    the channels each sin(y w), cos(y w), sin(x w), cos(x w), w = 10000^(-i / (dim / 4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    angles_y, angles_x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    embedding = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    return nn.functional.pad(embedding, (0, dim - 4 * quarter)).float()


def views(seed: int) -> list[torch.Tensor]:
    """The target view, the anchor view (both 24 x 24) and the focal views (16 x 16), standard normal pixels."""
    g = torch.Generator().manual_seed(seed)
    sizes = [SIZE, SIZE] + [FOCAL_SIZE] * FOCAL_VIEWS
    return [torch.randn(BATCH, 3, s, s, generator=g) for s in sizes]


class Recorder:
    """What the patched pieces of their code saw: the model, optimizer, mask, loss terms and pre-clip gradients."""

    def __init__(self) -> None:
        self.encoder = self.optimizer = self.prototypes = self.initial = None
        self.perms, self.loss_terms, self.p_bar, self.grad_norm, self.grads = [], None, None, None, None


def patch_their_code(msn_train, deit, recorder: Recorder, batch: list[torch.Tensor], shapes_out: dict) -> None:
    """Every patch listed in the module docstring."""
    def deit_tiny_fixture(patch_size=PATCH, **kwargs):  # their deit_tiny at depth 2, patch 8, 24-pixel images
        return deit.VisionTransformer(img_size=[SIZE], patch_size=patch_size, embed_dim=192, depth=DEPTH,
                                      num_heads=HEADS, mlp_ratio=4, qkv_bias=True,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    deit.__dict__[MODEL_NAME] = deit_tiny_fixture

    def interpolate_pos_encoding(self, x, pos_embed):  # imbssl's fixed positions; 0 on the class token
        side = int(math.isqrt(x.shape[1] - 1))
        patches = fixed_positions(side, side, x.shape[-1]).to(x)
        return torch.cat([torch.zeros_like(patches[:1]), patches]).unsqueeze(0)
    deit.VisionTransformer.interpolate_pos_encoding = interpolate_pos_encoding

    their_init_model = msn_train.init_model

    def init_model(**kwargs):
        encoder = their_init_model(**kwargs)
        shapes = {name: list(t.shape) for name, t in encoder.state_dict().items()}
        shapes["prototypes"] = [CONFIG["criterion"]["num_proto"], CONFIG["meta"]["output_dim"]]
        weights = fixture_io.seeded_weights(shapes, SEED)
        for name in ZEROED:
            weights[name].zero_()
        encoder.load_state_dict({k: v for k, v in weights.items() if k != "prototypes"})
        shapes_out.update(shapes)
        recorder.initial = weights
        recorder.encoder = encoder
        return encoder
    msn_train.init_model = init_model

    their_init_opt = msn_train.init_opt

    def init_opt(encoder, prototypes=None, **kwargs):
        with torch.no_grad():
            prototypes.copy_(recorder.initial["prototypes"])
        recorder.prototypes = prototypes
        out = their_init_opt(encoder=encoder, prototypes=prototypes, **kwargs)
        recorder.optimizer = out[1]
        return out
    msn_train.init_opt = init_opt

    their_init_msn_loss = msn_train.init_msn_loss

    def init_msn_loss(**kwargs):
        loss = their_init_msn_loss(**kwargs)

        def recorded(**loss_kwargs):
            out = loss(**loss_kwargs)
            recorder.loss_terms = out
            snn = loss.__defaults__[-1]  # their soft-nearest-neighbour predictions, the loss's own default
            with torch.no_grad():  # p_bar, the mean anchor prediction their me-max regularises
                recorder.p_bar = snn(loss_kwargs["anchor_views"], loss_kwargs["prototypes"],
                                     loss_kwargs["proto_labels"]).mean(0)
            return out
        return recorded
    msn_train.init_msn_loss = init_msn_loss

    class OneBatch:
        def __len__(self):
            return STEPS_PER_EPOCH

        def __iter__(self):
            yield batch, torch.zeros(BATCH, dtype=torch.long)
            raise FirstStepDone

    class Sampler:
        def set_epoch(self, epoch):
            pass
    msn_train.init_data = lambda **kwargs: (OneBatch(), Sampler())
    msn_train.make_transforms = lambda **kwargs: None
    msn_train.gpu_timer = lambda closure, log_timings=True: (closure(), 0.0)
    torch.cuda.max_memory_allocated = lambda *a, **k: 0

    their_randperm = torch.randperm

    def randperm(n, *args, **kwargs):
        perm = their_randperm(n, *args, **kwargs)
        recorder.perms.append(perm.clone())
        return perm
    torch.randperm = randperm

    their_clip = torch.nn.utils.clip_grad_norm_

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        recorder.grads = {n: p.grad.detach().clone() for n, p in recorder.encoder.named_parameters()
                          if p.grad is not None}
        recorder.grads["prototypes"] = recorder.prototypes.grad.detach().clone()
        norm = their_clip(parameters, max_norm, *args, **kwargs)
        recorder.grad_norm = float(norm)
        return norm
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_


def run_case(checkout: Path, commit: str, name: str, sinkhorn: bool) -> Path:
    """One step of their ``msn_train.main`` with ``use_sinkhorn`` set, on fresh imports of their modules with every
    patch applied anew; the torch functions patched are restored afterwards."""
    for module in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[module]
    import src.deit as deit
    import src.msn_train as msn_train

    torch.manual_seed(SEED)
    batch = views(SEED)
    recorder, shapes = Recorder(), {}
    saved = (torch.randperm, torch.nn.utils.clip_grad_norm_, torch.cuda.max_memory_allocated)
    patch_their_code(msn_train, deit, recorder, batch, shapes)
    config = {section: dict(values) for section, values in CONFIG.items()}
    config["criterion"]["use_sinkhorn"] = sinkhorn
    try:
        with tempfile.TemporaryDirectory() as folder:
            config["logging"]["folder"] = folder
            try:
                msn_train.main(config)
            except FirstStepDone:
                pass
            checkpoint = torch.load(Path(folder) / "fixture-latest.pth.tar", weights_only=True)
    finally:
        torch.randperm, torch.nn.utils.clip_grad_norm_, torch.cuda.max_memory_allocated = saved

    ploss, me_max, ent, logs, targets = recorder.loss_terms
    crit = config["criterion"]
    loss = ploss + crit["memax_weight"] * me_max + crit["ent_weight"] * ent  # as their train_step
    (perm,) = recorder.perms
    kept = perm[:int(math.floor(perm.numel() * (1 - config["data"]["patch_drop"])))]
    groups = recorder.optimizer.param_groups
    tensors = {f"input.view{i}": v for i, v in enumerate(batch)}
    tensors.update({"input.kept": kept, "loss": loss.detach(), "loss.cross_entropy": ploss.detach(),
                    "loss.me_max": torch.as_tensor(me_max).detach(), "targets": targets,
                    "out.p_bar": recorder.p_bar})
    tensors.update({f"init.{n}": t for n, t in recorder.initial.items()})  # the draw the test must repeat
    tensors.update({f"grad.{n}": g for n, g in recorder.grads.items()})
    tensors.update({f"after.{n}": t for n, t in checkpoint["encoder"].items()})
    tensors["after.prototypes"] = checkpoint["prototypes"]
    tensors.update({f"update.{n}": checkpoint["encoder"][n] - recorder.initial[n]
                    for n, _ in recorder.encoder.named_parameters()})
    tensors["update.prototypes"] = checkpoint["prototypes"] - recorder.initial["prototypes"]
    tensors.update({f"state.target.{n}": t for n, t in checkpoint["target_encoder"].items()})
    # AdamW's moments after the step: exp_avg = (1 - beta1) g holds the gradient as clipped, which the weights
    # after one step hardly show (Adam's first update is about lr * sign(g) whatever the gradient's scale)
    named = dict(recorder.encoder.named_parameters()) | {"prototypes": recorder.prototypes}
    for n, param in named.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            if param in recorder.optimizer.state:
                tensors[f"state.adamw.{moment}.{n}"] = recorder.optimizer.state[param][moment]
    meta = {"repo": REPO, "commit": commit, "seed": SEED, "shapes": shapes, "zeroed": list(ZEROED),
            "config": config | {"logging": {"write_tag": "fixture"}},
            "lr": [g["lr"] for g in groups], "weight_decay": [g["weight_decay"] for g in groups],
            "ema_momentum": 0.996,  # main's momentum_scheduler: _start_m, its first value
            "sharpen_T": crit["start_sharpen"], "grad_norm_before_clip": recorder.grad_norm,
            "kept": kept.tolist(), "anchor_views": 1, "focal_views": FOCAL_VIEWS,
            "their_group_sizes": [len(g["params"]) for g in groups],
            "vit": {"patch": PATCH, "dim": 192, "depth": DEPTH, "heads": HEADS, "mlp_ratio": 4, "ln_eps": 1e-6}}
    print(f"{name}: loss {loss.item():.6f} (ce {ploss.item():.6f}, me-max {float(me_max):.6f}), grad norm "
          f"{recorder.grad_norm:.4f} (clip at {config['optimization']['clip_grad']}), lr {groups[0]['lr']:.6g}, "
          f"wd {groups[0]['weight_decay']:.6g}, kept {kept.tolist()}")
    return fixture_io.save(name, tensors, meta, whole_limit=WHOLE_LIMIT, whole_prefixes=("input.",))


def main() -> None:
    checkout = Path(sys.argv[1]).resolve()
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    torch.set_num_threads(1)
    for name, sinkhorn in CASES.items():
        path = run_case(checkout, commit, name, sinkhorn)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
