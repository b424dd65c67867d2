"""Regenerate the ManiadisG/ExCB fixture: one training step of the authors' ExCB (Maniadis Metaxas et al., ECCV 2024,
"Efficient unsupervised visual representation learning with explicit cluster balancing"), multi-crop, with the
balancing operator at work.

Run in the REFERENCE environment (torch 2.14.1, torchvision 0.29.1, einops), never with imbssl:

    /work/refenv/bin/pip install einops   # their criterion and trainer import it
    /work/refenv/bin/python tests/reference/make_excb.py /work/refs/ManiadisG+ExCB

It writes fixtures/excb.safetensors: the views, the loss, every gradient, the student's weights and BatchNorm
statistics after their SGD step and the change of each weight, SGD's momentum buffers, the teacher after its EMA
update, and the balancing statistics before and after: the relative cluster sizes s (their criterion's ``center``)
and the hard-assignment counts (``cluster_count``), with the teacher's assignments of the step.

Their ``engine.Trainer.train_epoch`` runs the step, with their ``Classifier`` (engine/model.py), ``ClusteringLoss``
(engine/criterion.py), ``BuildOptimizer`` and ``EMAHandler``, on their configs/main_config.yaml and
resnet50_ep400.yaml with a small model: ResNet-18 (their torchvision-based backbone) on 24 x 24 global and
16 x 16 local views, 2 + 2 views of 8 images, heads 512 -> 64 -> 64 -> 32 (projector) and 32 -> 64 -> 32
(predictor), K = 32 centroids, warm-up 0 so that the step's lr is their 0.6, fp32. Patches, all here:

- ``wandb``, ``matplotlib``, ``termcolor``, ``sklearn`` and ``scipy`` are stubbed in ``sys.modules``: their logger,
  criterion and utils import them for logging, plots, NMI and k-means, none of which the step touches;
- the models are not put through ``build_model`` (which moves them to a GPU, converts BatchNorm to SyncBatchNorm and
  wraps them in DistributedDataParallel): ``Classifier`` is built directly and wrapped in ``Wrapped``, which has
  DDP's ``.module`` and names, on one CPU process;
- ``Trainer.init_centroids`` (the k-means initialisation of epoch 0, a pass over the data) is skipped: the centroids
  are the seeded ones;
- a data loader of one batch ends the epoch after the first step by raising ``FirstStepDone``, before the epoch's
  closing metrics (which all-reduce over processes and reset ``cluster_count``); a stub logger takes the logs;
- the weights are ``fixture_io.seeded_weights``, except the centroid layer's weight_g (their 1, fixed) and the
  Linear biases that feed a BatchNorm, which imbssl's heads do not have (0: BatchNorm cancels them in the forward
  pass, and at 0 they do not shift its running mean either);
- the relative cluster sizes start at a fixed non-uniform s (``initial_sizes``), some clusters below 1/K and some
  above, so that the balancing operator changes the teacher's similarities in both directions.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

PINNED = "7750bd5edc1689580a44bb09d0c4f92a2bf60186"
REPO = "ManiadisG/ExCB"
SEED = 29
BATCH, GLOBAL_VIEWS, LOCAL_VIEWS, GLOBAL_SIZE, LOCAL_SIZE = 8, 2, 2, 24, 16
NUM_CLUSTERS = 32
#: steps per epoch of their loader (ImageNet at batch 1,024): only the schedules' first step enters
STEPS_PER_EPOCH = 1251
#: their configs/main_config.yaml with configs/resnet50_ep400.yaml on top, then the small model and the CPU
ARGS = {
    "seed": SEED, "checkpoint_path": None, "mixed_precision": False, "epochs": 400, "prints_per_epoch": 25,
    "batch_size": BATCH, "num_clusters": NUM_CLUSTERS, "init_centroids": True, "clustering_samples": 500000,
    "optimizer": "sgd", "lr": 0.6, "lr_min_factor": 0.0001, "sgd_momentum": 0.9, "warmup_epochs": 0,
    "lr_schedule": "cosine", "clip_grad": 0.0, "weight_decay": 0.0001, "weight_decay_target_factor": 1.0,
    "centroid_adjustments": "wdx10c1", "backbone": "resnet18", "predictor": True, "mlp_hidden_dim": 64,
    "mlp_hidden_layers": 2, "mlp_bn": True, "mlp_activation": "relu", "bottleneck_dim": 32, "ema_momentum": 0.996,
    "ema_end_value": 1.0, "patch_size": 16, "drop_path_rate": 0.1, "predictor_activation": "bn",
    "teacher_temp": 0.04, "student_temp": 0.1, "center_momentum": 0.999, "crop_size": GLOBAL_SIZE,
    "crop_min_scale": 0.26, "crop_min_scale_final": 0.0, "teacher_transform_views": GLOBAL_VIEWS,
    "local_crop_grads": False, "mini_crops": LOCAL_VIEWS, "mini_crop_size": LOCAL_SIZE, "gpu": "cpu", "rank": 0,
}
#: Linear biases that feed a BatchNorm (imbssl's heads have none there): held at 0
ZEROED = ("classifier.projector.mlp.0.bias", "classifier.projector.mlp.3.bias", "classifier.predictor.mlp.0.bias")
#: tensors above this many elements are stored as fingerprints (ResNet-18's convolutions); the inputs ("input.") whole
WHOLE_LIMIT = 4096


class FirstStepDone(Exception):
    """Raised by the one-batch loader when their epoch asks for a second batch."""


class Wrapped(nn.Module):
    """What DistributedDataParallel gives their trainer on one process: ``.module`` and ``module.`` names."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class Logger:
    """Their utils.logger.Logger takes metrics to wandb; here they are dropped."""

    def print(self, *args, **kwargs):
        pass

    def log(self, *args, **kwargs):
        pass

    def print_epoch_progress(self, *args, **kwargs):
        pass


