"""Everything gradmon needs from Keras (and TensorFlow) that is not public API, in one place.

Public equivalents are used where they exist (`keras.tree`,
`keras.utils.unpack_x_y_sample_weight`); what remains private is named here,
with the Keras behaviour it relies on, so that a Keras upgrade breaks one
module, not seven. Read from keras 3.15.
"""

import keras
import numpy as np
from keras.src.losses import loss as _loss_module
from keras.src.models.functional import Functional  # noqa: F401  (re-exported)

tree = keras.tree
unpack_x_y_sample_weight = keras.utils.unpack_x_y_sample_weight
scale_loss_for_distribution = _loss_module.scale_loss_for_distribution
unscale_loss_for_distribution = _loss_module.unscale_loss_for_distribution


def compile_arguments(model):
    """The arguments `model.compile` was called with (the very objects), or `None` if not compiled.

    Keras 3 keeps them in `Trainer._compile_config.config` (optimizer,
    loss, loss_weights, metrics, weighted_metrics, run_eagerly,
    steps_per_execution, jit_compile); the optimizer is taken as the model
    holds it (an instance, wrapped in a `LossScaleOptimizer` under
    `mixed_float16`), so its state carries over.
    """
    config = getattr(model, "_compile_config", None)
    if not getattr(model, "compiled", False) or config is None:
        return None
    arguments = dict(config.config)
    arguments["optimizer"] = model.optimizer
    return arguments


def is_loss_scale_optimizer(optimizer):
    """Keras' `LossScaleOptimizer` (dynamic loss scaling for mixed precision)."""
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def base_optimizer(optimizer):
    """The optimizer that owns the update rule and the clipping arguments."""
    return optimizer.inner_optimizer if is_loss_scale_optimizer(optimizer) else optimizer


def updates_before(optimizer):
    """How many updates `optimizer` was given before gradmon saw it (its `iterations`), read on
    the host from the variable's stored value (inside a traced step `value` is the trace's), or
    0 when it cannot be read."""
    iterations = getattr(base_optimizer(optimizer), "iterations", None)
    stored = getattr(iterations, "_value", iterations)  # a Keras variable's backend value
    try:
        return max(0, int(np.asarray(stored.numpy() if hasattr(stored, "numpy") else stored)))
    except Exception:  # noqa: BLE001 -- e.g. a value only a trace holds: start at 0, as before
        return 0


def loss_scale(optimizer):
    """The factor `optimizer.scale_loss` multiplies the loss by, or `None`.

    A `LossScaleOptimizer`'s `dynamic_scale` (a variable, read when the step
    runs) or a plain optimizer's `loss_scale_factor`.
    """
    if optimizer is None:
        return None
    if is_loss_scale_optimizer(optimizer):
        return optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
    return getattr(optimizer, "loss_scale_factor", None)


def is_tensorflow_backend():
    return keras.backend.backend() == "tensorflow"


def is_keras_train_step(function):
    """Whether `function` is Keras' own `train_step` (its backend's trainer's)."""
    import importlib

    name = keras.backend.backend()
    trainer = {"tensorflow": "TensorFlowTrainer", "jax": "JAXTrainer", "torch": "TorchTrainer"}.get(name)
    module = importlib.import_module(f"keras.src.backend.{name}.trainer")
    return trainer is not None and function is getattr(module, trainer).train_step


def model_train_step_is_keras(model):
    """Whether `model` trains with Keras' own `train_step` (not an override)."""
    return is_keras_train_step(type(model).train_step)


def call_with_training(model, x):
    """`model(x, training=True)` where its `call` takes `training`."""
    return model(x, training=True) if model._call_has_training_arg else model(x)


def compute_loss(model, x, y, y_pred, sample_weight, training=True):
    """The compiled loss with regularization losses, as Keras' `train_step` computes it
    (`_compute_loss`, which also handles a `compute_loss` override without `training`)."""
    compute = getattr(model, "_compute_loss", None) or model.compute_loss
    return compute(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)


def track_loss(model, loss, x):
    """Updates the model's loss tracker as Keras' `train_step` does (unscaled per replica)."""
    import tensorflow as tf  # imported where used: the Hessian side imports this module on JAX / PyTorch

    batch = next(i for i in tree.flatten(x) if i is not None)
    model._loss_tracker.update_state(unscale_loss_for_distribution(loss),
                                     sample_weight=tf.shape(batch)[0])


