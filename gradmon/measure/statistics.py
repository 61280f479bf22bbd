"""Statistics as plug-ins: each declares its tags and computes from a `StepContext`.

A statistic is a small object (in the spirit of Cockpit's quantities and
`optax.monitor`) with:

- `name`: what `stats=` selects it by (`None`: always on);
- `labels(spec)`: one value per label (`[""]` for a global number, the group
  names for a per-group one, ...); the record layout, the host-side parsing
  and the written tags all follow from these;
- `tag(label)` (built with `gradmon.tags`) and `description(label)`: Markdown written
  with the tag's first value; by default `gradmon.tags.describe(tag(label))`, where
  every built-in tag is described (a user's statistic gives its own);
- `active(spec)`: whether it applies to this configuration;
- `compute(ctx)`: a float vector with one entry per label, inside the
  compiled step, on logged steps only;
- optionally `needs_weights` (pre-update weights in `ctx.weights_before`),
  `needs_update` (post-update weights in `ctx.weights_after`) and `chart`
  (`(category, title)` for the custom-scalars layout).

`default_statistics()` lists the built-ins; users pass their own in `stats=`.
"""

import keras

from gradmon.backend import lazy_tf as _lazy_tf
from gradmon.backend import keras_compat as _keras_compat
from gradmon.measure import moments as _stats
from gradmon import tags

tf = _lazy_tf.tensorflow()
# JAX / PyTorch (`gradmon.backend.door`): the statistics it supports compute in `keras.ops`
_OPS = not _lazy_tf.is_tensorflow()

GROUP_STATS = tags.GROUP_STATS
# Names `stats=` selects among (per group); global numbers are always written.
STAT_NAMES = GROUP_STATS + ("grad_to_weight", "update_ratio", "moment_norm", "cosines")
# What `stats=None` computes: few enough tags to browse on a big model (with the default
# per-layer grouping, ~200 tags and ~16 KB per logged step on MobileNetV2); `stats="all"`
# for every statistic.
DEFAULT_STATS = ("norm", "update_ratio")


class Spec:
    """What the statistics of one observed optimizer are computed over (host side, static).

    Attributes:
        groups: group names (variables or layers), distinct as tags.
        segment_ids: the group of each variable.
        has_transform: whether a transform or the optimizer's own clipping is active.
        fraction_names: the transform members' names (clip fractions).
        loss_scaled: whether the optimizer is a `LossScaleOptimizer`.
        penalty_names: gradmon penalties of the model's own step.
        noise_scale: whether the model's own step estimates the noise scale.
        moment_slots: the optimizer's moment slots (`_keras_compat.moment_slots`).
    """

    def __init__(self, groups, segment_ids, has_transform=False, fraction_names=(),
                 loss_scaled=False, penalty_names=(), noise_scale=False, full_moments=True,
                 moment_slots=None):
        self.groups = list(groups)
        self.segment_ids = list(segment_ids)
        self.has_transform = has_transform
        self.fraction_names = list(fraction_names)
        self.loss_scaled = loss_scaled
        self.penalty_names = list(penalty_names)
        self.noise_scale = noise_scale
        # whether any statistic needs more than the sum of squares (max, zeros, non-finite per group)
        self.full_moments = full_moments
        self.moment_slots = dict(moment_slots or {})

    @property
    def num_groups(self):
        return len(self.groups)


