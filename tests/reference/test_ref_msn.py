"""imbssl's MSN step against facebookresearch/msn (Assran et al., ECCV 2022), the authors' code.

The fixtures (make_msn.py) hold one training step of their ``msn_train.main`` on a tiny ViT (width 192, depth 2,
patch 8, 24 x 24 views), with and without Sinkhorn: the loss, every gradient, the weights, BatchNorm statistics and
AdamW moments after their AdamW step, the target encoder after its EMA update, the prototypes after. imbssl's
``MSN`` takes the same step on the same weights and views with ``optimizer_step``, the AdamW that the project builds
(at their first step's lr and weight decay) and ``on_step_end``.

The random choice is fixed: imbssl is given the tokens their mask kept (their ``randperm``, one for the batch).
imbssl's defaults differ from their code in the places ``REFERENCE_FORM`` lists (docs/priors.md, "Differences from
MSN's code"), each an option of imbssl (``method.proj_activation``, ``model.vit_ln_eps``,
``method.view_batches``, ``method.clip_grad_norm``). ``test_step_equals_reference`` sets all of them to the
reference's form and finds the step equal to fp32 round-off; ``test_each_difference_matters`` leaves each one at
imbssl's default in turn and finds the step different, so that imbssl's default differs from the reference by
exactly these options. What the fixture's script sets on their side (imbssl's fixed sine-cosine positions, the
projector's biases before BatchNorm at 0) is listed in make_msn.py.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

from imbssl.config import ModelConfig, OptimConfig  # noqa: E402
from imbssl.engine.optim import build_optimizer  # noqa: E402
from imbssl.engine.schedules import Schedules, constant_schedule  # noqa: E402
from imbssl.engine.trainer import optimizer_step  # noqa: E402
from imbssl.methods import build_method  # noqa: E402
from imbssl.methods.msn import MSN, MSNConfig  # noqa: E402
from imbssl.models import build_backbone  # noqa: E402
from imbssl.priors import PriorConfig  # noqa: E402

RTOL = 1e-5
CASES = ["msn-sinkhorn", "msn-plain"]
#: their parameters that imbssl's MSN does not have: the learned positions (imbssl's are fixed; unused in the
#: fixture) and the projector's biases before BatchNorm (which BatchNorm cancels; 0 in the fixture)
NOT_IN_IMBSSL = ("pos_embed", "fc.fc1.bias", "fc.fc2.bias")
#: training steps of the run the momentum schedule is taken from (only step 0's momentum, 0.996, enters)
TOTAL_STEPS = 800 * 1251


def imbssl_name(ref: str) -> str | None:
    """Their encoder's names (deit.VisionTransformer with the ``fc`` projector of msn_train.init_model) -> imbssl's
    MSN's, without the ``backbone.``/``projector.`` owner's prefix for the target; None where imbssl has none."""
    if ref in NOT_IN_IMBSSL:
        return None
    if ref == "prototypes":
        return "prototypes.weight"
    head, _, rest = ref.partition(".")
    if head == "fc":
        layer, _, leaf = rest.partition(".")
        index = {"fc1": 0, "bn1": 1, "fc2": 3, "bn2": 4, "fc3": 6}[layer]
        return f"projector.{index}.{leaf}"
    if head == "blocks":
        block, _, rest = rest.partition(".")
        renames = {"attn.qkv.weight": "self_attn.in_proj_weight", "attn.qkv.bias": "self_attn.in_proj_bias",
                   "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
                   "mlp.fc1.weight": "linear1.weight", "mlp.fc1.bias": "linear1.bias",
                   "mlp.fc2.weight": "linear2.weight", "mlp.fc2.bias": "linear2.bias"}
        return f"backbone.blocks.layers.{block}.{renames.get(rest, rest)}"
    if head == "patch_embed":
        return f"backbone.patch_embed.{rest.removeprefix('proj.')}"
    return f"backbone.{ref}"  # cls_token, norm.*


# -- imbssl switched to the reference's form, one difference at a time ------------------------------------------
# Each difference is an option of imbssl (docs/priors.md, "Differences from MSN's code"), whose default is imbssl's
# form: each function gives the options, by config section, that switch it to MSN's code's form.
def gelu_projector(fixture: fixture_io.Fixture) -> dict[str, dict]:
    """MSN's projector (msn_train.init_model) has GELU between its layers; imbssl's default ``heads.mlp`` ReLU."""
    return {"method": {"proj_activation": "gelu"}}


def layer_norm_eps(fixture: fixture_io.Fixture) -> dict[str, dict]:
    """DeiT's LayerNorms (their deit.py) use eps 1e-6; imbssl's ViT has torch's default 1e-5."""
    return {"model": {"vit_ln_eps": fixture.meta["vit"]["ln_eps"]}}


