"""The gradient pipeline: unscale -> (all-reduce) -> transform -> observe -> finiteness -> apply.

A small object, testable alone: it turns the gradients handed to an
optimizer into what gradmon measures and what the optimizer applies, and
decides whether the update may run. It knows nothing of callbacks, writers
or Keras models; `gradmon.observer` runs it at the optimizer's door.

- **unscale**: gradients reach the optimizer multiplied by the loss scale
  (a `LossScaleOptimizer`'s dynamic scale, or `loss_scale_factor`);
  statistics and transforms see true gradients.
- **all-reduce**: under a `tf.distribute` strategy the replicas' gradients
  are summed once, here; the optimizer is then told not to sum them again
  (one all-reduce per step, as in plain training).
- **transform**: the user's transform acts on the unscaled (global) gradient;
  without one, the optimizer gets the very tensors it was given (no
  observer effect).
- **observe**: what the optimizer will apply, its own `clipnorm` /
  `global_clipnorm` / `clipvalue` included ("transformed").
- **finiteness**: judged on what the optimizer would apply (after the
  transform: a transform can make NaN of a finite gradient, e.g. 0 / ||0||),
  on every step (`finite_applied`; the observer counts the non-finite ones).
  Under a `LossScaleOptimizer`, a non-finite gradient at a loss scale above 1
  is a loss-scale overflow, the optimizer's business (it skips the step and
  lowers its scale); other non-finite gradients are subject to the policy:
  `"warn"` applies them as Keras would, `"skip"` and `"stop"` refuse the
  update (`"stop"` refuses every later one too).
- **spikes** (opt-in, `on_spike`): a finite raw global norm whose z-score
  against the recent norms exceeds the threshold (`gradmon.spikes`, judged
  by the observer) is refused by `"skip"` and `"stop"` as a non-finite one
  is; `"warn"` applies it.
"""

import functools

import keras
import numpy as np

from gradmon.backend import lazy_tf as _lazy_tf
from gradmon.backend import distribute as _distribute, keras_compat as _keras_compat
from gradmon.measure import transforms
from gradmon._validation import check_choice, invalid

tf = _lazy_tf.tensorflow()

NONFINITE_POLICIES = ("warn", "skip", "stop")
SPIKE_POLICIES = (None, "warn", "skip", "stop")


def multiplied(gradient, factor):
    """`gradient * factor` for tensors and `tf.IndexedSlices`; `None` stays `None`."""
    if gradient is None:
        return None
    if not _lazy_tf.is_tensorflow():  # JAX / PyTorch: dense
        return gradient * keras.ops.cast(factor, gradient.dtype)
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values * tf.cast(factor, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient * tf.cast(factor, gradient.dtype)


def divided(gradient, divisor):
    """`gradient / divisor` for tensors and `tf.IndexedSlices`; `None` stays `None`."""
    if gradient is None:
        return None
    if not _lazy_tf.is_tensorflow():  # JAX / PyTorch: dense
        return gradient / keras.ops.cast(divisor, gradient.dtype)
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values / tf.cast(divisor, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient / tf.cast(divisor, gradient.dtype)


def _entries(g):
    return g.values if isinstance(g, tf.IndexedSlices) else g


def _exactly_finite(present):
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in present]))


def all_finite(gradients):
    """Scalar bool: no NaN/inf entry in any gradient.

    In a compiled step, one sum per gradient: a sum is finite only if every
    entry is (NaN and inf propagate); only when the total is not (a NaN, an
    inf, or finite entries whose sum overflows) are the entries checked one by
    one, in a branch not run otherwise. Eagerly the exact check (no
    device-to-host read for a branch).
    """
    if not _lazy_tf.is_tensorflow():  # JAX / PyTorch: exact, dense
        present = [g for g in gradients if g is not None]
        if not present:
            return keras.ops.convert_to_tensor(True)
        if keras.backend.backend() == "torch":
            return _all_finite_torch(present)
        # JAX: the largest magnitude of each, finite exactly when all its entries are (XLA's
        # max propagates a NaN): one fused reduction reading the gradient, where `isfinite`
        # wrote a full boolean array per gradient and reduced it
        largest = [keras.ops.max(keras.ops.abs(g)) for g in present if int(np.prod(g.shape))]
        if not largest:
            return keras.ops.convert_to_tensor(True)
        return keras.ops.all(keras.ops.isfinite(keras.ops.stack(largest)))  # stacked in the widest dtype
    present = [_entries(g) for g in gradients if g is not None]
    if not present:
        return tf.constant(True)
    if tf.executing_eagerly():
        return _exactly_finite(present)
    sums = [tf.cast(tf.reduce_sum(g), tf.float32) for g in present]
    total = sums[0] if len(sums) == 1 else tf.add_n(sums)
    return _keras_compat.lazy_cond(tf.math.is_finite(total), lambda: tf.constant(True),
                                   lambda: _exactly_finite(present))


