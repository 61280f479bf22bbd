"""Penalties added to the training loss, each with exact gradients.

A penalty is called with a `PenaltyContext` inside gradmon's train step (under its
gradient tape on TensorFlow, inside the differentiated function on JAX, on the
autograd graph on PyTorch) and returns a scalar added to the loss. The built-in
penalties compute in `keras.ops` and run on every Keras backend. The monitored step logs, per
penalty, its value, its share of the total loss and the norm of its own
gradient contribution (`gradmon.tags.penalty`).

Example:
    >>> model = gradmon.monitor(model, penalties=[
    ...     gradmon.penalties.WeightPenalty(l2=1e-4),
    ...     gradmon.penalties.GradientNormPenalty(0.01)])
"""

import dataclasses
import typing

import keras

from gradmon.backend import lazy_tf as _lazy_tf
from gradmon._validation import check_choice, check_non_negative, invalid

tf = _lazy_tf.tensorflow()


@dataclasses.dataclass
class PenaltyContext:
    """What a penalty may use, from the current train step.

    Attributes:
        model: the model being trained.
        x, y, sample_weight: the batch.
        y_pred: the model's output on `x` (training=True).
        variables: the trainable variables.
        data_gradients: gradients of the data loss with respect to
            `variables`, differentiable (a nested tape on TensorFlow, `jax.grad`
            inside the differentiated function on JAX, `create_graph=True` on
            PyTorch), or `None` unless a penalty asked for them (`needs_gradients`).
        seed: on JAX, this step's random key (`jax.random.fold_in` of the
            optimizer's iteration count: the jitted step has no random state of
            its own); `None` on TensorFlow and PyTorch (their stateful RNG).
    """

    model: typing.Any
    x: typing.Any
    y: typing.Any
    sample_weight: typing.Any
    y_pred: typing.Any
    variables: list
    data_gradients: typing.Optional[list] = None
    seed: typing.Any = None


class Penalty:
    """Base class. Subclasses set `name` and implement `__call__(context) -> scalar`."""

    name = "penalty"
    needs_gradients = False

    def __call__(self, context):
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class WeightPenalty(Penalty):
    """`l1 * sum|w| + l2 * sum w^2` over the trainable weights (or those `include` selects).

    Args:
        l1: non-negative L1 coefficient. Defaults to `0.0`.
        l2: non-negative L2 coefficient. Defaults to `0.0`.
        include: optional callable `variable -> bool` choosing the weights
            (e.g. `lambda v: "kernel" in v.path`). Defaults to all.
        name: tag name. Defaults to `"weight"`.
    """

    def __init__(self, l1=0.0, l2=0.0, include=None, name="weight"):
        self.l1 = check_non_negative("l1", l1)
        self.l2 = check_non_negative("l2", l2)
        if include is not None and not callable(include):
            raise invalid("include", "a callable variable -> bool or None", include)
        self.include = include
        self.name = name

    def __call__(self, context):
        chosen = [v for v in context.variables if self.include is None or self.include(v)]
        total = keras.ops.convert_to_tensor(0.0)
        for v in chosen:
            w = keras.ops.cast(v.value, "float32")
            if self.l1:
                total += self.l1 * keras.ops.sum(_abs(w))
            if self.l2:
                total += self.l2 * keras.ops.sum(keras.ops.square(w))
        return total

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2, "name": self.name}


class GradientNormPenalty(Penalty):
    """`weight * ||grad_theta L_data||_p`, differentiated exactly (double backpropagation).

    The data-loss gradient is taken on a nested tape, so the penalty's own
    gradient includes the Hessian-vector product `H g / ||g||` (p=2).

    Args:
        weight: non-negative coefficient.
        p: order of the norm, `1`, `2` or `"inf"`. Defaults to `2`.
        name: tag name. Defaults to `"grad_norm"`.

    References:
        Drucker & LeCun (1992), Improving generalization performance using
        double backpropagation.
    """

    needs_gradients = True

    def __init__(self, weight, p=2, name="grad_norm"):
        self.weight = check_non_negative("weight", weight)
        self.p = check_choice("p", p, (1, 2, "inf"))
        self.name = name

    def __call__(self, context):
        grads = [keras.ops.cast(keras.ops.convert_to_tensor(g), "float32")
                 for g in context.data_gradients if g is not None]
        if self.p == 2:
            norm = keras.ops.sqrt(_add_n([keras.ops.sum(keras.ops.square(g)) for g in grads]))
        elif self.p == 1:
            norm = _add_n([keras.ops.sum(_abs(g)) for g in grads])
        else:
            norm = keras.ops.max(keras.ops.stack([keras.ops.max(keras.ops.abs(g)) for g in grads]))
        return self.weight * norm

    def get_config(self):
        return {"weight": self.weight, "p": self.p, "name": self.name}


