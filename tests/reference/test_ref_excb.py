"""imbssl's ExCB step against ManiadisG/ExCB (Maniadis Metaxas et al., ECCV 2024), the authors' code.

The fixture (make_excb.py) holds one step of their ``Trainer.train_epoch`` with multi-crop (2 global 24 x 24 and
2 local 16 x 16 views of 8 images) on a ResNet-18 with K = 32 centroids, the balancing operator starting from a
non-uniform s: the loss, every gradient, the weights, BatchNorm statistics and SGD momentum buffers after their SGD
step, the teacher after its EMA update, and the balancing statistics after (s, their ``center``, and the teacher's
hard-assignment counts). imbssl's ``ExCB`` takes the same step with ``optimizer_step``, the SGD the project builds
(at their first step's lr and weight decays) and ``on_step_end``.

imbssl's defaults differ from the official code in the places ``REFERENCE_FORM`` lists (docs/excb.md, "What differs
from the paper and the official code"): three are options of imbssl (``REFERENCE_OPTIONS``: the projector's depth,
the heads' batching, the loss's pairs), two follow the paper on purpose and are switched here by a patch
(``REFERENCE_PATCHES``: the BatchNorm before the predictor, the boost and clamp). ``test_step_equals_reference``
switches all of them to the official form and finds the step equal to fp32 round-off;
``test_each_difference_matters`` leaves each one at imbssl's default in turn and finds the step different, so that
imbssl's default differs from the official code by exactly these. What the fixture's script sets on their side (the
Linear biases before BatchNorm at 0, weight_g = 1 as theirs) is listed in make_excb.py.
"""
from __future__ import annotations

import functools
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

import imbssl.methods.excb as excb_module  # noqa: E402
from imbssl.config import OptimConfig  # noqa: E402
from imbssl.engine.optim import build_optimizer  # noqa: E402
from imbssl.engine.schedules import Schedules, constant_schedule  # noqa: E402
from imbssl.engine.trainer import optimizer_step  # noqa: E402
from imbssl.methods.excb import ExCB, ExCBConfig  # noqa: E402
from imbssl.models.resnet import build_resnet, torchvision_state_dict  # noqa: E402

RTOL = 1e-5
#: their parameters that imbssl's ExCB does not have: the centroid layer's weight_g (fixed at 1: their centroids
#: are weight_v / |weight_v|, imbssl's weight / |weight|) and the Linear biases before BatchNorm (0 in the fixture)
NOT_IN_IMBSSL = ("classifier.centroid_layer.weight_g", "classifier.projector.mlp.0.bias",
                 "classifier.projector.mlp.3.bias", "classifier.predictor.mlp.0.bias")
#: the teacher's parts that only the student uses (their teacher is a whole Classifier; imbssl's has no predictor)
STUDENT_ONLY = ("classifier.predictor.", "classifier.predictor_activation.")


# -- names -------------------------------------------------------------------------------------------------------
def backbone_names() -> dict[str, str]:
    """Their ResNet-18's names (torchvision's) -> imbssl's, from ``torchvision_state_dict``, which renames imbssl's
    state dict in order."""
    backbone = build_resnet("resnet18", 3, stem="imagenet")
    theirs = [n for n in torchvision_state_dict(backbone) if not n.startswith("fc.")]
    return dict(zip(theirs, backbone.state_dict(), strict=True))


BACKBONE = backbone_names()
#: their heads' names -> imbssl's, for the reference form (3-layer projector, BatchNorm before the predictor)
HEADS = {"classifier.projector.mlp.": "projector.", "classifier.predictor_activation.": "predictor.0.",
         "classifier.predictor.mlp.0.": "predictor.1.", "classifier.predictor.mlp.1.": "predictor.2.",
         "classifier.predictor.mlp.3.": "predictor.4.", "classifier.centroid_layer.weight_v": "centroids.weight"}


def imbssl_name(ref: str) -> str | None:
    """Their Classifier's names -> imbssl's ExCB's (student side); None where imbssl has none."""
    if ref in NOT_IN_IMBSSL:
        return None
    if ref.startswith("backbone."):
        return "backbone." + BACKBONE[ref.removeprefix("backbone.")]
    prefix = next(p for p in HEADS if ref.startswith(p))
    return HEADS[prefix] + ref[len(prefix):]


# -- imbssl switched to the official form, one difference at a time ----------------------------------------------
# Three differences are options of imbssl, whose defaults are imbssl's form: each function gives the method options
# that switch it to the official form.
def three_layer_projector(fixture: fixture_io.Fixture) -> dict:
    """h_s, h_t: their MLP with mlp_hidden_layers 2 is Linear-BN-ReLU-Linear-BN-ReLU-Linear (the paper's "2-layer
    MLPs", counting hidden layers); imbssl's default projector has one hidden layer."""
    return {"proj_hidden_layers": fixture.meta["args"]["mlp_hidden_layers"]}