class StepContext:
    """What a statistic may read on a logged step (tensors; inside the compiled step).

    Attributes:
        spec: the `Spec`.
        raw: unscaled gradients (all-reduced under a strategy), `None` where absent.
        transformed: what the optimizer applies (after the transform and its own clipping).
        fractions: `{member: clip fraction}` of the transform.
        variables: the trainable variables, parallel to the gradients.
        optimizer: the observed optimizer.
        weights_before / weights_after: values around the update, or `None`.
        skipped: bool scalar, the update of this step was not applied.
        extras: numbers from gradmon's own train step (`"penalties"`, `"noise"`).
        counters: `{name: int64 scalar}` cumulative counters (`"skipped"`, `"nonfinite"`,
            `"overflow"`).
        state: `{statistic: its variables}` from `Statistic.build`.
    """

    def __init__(self, spec, raw, transformed, fractions, variables, optimizer, skipped,
                 weights_before=None, weights_after=None, extras=None, counters=None, state=None):
        self.spec, self.raw, self.transformed, self.fractions = spec, raw, transformed, fractions
        self.variables, self.optimizer, self.skipped = variables, optimizer, skipped
        self.weights_before, self.weights_after = weights_before, weights_after
        self.extras, self.counters, self.state = extras or {}, counters or {}, state or {}
        self._moments = {}

    def gradients(self, kind):
        return self.raw if kind == tags.RAW else self.transformed

    def moments(self, kind):
        """`[groups, stats.NUM_MOMENTS]` of the raw / transformed gradients, computed once."""
        if kind == tags.TRANSFORMED and not self.spec.has_transform:
            kind = tags.RAW  # the very same tensors: never computed twice
        if kind not in self._moments:
            self._moments[kind] = _stats.grouped_moments(
                self.gradients(kind), self.spec.segment_ids, self.spec.num_groups)
        return self._moments[kind]

    def sumsq(self, kind):
        """Per-group sum of squares: from the moments when those are needed anyway, else alone
        (one reduction per variable instead of five)."""
        if kind == tags.TRANSFORMED and not self.spec.has_transform:
            kind = tags.RAW
        if self.spec.full_moments or kind in self._moments:
            return self.moments(kind)[:, _stats.SUMSQ]
        key = ("sumsq", kind)
        if key not in self._moments:
            self._moments[key] = _stats.grouped_squared_norms(
                self.gradients(kind), self.spec.segment_ids, self.spec.num_groups)
        return self._moments[key]

    def global_norm(self, kind):
        return keras.ops.sqrt(keras.ops.sum(self.sumsq(kind)))

    def nonfinite_total(self, kind):
        if self.spec.full_moments:
            return keras.ops.sum(self.moments(kind)[:, _stats.NONFINITE])
        return _stats.count_nonfinite(self.gradients(kind), keras.ops.sum(self.sumsq(kind)))

    def weight_norms(self):
        """Per-group ||w|| before the update (computed once)."""
        if "weights" not in self._moments:
            self._moments["weights"] = keras.ops.sqrt(_stats.grouped_squared_norms(
                self.weights_before, self.spec.segment_ids, self.spec.num_groups))
        return self._moments["weights"]

    def deltas(self):
        """Per variable: w_after - w_before of this step (computed once)."""
        if "deltas" not in self._moments:
            self._moments["deltas"] = [a - b for a, b in zip(self.weights_after, self.weights_before)]
        return self._moments["deltas"]

    def delta_sumsq(self):
        """Per-group ||w_after - w_before||^2 (computed once)."""
        if "delta_sumsq" not in self._moments:
            self._moments["delta_sumsq"] = _stats.grouped_squared_norms(
                self.deltas(), self.spec.segment_ids, self.spec.num_groups)
        return self._moments["delta_sumsq"]


def undefined_ratio(numerator, denominator):
    """`numerator / denominator`, NaN where the denominator is 0 (undefined, not 0)."""
    return keras.ops.where(denominator > 0, keras.ops.divide_no_nan(numerator, denominator), float("nan"))


class Statistic:
    """Base class of a statistic; see the module docstring."""

    name = None
    needs_weights = False
    needs_update = False
    chart = None

    def active(self, spec):
        return True

    def labels(self, spec):
        return [""]

    def tag(self, label):
        raise NotImplementedError

    def description(self, label):
        """The tag's description (Markdown), written with its first value."""
        return tags.describe(self.tag(label))

    def build(self, spec):
        """Creates state variables (outside any tf.function); returns them or `None`."""
        return None

    def compute(self, ctx):
        raise NotImplementedError


class PerGroup(Statistic):
    """A statistic with one number per group (variable or layer)."""

    def labels(self, spec):
        return spec.groups


# -- gradient statistics of the raw and the transformed gradient -------------

class GradientMoment(PerGroup):
    """`norm`, `max_abs`, `rms`, `zero_fraction` or `nonfinite` of one kind of gradient."""

    def __init__(self, stat, kind):
        self.name, self.kind = stat, kind
        if stat == "norm":
            self.chart = ("Gradients", f"per-layer {kind} norms")

    def active(self, spec):
        return self.kind == tags.RAW or spec.has_transform

    def tag(self, label):
        return tags.group_stat(self.kind, self.name, label)

    def compute(self, ctx):
        if self.name == "norm":
            return keras.ops.sqrt(ctx.sumsq(self.kind))
        column = GROUP_STATS.index(self.name)
        return _stats.finalize(ctx.moments(self.kind))[:, column]


