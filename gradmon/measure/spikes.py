"""Spikes caught in the step: running mean and variance of the gradient norm (and the loss).

The statistics are those of ZClip (Kumar et al. 2025): a warm-up that only
collects values (after `warmup` of them, mean and variance are theirs,
exactly: the population variance), then exponential moving averages

    mean_t = alpha * mean_{t-1} + (1 - alpha) * x_t
    var_t  = alpha * var_{t-1}  + (1 - alpha) * (x_t - mean_t)^2

(the variance against the *updated* mean, as ZClip's reference code). A
value is judged by the statistics *before* it is folded in:
`z = (x - mean) / (std + eps)`. No value is judged during the warm-up, and a
non-finite value (NaN/inf gradient, loss-scale overflow) is neither judged
nor folded: it is the non-finite policy's business. Nothing is judged while
the variance is exactly 0 (values all equal so far, e.g. zero gradients):
z is undefined there (ZClip's reference code would clip every later step to
the mean, and keep doing so).

A spike is folded in *winsorised*, at `mean + threshold * std` (ZClip folds
its clipped norm): one huge norm does not inflate the variance so much that
the next spikes go unseen.

State is one float64 vector `[seen, mean, var]` in a device variable
(replica-local: every replica folds the same all-reduced norm), updated on
every step, logged or not. `SpikeTracker` (the `on_spike` policy) and
`gradmon.transforms.zclip` each keep their own.

What the `on_spike` detector (`SpikeTracker`) judges, so that a healthy run
raises no alarm (a user can leave it on `"stop"`):

- **The log of the raw global norm**, not the norm. Gradient norms are
  positive and heavy-tailed, and they change scale (an LSTM's rise 10x from
  its initialisation in its first 80 steps): the z of the norm itself
  reached 7.9 on healthy runs, the z of its log 3.5 (12 runs, 6,444 steps,
  `benchmarks/spike_alarms.py`). A z of the log-norm is a ratio: with the
  recent norms varying by a factor `exp(std)`, a norm is a spike when it
  exceeds their running geometric mean `exp(mean)` by `exp(threshold * std)`
  (default threshold 5). A zero norm has no log: it is neither judged nor
  folded in, as a non-finite one.
- **Full batches only.** The gradient of a batch of `b` examples is the
  mean of `b` per-example gradients: a small batch (the last, partial batch
  of an epoch, 5 examples against 32) has a larger norm by nature (up to
  `sqrt(32 / 5)`, more with one hard example), not a spike. A step whose
  batch is smaller than the largest batch seen so far is neither judged nor
  folded in (z NaN; its loss too). The batch size reaches the detector in
  `fit` by itself (`watch_batches` wraps the model's `train_step`, whatever
  it is: Keras', gradmon's own or the model's; `monitor()`, the mixin and a
  `GradientMonitor` on any model), and in a custom loop through
  `opt.gradmon.observe_batch(x)` in the step; without it every step is
  judged (drop the remainder then: `drop_remainder=True`). Under a strategy
  the replicas' shards are summed.
- The loss's z-score (written only, never acted upon) is of the loss itself
  (a loss may be negative), on full batches.

`zclip` keeps ZClip's reference rule (the norm itself, every step, partial
batches included): it clips (to `mean + z_threshold**2 * std / z`), it does
not refuse an update.

References:
    Kumar, Owen, Chowdhury, Güra (2025). ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training. arXiv:2504.02507.
"""

import contextlib

import keras
import numpy as np

from gradmon.backend import lazy_tf as _lazy_tf
from gradmon.backend import distribute as _distribute
from gradmon.measure import statistics
from gradmon import tags

tf = _lazy_tf.tensorflow()
# JAX / PyTorch (`gradmon.backend.door`): the state in float32 and int32 (JAX keeps float64
# variables in 32 bits without x64); the arithmetic is `keras.ops` on every backend
_OPS = not _lazy_tf.is_tensorflow()
STATE_DTYPE = "float32" if _OPS else "float64"
_COUNT_DTYPE = "int32" if _OPS else "int64"

