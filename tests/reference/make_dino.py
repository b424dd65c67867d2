"""Regenerate fixtures/dino.safetensors: DINO's loss, head and two training steps from facebookresearch/dino, and
lightly's DINOLoss as a second oracle.

    /work/refenv/bin/python tests/reference/make_dino.py /work/refs/facebookresearch+dino

Records, from the authors' modules imported unchanged (main_dino.py, utils.py, vision_transformer.py):

- ``terms.*``: their ``DINOLoss`` on fixed student and teacher outputs (4 crops, 2 of them global, of 6 images, K =
  16) from a non-zero centre, at epochs 0, 1 and 4 of a teacher-temperature warm-up from 0.04 to 0.07 over 3 epochs,
  and on 2 crops at epoch 4: the loss, its gradient by the student's outputs and the centre after it. lightly's
  ``DINOLoss`` (lightly 1.6.0) on the same outputs at each epoch's temperature: the same three.
- ``head.*``: their ``DINOHead`` at its defaults and with ``use_bn=True, norm_last_layer=False, nlayers=2``
  (hidden 32, bottleneck 16, K = 24) on one fixed input: the output and the gradient of its sum of squares by every
  parameter.
- ``step0.*``, ``step1.*``: ``main_dino.train_dino`` itself, at its argparse defaults except for the flags in
  ``FLAGS``, for the first two epochs of one batch each (8 images, 2 global 16 x 16 crops and 2 local 8 x 8 ones),
  so that the last layer is frozen in the first step (``--freeze_last_layer 1``) and not in the second, and the
  teacher temperature warms up: after each step the loss, every gradient, the student's weights, their change in the
  step and its BatchNorm buffers, AdamW's moments, the teacher's weights and buffers after its EMA update, the
  centre, and the step's lr, weight decay, teacher momentum and temperature (metadata).

The backbone is not one of their ViTs, which take 16 x 16 patches of 224 x 224 crops: ``SmallCNN`` here is imbssl's
SmallCNN at width 0.5 (models/small.py), written out layer for layer, standing in for ``vit_small`` (their default
arch; its ``embed_dim`` is the SmallCNN's 128 features). The head is theirs at its defaults (2048 hidden, 256
bottleneck) with ``--out_dim 64``. Weights are ``fixture_io.seeded_weights``, except the last layer's weight_g, their
fixed 1.

What is patched, and why (all in ``their_training``): ``torch.hub.list`` (their argparse lists XCiT's models from
GitHub: no network here), ``utils.init_distributed_mode`` (a gloo process group of one CPU process, opened by this
script, where theirs opens NCCL on a GPU; their ``DINOLoss.update_center`` all-reduces over it for real),
``datasets.ImageFolder`` and ``torch.utils.data.DataLoader`` (the one fixed batch), ``vits.vit_small`` (the
backbone above), ``main_dino.DINOHead`` (the real one; the student's, built first, and the student's backbone get the
seeded weights, which the teacher then loads from the student as their code has it),
``nn.SyncBatchNorm.convert_sync_batchnorm`` (left out: on one process it is BatchNorm, and it refuses CPU tensors),
``nn.parallel.DistributedDataParallel`` (the real one, without ``device_ids``, which CPU modules may not name),
``.cuda()`` of modules and tensors and ``torch.cuda.synchronize`` (no-ops: no GPU),
``utils.MetricLogger.synchronize_between_processes`` (their logs' sums over processes, in CUDA tensors; a no-op on
one process), and ``main_dino.train_one_epoch`` (the real one, followed by the recording; it ends the run after the
second epoch). ``--use_fp16 false``: their GradScaler is CUDA's, and imbssl compares in fp32. Their checkpoints go to
a temporary directory.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import inspect
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

REPO = "facebookresearch/dino"
PINNED = "7c446df5b9f45747937fb0d72314eb9f7b66930a"
NAME = "dino"
SEED = 31
BATCH, GLOBAL_SIZE, LOCAL_SIZE, LOCAL_CROPS = 8, 16, 8, 2
WIDTHS = (16, 32, 64, 128)  # imbssl's SmallCNN at width 0.5
OUT_DIM = 64
#: the flags set away from their defaults: the small K, 2 local crops, 4 epochs of which 2 run, no lr warm-up (their
#: 10 epochs would leave the lr at 0 in both steps), tau_t warmed up from 0.04 to 0.07 over 3 epochs (their README's
#: ViT-S/16 setting, over 30), fp32, and a clip norm that some of these tensors' gradients exceed and others do not
FLAGS = {"--arch": "vit_small", "--out_dim": str(OUT_DIM), "--local_crops_number": str(LOCAL_CROPS),
         "--epochs": "4", "--warmup_epochs": "0", "--teacher_temp": "0.07", "--warmup_teacher_temp_epochs": "3",
         "--use_fp16": "false", "--batch_size_per_gpu": str(BATCH), "--clip_grad": "0.3"}
STEPS = 2
TERMS = {"rows": 6, "dim": 16, "crops": 4, "warmup_temp": 0.04, "temp": 0.07, "warmup_epochs": 3, "epochs": 5,
         "at_epochs": (0, 1, 4)}
HEADS = {"default": {}, "bn_free_norm": {"use_bn": True, "norm_last_layer": False, "nlayers": 2}}
HEAD_DIMS = {"in_dim": 12, "out_dim": 24, "hidden_dim": 32, "bottleneck_dim": 16, "rows": 5}
#: tensors above this many elements are stored as fingerprints (the head's and the last convolutions' weights)
WHOLE_LIMIT = 4096


class SmallCNN(nn.Module):
    """imbssl's SmallCNN (four Conv-BN-ReLU-MaxPool blocks, ceil mode, global average pool, flattened), with the
    ``embed_dim`` their code reads off a ViT."""

    def __init__(self) -> None:
        super().__init__()
        layers, in_ch = [], 3
        for out_ch in WIDTHS:
            layers += [nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            in_ch = out_ch
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.embed_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


def seeded(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """``fixture_io.seeded_weights``, with every weight norm g at their fixed 1."""
    weights = fixture_io.seeded_weights(shapes, SEED)
    return {k: torch.ones_like(v) if k.endswith("weight_g") else v for k, v in weights.items()}


def terms(dino_loss_class, lightly_loss_class) -> tuple[dict[str, torch.Tensor], dict]:
    """Their DINOLoss and lightly's on the same outputs, from the same centre."""
    t = TERMS
    gen = torch.Generator().manual_seed(SEED)
    student = torch.randn(t["crops"] * t["rows"], t["dim"], generator=gen)
    teacher = torch.randn(2 * t["rows"], t["dim"], generator=gen)
    center = 0.3 * torch.randn(1, t["dim"], generator=gen)
    tensors = {"terms.student": student, "terms.teacher": teacher, "terms.center": center}
    temps = {}
    for crops, epochs in ((t["crops"], t["at_epochs"]), (2, (t["at_epochs"][-1],))):
        for epoch in epochs:
            key = f"terms.c{crops}.e{epoch}"
            theirs = dino_loss_class(t["dim"], crops, t["warmup_temp"], t["temp"], t["warmup_epochs"], t["epochs"])
            theirs.center = center.clone()
            out = student[:crops * t["rows"]].clone().requires_grad_()
            loss = theirs(out, teacher, epoch)
            loss.backward()
            temps[key] = float(theirs.teacher_temp_schedule[epoch])
            tensors.update({key: loss.detach(), f"{key}.grad": out.grad, f"{key}.center": theirs.center})

            lightly = lightly_loss_class(output_dim=t["dim"], warmup_teacher_temp=t["warmup_temp"],
                                         teacher_temp=t["temp"], warmup_teacher_temp_epochs=t["warmup_epochs"])
            lightly.center = center.view(1, 1, -1).clone()
            out = student[:crops * t["rows"]].clone().requires_grad_()
            loss = lightly(list(teacher.chunk(2)), list(out.chunk(crops)), teacher_temp=temps[key])
            loss.backward()
            tensors.update({f"lightly.{key}": loss.detach(), f"lightly.{key}.grad": out.grad,
                            f"lightly.{key}.center": lightly.center.view(1, -1)})
    return tensors, temps