def views_of_one_size_together(fixture: fixture_io.Fixture) -> dict[str, dict]:
    """Their encoder takes the views of one size as one batch (deit.VisionTransformer.forward), so the projector's
    BatchNorm normalises the focal views together; imbssl's default ``anchor_projections`` runs each view alone."""
    return {"method": {"view_batches": "by_size"}}


def clip_gradients(fixture: fixture_io.Fixture) -> dict[str, dict]:
    """Their train_step clips the encoder's gradient norm at clip_grad = 3.0 before AdamW's step (not the
    prototypes'); imbssl clips only with ``clip_grad_norm`` set."""
    return {"method": {"clip_grad_norm": fixture.meta["config"]["optimization"]["clip_grad"]}}


REFERENCE_FORM: dict[str, Callable[[fixture_io.Fixture], dict[str, dict]]] = {
    "gelu_projector": gelu_projector, "layer_norm_eps": layer_norm_eps,
    "views_of_one_size_together": views_of_one_size_together, "clip_gradients": clip_gradients}


def reference_options(fixture: fixture_io.Fixture, switched: tuple[str, ...]) -> dict[str, dict]:
    """The options of the differences in ``switched``, merged by section ("method", "model")."""
    options: dict[str, dict] = {"method": {}, "model": {}}
    for difference in switched:
        for section, values in REFERENCE_FORM[difference](fixture).items():
            options[section].update(values)
    return options


# -- one step ---------------------------------------------------------------------------------------------------
def msn_config(fixture: fixture_io.Fixture, **changes) -> MSNConfig:
    """The reference's configuration as imbssl's, with ``changes`` (options, PMSN's prior) on top."""
    config = fixture.meta["config"]
    criterion, meta = config["criterion"], config["meta"]
    return MSNConfig(num_clusters=criterion["num_proto"], proj_hidden=meta["hidden_dim"], proj_dim=meta["output_dim"],
                     anchor_temperature=criterion["temperature"],
                     target_temperature=criterion["temperature"] * fixture.meta["sharpen_T"],
                     regularization_weight=criterion["memax_weight"], mask_ratio=config["data"]["patch_drop"],
                     sinkhorn=criterion["use_sinkhorn"], teacher_momentum=fixture.meta["ema_momentum"], **changes)


def vit_config(fixture: fixture_io.Fixture, **changes) -> ModelConfig:
    """The fixture's ViT as imbssl's ``model`` section, with ``changes`` (the LayerNorm eps) on top."""
    vit = fixture.meta["vit"]
    assert vit["mlp_ratio"] == 4, "build_backbone's ViT has an MLP 4 times its width"
    return ModelConfig(backbone="vit", vit_patch=vit["patch"], vit_dim=vit["dim"], vit_depth=vit["depth"],
                       vit_heads=vit["heads"], **changes)