def _abs(x):
    """`|x|` whose gradient is `sign(x)`, 0 at 0, on every backend (JAX's `abs` has gradient 1
    at 0; TensorFlow's and PyTorch's 0): `x * sign(x)`, equal to `|x|` bit for bit."""
    return x * keras.ops.sign(x)


def _add_n(tensors):
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _input_gradients(model, total_of, flat):
    """Gradients of the scalar `total_of(flat)` with respect to each tensor of `flat`,
    themselves differentiable with respect to the model's weights (double backward)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        # the scope's values (this step's weights) by value: a forward pass inside `jax.grad`
        # must not leave its own assignments (BatchNorm statistics, seeds) in the outer scope
        mapping = [(v, v.value) for v in model.variables]

        def total(inputs):
            with keras.StatelessScope(state_mapping=mapping):
                return total_of(inputs)

        return list(jax.grad(total)(list(flat))), flat
    if backend == "torch":
        import torch

        flat = [t if t.requires_grad else t.detach().requires_grad_(True) for t in flat]
        total = total_of(flat)
        return list(torch.autograd.grad(total, flat, create_graph=True, allow_unused=True)), flat
    with tf.GradientTape() as tape:
        tape.watch(flat)
        total = total_of(flat)
    return tape.gradient(total, flat), flat


def input_gradient_norms(model, inputs, training=True):
    """Per-example L2 norm of `d sum(model(inputs)) / d inputs`, over all input tensors.

    Each example's output depends only on its own input (no BatchNorm in
    training mode across the batch), so the gradient of the summed output
    with respect to the batch holds each example's input gradient. On JAX the
    forward pass changes no state (its assignments are dropped).
    """
    flat = [keras.ops.convert_to_tensor(t) for t in keras.tree.flatten(inputs)]
    dtypes = [keras.backend.standardize_dtype(t.dtype) for t in flat]

    def total_of(tensors):
        outputs = model(keras.tree.pack_sequence_as(inputs, tensors), training=training)
        return _add_n([keras.ops.sum(keras.ops.cast(o, "float32")) for o in keras.tree.flatten(outputs)])

    grads = None
    if all("float" in d for d in dtypes):
        grads, flat = _input_gradients(model, total_of, flat)
    if grads is None or any(g is None for g in grads):
        raise ValueError(
            "InputGradientPenalty needs inputs the model's output depends on "
            "differentiably. Expected floating-point inputs that reach the output. "
            f"Received: inputs of dtypes {dtypes}")
    squares = [keras.ops.sum(keras.ops.reshape(keras.ops.square(keras.ops.cast(g, "float32")),
                                               [keras.ops.shape(g)[0], -1]), axis=1)
               for g in grads]
    return keras.ops.sqrt(_add_n(squares))


def _step_key(seed, which):
    """A JAX key for one random draw of this step (`PenaltyContext.seed`)."""
    import jax

    return jax.random.fold_in(seed, which)


def interpolate(real, fake, seed=None):
    """`eps * real + (1 - eps) * fake` with one `eps ~ U(0, 1)` per example (WGAN-GP).

    `seed`: an int or `None` (TensorFlow, PyTorch), or on JAX a key (inside a jitted
    step, where Keras' global seed generator cannot be used).
    """
    flat_real, flat_fake = keras.tree.flatten(real), keras.tree.flatten(fake)
    if keras.backend.backend() == "tensorflow":
        batch = tf.shape(flat_real[0])[0]
        eps = tf.random.uniform([batch], seed=seed)
    else:
        batch = keras.ops.shape(flat_real[0])[0]
        eps = keras.random.uniform([batch], seed=seed)
    mixed = []
    for r, f in zip(flat_real, flat_fake):
        r = keras.ops.convert_to_tensor(r)
        e = keras.ops.reshape(keras.ops.cast(eps, r.dtype), [-1] + [1] * (len(r.shape) - 1))
        mixed.append(e * r + (1 - e) * keras.ops.cast(f, r.dtype))
    return keras.tree.pack_sequence_as(real, mixed)


class InputGradientPenalty(Penalty):
    """Penalises the input gradient of the model's output: WGAN-GP or R1.

    - `kind="wgan-gp"`: `weight * mean((||grad_x f(x_hat)|| - target)^2)` on
      interpolates `x_hat` between the batch and `fake` (Gulrajani et al. 2017).
      In a monitored `fit`, `fake` is the batch itself in a shuffled order
      (interpolates between examples); in a custom train step call
      `penalty.value(model, real, fake)` with generated samples.
    - `kind="r1"`: `weight / 2 * mean(||grad_x f(x)||^2)` on the real batch
      (Mescheder et al. 2018).

    `f` is the sum of the model's outputs (a critic's single score, or all
    logits). The forward pass runs with `training=True`.

    Args:
        weight: non-negative coefficient (lambda for WGAN-GP, gamma for R1).
        kind: `"wgan-gp"` or `"r1"`. Defaults to `"wgan-gp"`.
        target: the norm WGAN-GP pulls towards. Defaults to `1.0`.
        name: tag name. Defaults to `kind` with "-" replaced by "_".

    References:
        Gulrajani et al. (2017), Improved Training of Wasserstein GANs.
        Mescheder, Geiger, Nowozin (2018), Which Training Methods for GANs
        do actually Converge?
    """

    def __init__(self, weight, kind="wgan-gp", target=1.0, name=None):
        self.weight = check_non_negative("weight", weight)
        self.kind = check_choice("kind", kind, ("wgan-gp", "r1"))
        self.target = check_non_negative("target", target)
        self.name = name or self.kind.replace("-", "_")

    def value(self, model, real, fake=None, seed=None):
        """The penalty for a critic `model` on `real` (and `fake` for WGAN-GP; `seed`: see
        `interpolate`)."""
        if self.kind == "r1":
            norms = input_gradient_norms(model, real)
            return self.weight / 2.0 * keras.ops.mean(keras.ops.square(norms))
        if fake is None:
            raise invalid("fake", "generated samples for kind='wgan-gp'", fake)
        norms = input_gradient_norms(model, interpolate(real, fake, seed))
        return self.weight * keras.ops.mean(keras.ops.square(norms - self.target))

    def __call__(self, context):
        fake, seed = None, context.seed
        if self.kind == "wgan-gp":
            flat = keras.tree.flatten(context.x)
            if keras.backend.backend() == "tensorflow":
                order = tf.random.shuffle(tf.range(tf.shape(flat[0])[0]))
                fake = keras.tree.pack_sequence_as(context.x, [tf.gather(t, order) for t in flat])
            else:
                first = keras.ops.convert_to_tensor(flat[0])
                order = keras.random.shuffle(keras.ops.arange(keras.ops.shape(first)[0]),
                                             seed=None if seed is None else _step_key(seed, 0))
                fake = keras.tree.pack_sequence_as(
                    context.x, [keras.ops.take(keras.ops.convert_to_tensor(t), order, axis=0) for t in flat])
                seed = None if seed is None else _step_key(seed, 1)
        return self.value(context.model, context.x, fake, seed)

    def get_config(self):
        return {"weight": self.weight, "kind": self.kind, "target": self.target, "name": self.name}


def check_penalties(penalties):
    """Validates the `penalties` argument; returns a tuple with unique names."""
    if penalties is None:
        return ()
    if isinstance(penalties, Penalty):
        penalties = [penalties]
    try:
        penalties = tuple(penalties)
    except TypeError:
        raise invalid("penalties", "a list of gradmon.penalties.Penalty", penalties) from None
    for p in penalties:
        if not isinstance(p, Penalty):
            raise invalid("penalties", "a list of gradmon.penalties.Penalty", penalties)
    names = [p.name for p in penalties]
    if len(set(names)) != len(names):
        raise invalid("penalties", "penalties with distinct names", names)
    return penalties


_REGISTRY = {cls.__name__: cls for cls in (WeightPenalty, GradientNormPenalty, InputGradientPenalty)}


def serialize(penalty):
    """`{"class_name": ..., "config": ...}` for a built-in penalty (a custom `include` filter is not kept)."""
    return {"class_name": type(penalty).__name__, "config": penalty.get_config()}


def deserialize(config):
    """Inverse of `serialize`."""
    cls = _REGISTRY.get(config.get("class_name"))
    if cls is None:
        raise invalid("config", f"a serialized gradmon penalty ({sorted(_REGISTRY)})", config)
    return cls.from_config(config["config"])