def heads(head_class) -> tuple[dict[str, torch.Tensor], dict]:
    """Their DINOHead in two settings on one input: output and gradients, from seeded weights."""
    d = HEAD_DIMS
    x = torch.randn(d["rows"], d["in_dim"], generator=torch.Generator().manual_seed(SEED))
    tensors, shapes = {"head.input": x}, {}
    for name, kwargs in HEADS.items():
        head = head_class(d["in_dim"], d["out_dim"], hidden_dim=d["hidden_dim"], bottleneck_dim=d["bottleneck_dim"],
                          **kwargs)
        shapes[name] = {k: list(v.shape) for k, v in head.state_dict().items()}
        head.load_state_dict(seeded(shapes[name]))
        out = head(x)
        out.pow(2).sum().backward()
        tensors[f"head.{name}.output"] = out.detach()
        tensors.update({f"head.{name}.grad.{k}": p.grad for k, p in head.named_parameters() if p.grad is not None})
    return tensors, shapes


class OneBatch:
    """Their data loader, for one fixed batch an epoch: (the crops, labels), with the sampler they set the epoch of."""

    def __init__(self, crops: list[torch.Tensor], sampler) -> None:
        self.crops, self.sampler = crops, sampler

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield list(self.crops), torch.zeros(BATCH, dtype=torch.long)


