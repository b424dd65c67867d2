"""The JAX half of make_byol.py: runs deepmind-research's byol/ (JAX, haiku, optax) on the inputs that make_byol.py
wrote, and writes back what it computed. Runs in a JAX environment (jax, jaxlib, dm-haiku, optax, dm-tree, numpy,
safetensors; no torch), started by make_byol.py:

    JAX_PYTHON byol_reference_step.py BYOL_SOURCE IN_FILE OUT_FILE

BYOL_SOURCE holds ``byol/`` exported at the pinned commit; IN_FILE (safetensors, numpy) the weights in torch's
names and layout (``init.*``), the two views (``input.view*``, NCHW) and the loss terms' vectors (``terms.*``), its
metadata the settings. OUT_FILE gets the results in torch's names and layout, its metadata their config's values.

Their code is imported unchanged; around it:
- ``tensorflow``, ``tensorflow_datasets``, ``acme`` and ``dill`` are empty stand-ins: byol/utils/dataset.py (the
  ImageNet input pipeline), byol_experiment.py (acme's prefetch of that pipeline) and utils/checkpointing.py import
  them at the top, and nothing on the path of a step from given inputs uses them;
- ``jax.tree_multimap`` and ``jax.tree_map``, removed from JAX since their commit, are ``jax.tree_util.tree_map``,
  which they were aliases of;
- ``networks.SmallCNN`` is imbssl's SmallCNN at width 0.5 written in haiku (``config.network_config.encoder_class``
  names it): four Conv 3x3 (no bias) - BatchNorm - ReLU - MaxPool 2x2 blocks and a global average pool, as
  models/small.py; their ResNet-50 needs 224 px crops;
- ``dataset.normalize_images`` and ``augmentations.postprocess`` are the identity: the views come normalised and
  augmented, as imbssl's engine gives them to the method (theirs normalise with ImageNet's statistics and colour-jitter
  on the device);
- checkpointing is off (``use_checkpointing=False``).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

#: the stand-ins of the modules their files import but a step from given inputs never uses
UNUSED_IMPORTS = ("tensorflow", "tensorflow.compat", "tensorflow.compat.v2", "tensorflow_datasets", "acme",
                  "acme.jax", "acme.jax.utils", "dill")
#: the BatchNorm state entries -> imbssl's buffers (their moving averages' ``hidden`` is torch's running value)
EMA_BUFFERS = {"mean_ema": "running_mean", "var_ema": "running_var"}


def stand_in(name: str) -> None:
    module = types.ModuleType(name)
    module.__getattr__ = lambda attribute: object  # annotations such as tf.Tensor, evaluated at import
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def haiku_small_cnn(hk, jax, jnp, widths: list[int]):
    """imbssl's SmallCNN in haiku, NHWC: the encoder class their ``_forward`` builds by name."""

    class SmallCNN(hk.Module):
        def __init__(self, num_classes=None, bn_config=None, name=None):
            super().__init__(name=name)
            self._bn_config = dict(bn_config)

        def __call__(self, inputs, is_training):
            out = inputs
            for k, width in enumerate(widths):
                out = hk.Conv2D(width, 3, stride=1, padding="SAME", with_bias=False, name=f"conv_{k}")(out)
                out = hk.BatchNorm(name=f"batch_norm_{k}", **self._bn_config)(out, is_training=is_training)
                out = hk.max_pool(jax.nn.relu(out), window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="SAME")
            return jnp.mean(out, axis=(1, 2))

    return SmallCNN


def torch_names(widths: list[int]) -> dict[str, tuple[str, str]]:
    """imbssl's parameter names (``backbone.body.*``, ``projector.*``, ``predictor.*``) -> (haiku module, parameter)
    of their online network; the target's are the same under ``target.``."""
    names = {}
    for k in range(len(widths)):
        names[f"backbone.body.{4 * k}.weight"] = (f"small_cnn/conv_{k}", "w")
        names[f"backbone.body.{4 * k + 1}.weight"] = (f"small_cnn/batch_norm_{k}", "scale")
        names[f"backbone.body.{4 * k + 1}.bias"] = (f"small_cnn/batch_norm_{k}", "offset")
    for head in ("projector", "predictor"):
        names.update({f"{head}.0.weight": (f"{head}/linear", "w"), f"{head}.0.bias": (f"{head}/linear", "b"),
                      f"{head}.1.weight": (f"{head}/batch_norm", "scale"),
                      f"{head}.1.bias": (f"{head}/batch_norm", "offset"),
                      f"{head}.3.weight": (f"{head}/linear_1", "w")})
    return names