def build(fixture: fixture_io.Fixture, switched: tuple[str, ...] = (), **changes) -> MSN:
    """imbssl's MSN on the fixture's ViT, built by ``build_backbone`` and ``build_method`` from the config with the
    differences in ``switched`` in the reference's form, loaded with the reference's initial weights (checked
    against theirs)."""
    options = reference_options(fixture, switched)
    backbone = build_backbone(vit_config(fixture, **options["model"]), 3)
    method = build_method(msn_config(fixture, **options["method"], **changes), backbone)
    initial = fixture_io.seeded_weights(fixture.meta["shapes"], fixture.meta["seed"])
    for name in fixture.meta["zeroed"]:
        initial[name].zero_()
    # the same draw as the reference's (fingerprints are float64 sums, which torch versions may order differently)
    fixture_io.assert_close(initial, fixture, "init.", rtol=1e-12, atol=0)
    state = method.state_dict()
    for ref, value in initial.items():
        name = imbssl_name(ref)
        if name is not None:
            state[name] = value
            if not name.startswith("prototypes"):
                state[f"target.{name}"] = value  # their target encoder is a deep copy of the encoder
    method.load_state_dict(state)
    return method


def optimizer_for(method: MSN, fixture: fixture_io.Fixture) -> torch.optim.Optimizer:
    """The AdamW the project builds (``build_optimizer``), at their first step's lr and weight decay (their warm-up
    and weight-decay schedules at step 1), with the engine's schedules at step 0 of their run set (the target
    encoder's momentum)."""
    lr, decay, batch = fixture.meta["lr"][0], fixture.meta["weight_decay"][0], len(fixture["input.view0"])
    optimizer = build_optimizer(method, OptimConfig(name="adamw", base_lr=lr * 256 / batch, weight_decay=decay),
                                method.defaults, batch)
    Schedules(method, optimizer, {"lr": constant_schedule(lr, TOTAL_STEPS)}, TOTAL_STEPS, 1251).apply(0)
    return optimizer


def record_gradients(method: MSN, optimizer: torch.optim.Optimizer) -> None:
    """Keep the gradients as the backward pass leaves them (``method.grads_before_clipping``: the fixture's
    ``grad.`` are theirs before clip_grad_norm_) and as the optimizer steps with them (``grads_at_step``), around the
    engine's clipping: its ``gradient_clipping`` hook is called between the two. Observation only."""
    clipping, step = method.gradient_clipping, optimizer.step

    def recorded_clipping():
        method.grads_before_clipping = {n: p.grad.detach().clone() for n, p in method.named_parameters()
                                        if p.grad is not None}
        return clipping()

    def recorded_step(*args, **kwargs):
        method.grads_at_step = {n: p.grad.detach().clone() for n, p in method.named_parameters()
                                if p.grad is not None}
        return step(*args, **kwargs)
    method.gradient_clipping, optimizer.step = recorded_clipping, recorded_step


def one_step(name: str, switched: tuple[str, ...]) -> tuple[fixture_io.Fixture, dict[str, torch.Tensor]]:
    """imbssl's step on the fixture's views with the differences in ``switched`` in the reference's form: what it
    gives, under the fixture's keys."""
    fixture, method, optimizer, out, initial = step_of(name, switched)
    return fixture, outputs(fixture, method, optimizer, out.loss, initial)


def step_of(name: str, switched: tuple[str, ...]):
    """``one_step``'s step: the fixture, the method and optimizer after it, its output, the initial weights."""
    torch.manual_seed(0)
    fixture = fixture_io.load(name)
    method = build(fixture, switched)
    method.train()
    views = [fixture[f"input.view{i}"] for i in range(2 + fixture.meta["focal_views"])]
    use_their_mask(method, fixture)
    optimizer = optimizer_for(method, fixture)
    record_gradients(method, optimizer)
    initial = {n: p.detach().clone() for n, p in method.named_parameters()}
    out = optimizer_step(method, optimizer, views, torch.arange(len(views[0])))
    method.on_step_end()
    return fixture, method, optimizer, out, initial