class GradToWeight(PerGroup):
    name = "grad_to_weight"
    needs_weights = True
    chart = ("Gradients", "gradient / weight ratio")

    def tag(self, label):
        return tags.grad_to_weight(label)

    def compute(self, ctx):
        return undefined_ratio(keras.ops.sqrt(ctx.sumsq(tags.RAW)),
                               ctx.weight_norms())


class UpdateRatio(PerGroup):
    name = "update_ratio"
    needs_weights = needs_update = True
    chart = ("Gradients", "update / weight ratio")

    def tag(self, label):
        return tags.update_ratio(label)

    def compute(self, ctx):
        return undefined_ratio(keras.ops.sqrt(ctx.delta_sumsq()),
                               ctx.weight_norms())


# -- global numbers -----------------------------------------------------------

class _OfKind(Statistic):
    """A global number of the raw or the transformed gradient (the latter only when
    something transforms it)."""

    def __init__(self, kind):
        self.kind = kind

    def active(self, spec):
        return self.kind == tags.RAW or spec.has_transform


class GlobalNorm(_OfKind):
    chart = ("Gradients", "global norm: raw vs transformed")

    def tag(self, label):
        return tags.global_norm(self.kind)

    def compute(self, ctx):
        return keras.ops.reshape(ctx.global_norm(self.kind), [1])


class NonfiniteTotal(_OfKind):
    def __init__(self, kind):
        super().__init__(kind)
        if kind == tags.RAW:
            self.chart = ("Gradients", "non-finite entries and skipped steps")

    def tag(self, label):
        return tags.nonfinite_total(self.kind)

    def compute(self, ctx):
        return keras.ops.reshape(ctx.nonfinite_total(self.kind), [1])


class ClipRatio(Statistic):
    chart = ("Gradients", "clip ratio and clip fraction")

    def active(self, spec):
        return spec.has_transform

    def tag(self, label):
        return tags.CLIP_RATIO

    def compute(self, ctx):
        raw, out = ctx.global_norm(tags.RAW), ctx.global_norm(tags.TRANSFORMED)
        ratio = keras.ops.where(raw > 0, keras.ops.divide_no_nan(out, raw), 1.0)
        # a skipped step was not clipped: nothing was applied
        return keras.ops.reshape(keras.ops.where(ctx.skipped, 1.0, ratio), [1])


class ClipFraction(Statistic):
    """The largest member's clip fraction, and each member's when there are several."""

    chart = ("Gradients", "clip ratio and clip fraction")

    def active(self, spec):
        return spec.has_transform and bool(spec.fraction_names)

    def labels(self, spec):
        names = spec.fraction_names
        return [""] + (names if len(names) > 1 else [])

    def tag(self, label):
        return tags.clip_fraction_of(label) if label else tags.CLIP_FRACTION

    def compute(self, ctx):
        values = keras.ops.stack([keras.ops.cast(ctx.fractions[n], "float32")
                                  for n in ctx.spec.fraction_names])
        values = keras.ops.where(ctx.skipped, keras.ops.zeros_like(values), values)
        members = [values] if len(ctx.spec.fraction_names) > 1 else []
        return keras.ops.concatenate([keras.ops.reshape(keras.ops.max(values), [1])] + members, 0)


class NoGradient(Statistic):
    def tag(self, label):
        return tags.NO_GRADIENT

    def compute(self, ctx):
        return keras.ops.convert_to_tensor([float(sum(g is None for g in ctx.raw))], "float32")


class Counter(Statistic):
    """A cumulative step counter kept by the pipeline (`skipped`, `nonfinite`, `overflow`)."""

    def __init__(self, counter, tag, loss_scaled_only=False):
        self.counter, self._tag, self.loss_scaled_only = counter, tag, loss_scaled_only
        self.chart = ("Gradients", "non-finite entries and skipped steps")

    def active(self, spec):
        return spec.loss_scaled or not self.loss_scaled_only

    def tag(self, label):
        return self._tag

    def compute(self, ctx):
        return keras.ops.reshape(keras.ops.cast(ctx.counters[self.counter], "float32"), [1])


class LossScale(Statistic):
    chart = ("Gradients", "loss scale (mixed precision)")

    def active(self, spec):
        return spec.loss_scaled

    def tag(self, label):
        return tags.LOSS_SCALE

    def compute(self, ctx):
        return keras.ops.reshape(keras.ops.cast(ctx.extras["loss_scale"], "float32"), [1])


# -- numbers of gradmon's own train step (they need the loss) -----------------