def to_haiku(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A torch-layout weight -> haiku's: conv [O, I, kh, kw] -> [kh, kw, I, O], linear [O, I] -> [I, O], norm [C] ->
    [1, .., C]."""
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
        value = value.T
    return np.ascontiguousarray(value.reshape(like.shape), dtype=like.dtype)


def to_torch(value: np.ndarray, torch_shape: list[int]) -> np.ndarray:
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2 and len(torch_shape) == 2:
        value = value.T
    return np.ascontiguousarray(value.reshape(torch_shape), dtype=np.float32)


def in_part(name: str, prefix: str) -> bool:
    """Whether imbssl's ``name`` is of the network under ``prefix``: "" the online one, "target." the target."""
    return name.startswith("target.") == (prefix == "target.")


def batchnorm_states(shapes: dict, prefix: str, names: dict, buffers: tuple[str, ...]):
    """(imbssl's buffer name, buffer, haiku BatchNorm module) of the network under ``prefix``."""
    for name in shapes:
        module, _, buffer = name.rpartition(".")
        if in_part(name, prefix) and buffer in buffers:
            yield name, buffer, names[f"{module.removeprefix(prefix)}.weight"][0]


def load(params: dict, state: dict, inputs: dict[str, np.ndarray], prefix: str, names: dict, shapes: dict) -> None:
    """The seeded weights and BatchNorm buffers of imbssl's names under ``prefix`` into haiku's params and state
    (device axis first): a BatchNorm's running mean and variance are its moving averages' ``hidden``, its counter 0.
    Their target's predictor, which nothing reads, keeps its draw."""
    for name, (module, leaf) in names.items():
        if prefix + name in shapes:
            params[module][leaf] = to_haiku(inputs[f"init.{prefix}{name}"], params[module][leaf][0])[None]
    for name, buffer, module in batchnorm_states(shapes, prefix, names, tuple(EMA_BUFFERS.values())):
        ema = next(key for key, value in EMA_BUFFERS.items() if value == buffer)
        entry = state[f"{module}/~/{ema}"]
        entry["hidden"] = to_haiku(inputs[f"init.{name}"], entry["hidden"][0])[None]


def read_back(params: dict, state: dict | None, prefix: str, names: dict, shapes: dict, group: str) -> dict:
    """Their params (and, for ``after.``, BatchNorm state) in imbssl's names and torch's layout."""
    out = {f"{group}{prefix}{name}": to_torch(np.asarray(params[module][leaf][0]), shapes[prefix + name])
           for name, (module, leaf) in names.items() if prefix + name in shapes}
    if state is None:
        return out
    buffers = (*EMA_BUFFERS.values(), "num_batches_tracked")
    for name, buffer, module in batchnorm_states(shapes, prefix, names, buffers):
        ema = next((key for key, value in EMA_BUFFERS.items() if value == buffer), "mean_ema")
        entry = state[f"{module}/~/{ema}"]
        if buffer == "num_batches_tracked":
            out[f"their_state.{name}"] = np.asarray(entry["counter"][0]).reshape(shapes[name]).astype(np.int64)
        else:
            out[f"their_state.{name}"] = np.asarray(entry["hidden"][0]).reshape(shapes[name]).astype(np.float32)
    return out


def main() -> None:
    source, in_file, out_file = map(Path, sys.argv[1:4])
    with safe_open(str(in_file), framework="numpy") as f:
        inputs = {key: f.get_tensor(key) for key in f.keys()}
        settings = json.loads(f.metadata()["settings"])
    for name in UNUSED_IMPORTS:
        stand_in(name)
    import haiku as hk
    import jax
    import jax.numpy as jnp
    jax.tree_multimap = jax.tree_util.tree_map
    jax.tree_map = jax.tree_util.tree_map
    sys.path.insert(0, str(source))
    from byol import byol_experiment
    from byol.configs import byol as byol_config
    from byol.utils import augmentations, dataset, helpers, networks, schedules

    config = byol_config.get_config(num_epochs=settings["num_epochs"], batch_size=settings["batch_size"])
    config["network_config"].update(encoder_class="SmallCNN", encoder_config={})
    config["checkpointing_config"]["use_checkpointing"] = False
    widths, shapes, step = settings["widths"], settings["shapes"], settings["step"]
    names = torch_names(widths)
    views = {f"view{v}": np.ascontiguousarray(inputs[f"input.view{v}"].transpose(0, 2, 3, 1))[None] for v in (1, 2)}
    batch = {**views, "labels": np.zeros((1, len(views["view1"][0])), dtype=np.int32)}
    rng = jax.random.split(jax.random.PRNGKey(settings["seed"]), 1)
    with mock.patch.object(networks, "SmallCNN", haiku_small_cnn(hk, jax, jnp, widths), create=True), \
            mock.patch.object(dataset, "normalize_images", lambda images: images), \
            mock.patch.object(augmentations, "postprocess", lambda inputs, rng: inputs):
        experiment = byol_experiment.ByolExperiment(**config)
        initial = jax.pmap(experiment._make_initial_state, axis_name="i")(rng, batch)
        params = {part: jax.tree_util.tree_map(np.array, getattr(initial, f"{part}_params"))
                  for part in ("online", "target")}
        state = {part: jax.tree_util.tree_map(np.array, getattr(initial, f"{part}_state"))
                 for part in ("online", "target")}
        for part, prefix in (("online", ""), ("target", "target.")):
            load(params[part], state[part], inputs, prefix, names, shapes)
        initial = initial._replace(online_params=params["online"], target_params=params["target"],
                                   online_state=state["online"], target_state=state["target"])
        grad_fn = jax.pmap(jax.grad(experiment.loss_fn, has_aux=True), axis_name="i")
        grads, (_, logs) = grad_fn(initial.online_params, initial.target_params, initial.online_state,
                                   initial.target_state, rng, batch)
        outputs, _ = jax.pmap(lambda p, s, x: experiment.forward.apply(p, s, x, is_training=True),
                              axis_name="i")(initial.online_params, initial.online_state, batch)
        after, step_logs = experiment.update_pmap(initial, global_step=np.array([step]), rng=rng, inputs=batch)

    p, z = jnp.asarray(inputs["terms.p"]), jnp.asarray(inputs["terms.z"])
    results = {"loss": np.asarray(logs["repr_loss"][0], dtype=np.float32),
               "step_loss": np.asarray(step_logs["repr_loss"][0], dtype=np.float32),
               "tau": np.asarray(step_logs["tau"][0], dtype=np.float32),
               "lr": np.asarray(step_logs["learning_rate"][0], dtype=np.float32),
               "terms.regression": np.asarray(helpers.regression_loss(p, z)),
               "terms.regression.grad": np.asarray(jax.grad(lambda q: jnp.mean(helpers.regression_loss(q, z)))(p)),
               **{f"forward.{kind}{v}": np.asarray(outputs[f"{kind}_view{v}"][0])
                  for kind in ("projection", "prediction") for v in (1, 2)},
               **read_back(grads, None, "", names, shapes, "grad."),
               **read_back(after.online_params, after.online_state, "", names, shapes, "after."),
               **read_back(after.target_params, after.target_state, "target.", names, shapes, "after.")}
    steps = np.array(settings["schedule_steps"])
    results["schedule.lr"] = np.asarray(schedules.learning_schedule(
        jnp.asarray(steps), batch_size=config["batch_size"], total_steps=config["max_steps"],
        **config["lr_schedule_config"]))
    results["schedule.tau"] = np.asarray(schedules.target_ema(jnp.asarray(steps), base_ema=config["base_target_ema"],
                                                              max_steps=config["max_steps"]))
    meta = {"config": {k: v for k, v in config.items() if k != "checkpointing_config"},
            "jax": jax.__version__, "haiku": hk.__version__}
    save_file({k: np.array(v, order="C") for k, v in results.items()}, str(out_file),
              metadata={"meta": json.dumps(meta)})


if __name__ == "__main__":
    main()