def stub_logging_modules() -> None:
    """wandb, matplotlib, termcolor, sklearn, scipy: imported for logs, plots, NMI and k-means only."""
    stubs = {"wandb": {}, "matplotlib": {"use": lambda *a, **k: None}, "matplotlib.pyplot": {},
             "termcolor": {"colored": lambda text, *a, **k: text}, "sklearn": {}, "sklearn.metrics": {},
             "sklearn.metrics.cluster": {"normalized_mutual_info_score": None}, "scipy": {},
             "scipy.sparse": {"csr_matrix": None}}
    for name, attributes in stubs.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module


def initial_sizes(seed: int) -> torch.Tensor:
    """A fixed relative-size vector s: positive shares summing to 1, within about 25% of 1/K on either side (a
    wider spread has the operator's boost of the smallest clusters outweigh the untrained similarities, and the
    teacher puts every view in one or two clusters)."""
    g = torch.Generator().manual_seed(seed)
    shares = torch.exp(0.1 * torch.randn(NUM_CLUSTERS, generator=g))
    return shares / shares.sum()


def batch(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The global views (24 x 24) and local views (16 x 16), standard normal pixels, one [B, C, H, W] each."""
    g = torch.Generator().manual_seed(seed)
    global_views = [torch.randn(BATCH, 3, GLOBAL_SIZE, GLOBAL_SIZE, generator=g) for _ in range(GLOBAL_VIEWS)]
    local_views = [torch.randn(BATCH, 3, LOCAL_SIZE, LOCAL_SIZE, generator=g) for _ in range(LOCAL_VIEWS)]
    return global_views, local_views


def main() -> None:
    checkout = Path(sys.argv[1]).resolve()
    commit = fixture_io.pinned_checkout(checkout, PINNED)
    sys.path.insert(0, str(checkout))
    import torchvision.models.resnet  # noqa: F401  (theirs builds on it; torch._dynamo, which it imports, looks up
    # sklearn and scipy by their module spec, which the stubs below do not have: imported first)
    stub_logging_modules()
    torch.set_num_threads(1)
    from engine import BuildOptimizer, Trainer  # noqa: E402  (their modules, from the checkout)
    from engine.criterion import get_criterion  # noqa: E402
    from engine.model import Classifier  # noqa: E402

    torch.manual_seed(SEED)
    args = types.SimpleNamespace(**ARGS)
    student, teacher = Classifier(args), Classifier(args, teacher=True)
    shapes = {name: list(t.shape) for name, t in student.state_dict().items()}
    initial = fixture_io.seeded_weights(shapes, SEED)
    initial["classifier.centroid_layer.weight_g"].fill_(1.0)  # their MLPBottleneckClassifier: g = 1, not trained
    for name in ZEROED:
        initial[name].zero_()
    student.load_state_dict(initial)
    student, teacher = Wrapped(student), Wrapped(teacher)
    steps = STEPS_PER_EPOCH * args.epochs
    criterion = get_criterion(args, NUM_CLUSTERS, steps, STEPS_PER_EPOCH, Logger())
    sizes_before = initial_sizes(SEED)
    criterion.center.copy_(sizes_before.unsqueeze(0))
    optimizer, scheduler = BuildOptimizer.build_optimizer(student, args, steps, STEPS_PER_EPOCH * args.warmup_epochs)
    trainer = Trainer(student, teacher, criterion, optimizer, scheduler, args, Logger())  # teacher <- student
    trainer.init_centroids = lambda *a, **k: None

    global_views, local_views = batch(SEED)
    samples = [torch.stack(global_views, 1), torch.stack(local_views, 1)]  # their loader's [B, V, C, H, W] each

    class OneBatch:
        sampler = types.SimpleNamespace(set_epoch=lambda epoch: None)

        def __len__(self):
            return STEPS_PER_EPOCH

        def __iter__(self):
            yield torch.arange(BATCH), samples, torch.zeros(BATCH, dtype=torch.long)
            raise FirstStepDone

    seen = {}
    their_forward = criterion.forward

    def recorded_forward(student_output, teacher_output, training_match, epoch, step):
        loss, metrics = their_forward(student_output, teacher_output, training_match, epoch, step)
        seen.update(loss=loss.detach(), teacher_similarities=teacher_output.detach(), match=training_match)
        return loss, metrics
    criterion.forward = recorded_forward
    try:
        trainer.train_epoch(OneBatch())
    except FirstStepDone:
        pass

    module, teacher_module = student.module, teacher.module
    params = dict(module.named_parameters())
    groups = optimizer.param_groups
    group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    tensors = {f"input.global{i}": v for i, v in enumerate(global_views)}
    tensors |= {f"input.local{i}": v for i, v in enumerate(local_views)}
    tensors |= {"loss": seen["loss"], "out.teacher_similarities": seen["teacher_similarities"]}
    tensors |= {f"init.{n}": t for n, t in initial.items()}
    tensors |= {f"grad.{n}": p.grad for n, p in params.items() if p.grad is not None}
    tensors |= {f"after.{n}": t for n, t in module.state_dict().items()}
    tensors |= {f"update.{n}": p.detach() - initial[n] for n, p in params.items() if p.requires_grad}
    tensors |= {f"state.sgd.momentum_buffer.{n}": optimizer.state[p]["momentum_buffer"]
                for n, p in params.items() if p in optimizer.state}
    tensors |= {f"state.teacher.{n}": t for n, t in teacher_module.state_dict().items()}
    tensors |= {"state.sizes_before": sizes_before, "state.sizes": criterion.center[0].clone(),
                "state.cluster_count": criterion.cluster_count.clone()}
    meta = {"repo": REPO, "commit": commit, "seed": SEED, "shapes": shapes, "zeroed": list(ZEROED),
            "args": ARGS, "steps": steps, "steps_per_epoch": STEPS_PER_EPOCH,
            "lr": [g["lr"] for g in groups], "weight_decay": [g["weight_decay"] for g in groups],
            "group_of": {n: group_of.get(id(p)) for n, p in params.items()},
            "ema_momentum": 0.996, "matches": seen["match"]["matches"],
            "views": {"global": GLOBAL_VIEWS, "local": LOCAL_VIEWS, "batch": BATCH}}
    print(f"excb: loss {seen['loss'].item():.6f}, lr {groups[0]['lr']:.6g}, wd {[g['weight_decay'] for g in groups]}, "
          f"assignments {criterion.cluster_count.nonzero().flatten().tolist()}, matches {seen['match']['matches']}")
    path = fixture_io.save("excb", tensors, meta, whole_limit=WHOLE_LIMIT, whole_prefixes=("input.",))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