class Losses(Statistic):
    """`loss/data` and `loss/total` when gradmon penalties are added to the loss."""

    chart = ("Penalties", "data vs total loss")

    def active(self, spec):
        return bool(spec.penalty_names)

    def labels(self, spec):
        return ["data", "total"]

    def tag(self, label):
        return tags.LOSS_DATA if label == "data" else tags.LOSS_TOTAL

    def compute(self, ctx):
        numbers = ctx.extras.get("penalties")
        if numbers is None:  # an update that did not come from gradmon's own step
            return keras.ops.full([2], float("nan"))
        return keras.ops.stack([keras.ops.cast(numbers["data_loss"], "float32"),
                                keras.ops.cast(numbers["total_loss"], "float32")])


class PenaltyValues(Statistic):
    """Per penalty: its value, its share of the total loss, the norm of its own gradient."""

    _PARTS = ("value", "share", "grad_norm")

    def active(self, spec):
        return bool(spec.penalty_names)

    def labels(self, spec):
        return [f"{name}:{part}" for name in spec.penalty_names for part in self._PARTS]

    def tag(self, label):
        name, part = label.rsplit(":", 1)
        return {"value": tags.penalty, "share": tags.penalty_share,
                "grad_norm": tags.penalty_grad_norm}[part](name)

    def compute(self, ctx):
        numbers = ctx.extras.get("penalties")
        if numbers is None:
            return keras.ops.full([3 * len(ctx.spec.penalty_names)], float("nan"))
        total = keras.ops.cast(numbers["total_loss"], "float32")
        rows = []
        for value, grad_norm in zip(numbers["values"], numbers["grad_norms"]):
            value = keras.ops.cast(value, "float32")  # keras.ops on every backend (gradmon's own step)
            rows += [value, keras.ops.divide_no_nan(value, total), keras.ops.cast(grad_norm, "float32")]
        return keras.ops.stack(rows)


# Decay of the exponential moving averages of tr(Sigma) and |G|^2 behind
# `gradients/noise_scale_ema` (McCandlish et al. 2018 smooth both, not the ratio).
NOISE_SCALE_EMA_DECAY = 0.99


class NoiseScale(Statistic):
    """B_simple = tr(Sigma) / |G|^2 per step and from EMAs, and per-group SNR.

    From the per-group moments `[|g1|^2, |g2|^2, g1.g2]` of the two halves
    (b examples each) of the batch, computed by gradmon's train step.
    Unbiased estimates: |G|^2 = 2|G_2b|^2 - |G_b|^2 and
    tr(Sigma) = 2b (|G_b|^2 - |G_2b|^2), with |G_b|^2 the mean over the two
    halves and G_2b = (g1 + g2) / 2.
    """

    chart = ("Gradients", "gradient noise scale")

    def active(self, spec):
        return spec.noise_scale

    _GLOBAL = {"": tags.NOISE_SCALE, "ema": tags.NOISE_SCALE_EMA, "grad_sq": tags.NOISE_GRAD_SQ,
               "trace_cov": tags.NOISE_TRACE_COV}

    def labels(self, spec):
        return list(self._GLOBAL) + spec.groups

    def tag(self, label):
        return self._GLOBAL[label] if label in self._GLOBAL else tags.snr(label)

    def build(self, spec):
        from gradmon.backend import distribute as _distribute

        if _OPS:  # the door's state (float32: JAX keeps no float64 without x64)
            return _distribute.replica_local_variable([0.0, 0.0], dtype="float32", name="gradmon_noise_ema")
        return _distribute.replica_local_variable(tf.zeros([2], tf.float64))

    @staticmethod
    def _estimates(noise):
        """Per group `(|G|^2, tr(Sigma))` and their totals, in keras.ops float32 (JAX / PyTorch)."""
        ops = keras.ops
        m, b = ops.cast(noise["moments"], "float32"), float(noise["half_batch"])
        small = (m[:, 0] + m[:, 1]) / 2
        big = (m[:, 0] + m[:, 1] + 2 * m[:, 2]) / 4
        grad_sq, trace_cov = 2 * big - small, 2 * b * (small - big)
        return grad_sq, trace_cov, ops.sum(grad_sq), ops.sum(trace_cov)

    def next_ema(self, ema, noise):
        """The EMAs `[tr(Sigma), |G|^2]` after this step (JAX / PyTorch: assigned by the
        observer outside the pure branch that computes the row)."""
        _, _, total_grad_sq, total_trace = self._estimates(noise)
        decay = NOISE_SCALE_EMA_DECAY
        return decay * ema + (1 - decay) * keras.ops.stack([total_trace, total_grad_sq])

    def _compute_at_door(self, ctx, noise):
        ops = keras.ops
        grad_sq, trace_cov, total_grad_sq, total_trace = self._estimates(noise)
        new_ema = noise["ema"]
        snr = ops.divide_no_nan(2 * float(noise["half_batch"]) * grad_sq, trace_cov)
        return ops.concatenate([ops.stack([
            ops.divide_no_nan(total_trace, total_grad_sq), ops.divide_no_nan(new_ema[0], new_ema[1]),
            total_grad_sq, total_trace]), snr], 0)

    def compute(self, ctx):
        noise = ctx.extras.get("noise")
        if noise is None:
            if _OPS:
                return keras.ops.full([4 + ctx.spec.num_groups], float("nan"))
            return tf.fill([4 + ctx.spec.num_groups], float("nan"))
        if _OPS:
            return self._compute_at_door(ctx, noise)
        m, b = tf.cast(noise["moments"], tf.float64), tf.cast(noise["half_batch"], tf.float64)
        small = (m[:, 0] + m[:, 1]) / 2
        big = (m[:, 0] + m[:, 1] + 2 * m[:, 2]) / 4
        grad_sq, trace_cov = 2 * big - small, 2 * b * (small - big)
        total_grad_sq, total_trace = tf.reduce_sum(grad_sq), tf.reduce_sum(trace_cov)
        ema = ctx.state[self]
        decay = NOISE_SCALE_EMA_DECAY
        new_ema = decay * ema + (1 - decay) * tf.stack([total_trace, total_grad_sq])
        ema.assign(new_ema)
        # Zero-started averages need a bias correction 1 / (1 - decay^t); it is
        # the same for both, so their ratio needs none.
        snr = tf.math.divide_no_nan(2 * b * grad_sq, trace_cov)
        return tf.cast(tf.concat([tf.stack([
            tf.math.divide_no_nan(total_trace, total_grad_sq),
            tf.math.divide_no_nan(new_ema[0], new_ema[1]), total_grad_sq, total_trace]), snr], 0),
            tf.float32)