def use_their_mask(method: MSN, fixture: fixture_io.Fixture) -> None:
    """The random choice fixed: every anchor view keeps the tokens their ``randperm`` kept, in every image."""
    kept = fixture["input.kept"]
    method.anchor_masks = lambda anchor_views, generator: [kept.expand(len(x), -1) for x in anchor_views]


def outputs(fixture: fixture_io.Fixture, method: MSN, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
            initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """imbssl's results under the fixture's keys: loss, grad., after., update., state.target., state.adamw."""
    params, state = dict(method.named_parameters()), method.state_dict()
    results = {"loss": loss}
    for ref in fixture.meta["shapes"]:
        name = imbssl_name(ref)
        if name is None:
            continue
        results[f"after.{ref}"] = state[name]
        if name in params:
            results[f"grad.{ref}"] = method.grads_before_clipping[name]
            results[f"update.{ref}"] = params[name].detach() - initial[name]
            for moment in ("exp_avg", "exp_avg_sq"):
                results[f"state.adamw.{moment}.{ref}"] = optimizer.state[params[name]][moment]
        if not name.startswith("prototypes"):
            results[f"state.target.{ref}"] = state[f"target.{name}"]
    return results


def zero_gradient_elements(ref: str, dim: int) -> slice | None:
    """The elements of ``ref`` whose gradient is 0 in exact arithmetic, so that both sides hold round-off there:
    the final LayerNorm's bias (a shift of every row that the projector's first BatchNorm removes) and the key part
    of each attention's qkv bias (a shift of every logit of a query, which the softmax removes). AdamW's first step
    moves such an element by lr * g / (|g| + eps) with g round-off: anything in [-lr, lr], on either side."""
    if ref == "norm.bias":
        return slice(None)
    if ref.startswith("blocks.") and ref.endswith(".attn.qkv.bias"):
        return slice(dim, 2 * dim)
    return None


def without_elements(t: torch.Tensor, dropped: slice) -> torch.Tensor:
    keep = torch.ones(len(t), dtype=torch.bool)
    keep[dropped] = False
    return t[keep]


#: AdamW's eps; its first update lr * g / (|g| + eps) turns a round-off difference d in a gradient g near eps into
#: lr * d * eps / (|g| + eps)^2, so ``update.`` is compared where the reference's (clipped) |g| >= 100 eps
ADAM_EPS = 1e-8


def comparable(fixture: fixture_io.Fixture, results: dict[str, torch.Tensor]
               ) -> tuple[fixture_io.Fixture, dict[str, torch.Tensor]]:
    """The fixture and imbssl's results without what cannot be compared: the parameters imbssl does not have
    (``NOT_IN_IMBSSL``), the zero-gradient elements outside the target encoder (``zero_gradient_elements``; checked
    by ``test_zero_gradients_are_round_off``), and in ``update.`` the elements whose gradient is near AdamW's eps."""
    dim = fixture.meta["vit"]["dim"]
    tensors, mine = {}, {}
    for key, expected in fixture.tensors.items():
        name = fixture_io.name_of(key)
        group, ref = next(((g, name[len(g):]) for g in GROUPS + ("init.", "input.") if name.startswith(g)),
                          ("", name))
        if ref.removeprefix("exp_avg_sq.").removeprefix("exp_avg.") in NOT_IN_IMBSSL:
            continue
        actual = results.get(name)
        dropped = zero_gradient_elements(ref.removeprefix("exp_avg_sq.").removeprefix("exp_avg."), dim)
        if dropped is not None and group in ("grad.", "after.", "update.", *GROUPS[-2:]):
            if dropped == slice(None):
                continue
            expected, actual = without_elements(expected, dropped), without_elements(actual, dropped)
        if group == "update." and name == key:  # whole: leave out the gradients near eps
            clipped = fixture[f"state.adamw.exp_avg.{ref}"] / 0.1  # exp_avg = (1 - beta1) g after one step
            if dropped is not None:
                clipped = without_elements(clipped, dropped)
            conditioned = clipped.abs() >= 100 * ADAM_EPS
            expected, actual = expected[conditioned], actual[conditioned]
        tensors[key] = expected
        if actual is not None:
            mine[name] = actual
    return fixture_io.Fixture(tensors, fixture.meta), mine


GROUPS = ("loss", "grad.", "after.", "update.", "state.target.", "state.adamw.exp_avg.", "state.adamw.exp_avg_sq.")
#: each group's relative tolerance, RTOL unless named: AdamW's second moment holds g^2, twice g's relative error
GROUP_RTOL = {"state.adamw.exp_avg_sq.": 2}


def differences(fixture: fixture_io.Fixture, results: dict[str, torch.Tensor],
                rtol: float = RTOL) -> dict[str, fixture_io.Difference]:
    """``assert_close`` for each group of keys, relative to each tensor's largest value (``GROUP_RTOL``); the largest
    difference of each. A weight's change (``update.``) is allowed the spacing of the weight itself beyond ``rtol``,
    where it is stored whole."""
    fixture, results = comparable(fixture, results)
    return fixture_io.assert_groups_close(results, fixture, GROUPS, rtol, GROUP_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_step_equals_reference(name):
    """With every difference of ``REFERENCE_FORM`` switched, imbssl's step is the reference's to fp32 round-off."""
    fixture, results = one_step(name, tuple(REFERENCE_FORM))
    found = differences(fixture, results)
    print(name, {group: f"abs {d.max_abs:.2g} rel {d.max_rel:.2g}" for group, d in found.items()})


def test_their_gradient_is_clipped():
    """The fixture's gradients are above their clip norm, so the clipping is exercised (see clip_gradients)."""
    for name in CASES:
        fixture = fixture_io.load(name)
        assert fixture.meta["grad_norm_before_clip"] > fixture.meta["config"]["optimization"]["clip_grad"]


@pytest.mark.slow
def test_the_engine_clips_the_encoder_at_their_norm_and_leaves_the_prototypes():
    """With ``clip_grad_norm``, AdamW steps with the encoder's gradient (backbone and projector) scaled to their
    clip norm, from the norm their grad_logger saw, and with the prototypes' gradient as the backward pass left it."""
    fixture, method, *_ = step_of("msn-plain", tuple(REFERENCE_FORM))
    clip = fixture.meta["config"]["optimization"]["clip_grad"]
    before, at_step = method.grads_before_clipping, method.grads_at_step
    encoder = [n for n in before if n != "prototypes.weight"]

    def norm(grads: dict[str, torch.Tensor]) -> float:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[n]) for n in encoder])).item()
    assert norm(before) == pytest.approx(fixture.meta["grad_norm_before_clip"], rel=RTOL)
    assert norm(at_step) == pytest.approx(clip, rel=1e-5)
    assert torch.equal(at_step["prototypes.weight"], before["prototypes.weight"])