class StepsDone(Exception):
    """Raised after the recorded epochs: the rest of the run is not needed."""


def their_training(main_dino, utils, vits) -> tuple[dict[str, torch.Tensor], dict]:
    """``train_dino`` for ``STEPS`` epochs of one batch; what each step left behind."""
    gen = torch.Generator().manual_seed(SEED)
    crops = [torch.randn(BATCH, 3, GLOBAL_SIZE, GLOBAL_SIZE, generator=gen) for _ in range(2)]
    crops += [torch.randn(BATCH, 3, LOCAL_SIZE, LOCAL_SIZE, generator=gen) for _ in range(LOCAL_CROPS)]
    tensors = {f"input.crop{i}": c for i, c in enumerate(crops)}
    meta: dict = {"steps": []}
    built = []

    def join_group(args) -> None:
        args.rank, args.gpu, args.world_size = 0, 0, 1
        utils.setup_for_distributed(True)

    def backbone(**vit_kwargs) -> SmallCNN:  # patch_size, drop_path_rate: a ViT's
        built.append(SmallCNN())
        return built[-1]

    def head(*args, real=main_dino.DINOHead, **kwargs) -> nn.Module:
        """Their head; the student's (built first) and the student's backbone (also first) get the seeded weights,
        drawn under the names of the student's MultiCropWrapper."""
        model = real(*args, **kwargs)
        if "shapes" not in meta:
            parts = {"backbone": built[0], "head": model}
            meta["shapes"] = {f"{part}.{k}": list(v.shape) for part, module in parts.items()
                              for k, v in module.state_dict().items()}
            weights = seeded(meta["shapes"])
            for part, module in parts.items():
                module.load_state_dict({k.removeprefix(f"{part}."): v for k, v in weights.items()
                                        if k.startswith(f"{part}.")})
        return model

    def recorded_epoch(student, teacher, teacher_without_ddp, dino_loss, data_loader, optimizer, lr_schedule,
                       wd_schedule, momentum_schedule, epoch, fp16_scaler, args, real=main_dino.train_one_epoch):
        before = {k: p.detach().clone() for k, p in student.module.named_parameters()}
        stats = real(student, teacher, teacher_without_ddp, dino_loss, data_loader, optimizer, lr_schedule,
                     wd_schedule, momentum_schedule, epoch, fp16_scaler, args)
        key = f"step{epoch}"
        params = dict(student.module.named_parameters())
        # copies: the next step moves these tensors in place
        tensors.update({f"{key}.loss": torch.tensor(stats["loss"], dtype=torch.float32),
                        **{f"{key}.grad.{k}": p.grad.clone() for k, p in params.items() if p.grad is not None},
                        **{f"{key}.after.{k}": p.detach().clone() for k, p in params.items()},
                        **{f"{key}.update.{k}": p.detach() - before[k] for k, p in params.items()},
                        **{f"{key}.state.{k}": v.clone() for k, v in student.module.named_buffers()},
                        **{f"{key}.teacher.{k}": v.clone() for k, v in teacher_without_ddp.state_dict().items()},
                        **{f"{key}.adamw.{k}.{moment}": optimizer.state[p][moment].clone() for k, p in params.items()
                           if p in optimizer.state for moment in ("step", "exp_avg", "exp_avg_sq")},
                        f"{key}.center": dino_loss.center.clone()})
        meta["steps"].append({"lr": float(lr_schedule[epoch]), "weight_decay": float(wd_schedule[epoch]),
                              "momentum": float(momentum_schedule[epoch]),
                              "teacher_temp": float(dino_loss.teacher_temp_schedule[epoch]),
                              "frozen": [k for k in params if params[k].requires_grad and params[k].grad is None]})
        if epoch + 1 == STEPS:
            raise StepsDone
        return stats

    ddp = nn.parallel.DistributedDataParallel
    with tempfile.TemporaryDirectory() as out_dir, \
            mock.patch.object(utils, "init_distributed_mode", join_group), \
            mock.patch.object(main_dino.datasets, "ImageFolder", lambda path, transform: list(range(BATCH))), \
            mock.patch.object(torch.utils.data, "DataLoader", lambda data, sampler, **kw: OneBatch(crops, sampler)), \
            mock.patch.object(vits, "vit_small", backbone), \
            mock.patch.object(main_dino, "DINOHead", head), \
            mock.patch.object(nn.SyncBatchNorm, "convert_sync_batchnorm", lambda module, *a, **k: module), \
            mock.patch.object(nn.parallel, "DistributedDataParallel", lambda module, device_ids: ddp(module)), \
            mock.patch.object(nn.Module, "cuda", lambda self, *a, **k: self), \
            mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), \
            mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None), \
            mock.patch.object(utils.MetricLogger, "synchronize_between_processes", lambda self: None), \
            mock.patch.object(main_dino, "train_one_epoch", recorded_epoch), \
            contextlib.redirect_stdout(io.StringIO()):  # their settings and progress lines
        args = their_args(main_dino, [*(x for flag in FLAGS.items() for x in flag), "--output_dir", out_dir])
        with contextlib.suppress(StepsDone):
            main_dino.train_dino(args)
    return tensors, meta