def _all_finite_torch(present):
    """PyTorch's eager step: the largest and the smallest entry of each gradient, finite
    exactly when all its entries are (a NaN propagates into both, an inf into one), without
    the full boolean tensor per gradient that `isfinite` writes (on CPU about eight times
    dearer), and without a sum that finite entries could overflow."""
    import torch

    ends = [end for g in present if g.numel() for end in (torch.amax(g), torch.amin(g))]
    if not ends:
        return torch.tensor(True)
    dtypes = {t.dtype for t in ends}
    if len(dtypes) > 1:  # stacked in the widest: a finite entry stays finite
        widest = functools.reduce(torch.promote_types, dtypes)
        ends = [t.to(widest) for t in ends]
    return torch.isfinite(torch.stack(ends)).all()


class Prepared:
    """The pipeline's output for one step (tensors).

    Attributes:
        raw: unscaled (all-reduced) gradients: what is measured as "raw".
        observed: what the optimizer applies, unscaled: measured as "transformed".
        fractions: `{member: clip fraction}` of the transform and the optimizer's clipping.
        to_apply: what to hand to the optimizer (scaled as it expects).
        scale: the loss scale of this step (float32 scalar) or `None`.
    """

    def __init__(self, raw, observed, fractions, to_apply, scale):
        self.raw, self.observed, self.fractions = raw, observed, fractions
        self.to_apply, self.scale = to_apply, scale


class Verdict:
    """Whether this step's update runs. `finite`, `overflow`, `refused`, `apply`: bool scalars.

    `spike`: the raw norm was a spike (`None` when spikes are not tracked);
    `halts`: this step stops every later update (a `"stop"` policy's event;
    `None` under no `"stop"` policy);
    `skipped`: the update does not happen (refused here, or skipped by a
    `LossScaleOptimizer` for its non-finite gradient).
    """

    def __init__(self, finite, overflow, refused, may_refuse, spike=None, halts=None, loss_scaled=False):
        self.finite, self.overflow, self.refused = finite, overflow, refused
        self.apply = keras.ops.logical_not(refused)
        self.skipped = keras.ops.logical_or(refused, keras.ops.logical_not(finite)) if loss_scaled else refused
        # False: the update always reaches the optimizer (which may skip it itself)
        self.may_refuse = may_refuse
        self.spike, self.halts = spike, halts


