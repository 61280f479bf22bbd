"""The monitored train step: `GradientMonitorMixin` and `monitor(model)`.

The train step computes gradient statistics *inside* the compiled step (so it
works under XLA, where summary ops cannot run) and stores them in a few
non-trainable `tf.Variable`s held by a `MonitorState`. Callbacks read that
state on the host and write it; nothing here does I/O.

Semantics of the step are those of Keras' own TensorFlow `train_step`
(training argument, loss scaling, loss tracker, sample weights, regularization
losses, metrics); gradmon adds, between `tape.gradient` and
`optimizer.apply_gradients`: statistics of the raw (unscaled) gradients, the
user's transform, statistics of the transformed gradients (after the
optimizer's own `clipnorm`/`global_clipnorm`/`clipvalue`, if set), and after
the update, the update-to-weight ratio.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf
from keras.src import tree
from keras.src.losses import loss as loss_module
from keras.src.models.functional import Functional
from keras.src.trainers.data_adapters import data_adapter_utils

from gradmon import _distribute
from gradmon import penalties as penalties_module
from gradmon import stats, tags, transforms
from gradmon._validation import check_choice, invalid, warn_once

GROUPINGS = ("variable", "layer")
# Every statistic a monitored step can compute; `stats=` selects among them.
STAT_NAMES = tags.GROUP_STATS + ("grad_to_weight", "update_ratio")
HISTOGRAM_BUCKETS = 30
# Decay of the exponential moving averages of tr(Sigma) and |G|^2 behind
# `gradients/noise_scale_ema` (McCandlish et al. 2018 smooth both, not the ratio).
NOISE_SCALE_EMA_DECAY = 0.99

# Columns of a row of MonitorState.read()["group_stats"]: raw stats (tags.GROUP_STATS order), the
# same for the transformed gradient, then grad_to_weight.
RAW_COLUMNS = slice(0, 5)
TRANSFORMED_COLUMNS = slice(5, 10)
GRAD_TO_WEIGHT_COLUMN = 10
GROUP_COLUMNS = 11
# Entries of MonitorState.global_stats.
GLOBAL_FIELDS = (
    "raw_global_norm",
    "transformed_global_norm",
    "clip_ratio",
    "clip_fraction",
    "raw_nonfinite",
    "transformed_nonfinite",
    "no_gradient",
    "skipped_steps",
)
NONFINITE_POLICIES = ("warn", "skip", "stop")
_STEP_KEY = "gradmon_step"


def _check_stats(stats_arg):
    if stats_arg is None:
        return STAT_NAMES
    if isinstance(stats_arg, str):
        stats_arg = (stats_arg,)
    unknown = [s for s in stats_arg if s not in STAT_NAMES]
    if unknown or not stats_arg:
        raise invalid("stats", f"a non-empty subset of {list(STAT_NAMES)}", stats_arg)
    return tuple(s for s in STAT_NAMES if s in stats_arg)


def _group_name(variable, grouping):
    path = getattr(variable, "path", None) or variable.name
    if grouping == "layer" and "/" in path:
        return path.rsplit("/", 1)[0]
    return path


class GradientConfig:
    """What a monitored model computes: transform, penalties, grouping, statistics."""

    def __init__(self, transform=None, grouping="variable", stats=None, penalties=None,
                 noise_scale=False, on_nonfinite="warn"):
        self.transform = None if transform is None else transforms.as_transform(transform)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        if not isinstance(noise_scale, bool):
            raise invalid("noise_scale", "True or False", noise_scale)
        self.noise_scale = noise_scale
        self.grouping = check_choice("grouping", grouping, GROUPINGS)
        self.stats = _check_stats(stats)
        self.penalties = penalties_module.check_penalties(penalties)

    def get_config(self):
        t = self.transform
        serializable = t is None or type(t).__name__ in transforms._REGISTRY
        return {
            "transform": None if t is None or not serializable else transforms.serialize(t),
            "grouping": self.grouping,
            "stats": list(self.stats),
            "penalties": [penalties_module.serialize(p) for p in self.penalties],
            "noise_scale": self.noise_scale,
            "on_nonfinite": self.on_nonfinite,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("transform") is not None:
            config["transform"] = transforms.deserialize(config["transform"])
        config["penalties"] = [penalties_module.deserialize(p) for p in config.get("penalties", [])]
        return cls(**config)


class MonitorState:
    """Variables the train step writes and callbacks read.

    Plain attributes of a plain object, so that Keras does not track them as
    model weights (they are not saved, not counted in `model.weights`).
    A logged step's numbers are packed into one float64 row of `records`, so
    a callback reads them with a single device-to-host copy:
    `[step, GLOBAL_FIELDS..., group rows (GROUP_COLUMNS each)...,
    update ratio per group..., clip fraction per transform...,
    (data loss, total loss, (value, share, grad norm) per penalty)...,
    (noise scale block)...]`. There is one row per step of an execution
    (`steps_per_execution`), at `step % rows`, so no logged step of a
    multi-step execution is lost before the callback reads them.

    Under a `tf.distribute` strategy (created in its scope) every variable is
    replica-local (`_distribute.replica_local_variable`): each replica
    records the same numbers, those of the all-reduced gradient, and the host
    reads the first replica's copy.
    """

    def __init__(self):
        variable = _distribute.replica_local_variable
        self.step = variable(0, dtype=tf.int64, name="gradmon_step")
        # 0 disables; set by callbacks.
        self.log_every = variable(1, dtype=tf.int64, name="gradmon_log_every")
        self.hist_every = variable(0, dtype=tf.int64, name="gradmon_hist_every")
        # whether the train function contains the histogram branch at all
        self.histograms_requested = False
        # steps whose update was not applied (non-finite gradients), cumulative
        self.skipped = variable(0, dtype=tf.int64, name="gradmon_skipped")
        self.key = None

    def build(self, variables, config, observed_transform, rows=1):
        """Allocates buffers for `variables`; called outside any tf.function
        (in the model's strategy scope, if it has one)."""
        variable = _distribute.replica_local_variable
        self.group_names, segment_ids = [], []
        for v in variables:
            name = _group_name(v, config.grouping)
            if name not in self.group_names:
                self.group_names.append(name)
            segment_ids.append(self.group_names.index(name))
        self.segment_ids = segment_ids
        self.config = config
        self.has_transform = observed_transform is not None
        self.fraction_names = (
            [] if observed_transform is None else observed_transform.fraction_names()
        )
        self.penalty_names = [p.name for p in config.penalties]
        # exponential moving averages of tr(Sigma) and |G|^2
        self.noise_ema = variable(tf.zeros([2], tf.float64))
        g = len(self.group_names)
        size = 1 + len(GLOBAL_FIELDS) + g * (GROUP_COLUMNS + 1) + len(self.fraction_names)
        if self.penalty_names:
            size += 2 + 3 * len(self.penalty_names)
        if config.noise_scale:
            size += 4 + g
        # step -1 marks an empty row
        self.records = variable(
            tf.concat([-tf.ones([rows, 1], tf.float64), tf.zeros([rows, size - 1], tf.float64)], 1))
        self.hist_step = variable(-1, dtype=tf.int64)
        # [raw/transformed, group, (min, max, counts...)]
        self.histograms = variable(tf.zeros([2, g, HISTOGRAM_BUCKETS + 2]))

    # -- host-side reading (callbacks) -------------------------------------

    def read(self):
        """The latest logged step's statistics as numpy, or `None` before the first.

        See `read_all` for the layout.
        """
        snapshots = self.read_all()
        return snapshots[-1] if snapshots else None

    def read_all(self):
        """The statistics of the logged steps still held (one per step of the
        last execution), oldest first.

        Returns:
            A list of dicts, each with
            `step`, `global` (`GLOBAL_FIELDS` -> float), `groups`
            (names), `group_stats` (`[groups, GROUP_COLUMNS]`), `update_ratio`
            (`[groups]`), `fractions` (transform member -> clip fraction),
            `losses` (`{"data", "total"}`, or `None` without penalties),
            `penalties` (name -> `{"value", "share", "grad_norm"}`) and
            `noise` (noise-scale numbers, or `None`).
        """
        if self.key is None:
            return []
        rows = [r for r in self.records.numpy() if r[0] >= 0]
        return [self._parse(r) for r in sorted(rows, key=lambda r: r[0])]

    def _parse(self, record):
        g, n_global, n_fractions = len(self.group_names), len(GLOBAL_FIELDS), len(self.fraction_names)
        rows_end = 1 + n_global + g * GROUP_COLUMNS
        fractions_end = rows_end + g + n_fractions
        snapshot = {
            "step": int(record[0]),
            "global": dict(zip(GLOBAL_FIELDS, record[1:1 + n_global].tolist())),
            "groups": self.group_names,
            "group_stats": record[1 + n_global:rows_end].reshape(g, GROUP_COLUMNS),
            "update_ratio": record[rows_end:rows_end + g],
            "fractions": dict(zip(self.fraction_names, record[rows_end + g:fractions_end].tolist())),
            "losses": None,
            "penalties": {},
            "noise": None,
        }
        penalties_end = fractions_end + (2 + 3 * len(self.penalty_names) if self.penalty_names else 0)
        if self.config.noise_scale:
            block = record[penalties_end:]
            snapshot["noise"] = {
                "noise_scale": float(block[0]), "noise_scale_ema": float(block[1]),
                "grad_sq": float(block[2]), "trace_cov": float(block[3]), "snr": block[4:4 + g],
            }
        if self.penalty_names:
            block = record[fractions_end:]
            snapshot["losses"] = {"data": float(block[0]), "total": float(block[1])}
            for i, name in enumerate(self.penalty_names):
                value, share, grad_norm = block[2 + 3 * i:5 + 3 * i].tolist()
                snapshot["penalties"][name] = {"value": value, "share": share, "grad_norm": grad_norm}
        return snapshot

    def read_histograms(self):
        """`(step, array[2, groups, 2 + buckets])` of the latest histogram step, or `None`."""
        if self.key is None or int(self.hist_step.numpy()) < 0:
            return None
        return int(self.hist_step.numpy()), self.histograms.numpy()


def _loss_scale(optimizer):
    """The factor `optimizer.scale_loss` multiplies the loss by, or `None`."""
    if optimizer is None:
        return None
    if hasattr(optimizer, "dynamic_scale"):  # LossScaleOptimizer
        return optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
    return getattr(optimizer, "loss_scale_factor", None)


def _multiplied(gradient, factor):
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values * tf.cast(factor, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient * tf.cast(factor, gradient.dtype)


def _divided(gradient, divisor):
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values / tf.cast(divisor, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient / tf.cast(divisor, gradient.dtype)


def _histogram_rows(grads, segment_ids, num_groups):
    """Per-group `[min, max, counts...]` over the finite entries, TensorBoard's bucketing."""
    per_group = [[] for _ in range(num_groups)]
    for g, gid in zip(grads, segment_ids):
        if g is not None:
            v = tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1])
            per_group[gid].append(v)
    rows = []
    for values in per_group:
        if not values:
            rows.append(tf.zeros([HISTOGRAM_BUCKETS + 2]))
            continue
        v = tf.concat(values, axis=0)
        finite = tf.math.is_finite(v)
        big = tf.constant(np.finfo(np.float32).max)
        any_finite = tf.reduce_any(finite)
        # with no finite entry at all the histogram is empty, over [0, 0]
        lo = tf.where(any_finite, tf.reduce_min(tf.where(finite, v, big)), 0.0)
        hi = tf.where(any_finite, tf.reduce_max(tf.where(finite, v, -big)), 0.0)
        width = (hi - lo) / HISTOGRAM_BUCKETS
        index = tf.where(
            width > 0,
            tf.floor(tf.math.divide_no_nan(v - lo, width)),
            tf.fill(tf.shape(v), float(HISTOGRAM_BUCKETS - 1)),
        )
        index = tf.cast(tf.clip_by_value(index, 0, HISTOGRAM_BUCKETS - 1), tf.int32)
        counts = tf.math.unsorted_segment_sum(
            tf.cast(finite, tf.float32), index, HISTOGRAM_BUCKETS
        )
        rows.append(tf.concat([[lo, hi], counts], axis=0))
    return tf.stack(rows)


class GradientMonitorMixin:
    """Drop-in `train_step` that measures and optionally transforms gradients.

    Put it before `keras.Model` in the bases of a subclassed model:

    ```python
    class Net(gradmon.GradientMonitorMixin, keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(10)
        def call(self, x):
            return self.dense(x)

    net = Net(gradient_transform=gradmon.transforms.clip_by_global_norm(1.0))
    # or, equivalently: net.configure_gradients(transform=...)
    ```

    Constructor keywords (all optional): `gradient_transform`,
    `gradient_grouping` (`"variable"` or `"layer"`), `gradient_stats` (a subset
    of `gradmon.STAT_NAMES`). With no transform, training is exactly that of
    Keras' built-in `train_step`.
    """

    def __init__(self, *args, gradient_transform=None, gradient_grouping="variable",
                 gradient_stats=None, gradient_penalties=None, gradient_noise_scale=False,
                 gradient_on_nonfinite="warn", **kwargs):
        config = GradientConfig(gradient_transform, gradient_grouping, gradient_stats,
                                gradient_penalties, gradient_noise_scale, gradient_on_nonfinite)
        object.__setattr__(self, "_gradmon_config", config)
        object.__setattr__(self, "_gradmon_state", MonitorState())
        super().__init__(*args, **kwargs)

    def configure_gradients(self, transform=None, grouping="variable", stats=None, penalties=None,
                            noise_scale=False, on_nonfinite="warn"):
        """Sets the transform, grouping and statistics; takes effect at the next `fit`.

        Args:
            transform: a `gradmon.transforms` transform, a callable
                `(grads, params) -> grads`, or `None`. Defaults to `None`.
            grouping: `"variable"` (one row per variable) or `"layer"` (one row
                per layer: statistics over the layer's variables taken as one
                vector). Defaults to `"variable"`.
            stats: names from `gradmon.STAT_NAMES` to compute and write, or
                `None` for all. Defaults to `None`.
            penalties: a list of `gradmon.penalties.Penalty` added to the
                loss, or `None`. Defaults to `None`.
            noise_scale: also estimate the gradient noise scale and per-group
                SNR from the two halves of each logged batch (one extra
                backward pass on those steps). Defaults to `False`.
            on_nonfinite: what a step with NaN/inf gradients does: `"warn"`
                (apply it, as Keras would; `GradientMonitor` warns once),
                `"skip"` (leave weights and optimizer state as they were and
                go on) or `"stop"` (skip it and end `fit`, naming the
                variables). Defaults to `"warn"`.

        Returns:
            The model, for chaining.
        """
        object.__setattr__(self, "_gradmon_config", GradientConfig(
            transform, grouping, stats, penalties, noise_scale, on_nonfinite))
        self.train_function = None
        return self

    def get_config(self):
        config = super().get_config()
        config["gradient_config"] = self._gradmon_config.get_config()
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        gradient_config = config.pop("gradient_config", None)
        model = super().from_config(config, custom_objects=custom_objects)
        if gradient_config is not None:
            object.__setattr__(model, "_gradmon_config", GradientConfig.from_config(gradient_config))
        return model

    def save_own_variables(self, store):
        super().save_own_variables(store)
        # the summary step axis continues after loading
        store[_STEP_KEY] = np.asarray(self._gradmon_state.step.numpy())

    def load_own_variables(self, store):
        keys = list(store.keys())
        if _STEP_KEY in keys:
            self._gradmon_state.step.assign(int(np.asarray(store[_STEP_KEY])))
        own = self._trainable_variables + self._non_trainable_variables
        if len([k for k in keys if k != _STEP_KEY]) != len(own):
            raise ValueError(
                f"Layer '{self.name}' expected {len(own)} variables, but received "
                f"{len(keys)} variables during loading.")
        for i, v in enumerate(own):
            v.assign(store[f"{i}"])

    @property
    def gradient_config(self):
        return self._gradmon_config

    @property
    def gradient_state(self):
        """The `MonitorState` callbacks read from."""
        return self._gradmon_state

    def _observed_transform(self):
        """The user's transform followed by the optimizer's own clipping, as one transform."""
        members = [t for t in (self._gradmon_config.transform,
                               transforms.from_optimizer(self.optimizer)) if t is not None]
        if not members:
            return None
        return members[0] if len(members) == 1 else transforms.chain(*members)

    def _gradmon_ensure_state(self, variables):
        """(Re)allocates the state for `variables` and the config; True if it did."""
        state, config = self._gradmon_state, self._gradmon_config
        rows = int(getattr(self, "steps_per_execution", 1) or 1)
        key = (tuple(id(v) for v in variables), id(config), config.on_nonfinite,
               id(self.optimizer), rows, state.histograms_requested)
        if state.key == key:
            return False
        # Outside any tf.function: a subclassed model may create its variables
        # only while the train step is first traced.
        with tf.init_scope(), _distribute.strategy_scope(self._distribute_strategy):
            if self.optimizer is not None and not self.optimizer.built and variables:
                # apply_gradients may run inside tf.cond, where it cannot create slots
                self.optimizer.build(variables)
            state.build(variables, config, self._observed_transform(), rows)
        state.key = key
        return True

    def make_train_function(self, force=False):
        if self._gradmon_ensure_state(self.trainable_variables):
            force = True
        return super().make_train_function(force=force)

    def train_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        if self._gradmon_config.penalties and self.trainable_weights:
            y_pred, gradients, penalty_numbers = self._gradmon_penalized_gradients(x, y, sample_weight)
            self._gradmon_apply(gradients, self.trainable_weights, penalty_numbers,
                                (x, y, sample_weight))
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        # Keras' own TensorFlow train_step, verbatim but for _gradmon_apply.
        with tf.GradientTape() as tape:
            y_pred = self._gradmon_forward(x)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            self._gradmon_track_loss(loss, x)
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)

        if self.trainable_weights:
            variables = self.trainable_weights
            gradients = tape.gradient(loss, variables)
            self._gradmon_apply(gradients, variables, batch=(x, y, sample_weight))
        else:
            warn_once(("no-trainable", id(self)), "The model does not have any trainable weights.")
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _gradmon_forward(self, x):
        return self(x, training=True) if self._call_has_training_arg else self(x)

    def _gradmon_track_loss(self, loss, x):
        self._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(next(i for i in tree.flatten(x) if i is not None))[0],
        )

    def _gradmon_penalized_gradients(self, x, y, sample_weight):
        """Gradients of data loss + penalties, each part differentiated on its own.

        Returns `(y_pred, scaled gradients, numbers)` where `numbers` holds the
        data loss, total loss, penalty values and the norm of each penalty's
        own (unscaled) gradient. Under a strategy the numbers are this
        replica's (its shard's losses; the host reads the first replica's),
        and a penalty needing the data gradient sees its shard's gradient
        (`context.data_gradients` is scaled by the number of replicas).
        """
        variables = self.trainable_weights
        penalty_list = self._gradmon_config.penalties
        need_gradients = any(p.needs_gradients for p in penalty_list)
        scale = _loss_scale(self.optimizer)
        replicas = _distribute.num_replicas()

        def scaled(loss):
            return self.optimizer.scale_loss(loss) if self.optimizer is not None else loss

        def unscaled(grads):
            return list(grads) if scale is None else [_divided(g, scale) for g in grads]

        with tf.GradientTape(persistent=True) as outer:
            # A nested tape makes the data gradient differentiable (double backprop).
            inner = tf.GradientTape() if need_gradients else contextlib.nullcontext()
            with inner:
                y_pred = self._gradmon_forward(x)
                data_loss = self._compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
                )
                scaled_data = scaled(data_loss)
            context = penalties_module.PenaltyContext(self, x, y, sample_weight, y_pred, variables)
            if need_gradients:
                data_gradients = inner.gradient(scaled_data, variables)
                # a replica's loss is divided by the number of replicas: its shard's gradient
                context.data_gradients = [g if replicas == 1 else _multiplied(g, replicas)
                                          for g in unscaled(data_gradients)]
            values = [tf.cast(p(context), data_loss.dtype) for p in penalty_list]
            # Under a strategy Keras divides each replica's data loss by the number of
            # replicas (the optimizer sums the replicas' gradients); so are the penalties.
            shares = [loss_module.scale_loss_for_distribution(v) for v in values]
            total = data_loss + tf.add_n(shares)
            self._gradmon_track_loss(total, x)
            scaled_values = [scaled(v) for v in shares]
        if not need_gradients:
            data_gradients = outer.gradient(scaled_data, variables)
        parts = [data_gradients] + [outer.gradient(v, variables) for v in scaled_values]
        del outer
        gradients = []
        for per_part in zip(*parts):
            present = [g for g in per_part if g is not None]
            gradients.append(tf.add_n([tf.convert_to_tensor(g) for g in present]) if present else None)
        numbers = {
            "data_loss": loss_module.unscale_loss_for_distribution(data_loss),
            "total_loss": loss_module.unscale_loss_for_distribution(total),
            "values": values,
            "grad_norms": [stats.global_norm(unscaled(part)) * replicas for part in parts[1:]],
        }
        return y_pred, gradients, numbers

    def _gradmon_apply(self, gradients, variables, penalty_numbers=None, batch=None):
        """Measures, transforms and applies `gradients` (scaled by the loss scale).

        Under a strategy with several replicas, `gradients` are this
        replica's (of its shard's loss, which Keras divides by the number of
        replicas). Statistics and gradmon's transform use their all-reduced
        sum, the gradient of the global batch; the optimizer, which sums over
        the replicas again, gets the transformed sum divided by the number of
        replicas, so the update equals that of one device on the global batch.
        Without a transform each replica's own gradients go to the optimizer
        untouched. A Keras optimizer's own `clipnorm` / `global_clipnorm` /
        `clipvalue` acts on each replica's gradient before its all-reduce; the
        observed ("transformed") statistics are those of what it applies (the
        sum over replicas of the clipped replica gradients), and its clip
        fractions are averaged over the replicas.
        """
        self._gradmon_ensure_state(variables)
        state, config = self._gradmon_state, self._gradmon_config
        missing = [v.path for v, g in zip(variables, gradients) if g is None]
        if missing:
            warn_once(("no-gradient", id(self), tuple(missing)),
                      f"gradmon: no gradient for variables {missing}; they are reported "
                      f"under `{tags.NO_GRADIENT}` and have zero gradient statistics.")
        step = state.step.assign_add(1, read_value=True)
        replicas = _distribute.num_replicas()
        # the global batch's gradient (a synchronisation point, so outside any tf.cond)
        total = _distribute.all_reduce_sum(gradients)
        scale = _loss_scale(self.optimizer)
        scale = None if scale is None else tf.cast(scale, tf.float32)

        def unscale(grads):
            return list(grads) if scale is None else [_divided(g, scale) for g in grads]

        unscaled = unscale(total)
        to_apply, transformed, fractions = gradients, unscaled, {}
        if config.transform is not None:
            transformed, fractions = config.transform(unscaled, variables)
            to_apply = transformed if scale is None else [_multiplied(g, scale) for g in transformed]
            if replicas > 1:
                # the optimizer sums the replicas' (identical) shares
                to_apply = [_divided(g, replicas) for g in to_apply]
        optimizer_clip = transforms.from_optimizer(self.optimizer)

        def observe():
            # What the optimizer will actually apply (before its own update rule).
            if optimizer_clip is None:
                return transformed, fractions
            if replicas == 1:
                clipped, more = optimizer_clip(transformed, variables)
                return clipped, transforms.merge_fractions(fractions, more)
            # Keras clips each replica's unscaled gradient, then sums them.
            clipped, more = optimizer_clip(unscale(to_apply), variables)
            return (_distribute.all_reduce_sum(clipped),
                    transforms.merge_fractions(fractions, _distribute.all_reduce_mean(more)))

        distributed = _distribute.in_replicas()
        if distributed:
            # all-reduces: every step, outside the conditional branches below
            observed_now = observe()

            def observe():
                return observed_now

        do_log = tf.logical_and(state.log_every > 0,
                                tf.equal(tf.math.floormod(step, tf.maximum(state.log_every, 1)), 0))
        do_hist = tf.logical_and(state.hist_every > 0,
                                 tf.equal(tf.math.floormod(step, tf.maximum(state.hist_every, 1)), 0))

        loss_scaled = hasattr(self.optimizer, "dynamic_scale")
        skipped_now = None
        if config.on_nonfinite != "warn" or loss_scaled:
            # of the all-reduced gradients: every replica takes the same decision
            finite = tf.reduce_all(tf.stack([
                tf.reduce_all(tf.math.is_finite(g.values if isinstance(g, tf.IndexedSlices) else g))
                for g in total if g is not None] or [tf.constant(True)]))
            # A LossScaleOptimizer skips such steps itself; so do the skip/stop policies.
            skipped_now = tf.logical_not(finite)
            state.skipped.assign_add(tf.cast(skipped_now, tf.int64))
        if config.on_nonfinite != "warn":
            # the callback must see the bad step, to stop or to name the variables
            do_log = tf.logical_or(do_log, tf.logical_not(finite))

        def histograms():
            g = len(state.group_names)
            state.histograms.assign(tf.stack([
                _histogram_rows(unscaled, state.segment_ids, g),
                _histogram_rows(observe()[0], state.segment_ids, g),
            ]))
            state.hist_step.assign(step)
            return tf.constant(True)

        if state.histograms_requested:
            tf.cond(do_hist, histograms, lambda: tf.constant(False))

        def apply_gradients(grads):
            self.optimizer.apply_gradients(zip(grads, variables))

        def apply():
            if config.on_nonfinite == "warn":
                apply_gradients(to_apply)
                return tf.constant(True)
            return _distribute.cond_apply(finite, apply_gradients, (to_apply,))

        needs_weights = "update_ratio" in config.stats or "grad_to_weight" in config.stats

        def noise_moments():
            return self._gradmon_half_batch_moments(batch, variables)

        def measure(applied, observed, observed_fractions, before, noise):
            with tf.control_dependencies([applied]):
                after = [v.value for v in variables] if before is not None else None
            # (A nested jit_compile=True function for these reductions was measured
            # slower on CPU: 1.62x vs 1.32x a plain step, XLA launch overhead.)
            numbers = self._gradmon_record(unscaled, list(observed), observed_fractions, after, before,
                                len(missing), penalty_numbers, skipped_now)
            parts = [tf.reshape(tf.cast(step, tf.float64), [1]), numbers]
            if noise is not None:
                parts.append(self._gradmon_noise_record(noise, batch))
            rows = tf.shape(state.records, out_type=tf.int64)[0]
            row = tf.reshape(tf.math.floormod(step, rows), [1, 1])
            state.records.assign(tf.tensor_scatter_nd_update(state.records, row, tf.concat(parts, 0)[None]))
            return tf.constant(True)

        if distributed:
            # The update synchronises the replicas: it cannot run inside a
            # tf.cond in replica context, so the pre-update weights are copied
            # (when asked for) and the noise passes run before it, on every step.
            noise = None
            if config.noise_scale:
                g = len(state.group_names)
                noise = tf.cond(do_log, noise_moments, lambda: tf.zeros([g, 3]))
            before = [tf.identity(v.value) for v in variables] if needs_weights else None
            applied = apply()
            observed, observed_fractions = observe()
            tf.cond(do_log, lambda: measure(applied, observed, observed_fractions, before, noise),
                    lambda: tf.constant(False))
            return

        def apply_and_measure():
            # Only logged steps pay for the noise-scale passes and for keeping
            # the pre-update weights alive (which forces copies in the update).
            noise = noise_moments() if config.noise_scale else None
            before = [tf.identity(v.value) for v in variables] if needs_weights else None
            applied = apply()
            with tf.control_dependencies([applied]):
                observed, observed_fractions = observe()
            return measure(applied, observed, observed_fractions, before, noise)

        def apply_only():
            apply()
            return tf.constant(False)

        tf.cond(do_log, apply_and_measure, apply_only)

    def _gradmon_half_batch_moments(self, batch, variables):
        """Per group `[|g1|^2, |g2|^2, g1.g2]` for the gradients of the two batch halves.

        Computed in a `keras.StatelessScope`, so the extra forward passes
        change no BatchNorm statistic, RNG state or loss tracker. Under a
        strategy, of this replica's shard only: the host reads the first
        replica's noise scale (an estimate from a batch `num_replicas` times
        smaller; B_simple itself does not depend on the batch size).
        """
        state = self._gradmon_state
        x, y, sample_weight = batch
        half = tf.shape(tree.flatten(x)[0])[0] // 2

        def part(start):
            def take(t):
                return None if t is None else t[start:start + half]
            xs, ys, ws = (tree.map_structure(take, t) if t is not None else None
                          for t in (x, y, sample_weight))
            params = [tf.identity(v.value) for v in variables]
            with tf.GradientTape() as tape:
                tape.watch(params)
                with keras.StatelessScope(state_mapping=list(zip(variables, params)),
                                          collect_losses=True):
                    pred = self._gradmon_forward(xs)
                    loss = self._compute_loss(x=xs, y=ys, y_pred=pred, sample_weight=ws,
                                              training=True)
            # Keras divides a replica's loss by the number of replicas: undo it
            return [None if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32) * replicas
                    for g in tape.gradient(loss, params)]

        replicas = float(_distribute.num_replicas())

        first, second = part(0), part(half)
        ids = tf.constant(state.segment_ids, tf.int32)
        g = len(state.group_names)
        rows = []
        for a, b in zip(first, second):
            if a is None or b is None:
                rows.append(tf.zeros([3]))
            else:
                rows.append(tf.stack([tf.reduce_sum(a * a), tf.reduce_sum(b * b), tf.reduce_sum(a * b)]))
        return tf.math.unsorted_segment_sum(tf.stack(rows), ids, g)

    def _gradmon_noise_record(self, moments, batch):
        """`[B_simple, EMA B_simple, |G|^2, tr(Sigma), SNR per group...]` (McCandlish et al. 2018).

        Two batch sizes: the halves (b examples each) and their union (2b).
        Unbiased estimates: |G|^2 = 2|G_2b|^2 - |G_b|^2 and
        tr(Sigma) = 2b (|G_b|^2 - |G_2b|^2), with |G_b|^2 the mean over the
        two halves and G_2b = (g1 + g2) / 2.
        """
        state = self._gradmon_state
        m = tf.cast(moments, tf.float64)
        b = tf.cast(tf.shape(tree.flatten(batch[0])[0])[0] // 2, tf.float64)
        small = (m[:, 0] + m[:, 1]) / 2
        big = (m[:, 0] + m[:, 1] + 2 * m[:, 2]) / 4
        grad_sq = 2 * big - small
        trace_cov = 2 * b * (small - big)
        total_grad_sq, total_trace = tf.reduce_sum(grad_sq), tf.reduce_sum(trace_cov)
        decay = NOISE_SCALE_EMA_DECAY
        ema_trace = decay * state.noise_ema[0] + (1 - decay) * total_trace
        ema_grad_sq = decay * state.noise_ema[1] + (1 - decay) * total_grad_sq
        state.noise_ema.assign(tf.stack([ema_trace, ema_grad_sq]))
        # Zero-started averages need a bias correction 1 / (1 - decay^t); it is
        # the same for both, so their ratio needs none.
        snr = tf.math.divide_no_nan(2 * b * grad_sq, trace_cov)
        return tf.concat([tf.stack([
            tf.math.divide_no_nan(total_trace, total_grad_sq),
            tf.math.divide_no_nan(ema_trace, ema_grad_sq),
            total_grad_sq, total_trace]), snr], 0)

    def _gradmon_record(self, raw, observed, fractions, after, before, num_missing, penalty_numbers,
                        skipped_now):
        """One step's statistics packed as `MonitorState.record` (without the leading step)."""
        state = self._gradmon_state
        g, ids = len(state.group_names), state.segment_ids
        raw_moments = stats.grouped_moments(raw, ids, g)
        raw_final = stats.finalize(raw_moments)
        raw_norm = tf.sqrt(tf.reduce_sum(raw_moments[:, stats.SUMSQ]))
        raw_nonfinite = tf.reduce_sum(raw_moments[:, stats.NONFINITE])
        if state.has_transform:
            obs_moments = stats.grouped_moments(observed, ids, g)
            obs_final = stats.finalize(obs_moments)
            obs_norm = tf.sqrt(tf.reduce_sum(obs_moments[:, stats.SUMSQ]))
            obs_nonfinite = tf.reduce_sum(obs_moments[:, stats.NONFINITE])
        else:
            obs_final, obs_norm, obs_nonfinite = raw_final, raw_norm, raw_nonfinite
        if before is not None:
            weight_norm = tf.sqrt(stats.grouped_squared_norms(before, ids, g))
            grad_to_weight = stats.safe_ratio(raw_final[:, 0], weight_norm)
            delta = [a - b for a, b in zip(after, before)]
            update_ratio = stats.safe_ratio(
                tf.sqrt(stats.grouped_squared_norms(delta, ids, g)), weight_norm)
        else:
            grad_to_weight = update_ratio = tf.zeros([g])
        values = [fractions[name] for name in state.fraction_names]
        clip_ratio = tf.where(raw_norm > 0, obs_norm / raw_norm, tf.constant(1.0))
        if skipped_now is not None:
            # a skipped step was not clipped: nothing was applied
            values = [tf.where(skipped_now, 0.0, v) for v in values]
            clip_ratio = tf.where(skipped_now, 1.0, clip_ratio)
        clip_fraction = tf.reduce_max(tf.stack(values)) if values else tf.constant(0.0)
        global_values = tf.stack([
            raw_norm, obs_norm, clip_ratio,
            clip_fraction, raw_nonfinite, obs_nonfinite, float(num_missing),
            tf.cast(state.skipped, tf.float32),
        ])
        parts = [
            global_values,
            tf.reshape(tf.concat([raw_final, obs_final, grad_to_weight[:, None]], axis=1), [-1]),
            update_ratio,
        ] + ([tf.stack(values)] if values else [])
        if penalty_numbers is not None:
            total = tf.cast(penalty_numbers["total_loss"], tf.float32)
            rows = [tf.cast(penalty_numbers["data_loss"], tf.float32), total]
            for value, grad_norm in zip(penalty_numbers["values"], penalty_numbers["grad_norms"]):
                value = tf.cast(value, tf.float32)
                rows += [value, stats.safe_ratio(value, total), grad_norm]
            parts.append(tf.stack(rows))
        return tf.concat([tf.cast(p, tf.float64) for p in parts], axis=0)


@keras.saving.register_keras_serializable(package="gradmon", name="MonitoredFunctional")
class _MonitoredFunctional(GradientMonitorMixin, Functional):
    """A functional model over the layers of an existing one, with the monitored step."""


@keras.saving.register_keras_serializable(package="gradmon", name="MonitoredWrapper")
class _MonitoredWrapper(GradientMonitorMixin, keras.Model):
    """Wraps a model that is not functional (a subclassed or unbuilt Sequential model)."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def get_config(self):
        return {"name": self.name, "inner": keras.saving.serialize_keras_object(self.inner),
                "gradient_config": self._gradmon_config.get_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner"), custom_objects=custom_objects)
        gradient_config = GradientConfig.from_config(config.pop("gradient_config"))
        model = cls(inner, **config)
        object.__setattr__(model, "_gradmon_config", gradient_config)
        return model


def monitor(model, transform=None, grouping="variable", stats=None, penalties=None,
            noise_scale=False, on_nonfinite="warn"):
    """Returns a model that shares `model`'s layers and weights and monitors its gradients.

    Compile and fit the returned model as you would `model`; training `model`
    afterwards sees the same weights. Under a `tf.distribute` strategy, call it
    inside `strategy.scope()`: statistics are those of the all-reduced
    gradient and `transform` clips that gradient, while a Keras optimizer's own
    clipping acts on each replica's gradient before the all-reduce (see
    `GradientMonitorMixin._gradmon_apply`).

    Args:
        model: a `keras.Model` (Sequential, functional or subclassed).
        transform: a gradient transform from `gradmon.transforms`, a callable
            `(grads, params) -> grads`, or `None`. Defaults to `None`.
        grouping: `"variable"` or `"layer"`. Defaults to `"variable"`.
        stats: names from `gradmon.STAT_NAMES`, or `None` for all.
            Defaults to `None`.
        penalties: a list of `gradmon.penalties.Penalty` added to the loss,
            or `None`. Defaults to `None`.
        noise_scale: also log the gradient noise scale and per-group SNR.
            Defaults to `False`.
        on_nonfinite: `"warn"`, `"skip"` or `"stop"` (see
            `GradientMonitorMixin.configure_gradients`). Defaults to `"warn"`.

    Returns:
        A `keras.Model` with `GradientMonitorMixin`'s train step.

    Example:
        >>> m = gradmon.monitor(model, transform=gradmon.transforms.clip_by_global_norm(1.0))
        >>> m.compile(optimizer="adam", loss="mse")
        >>> m.fit(x, y, callbacks=[gradmon.GradientMonitor("runs/exp1")])
    """
    if isinstance(model, GradientMonitorMixin):
        return model.configure_gradients(transform, grouping, stats, penalties, noise_scale,
                                         on_nonfinite)
    if not isinstance(model, keras.Model):
        raise invalid("model", "a keras.Model", model)
    kwargs = dict(gradient_transform=transform, gradient_grouping=grouping, gradient_stats=stats,
                  gradient_penalties=penalties, gradient_noise_scale=noise_scale,
                  gradient_on_nonfinite=on_nonfinite,
                  name=f"{model.name}_monitored")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if inputs and outputs:
        if isinstance(model, keras.Sequential):
            inputs, outputs = inputs[0], outputs[0]
        else:
            inputs, outputs = model._inputs_struct, model._outputs_struct
        return _MonitoredFunctional(inputs=inputs, outputs=outputs, **kwargs)
    return _MonitoredWrapper(model, **kwargs)