@pytest.mark.slow
def test_the_priors_paper_preset_runs_msn_in_the_reference_form():
    """Every option that ``REFERENCE_FORM`` switches is set, to the reference's value, in the MSN and PMSN runs of
    the priors experiment's paper preset (on the ViT, where the LayerNorm eps applies)."""
    from imbssl.config import deep_merge
    from imbssl.recipes import load_preset
    from imbssl.recipes.priors import PriorsExperimentConfig

    fixture = fixture_io.load("msn-plain")
    options = reference_options(fixture, tuple(REFERENCE_FORM))
    exp = PriorsExperimentConfig.model_validate(deep_merge(load_preset("priors", "paper"),
                                                           {"base": {"model": {"backbone": "vit"}}}))
    for method in ("msn", "pmsn-0.25"):
        cfg = exp.run_config(exp.subsets[0], method, exp.seeds[0])
        for section, values in options.items():
            assert {key: getattr(getattr(cfg, section), key) for key in values} == values, (method, section)


@pytest.mark.slow
def test_zero_gradients_are_round_off():
    """What ``comparable`` leaves out is round-off on both sides: the gradients that are 0 in exact arithmetic (their
    projector's biases before BatchNorm, which imbssl does not have; ``zero_gradient_elements``) are below 1e-5 of
    the projector's largest gradient, in the reference and in imbssl, and AdamW moved them by at most lr."""
    fixture, results = one_step("msn-plain", tuple(REFERENCE_FORM))
    dim, lr = fixture.meta["vit"]["dim"], fixture.meta["lr"][0]
    largest = max(fixture[f"grad.fc.{layer}.weight"].abs().max() for layer in ("fc2", "fc3"))
    for ref in ("fc.fc1.bias", "fc.fc2.bias"):
        assert fixture[f"grad.{ref}"].abs().max() < 1e-5 * largest
    zero = {ref: zero_gradient_elements(ref, dim) for ref in fixture.meta["shapes"]}
    zero = {ref: elements for ref, elements in zero.items() if elements is not None}
    assert len(zero) == 1 + fixture.meta["vit"]["depth"]
    for ref, elements in zero.items():
        for side in (fixture.tensors, results):
            assert side[f"grad.{ref}"][elements].abs().max() < 1e-5 * largest, ref
            assert side[f"update.{ref}"][elements].abs().max() <= lr * (1 + 1e-4), ref