def functional_structure(model):
    """`(inputs, outputs)` structures to rebuild a functional model, or `(None, None)`."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        return None, None
    if not inputs or not outputs:
        return None, None
    if isinstance(model, keras.Sequential):
        return inputs[0], outputs[0]
    return model._inputs_struct, model._outputs_struct


def own_variables(model):
    """The variables `save_own_variables` stores for a model (its own, not its layers')."""
    return model._trainable_variables + model._non_trainable_variables


def skip_optimizer_all_reduce(optimizer):
    """From now on, `optimizer.apply` does not all-reduce the gradients it is given.

    Under a `tf.distribute` strategy Keras' TensorFlow optimizer sums the
    replicas' gradients in `_all_reduce_sum_gradients`, inside `apply`. An
    observed optimizer's gradients reach it through gradmon's pipeline, which
    all-reduces them first (to measure the global gradient): a second
    all-reduce would double the traffic and the gradient. Set on the instance
    for good (replicas trace `apply` in parallel threads, so a temporary
    switch would race).
    """
    object.__setattr__(base_optimizer(optimizer), "_all_reduce_sum_gradients",
                       lambda grads_and_vars: list(grads_and_vars))


def restore_optimizer_all_reduce(optimizer):
    base_optimizer(optimizer).__dict__.pop("_all_reduce_sum_gradients", None)


def optimizer_variables(optimizer):
    """The trainable variables a built optimizer updates (`apply(grads)` without variables)."""
    return list(optimizer._trainable_variables)


def optimizer_slot(optimizer, slot, variable):
    """An optimizer's per-variable slot, e.g. Adam's `"momentums"` / `"velocities"`.

    For user statistics (see docs/ARCHITECTURE.md, "How to add a statistic").
    """
    optimizer = base_optimizer(optimizer)
    slots = getattr(optimizer, f"_{slot}", None)
    if slots is None:  # SGD keeps its momentum buffers public (`momentums`)
        slots = getattr(optimizer, slot, None) if slot == "momentums" else None
    if slots is None:
        raise ValueError(
            f"Invalid value for argument `slot`. Expected a slot of {type(optimizer).__name__}. "
            f"Received: slot={slot!r}")
    return slots[optimizer._get_variable_index(variable)]


def moment_slots(optimizer):
    """The optimizer's moment slots, from its class and configuration (before it is built).

    Returns:
        `{"first_moment": (slot, sign), "second_moment": (slot, squared)}` with only the
        moments the optimizer keeps. `slot` is for `optimizer_slot`; `sign` turns the first
        moment into the gradient's direction (-1 for SGD, whose buffer holds -lr x the running
        sum); `squared` says the slot holds squared gradients (Adamax's `u` does not).
        Slot names read from keras 3.15's `build` methods.
    """
    o = base_optimizer(optimizer)
    k = keras.optimizers
    if isinstance(o, (k.Adam, k.Nadam, k.Lamb)):  # AdamW is an Adam
        return {"first_moment": ("momentums", 1.0), "second_moment": ("velocities", True)}
    if isinstance(o, k.Adamax):
        return {"first_moment": ("m", 1.0), "second_moment": ("u", False)}
    if isinstance(o, k.Lion):
        return {"first_moment": ("momentums", 1.0)}
    if isinstance(o, k.RMSprop):
        first = {"first_moment": ("momentums", 1.0)} if o.momentum > 0 else {}
        return dict(first, second_moment=("velocities", True))
    if isinstance(o, k.Adagrad):
        return {"second_moment": ("accumulators", True)}
    if isinstance(o, k.SGD):
        return {"first_moment": ("momentums", -1.0)} if o.momentum != 0 else {}
    return {}


def lazy_cond(pred, true_fn, false_fn):
    """`tf.cond` whose branches run as function calls, only the branch taken.

    `tf.cond` inside a `tf.function` is lowered to Switch/Merge: the ops of
    the branch not taken are still visited by the executor (dead tensors
    propagate through each), which costs every unlogged step in proportion to
    the size of the measurement branch. An `If` kept functional
    (`lower_using_switch_merge=False`, TensorFlow's `cond_v2.indexed_case`)
    costs one op. Eagerly, it is a Python branch.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return true_fn() if bool(pred) else false_fn()
    from tensorflow.python.ops import cond_v2

    index = tf.cast(pred, tf.int32)  # 0: false, 1: true
    return cond_v2.indexed_case(index, [false_fn, true_fn], lower_using_switch_merge=False)


def serialize_as(plain):
    """Class decorator: instances of the class (a registered gradmon model class) are saved
    under `plain`'s name, so that their files open without gradmon.

    Keras 3.15 writes a class's `__module__` and `__name__` into the saved config
    (`serialization_lib.serialize_with_public_class`) next to its registered name, and
    `_retrieve_class_or_fn` looks the registered name up first: with gradmon imported it
    finds `cls`; without, it imports the `keras.*` module named and takes `plain` from it.
    """
    def decorate(cls):
        # `__qualname__` stays gradmon's: `type(model)` reads e.g. `...functional._MonitoredFunctional`
        cls.__module__, cls.__name__ = plain.__module__, plain.__name__

        def __reduce__(self):
            # Keras pickles a model as its saved bytes and `cls._unpickle_model`, a reference
            # to the class by module and qualname, which this renamed class cannot be found
            # by: `plain`'s loads the same bytes (the monitored model where gradmon is imported)
            _, arguments = super(cls, self).__reduce__()
            return plain._unpickle_model, arguments

        cls.__reduce__ = __reduce__
        return cls

    return decorate


def track_for_checkpoint(model, name, trackable):
    """Makes `trackable` a dependency `name` of `model` for `tf.train.Checkpoint` (Keras 3's
    TensorFlow layers are `AutoTrackable`s: `_track_trackable` is what attribute assignment
    does for a `Trackable`)."""
    model._track_trackable(trackable, name=name, overwrite=True)


def cloning_source(max_depth=12):
    """The model `keras.models.clone_model` is cloning, when called from inside it, else `None`.

    Keras 3.15's `_clone_functional_model(model, ...)` builds the clone with
    `model.__class__(inputs, outputs, name=model.name)`, and `clone_model(model)`
    of a custom class goes through `get_config` / `from_config`: the settings gradmon
    keeps outside the config (a plain-callable transform, custom statistics) do not
    reach the new instance. The source is the innermost such frame's `model`.
    """
    import sys

    from keras.src.models import cloning

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_code.co_name in ("_clone_functional_model", "clone_model") and \
                frame.f_code.co_filename == cloning.__file__:
            return frame.f_locals.get("model")
        frame = frame.f_back
    return None


def variable_value(variable):
    """The current value of a Keras variable (`.value`, a property) or of a plain `tf.Variable`
    (where `value` is a method), as a tensor."""
    if isinstance(variable, keras.Variable):
        return variable.value
    import tensorflow as tf

    return variable.read_value() if hasattr(variable, "read_value") else tf.convert_to_tensor(variable)