def heads_on_all_views(fixture: fixture_io.Fixture) -> dict:
    """Their Classifier runs the backbone on each crop size and the heads on all views together, so the heads'
    BatchNorm normalises the global and local views as one batch; imbssl's default ``student_outputs`` runs each
    group through the heads alone."""
    return {"head_batches": "all"}


def loss_pairs_as_code(fixture: fixture_io.Fixture) -> dict:
    """Their ClusteringLoss pairs teacher view x' with the projector output of each OTHER GLOBAL view and the
    predictor output of every view, and averages over all these pairs at once (``excb_loss_as_code``); imbssl's
    default (Eq. 7) also pairs it with the local views' projector outputs, and averages each of the two sums over its
    own pairs."""
    return {"pairing": "code"}


REFERENCE_OPTIONS: dict[str, Callable[[fixture_io.Fixture], dict]] = {
    "three_layer_projector": three_layer_projector, "heads_on_all_views": heads_on_all_views,
    "loss_pairs_as_code": loss_pairs_as_code}


# Two differences follow the paper on purpose and are no option (docs/excb.md): switched by patching imbssl.
def predictor_batchnorm(method: ExCB, stack: ExitStack) -> None:
    """Their predictor_activation "bn": a BatchNorm on the projections before g_s, which the paper does not have."""
    method.predictor = nn.Sequential(nn.BatchNorm1d(method.cfg.proj_dim), *method.predictor)


def boost_and_clamp(method: ExCB, stack: ExitStack) -> None:
    """Their ``centering`` multiplies each view's largest balanced similarity by 1.01 and clamps to [-1, 1]; the
    paper has neither. (Their noise on balancing factors that are exactly 0 does not arise: no s is 0 here.)"""
    balance = excb_module.balance

    def balance_then_boost(z, sizes, target):
        z = balance(z, sizes, target)
        return (z * (1 + 0.01 * F.one_hot(z.argmax(-1), z.shape[-1]))).clamp(-1, 1)
    stack.enter_context(mock.patch.object(excb_module, "balance", balance_then_boost))


REFERENCE_PATCHES: dict[str, Callable[[ExCB, ExitStack], None]] = {
    "predictor_batchnorm": predictor_batchnorm, "boost_and_clamp": boost_and_clamp}
REFERENCE_FORM = (*REFERENCE_OPTIONS, *REFERENCE_PATCHES)


def reference_options(fixture: fixture_io.Fixture, switched: tuple[str, ...]) -> dict:
    """The method options of the differences in ``switched`` that are options."""
    return {key: value for difference in switched if difference in REFERENCE_OPTIONS
            for key, value in REFERENCE_OPTIONS[difference](fixture).items()}


# -- one step ----------------------------------------------------------------------------------------------------
def excb_config(fixture: fixture_io.Fixture, **options) -> ExCBConfig:
    """The reference's configuration as imbssl's, with ``options`` (the official form's) on top."""
    args, centroid_group = fixture.meta["args"], fixture.meta["weight_decay"][-1]
    return ExCBConfig(num_clusters=args["num_clusters"], proj_hidden=args["mlp_hidden_dim"],
                      proj_dim=args["bottleneck_dim"], pred_hidden=args["mlp_hidden_dim"],
                      teacher_temperature=args["teacher_temp"], student_temperature=args["student_temp"],
                      teacher_momentum=args["ema_momentum"], size_momentum=args["center_momentum"],
                      centroid_init="random", centroid_weight_decay=(centroid_group, args["weight_decay"]), **options)


def load_reference_weights(method: ExCB, fixture: fixture_io.Fixture) -> None:
    """The reference's initial weights (checked against theirs) into the student and the teacher, and their s."""
    initial = fixture_io.seeded_weights(fixture.meta["shapes"], fixture.meta["seed"])
    initial["classifier.centroid_layer.weight_g"].fill_(1.0)
    for name in fixture.meta["zeroed"]:
        initial[name].zero_()
    # the same draw as the reference's (fingerprints are float64 sums, which torch versions may order differently)
    fixture_io.assert_close(initial, fixture, "init.", rtol=1e-12, atol=0)
    state, method.not_loaded = method.state_dict(), []
    for ref, value in initial.items():
        name = imbssl_name(ref)
        if name is None:
            continue
        if name not in state or state[name].shape != value.shape:  # a difference left in imbssl's form
            method.not_loaded.append(ref)
            continue
        state[name] = value
        if f"teacher.{name}" in state:  # their EMAHandler starts the teacher as the student's state dict
            state[f"teacher.{name}"] = value
    method.load_state_dict(state)
    method.cluster_sizes.copy_(fixture["state.sizes_before"])