@pytest.mark.slow
@pytest.mark.parametrize("left_out", list(REFERENCE_FORM))
def test_each_difference_matters(left_out):
    """Each difference left in imbssl's form moves the step beyond round-off: the list is no longer than needed."""
    switched = tuple(d for d in REFERENCE_FORM if d != left_out)
    fixture, results = one_step("msn-plain", switched)
    with pytest.raises(AssertionError):
        differences(fixture, results)


@pytest.mark.slow
@pytest.mark.parametrize("tau", [0.25, 1.0])
def test_pmsn_prior_term_is_the_formula_of_docs_priors(tau):
    """PMSN has no reference code; docs/priors.md defines its regulariser as R = KL(p_bar || pi) =
    sum_k p_bar_k log(p_bar_k / pi_k), with pi_k = k^-tau / sum_j j^-tau. Computed here in float64 from their mean
    anchor prediction p_bar: at pi = 1/K it is their me-max term, and imbssl's PMSN loss on the fixture's step (in
    MSN's reference form, so that p_bar is theirs) is their cross-entropy plus lambda R."""
    fixture = fixture_io.load("msn-plain")
    p_bar = fixture["out.p_bar"].double()
    num_clusters = len(p_bar)
    ranks = torch.arange(1, num_clusters + 1, dtype=torch.float64)
    prior = ranks ** -tau / (ranks ** -tau).sum()
    prior_kl = (p_bar * (p_bar / prior).log()).sum()
    uniform_kl = (p_bar * (p_bar * num_clusters).log()).sum()
    torch.testing.assert_close(uniform_kl.float(), fixture["loss.me_max"], rtol=RTOL, atol=1e-7)

    method = build(fixture, tuple(REFERENCE_FORM), prior=PriorConfig(kind="power_law", tau=tau))
    method.train()
    use_their_mask(method, fixture)
    views = [fixture[f"input.view{i}"] for i in range(2 + fixture.meta["focal_views"])]
    out = method.training_step(views, torch.arange(len(views[0])))
    weight = method.cfg.regularization_weight
    torch.testing.assert_close(out.stats["prior_kl"], prior_kl.float(), rtol=RTOL, atol=1e-7)
    expected = fixture["loss.cross_entropy"].double() + weight * prior_kl
    torch.testing.assert_close(out.loss.detach(), expected.float(), rtol=RTOL, atol=1e-7)
    # the prior moves the term by far more than the tolerance, so the checks above tell pi from 1/K
    assert abs(prior_kl - uniform_kl) > 20 * (1e-7 + RTOL * prior_kl)
