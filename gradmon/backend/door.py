"""The optimizer's door on JAX and PyTorch: what gradmon's step needs from the framework.

On Keras' TensorFlow backend the observer runs as before (`tf.function`,
replica-local variables, `tf.cond`). On JAX and PyTorch the hooked
`optimizer.apply` (JAX: called by `stateless_apply` inside the jitted train
step; PyTorch: after `backward()`, under `no_grad`) runs the same pipeline
and statistics in `keras.ops`, and takes from the backend module
(`door_jax`, `door_torch`) only:

- `state_variable(initial, dtype, name)`: the recorder's state (JAX: made with
  the optimizer's `add_variable`, so it rides in the optimizer state that the
  jitted step carries, and is left out of the optimizer's saved variables);
- `weights(variables, pred)`: the pre-update weights a logged step needs;
- `cond(pred, true_fn, width)`: a value-returning conditional (JAX: `lax.cond`
  with pure branches, the assignment outside; PyTorch: a host branch);
- `read(variable)` / `assign(variable, value)`: host reads and writes
  (JAX: through the trainer's current state, see `door_jax`).
- `EAGER`: whether the hooked apply runs on the host (PyTorch: an observed
  custom loop writes as it goes; JAX: inside jit, except for an eager loop's
  `optimizer.apply`, told apart by `door_jax.on_host`).

Not yet (they raise): custom statistics
with state variables on JAX (their `build`), `GradientTransform` subclasses
not marked `keras_ops`, `keras.distribution` on PyTorch (Keras
implements it for JAX only). gradmon's state is saved with the model in Keras'
files there too (`gradmon.saving`); `tf.train.Checkpoint` is TensorFlow's.

What does not work there yet raises `NotImplementedError` naming the
backend and the feature (`check_supported`).
"""

import contextlib
import importlib

import keras

from gradmon.backend import lazy_tf

# per-group statistics the JAX / PyTorch door computes (the global numbers, clip ratio and
# fraction, counters and `no_gradient` come with them): every name `stats=` takes
SUPPORTED_STATS = ("norm", "max_abs", "rms", "zero_fraction", "nonfinite", "grad_to_weight", "update_ratio",
                   "moment_norm", "cosines")


def backend_name():
    return keras.backend.backend()


def current():
    """The door module of Keras' backend (`door_jax`, `door_torch`), `None` on TensorFlow."""
    name = backend_name()
    if name == "tensorflow":
        return None
    if name not in ("jax", "torch"):
        raise unsupported("observing gradients")
    return importlib.import_module(f"gradmon.backend.door_{name}")


def unsupported(feature):
    """The error for a gradmon feature that does not run on this backend yet."""
    return NotImplementedError(
        f"gradmon: {feature} is not supported on the {backend_name()!r} backend yet "
        f"(KERAS_BACKEND={backend_name()}); it works on the 'tensorflow' backend. "
        "On JAX and PyTorch gradmon observes `fit` (`gradmon.monitor(model)`, the mixin, "
        "`gradmon.GradientMonitor(log_dir)`) and `gradmon.observe` custom loops: the statistics "
        f"{list(SUPPORTED_STATS)}, custom statistics, histograms and the transforms "
        "clip_by_global_norm, clip_by_norm, "
        "clip_by_value, adaptive_clip, zclip, callables written in keras.ops, subclasses of "
        "GradientTransform marked `keras_ops = True`, and their chains (the optimizer's own "
        "clipping included); gradmon's penalties and noise scale (gradmon's own train step); "
        "the policies on_nonfinite='skip'/'stop' and on_spike; LossScaleOptimizer.")


def check_supported(observer, optimizer_clip=None, loss_scaled=False):
    """Raises `NotImplementedError` for what the JAX / PyTorch door does not do yet.

    Args:
        observer: the `gradmon.measure.observer.Observer`.
        optimizer_clip: the transform equal to the optimizer's own clipping, or `None`.
        loss_scaled: the optimizer is a `LossScaleOptimizer`.
    """
    settings = observer.settings
    stateful = [s for s in settings.custom if _has_state(s)]
    if stateful and backend_name() == "jax":
        raise unsupported(f"custom statistics with state variables (`build`) on JAX: {stateful}")
    for transform in (observer.transform, optimizer_clip):
        if transform is not None and not getattr(transform, "keras_ops", False):
            raise unsupported(f"the gradient transform {transform!r} (a GradientTransform subclass "
                              "not marked `keras_ops = True`: written for TensorFlow)")
    distribution = keras.distribution.distribution()
    if distribution is not None and backend_name() != "jax":
        # Keras implements keras.distribution for JAX only: its PyTorch `fit` runs on one device
        raise NotImplementedError(
            f"gradmon: keras.distribution is not supported on the {backend_name()!r} backend: Keras' "
            f"{backend_name()!r} backend does not implement it (its `fit` trains on one device, "
            "ignoring the distribution). Expected no distribution on this backend "
            "(`keras.distribution.set_distribution(None)`); use KERAS_BACKEND=jax for "
            "`keras.distribution.DataParallel` / `ModelParallel`, or a `tf.distribute` strategy "
            f"on 'tensorflow'. Received: keras.distribution.distribution()={distribution!r}")


def _has_state(statistic):
    """Whether a custom statistic makes state variables (its own `build`): on JAX its `compute`
    runs in a pure `lax.cond` branch, where assigning them is not possible."""
    for cls in type(statistic).__mro__:
        if cls.__module__ == "gradmon.measure.statistics":  # gradmon's base classes: no state
            return False
        if "build" in vars(cls):
            return True
    return False


@contextlib.contextmanager
def state_owner(optimizer):
    """Within it, `state_variable` makes the state of `optimizer`'s observer."""
    door = current()
    if door is None or not hasattr(door, "owner"):
        yield
        return
    with door.owner(optimizer):
        yield


def state_in_optimizer():
    """Whether gradmon's state rides in its optimizer's state (JAX): another optimizer's
    jitted step never carries it."""
    return backend_name() == "jax"


def is_tensorflow():
    return lazy_tf.is_tensorflow()