SPIKE_POLICIES = ("warn", "skip", "stop")
# The detector's EMA (ZClip's defaults): alpha 0.97 (about 33 steps of memory), 25 warm-up steps.
SPIKE_ALPHA = 0.97
SPIKE_WARMUP = 25
# Spikes are judged against z = 5 (of the log-norm) by default: the detector guards updates,
# so a false alarm costs (a skipped step, a stopped run). On 12 healthy runs (MLP, CNN, LSTM,
# Transformer, 3 seeds each, 6,444 steps) the largest z of a full batch's log-norm was 3.5
# (benchmarks/spike_alarms.py).
DEFAULT_SPIKE_THRESHOLD = 5.0
_EPS = 1e-12
_NAME_SCOPE = "gradmon_spikes"  # every op of the tracker: a test finds them by it


def initial_state():
    """`[seen, mean, var]` before the first value."""
    return np.zeros([3], STATE_DTYPE)


def _value(variable):
    """A state variable's value inside the step (a `tf.Variable` on TensorFlow, else Keras')."""
    return variable.value if _OPS else variable.read_value()


def _scope():
    """The tracker's name scope (TensorFlow: a test finds its ops by it)."""
    return contextlib.nullcontext() if _OPS else tf.name_scope(_NAME_SCOPE)


def read_state(variable):
    """`(seen, mean, var)` scalars of a state variable (one read, one unstack)."""
    return tuple(keras.ops.unstack(_value(variable)))


def _like(state, x):
    """`x` in the state's float dtype (float64 on TensorFlow, float32 on JAX / PyTorch)."""
    return keras.ops.cast(x, keras.backend.standardize_dtype(state[1].dtype))


def warmed_up(state, warmup):
    """Bool scalar: the next value is judged: `warmup` values were folded in, and they vary.

    With a variance of exactly 0 (e.g. a warm-up of all-zero gradients) no z
    is defined: every larger value would be a spike, folded in (or clipped)
    at the mean, and the variance would stay 0 for good. Such a value is
    folded in as it is, and judging starts once the values vary.
    """
    return keras.ops.logical_and(state[0] >= warmup, state[2] > 0)


def zscore(state, x, eps=_EPS):
    """`(x - mean) / (std + eps)` against `state` `(seen, mean, var)`."""
    return (_like(state, x) - state[1]) / (keras.ops.sqrt(state[2]) + eps)


def judged(state, x, threshold, warmup, eps=_EPS):
    """`(z, over)` of `x` against `state`: z is NaN where nothing is judged (the warm-up, no
    variance yet, a non-finite `x`); `over` whether it exceeds `threshold` (the state's float, bool)."""
    x = _like(state, x)
    judge = keras.ops.logical_and(warmed_up(state, warmup), keras.ops.isfinite(x))
    z = keras.ops.where(judge, zscore(state, x, eps), _like(state, np.nan))
    return z, keras.ops.logical_and(judge, z > threshold)


def upper_bound(state, threshold):
    """`mean + threshold * std`: the largest value that is not a spike."""
    return state[1] + threshold * keras.ops.sqrt(state[2])


def folded(state, x, warmup, alpha):
    """The state after folding in `x` (a scalar); a non-finite `x` leaves it unchanged.

    Args:
        state: `(seen, mean, var)` (float64 on TensorFlow, float32 on JAX / PyTorch).
        x: the value folded in (a spike already winsorised by the caller).
        warmup: values collected before the moving averages start (positive int).
        alpha: EMA decay in [0, 1).

    Returns:
        The new vector `[seen, mean, var]`.
    """
    x = _like(state, x)
    seen, mean, var = state
    # warm-up: the running (Welford) mean and population variance of the values so far
    n = seen + 1.0
    warm_mean = mean + (x - mean) / n
    warm_var = (var * seen + (x - mean) * (x - warm_mean)) / n
    ema_mean = alpha * mean + (1.0 - alpha) * x
    ema_var = alpha * var + (1.0 - alpha) * keras.ops.square(x - ema_mean)
    warm = seen >= warmup
    new = keras.ops.stack([n, keras.ops.where(warm, ema_mean, warm_mean),
                           keras.ops.where(warm, ema_var, warm_var)])
    return keras.ops.where(keras.ops.isfinite(x), new, keras.ops.stack(state))