# -- optimizer state (Composer's OptimizerMonitor, for Keras) -----------------

def _slots(ctx, moment):
    """Per variable: the optimizer's `moment` slot after this step, float32, read once per step."""
    key = ("slots", moment)
    if key not in ctx._moments:
        slot, _ = ctx.spec.moment_slots[moment]
        ctx._moments[key] = [_float32(_keras_compat.optimizer_slot(ctx.optimizer, slot, v))
                             for v in ctx.variables]
    return ctx._moments[key]


def _float32(variable):
    """A variable's value in float32 (JAX: the step's own value, in its `StatelessScope`)."""
    return keras.ops.cast(variable.value, "float32")


def _slot_squares(ctx, moment):
    """Per variable: sum of squares of the optimizer's `moment` slot after this step (for a
    slot of squared gradients, the plain sum: ||sqrt(v)||^2), computed once per step."""
    key = ("slot_squares", moment)
    if key not in ctx._moments:
        squared = moment == tags.SECOND_MOMENT and ctx.spec.moment_slots[moment][1]
        ctx._moments[key] = keras.ops.stack([keras.ops.sum(s) if squared else _stats.squared_norm(s)
                                             for s in _slots(ctx, moment)])
    return ctx._moments[key]


class MomentNorm(PerGroup):
    """Per-group norm of the optimizer's first or second moment slots, after this step.

    First moment: the L2 norm of the slot as the optimizer holds it. Second
    moment: sqrt(sum v) = ||sqrt(v)||, in gradient units (Adamax's `u`, already
    in gradient units: ||u||). Only for optimizers that keep the slot
    (`_keras_compat.moment_slots`).
    """

    name = "moment_norm"

    def __init__(self, moment):
        self.moment = moment
        self.chart = ("Optimizer", f"{moment.replace('_', ' ')} norms")

    def active(self, spec):
        return self.moment in spec.moment_slots

    def tag(self, label):
        return tags.moment_norm(self.moment, label)

    def compute(self, ctx):
        ids = keras.ops.convert_to_tensor(ctx.spec.segment_ids, "int32")
        return keras.ops.sqrt(keras.ops.segment_sum(_slot_squares(ctx, self.moment), ids,
                                                    num_segments=ctx.spec.num_groups))