def optimizer_for(method: ExCB, fixture: fixture_io.Fixture) -> torch.optim.Optimizer:
    """The SGD the project builds (``build_optimizer``), at their first step's lr and the optimizer's weight decay,
    with the engine's schedules at step 0 of their run set: the centroids' decay, the first value of
    ``centroid_weight_decay`` (their first step's), and the teacher's momentum."""
    args, batch, steps = fixture.meta["args"], fixture.meta["views"]["batch"], fixture.meta["steps"]
    lr = fixture.meta["lr"][0]
    cfg = OptimConfig(name="sgd", base_lr=lr * 256 / batch, weight_decay=args["weight_decay"],
                      momentum=args["sgd_momentum"])
    optimizer = build_optimizer(method, cfg, method.defaults, batch)
    Schedules(method, optimizer, {"lr": constant_schedule(lr, steps)}, steps, 1).apply(0)
    return optimizer


def one_step(switched: tuple[str, ...]) -> tuple[fixture_io.Fixture, ExCB, dict[str, torch.Tensor]]:
    """imbssl's step on the fixture's views with the differences in ``switched`` in the official form: what it
    gives, under the fixture's keys."""
    torch.manual_seed(0)
    fixture = fixture_io.load("excb")
    views = fixture.meta["views"]
    method = ExCB(build_resnet("resnet18", 3, stem="imagenet"),
                  excb_config(fixture, **reference_options(fixture, switched)))
    with ExitStack() as stack:
        for difference in switched:
            if difference in REFERENCE_PATCHES:
                REFERENCE_PATCHES[difference](method, stack)
        load_reference_weights(method, fixture)
        method.train()
        inputs = ([fixture[f"input.global{i}"] for i in range(views["global"])]
                  + [fixture[f"input.local{i}"] for i in range(views["local"])])
        optimizer = optimizer_for(method, fixture)
        initial = {n: p.detach().clone() for n, p in method.named_parameters()}
        grads = {}
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None})
            return step(*args, **kwargs)
        optimizer.step = recorded_step
        out = optimizer_step(method, optimizer, inputs, torch.arange(views["batch"]))
        method.on_step_end()
    return fixture, method, outputs(fixture, method, optimizer, out.loss, initial, grads)


@functools.cache
def reference_form_step() -> tuple[fixture_io.Fixture, ExCB, dict[str, torch.Tensor]]:
    """``one_step`` with every difference switched, once for the tests that read it."""
    return one_step(tuple(REFERENCE_FORM))