class GradientPipeline:
    """unscale -> (all-reduce) -> transform -> observe -> finiteness.

    Args:
        transform: a `gradmon.transforms` transform, a callable
            `(grads, params) -> grads`, or `None`. Defaults to `None`.
        on_nonfinite: `"warn"`, `"skip"` or `"stop"`. Defaults to `"warn"`.
        on_spike: `None` (spikes not tracked), `"warn"`, `"skip"` or `"stop"`.
            Defaults to `None`.
    """

    def __init__(self, transform=None, on_nonfinite="warn", on_spike=None):
        self.transform = None if transform is None else transforms.as_transform(transform)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        if on_spike is not None and (not isinstance(on_spike, str) or on_spike not in SPIKE_POLICIES):
            raise invalid("on_spike", f"None or one of {list(SPIKE_POLICIES[1:])}", on_spike)
        self.on_spike = on_spike

    @property
    def stops(self):
        """Whether a policy is `"stop"` (a step may refuse every later one)."""
        return "stop" in (self.on_nonfinite, self.on_spike)

    def observed_transform(self, optimizer_clip):
        """The user's transform followed by the optimizer's own clipping, as one, or `None`."""
        members = [t for t in (self.transform, optimizer_clip) if t is not None]
        if not members:
            return None
        return members[0] if len(members) == 1 else transforms.chain(*members)

    def prepare(self, gradients, variables, scale=None, optimizer_clip=None):
        """Runs unscale, all-reduce, transform and observe on one step's gradients.

        Args:
            gradients: what reached the optimizer (this replica's, scaled).
            variables: the variables, parallel to `gradients`.
            scale: the loss scale the gradients carry, or `None`.
            optimizer_clip: the transform equal to the optimizer's own clipping, or `None`.

        Returns:
            A `Prepared`.
        """
        reduced = _distribute.all_reduce_sum(gradients)
        if scale is not None:
            scale = tf.cast(scale, tf.float32) if _lazy_tf.is_tensorflow() else _scale_value(scale)
        raw = reduced if scale is None else [divided(g, scale) for g in reduced]
        transformed, fractions, to_apply = raw, {}, reduced
        if self.transform is not None:
            transformed, fractions = self._run_transform(raw, variables)
            to_apply = transformed if scale is None else [multiplied(g, scale) for g in transformed]
        observed = transformed
        if optimizer_clip is not None:
            observed, more = optimizer_clip(transformed, variables)
            fractions = transforms.merge_fractions(fractions, more)
        return Prepared(raw, observed, fractions, to_apply, scale)

    def _run_transform(self, raw, variables):
        result = self.transform(list(raw), list(variables))
        if not isinstance(result, tuple) or len(result) != 2 or result[0] is None:
            raise invalid("transform", "a transform returning (gradients, fractions), "
                          "one gradient per variable", self.transform)
        transformed, fractions = list(result[0]), dict(result[1])
        if len(transformed) != len(raw):
            raise invalid("transform", f"a transform returning {len(raw)} gradients "
                          f"(one per variable), got {len(transformed)}", self.transform)
        transforms.check_like(getattr(self.transform, "name", repr(self.transform)), raw, transformed,
                              variables)
        return transformed, fractions

    @staticmethod
    def finite_applied(prepared):
        """Bool scalar: what the optimizer gets (after the transform, scaled as it expects) is
        finite. One sum per gradient (`all_finite`)."""
        return all_finite(prepared.to_apply)

    def verdict(self, prepared, loss_scaled=False, halted=None, spike=None):
        """Decides the update from the finiteness of what would be applied (after the
        transform) and the raw gradient's spike verdict.

        Args:
            prepared: this step's `Prepared`.
            loss_scaled: the optimizer is a `LossScaleOptimizer`.
            halted: bool scalar, a previous step stopped training (`"stop"`), or `None`.
            spike: bool scalar, the raw norm is a spike (`gradmon.spikes`), or `None`
                when spikes are not tracked.

        Returns:
            A `Verdict`, or `None` when nothing needs deciding (policy `"warn"`
            without loss scaling or spikes: the step is applied as Keras would).
        """
        refuses_spikes = spike is not None and self.on_spike in ("skip", "stop")
        if self.on_nonfinite == "warn" and not loss_scaled and not refuses_spikes:
            return None  # on_spike="warn" refuses nothing: the tracker counts its spikes
        ops = keras.ops
        finite = self.finite_applied(prepared)
        overflow = ops.convert_to_tensor(False)
        if loss_scaled:
            overflow = ops.logical_and(ops.logical_not(finite), prepared.scale > 1.0)
        refused, halts = ops.convert_to_tensor(False), None
        if self.on_nonfinite != "warn":
            refused = ops.logical_and(ops.logical_not(finite), ops.logical_not(overflow))
            if self.on_nonfinite == "stop":
                halts = refused
        if refuses_spikes:
            refused = ops.logical_or(refused, spike)
            if self.on_spike == "stop":
                halts = spike if halts is None else ops.logical_or(halts, spike)
        if halted is not None:
            refused = ops.logical_or(refused, halted)
        return Verdict(finite, overflow, refused, self.on_nonfinite != "warn" or refuses_spikes,
                       spike, halts, loss_scaled)


def _scale_value(scale):
    """The loss scale of this step as a float32 value of its own (JAX / PyTorch): a
    `LossScaleOptimizer`'s update changes its `dynamic_scale` in place on PyTorch."""
    value = keras.ops.cast(keras.ops.convert_to_tensor(scale), "float32")
    return keras.ops.copy(value) if keras.backend.backend() == "torch" else value


def apply_unless_refused(verdict, apply, variables, door):
    """Runs the optimizer update `apply()` on JAX / PyTorch as `verdict` says.

    PyTorch (`door.EAGER`): a host branch, the update runs or not. JAX (inside
    the jitted step, no branch around an update): the update runs, then each
    variable it changed (the weights, the optimizer's slots and iteration count)
    gets `where(apply, new, old)`: a refused step leaves every one as it was.

    Args:
        verdict: this step's `Verdict`, or `None` (nothing to decide: the update runs).
        apply: the update, `() -> None`.
        variables: every variable the update may change (the weights and the optimizer's).
        door: the backend's door module (`gradmon.backend.door`).
    """
    if verdict is None or not verdict.may_refuse:
        apply()
        return
    if door.EAGER:
        if bool(verdict.apply):
            apply()
        return
    before = [(v, v.value) for v in variables]
    apply()
    for v, old in before:
        new = v.value
        if new is not old:  # the scope returns the same array for a variable left alone
            v.assign(keras.ops.where(verdict.apply, new, old))