class SpikeStep:
    """One step's verdict of the tracker (tensors).

    Attributes:
        zscore: z of the log of the raw global norm (NaN during the warm-up, for a
            non-finite or zero norm, and for a partial batch).
        loss_zscore: z of the loss, or `None` where the loss is unknown.
        spike: bool scalar, the norm is a spike.
    """

    def __init__(self, zscore, loss_zscore, spike):
        self.zscore, self.loss_zscore, self.spike = zscore, loss_zscore, spike


def forget_steps_after(held, step, read, assign):
    """Marks the rows of a ring held on the device whose step is after `step` as empty (-1):
    `held` holds the steps themselves, or rows whose first column is the step; `read(variable)`
    and `assign(variable, value)` are the host's. The spike ring's and the record ring's rule."""
    values = np.array(read(held))
    steps = values[:, 0] if values.ndim == 2 else values
    if (steps > step).any():
        steps[steps > step] = -1
        assign(held, values)


class SpikeTracker:
    """Device state of the spike detector of one observed optimizer (created outside tf.function).

    Args:
        threshold: positive float, the z (of the log-norm) above which a norm is a spike.
        rows: positive int, spikes held between two reads (a ring of `(step, z)`).
        loss: whether a loss reaches the step (gradmon's own train step), so its
            statistics are kept too. Defaults to `False`.
        alpha: EMA decay. Defaults to `SPIKE_ALPHA` (0.97).
        warmup: finite values collected before the first verdict. Defaults to
            `SPIKE_WARMUP` (25).

    References:
        Kumar, Owen, Chowdhury, Güra (2025). ZClip: Adaptive Spike Mitigation
        for LLM Pre-Training. arXiv:2504.02507.
    """

    def __init__(self, threshold, rows, loss=False, alpha=SPIKE_ALPHA, warmup=SPIKE_WARMUP):
        variable = _distribute.replica_local_variable
        self.threshold, self.alpha, self.warmup = float(threshold), float(alpha), int(warmup)
        self.norm_state = variable(initial_state(), dtype=STATE_DTYPE, name="gradmon_spike_norm")
        self.loss_state = variable(initial_state(), dtype=STATE_DTYPE,
                                   name="gradmon_spike_loss") if loss else None
        self.count = variable(0, dtype=_COUNT_DTYPE, name="gradmon_spike_count")
        # the largest batch seen (examples; 0 until a batch size is handed over)
        self.largest_batch = variable(0, dtype=_COUNT_DTYPE, name="gradmon_spike_largest_batch")
        # the latest spikes, row `count % rows`: (step, z); step -1 where none yet
        self.ring = variable(np.concatenate([-np.ones([rows, 1]), np.zeros([rows, 1])], axis=1),
                             dtype=STATE_DTYPE, name="gradmon_spike_ring")
        if _OPS:  # the step of each spike, exact (a float32 column would stop at 2^24)
            self.ring_steps = variable(-np.ones([rows], np.int32), dtype="int32",
                                       name="gradmon_spike_ring_steps")
        self.observer = None  # JAX: whose trainer holds the state between steps (host reads)

    @property
    def rows(self):
        return int(self.ring.shape[0])

    def forget_after(self, step, assign):
        """Drops the held spikes of steps after `step` (the axis went back), with the host's
        `assign(variable, value)`."""
        forget_steps_after(self.ring_steps if _OPS else self.ring, step, self._host, assign)

    def _judge(self, variable, x, counted):
        """`(z, spike)` of `x` against `variable`'s state, which then folds `x` in (winsorised);
        where not `counted` (a partial batch) nothing is judged or folded."""
        state = read_state(variable)
        x = keras.ops.where(counted, _like(state, x), _like(state, np.nan))
        z, spike = judged(state, x, self.threshold, self.warmup)
        kept = keras.ops.where(spike, upper_bound(state, self.threshold), x)
        variable.assign(folded(state, kept, self.warmup, self.alpha))
        return z, spike

    def _full_batch(self, batch_size):
        """Bool scalar: this step's batch is a full one (as large as the largest seen so far).

        Under a strategy the replicas' shards are summed first (every replica then
        judges the global batch alike).
        """
        if batch_size is None:
            return keras.ops.convert_to_tensor(True)
        size = keras.ops.cast(batch_size, _COUNT_DTYPE)
        if _distribute.num_replicas() > 1:  # in float32 (exact below 2**24 examples)
            size = tf.cast(_distribute.all_reduce_sum([tf.cast(size, tf.float32)])[0], tf.int64)
        largest = keras.ops.maximum(_value(self.largest_batch), size)
        self.largest_batch.assign(largest)
        return size >= largest

    def update(self, step, norm, loss=None, batch_size=None):
        """Judges this step's raw global norm (and loss) and folds them in (inside the step).

        Every assignment is unconditional (a pure value decides what is written), so
        it runs as it is inside a jitted JAX step.

        Args:
            step: int scalar, the observer's step of this update.
            norm: the raw global norm.
            loss: the batch loss, or `None` where it is unknown. Defaults to `None`.
            batch_size: the number of examples in this step's batch, or `None`
                where it is unknown (every step is then judged). A batch smaller
                than the largest seen so far is neither judged nor folded in.
                Defaults to `None`.

        Returns:
            A `SpikeStep`.
        """
        with _scope():
            counted = self._full_batch(batch_size)
            # the log of the norm: a zero norm (-inf) is no value, as a non-finite one
            z, spike = self._judge(self.norm_state, keras.ops.log(keras.ops.cast(norm, STATE_DTYPE)),
                                   counted)
            loss_z = None
            if self.loss_state is not None and loss is not None:
                loss_z, _ = self._judge(self.loss_state, loss, counted)
            count = _value(self.count)
            index = keras.ops.mod(count, self.rows)
            at = keras.ops.reshape(index, [1, 1])
            ring = _value(self.ring)
            row = keras.ops.where(spike, keras.ops.stack([keras.ops.cast(step, STATE_DTYPE), z]), ring[index])
            self.ring.assign(keras.ops.scatter_update(ring, at, row[None]))
            if _OPS:
                steps = _value(self.ring_steps)
                kept = keras.ops.where(spike, keras.ops.cast(step, "int32"), steps[index])
                self.ring_steps.assign(keras.ops.scatter_update(steps, at, kept[None]))
            self.count.assign(count + keras.ops.cast(spike, _COUNT_DTYPE))
            return SpikeStep(z, loss_z, spike)

    def _host(self, variable):
        if not _OPS:
            return variable.numpy()
        from gradmon.backend import door

        return door.current().read(variable, self.observer)

    def read(self):
        """`(count, [(step, z), ...] oldest first)` of the spikes held (host side)."""
        count, ring = int(self._host(self.count)), np.array(self._host(self.ring), np.float64)
        if _OPS:
            ring[:, 0] = self._host(self.ring_steps)
        held = ring[ring[:, 0] >= 0]
        held = held[np.argsort(held[:, 0])]
        return count, [(int(s), float(z)) for s, z in held]