def their_args(main_dino, argv: list[str]) -> argparse.Namespace:
    """main_dino.py's command line parsed as its ``__main__`` parses it."""
    with mock.patch.object(torch.hub, "list", lambda *a, **k: []):
        return argparse.ArgumentParser("DINO", parents=[main_dino.get_args_parser()]).parse_args(argv)


def defaults(main_dino, head_class, loss_class) -> dict:
    """Their argparse defaults, and the defaults of DINOHead's and DINOLoss's arguments that are not flags."""
    flags = vars(their_args(main_dino, []))
    head = {k: v.default for k, v in inspect.signature(head_class).parameters.items() if k in
            ("use_bn", "norm_last_layer", "nlayers", "hidden_dim", "bottleneck_dim")}
    loss = {k: v.default for k, v in inspect.signature(loss_class).parameters.items() if k in
            ("student_temp", "center_momentum")}
    skipped = ("data_path", "output_dir", "dist_url", "local_rank", "num_workers", "saveckp_freq", "seed")
    return {"flags": {k: v for k, v in flags.items() if k not in skipped}, "head": head, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of facebookresearch/dino at the pinned commit")
    checkout = Path(parser.parse_args().checkout)
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    torch.manual_seed(SEED)
    import main_dino
    import utils
    import vision_transformer as vits
    from lightly.loss import DINOLoss as LightlyDINOLoss

    with tempfile.TemporaryDirectory() as rendezvous:  # the process group of one CPU process their code all-reduces in
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}/group", world_size=1, rank=0)
        try:
            tensors, meta = their_training(main_dino, utils, vits)
            term_tensors, temps = terms(main_dino.DINOLoss, LightlyDINOLoss)
        finally:
            dist.destroy_process_group()
    head_tensors, head_shapes = heads(vits.DINOHead)
    tensors.update(term_tensors)
    tensors.update(head_tensors)
    initial = seeded(meta["shapes"])
    tensors.update({f"init.{k}": v for k, v in initial.items()})
    import lightly
    meta.update(repo=REPO, commit=commit, seed=SEED, batch=BATCH, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE,
                local_crops=LOCAL_CROPS, widths=WIDTHS, flags=FLAGS, terms=TERMS, term_temps=temps, heads=HEADS,
                head_dims=HEAD_DIMS, head_shapes=head_shapes, defaults=defaults(main_dino, vits.DINOHead,
                                                                                  main_dino.DINOLoss),
                torch=torch.__version__, lightly=lightly.__version__,
                configured="main_dino.train_dino at its defaults but FLAGS, 2 epochs of one batch of 8 images "
                           "(2 global 16 x 16 crops, 2 local 8 x 8); backbone: imbssl's SmallCNN (width 0.5) as "
                           "vit_small; their DINOHead (2048, 256) to K = 64; seeded weights, g = 1; AdamW; fp32")
    path = fixture_io.save(NAME, tensors, meta, whole_limit=WHOLE_LIMIT,
                           whole_prefixes=("input.", "terms.", "lightly.", "head."))
    print(path, f"loss {tensors['step0.loss'].item():.7f} {tensors['step1.loss'].item():.7f}")


if __name__ == "__main__":
    main()