class Cosines(Statistic):
    """cos(update, -gradient) and cos(gradient, first moment), over all variables.

    The update is w_after - w_before of this step; the gradient the raw one
    (unscaled, untransformed: the loss's own descent direction), so 1 means the
    step went straight down the gradient; momentum, preconditioning, weight decay
    and transforms turn it. The first moment is the optimizer's slot after this
    step, taken in the gradient's direction (SGD's buffer holds -lr x the running
    sum: negated). NaN where undefined: the update was not applied, or a zero vector.
    An `IndexedSlices` gradient is not densified: its dot products gather its rows.

    References:
        Composer's `OptimizerMonitor` (MosaicML), which logs the same cosines for PyTorch.
    """

    name = "cosines"
    needs_weights = needs_update = True
    chart = ("Optimizer", "cosines: update vs -gradient, gradient vs first moment")

    def labels(self, spec):
        return ["update_gradient"] + (
            ["gradient_first_moment"] if tags.FIRST_MOMENT in spec.moment_slots else [])

    def tag(self, label):
        return {"update_gradient": tags.COSINE_UPDATE_GRADIENT,
                "gradient_first_moment": tags.COSINE_GRADIENT_FIRST_MOMENT}[label]

    def compute(self, ctx):
        ops = keras.ops
        grad_norm = ctx.global_norm(tags.RAW)
        along = [_stats.dot(g, d) for g, d in zip(ctx.raw, ctx.deltas()) if g is not None]
        step_norm = ops.sqrt(ops.sum(ctx.delta_sumsq()))
        out = [undefined_ratio(-sum(along) if along else ops.zeros([]), step_norm * grad_norm)]
        if tags.FIRST_MOMENT in ctx.spec.moment_slots:
            sign = ctx.spec.moment_slots[tags.FIRST_MOMENT][1]
            dots = [_stats.dot(g, m) for g, m in zip(ctx.raw, _slots(ctx, tags.FIRST_MOMENT))
                    if g is not None]
            moment_norm = ops.sqrt(ops.sum(_slot_squares(ctx, tags.FIRST_MOMENT)))
            out.append(undefined_ratio(sign * (sum(dots) if dots else ops.zeros([])),
                                       moment_norm * grad_norm))
        values = ops.stack(out)
        return ops.where(ctx.skipped, float("nan"), values)


def default_statistics(selected=None):
    """The built-in statistics, in record order; `selected` names the per-group ones kept."""
    selected = STAT_NAMES if selected is None else selected
    out = [GlobalNorm(tags.RAW), NonfiniteTotal(tags.RAW), GlobalNorm(tags.TRANSFORMED),
           NonfiniteTotal(tags.TRANSFORMED), ClipRatio(), ClipFraction(), NoGradient(),
           Counter("skipped", tags.SKIPPED_STEPS), Counter("nonfinite", tags.NONFINITE_STEPS),
           Counter("overflow", tags.OVERFLOW_STEPS, True),
           LossScale(), Losses(), PenaltyValues(), NoiseScale()]
    for kind in tags.KINDS:
        out += [GradientMoment(s, kind) for s in GROUP_STATS if s in selected]
    if "grad_to_weight" in selected:
        out.append(GradToWeight())
    if "update_ratio" in selected:
        out.append(UpdateRatio())
    if "moment_norm" in selected:
        out += [MomentNorm(tags.FIRST_MOMENT), MomentNorm(tags.SECOND_MOMENT)]
    if "cosines" in selected:
        out.append(Cosines())
    return out


def check_stats(stats_arg, argument="stats"):
    """Validates `stats=`: names from `STAT_NAMES` and/or `Statistic` instances.

    Returns:
        `(selected names, custom Statistic instances)`.
    """
    from gradmon._validation import invalid

    if stats_arg is None:
        return DEFAULT_STATS, []
    if isinstance(stats_arg, str) and stats_arg == "all":
        return STAT_NAMES, []
    if isinstance(stats_arg, (str, Statistic)):
        stats_arg = (stats_arg,)
    try:
        items = list(stats_arg)
    except TypeError:
        raise invalid(argument, f"a non-empty list of names from {list(STAT_NAMES)} "
                      "or gradmon.statistics.Statistic instances", stats_arg) from None
    names = [s for s in items if isinstance(s, str)]
    custom = [s for s in items if isinstance(s, Statistic)]
    unknown = [s for s in items if not isinstance(s, Statistic) and s not in STAT_NAMES]
    if unknown or not items:
        raise invalid(argument, f"a non-empty list of names from {list(STAT_NAMES)} "
                      "or gradmon.statistics.Statistic instances", stats_arg)
    return tuple(s for s in STAT_NAMES if s in names), custom