def batch_size(batch):
    """The number of examples in `batch`: an int, or the leading dimension of its first tensor
    (`(x, y, sample_weight)`, `x`, any nest), as Keras' loss tracker counts them."""
    if _OPS:  # the leading dimension is static on JAX and PyTorch
        if isinstance(batch, (int, np.integer)):
            return keras.ops.convert_to_tensor(int(batch), "int32")
        leaves = [t for t in keras.tree.flatten(batch) if t is not None]
        if not leaves:
            return None
        shape = keras.ops.shape(leaves[0])
        return keras.ops.cast(leaves[0] if len(shape) == 0 else shape[0], "int32")
    if isinstance(batch, (int, np.integer)):
        return tf.constant(int(batch), tf.int64)
    leaves = [t for t in tf.nest.flatten(batch) if t is not None]
    if not leaves:
        return None
    first = leaves[0]
    if tf.TensorShape(getattr(first, "shape", None) or np.shape(first)).rank == 0:
        return tf.cast(first, tf.int64)  # a count handed over as a tensor
    return tf.cast(tf.shape(first)[0], tf.int64)


def watch_batches(model):
    """Makes `model.train_step` hand each batch's size to the model's observer (`fit`).

    Installed once per model (an instance attribute, as Keras' `make_train_function`
    reads `self.train_step`); it hands the size over only while `on_spike` is set,
    so the step holds no op of it otherwise. Works whatever `train_step` the model
    has: Keras', gradmon's own or the model's.
    """
    if "_gradmon_batch_watch" in model.__dict__:
        return
    original = model.train_step

    def train_step(*args):  # (data); on JAX (state, data)
        observer = getattr(model, "_gradmon_observer", None)
        if observer is None or observer.on_spike is None:
            return original(*args)
        observer.observe_batch(args[-1])
        try:
            return original(*args)
        finally:
            observer.observe_batch(None)  # never left to a later trace

    object.__setattr__(model, "train_step", train_step)
    object.__setattr__(model, "_gradmon_batch_watch", True)