def outputs(fixture: fixture_io.Fixture, method: ExCB, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
            initial: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """imbssl's results under the fixture's keys."""
    params, state = dict(method.named_parameters()), method.state_dict()
    results = {"loss": loss}
    for ref in fixture.meta["shapes"]:
        name = imbssl_name(ref)
        if name is None or name not in state or ref in method.not_loaded:
            continue
        results[f"after.{ref}"] = state[name]
        if name in params:
            results[f"grad.{ref}"] = grads[name]
            results[f"update.{ref}"] = params[name].detach() - initial[name]
            results[f"state.sgd.momentum_buffer.{ref}"] = optimizer.state[params[name]]["momentum_buffer"]
        if f"teacher.{name}" in state:
            results[f"state.teacher.{ref}"] = state[f"teacher.{name}"]
    results["state.sizes"] = method.cluster_sizes
    assignments = torch.cat(method._epoch_assignments)
    results["state.cluster_count"] = torch.bincount(assignments, minlength=len(method.cluster_sizes)).float()
    return results


def zero_gradient(ref: str) -> bool:
    """The BatchNorm before their predictor shifts every row by its bias, which the predictor's own BatchNorm
    removes: that bias's gradient is 0 in exact arithmetic, round-off on both sides (checked by
    ``test_zero_gradients_are_round_off``), so it is left out of ``grad.``."""
    return ref == "classifier.predictor_activation.bias"


GROUPS = ("loss", "grad.", "after.", "update.", "state.sgd.momentum_buffer.", "state.teacher.", "state.sizes",
          "state.cluster_count")


def split_key(key: str) -> tuple[str, str]:
    """A fixture key -> (its group, their parameter name): ("grad.", "backbone.conv1.weight")."""
    name = fixture_io.name_of(key)
    group = next((g for g in GROUPS if g.endswith(".") and name.startswith(g)), "")
    return group, name[len(group):]


def comparable(fixture: fixture_io.Fixture) -> fixture_io.Fixture:
    """The fixture without what imbssl does not have (``NOT_IN_IMBSSL``, the teacher's ``STUDENT_ONLY`` parts), the
    zero-gradient bias's gradient, change and momentum (lr times round-off), and what is not compared (inputs,
    initial weights, diagnostics)."""
    kept = {}
    for key, tensor in fixture.tensors.items():
        group, ref = split_key(key)
        if not group and key not in GROUPS:
            continue
        if ref in NOT_IN_IMBSSL or (group == "state.teacher." and ref.startswith(STUDENT_ONLY)):
            continue
        if zero_gradient(ref) and group in ("grad.", "update.", "state.sgd.momentum_buffer."):
            continue
        kept[key] = tensor
    return fixture_io.Fixture(kept, fixture.meta)


def differences(fixture: fixture_io.Fixture, results: dict[str, torch.Tensor],
                rtol: float = RTOL) -> dict[str, fixture_io.Difference]:
    """``assert_close`` for each group of keys, relative to each tensor's largest value; the largest difference of
    each. A weight's change (``update.``) is allowed the spacing of the weight itself beyond ``rtol``, where it is
    stored whole."""
    return fixture_io.assert_groups_close(results, comparable(fixture), GROUPS, rtol)


@pytest.mark.slow
def test_step_equals_reference():
    """With every difference of ``REFERENCE_FORM`` switched, imbssl's step is the official code's to round-off:
    loss, gradients, weights, BatchNorm statistics and momentum buffers after SGD, the EMA teacher, s and the
    teacher's hard assignments."""
    fixture, method, results = reference_form_step()
    assert method.not_loaded == []
    found = differences(fixture, results)
    print({group: f"abs {d.max_abs:.2g} rel {d.max_rel:.2g}" for group, d in found.items()})


def test_their_loss_pairs_are_the_ones_switched_to():
    """Their ``training_match``: teacher view i against the projector output of the other global view and the
    predictor output of all four views (student outputs: 4 projector, then 4 predictor), as ``excb_loss_as_code``."""
    fixture = fixture_io.load("excb")
    views = fixture.meta["views"]["global"] + fixture.meta["views"]["local"]
    expected = [[j for j in range(fixture.meta["views"]["global"]) if j != i] + list(range(views, 2 * views))
                for i in range(fixture.meta["views"]["global"])]
    assert fixture.meta["matches"] == expected


def test_the_balancing_is_at_work_in_the_fixture():
    """The fixture exercises B in both directions, and the teacher spreads the step's 16 views over several clusters."""
    fixture = fixture_io.load("excb")
    relative = fixture["state.sizes_before"] * fixture.meta["args"]["num_clusters"]
    assert (relative < 0.9).any() and (relative > 1.1).any()
    assert (fixture["state.cluster_count"] > 0).sum() >= 4


@pytest.mark.slow
def test_zero_gradients_are_round_off():
    """What ``comparable`` leaves out is round-off on both sides: the gradients that are 0 in exact arithmetic (the
    Linear biases before BatchNorm, which imbssl does not have, and the bias of the BatchNorm before the predictor)
    are below 1e-5 of the largest gradient of the heads, in the reference and in imbssl."""
    fixture, _, results = reference_form_step()
    largest = max(fixture[f"grad.{ref}"].abs().max() for ref in
                  ("classifier.projector.mlp.6.weight", "classifier.predictor.mlp.3.weight"))
    for ref in NOT_IN_IMBSSL[1:] + ("classifier.predictor_activation.bias",):
        assert fixture[f"grad.{ref}"].abs().max() < 1e-5 * largest, ref
    assert results["grad.classifier.predictor_activation.bias"].abs().max() < 1e-5 * largest


@pytest.mark.slow
def test_the_excb_paper_presets_run_the_official_form_where_it_is_an_option():
    """Every option of ``REFERENCE_OPTIONS`` is set to the official code's value in the ExCB runs of the paper presets
    of the ExCB, priors and long-tailed SSL experiments."""
    from imbssl.recipes import load_preset
    from imbssl.recipes.excb import ExcbExperimentConfig
    from imbssl.recipes.longtail_ssl import LongtailSSLConfig
    from imbssl.recipes.priors import PriorsExperimentConfig

    options = reference_options(fixture_io.load("excb"), REFERENCE_FORM)
    for experiment, schema, method in (("experiment-excb", ExcbExperimentConfig, "excb"),
                                       ("priors", PriorsExperimentConfig, "excb-power-0.25"),
                                       ("longtail-ssl", LongtailSSLConfig, "excb")):
        exp = schema.model_validate(load_preset(experiment, "paper"))
        cfg = exp.run_config(exp.subsets[0], method, exp.seeds[0]).method
        assert {key: getattr(cfg, key) for key in options} == options, experiment


@pytest.mark.slow
@pytest.mark.parametrize("left_out", list(REFERENCE_FORM))
def test_each_difference_matters(left_out):
    """Each difference left in imbssl's form moves the step beyond round-off: the list is no longer than needed."""
    fixture, _, results = one_step(tuple(d for d in REFERENCE_FORM if d != left_out))
    with pytest.raises(AssertionError):
        differences(fixture, results)