def global_norm(gradients):
    """The raw global norm the tracker judges, inside its name scope."""
    from gradmon.measure import moments as stats

    with _scope():
        return stats.global_norm(gradients)


# -- what a logged step writes ------------------------------------------------

class SpikeScores(statistics.Statistic):
    """`gradients/spike/zscore` (and `gradients/spike/loss_zscore` where the loss is known)."""

    chart = ("Gradients", "spikes: z-scores")

    def __init__(self, loss=False):
        self.loss = loss

    def labels(self, spec):
        return ["norm", "loss"] if self.loss else ["norm"]

    def tag(self, label):
        return tags.SPIKE_LOSS_ZSCORE if label == "loss" else tags.SPIKE_ZSCORE

    def compute(self, ctx):
        step = ctx.extras["spike"]
        loss_z = step.loss_zscore
        if loss_z is None:  # a step without its loss (observe_loss not called in it)
            loss_z = keras.ops.cast(np.nan, STATE_DTYPE)
        values = [keras.ops.cast(step.zscore, STATE_DTYPE)] + ([loss_z] if self.loss else [])
        return keras.ops.cast(keras.ops.stack(values), "float32")


def spike_count():
    """`gradients/spike/count`: a counter, written also on overflow steps (charted with the z-scores)."""
    counter = statistics.Counter("spikes", tags.SPIKE_COUNT)
    counter.chart = SpikeScores.chart
    return counter


class ZClipThreshold(statistics.Statistic):
    """`gradients/zclip/threshold`: the norm above which a `zclip` member clipped this step."""

    chart = ("Gradients", "global norm: raw vs transformed")

    def __init__(self, member, label):
        self.member, self._label = member, label

    def tag(self, label):
        return tags.zclip_threshold(self._label)

    def compute(self, ctx):
        # the variable read as the step sees it (JAX: its value in the step's state)
        threshold = keras.ops.convert_to_tensor(self.member.threshold)
        return keras.ops.reshape(keras.ops.cast(threshold, "float32"), [1])
