"""Device-side state of one observed optimizer, and its host-side reading.

The step stores numbers in a few non-trainable variables; the host reads them
back and turns them into `{tag: value}`. The layout of a record row follows
from the list of active statistics (`gradmon.statistics`): nothing here knows
any particular statistic.

A record row is `[step, overflow flag, values of statistic 1..., statistic 2...]`
in float64, one row per logged step, in a ring of `rows` rows indexed by the
count of logged steps (`logged`), not by the step: it holds the last `rows`
logged steps whatever the schedule (so the logged steps of a multi-step
execution, or of a `tf.function` loop between two `flush()` calls, are all
kept). The host counts what it has taken (`take`): logged steps overwritten
before they were taken are counted, never silently dropped.
"""

import numpy as np
import keras

from gradmon.backend import lazy_tf as _lazy_tf
from gradmon.backend import distribute as _distribute, keras_compat as _keras_compat
from gradmon.measure import spikes, statistics
from gradmon import tags
from gradmon._validation import invalid
from gradmon.publish import schedule  # the schedule's rule: the host sets it, the step applies it

tf = _lazy_tf.tensorflow()
# JAX / PyTorch (`gradmon.backend.door`): 32-bit state (JAX stores 64-bit variables in 32 bits
# without x64), the steps of the ring in an int32 column of their own, `keras.ops`
_OPS = not _lazy_tf.is_tensorflow()

HISTOGRAM_BUCKETS = 30
_HEADER = 2  # step, overflow flag
MAX_RING_BYTES = 256 * 2 ** 20  # the record ring's size on the device, at most
# the step counter, the counters and the schedule: one set per observed optimizer, shared by
# every recorder of it (one per variable list its updates were traced with)
SHARED = ("step", "skipped", "overflow", "nonfinite", "halted", "halted_at", "every", "log_at",
          "hist_every")


class Snapshot:
    """One logged step read back on the host.

    Attributes:
        step: the step (1-based count of the optimizer's observed updates).
        overflow: the loss-scaled gradient overflowed (only the counters are valid).
        values: `{tag: float}` as written.
        by_statistic: `{statistic: numpy vector over its labels}`.
    """

    def __init__(self, step, overflow, values, by_statistic):
        self.step, self.overflow = step, overflow
        self.values, self.by_statistic = values, by_statistic

    def __getitem__(self, tag):
        return self.values[tag]

    def __contains__(self, tag):
        return tag in self.values


class Recorder:
    """Variables for one observed optimizer (created outside any tf.function).

    Under a `tf.distribute` strategy every variable is replica-local
    (`_distribute.replica_local_variable`): each replica records the same
    numbers, those of the all-reduced gradient; the host reads the first copy.
    """

    def __init__(self, spec, statistics, rows, histograms, prefix=None, variables=(), shared=None):
        variable = _distribute.replica_local_variable
        self.spec, self.prefix = spec, prefix
        self.statistics = [s for s in statistics if s.active(spec)]
        self.slices, offset = [], _HEADER
        for s in self.statistics:
            labels = list(s.labels(spec))
            self.slices.append((s, labels, slice(offset, offset + len(labels))))
            offset += len(labels)
        if rows * offset * 8 > MAX_RING_BYTES:
            raise invalid("buffer_steps", f"at most {MAX_RING_BYTES // (offset * 8)} logged steps "
                          f"for these {offset - _HEADER} statistics per step (a ring of at most "
                          f"{MAX_RING_BYTES // 2 ** 20} MiB on the device); call flush() more often "
                          "instead", rows)
        self.state = {s: s.build(spec) for s in self.statistics}
        int64, float64, boolean = ("int32", "float32", "bool") if _OPS else (tf.int64, tf.float64, tf.bool)
        self.door = None  # JAX / PyTorch: the backend's door module (host reads and writes)
        self.observer = None  # whose trainer holds the state (JAX)
        # the pre-update weights of a logged step, for statistics that need them (one
        # copy of the trainable weights, filled on logged steps only)
        self.weight_buffers = None
        if any(s.needs_weights for s in self.statistics) and not _OPS:  # the door keeps them
            self.weight_buffers = [variable(tf.zeros(v.shape, v.dtype)) for v in variables]
        self.spikes = None  # the observer's SpikeTracker (`on_spike`), if any
        self.step = variable(0, dtype=int64, name="gradmon_step")
        self.skipped = variable(0, dtype=int64, name="gradmon_skipped")
        self.overflow = variable(0, dtype=int64, name="gradmon_overflow")
        # every step, measured or not: [steps whose update was non-finite (loss-scale overflows
        # left out), the first of them since the host last reported (-1: none), the latest]
        self.nonfinite = variable([0, -1, -1], dtype=int64, name="gradmon_nonfinite")
        # set once a step is refused under a "stop" policy: no later step applies
        self.halted = variable(False, dtype=boolean, name="gradmon_halted")
        self.halted_at = variable(-1, dtype=int64, name="gradmon_halted_at")  # the step that did
        # the schedule (owned by the host): every `every` steps, and at step `log_at`
        self.every = variable(1, dtype=int64, name="gradmon_every")
        self.log_at = variable(-1, dtype=int64, name="gradmon_log_at")
        self.hist_every = variable(0, dtype=int64, name="gradmon_hist_every")
        self.records = variable(np.concatenate(
            [-np.ones([rows, 1]), np.zeros([rows, offset - 1])], axis=1), dtype=float64)
        if _OPS:  # the step of each row, exact (a float32 column would stop at 2^24)
            self.record_steps = variable(-np.ones([rows], np.int32), dtype="int32",
                                         name="gradmon_record_steps")
        # logged steps written into the ring so far (the next row is `logged % rows`)
        self.logged = variable(0, dtype=int64, name="gradmon_logged")
        self.host_logged = 0  # `logged` when the host last took the ring (`take`)
        self.host_step = -1  # the latest step the host took from the ring
        self.host_histogram = None  # the histogram step the host last wrote
        if shared is not None:  # the same optimizer's updates, traced with other variables
            for name in SHARED:
                if hasattr(shared, name):
                    setattr(self, name, getattr(shared, name))
        self.histograms_wanted = histograms
        if histograms:
            self.hist_step = variable(-1, dtype=int64)
            # [raw (, transformed), group, (min, max, counts...)]
            kinds = 2 if spec.has_transform else 1
            self.histograms = variable(np.zeros([kinds, spec.num_groups, HISTOGRAM_BUCKETS + 2], np.float32),
                                       dtype="float32")
        self.tags = {s: [self._tag(s, label) for label in labels] for s, labels, _ in self.slices}
        # parsing a row is one zip over these (host cost per logged step matters)
        self._all_tags = [t for s, _, _ in self.slices for t in self.tags[s]]
        self._counter_columns = [(t, where.start + i) for s, labels, where in self.slices
                                 if isinstance(s, _ALWAYS_WRITTEN) for i, t in enumerate(self.tags[s])]

    def _tag(self, statistic, label):
        return tags.prefixed(self.prefix, statistic.tag(label))

    @property
    def rows(self):
        return int(self.records.shape[0])

    # -- inside the step ---------------------------------------------------

    def should_log(self, step):
        """Whether `step` is due (the host's schedule, held in `every` / `log_at`): a bool tensor."""
        # `every` is never 0 on the device: "never" is stored as a period no run reaches
        return schedule.is_due(step, self.every, self.log_at)

    def should_histogram(self, step):
        if not self.histograms_wanted:
            return tf.constant(False)
        return schedule.is_histogram_due(step, self.hist_every)

    def write(self, step, ctx, overflow):
        """Stores one logged step's statistics (an overflow step keeps only the counters)."""
        parts = [tf.stack([tf.cast(step, tf.float64), tf.cast(overflow, tf.float64)])]
        for statistic, labels, _ in self.slices:
            values = tf.reshape(tf.cast(statistic.compute(ctx), tf.float64), [len(labels)])
            parts.append(values)
        logged = self.logged.assign_add(1, read_value=True)
        row = tf.reshape(tf.math.floormod(logged - 1, self.rows), [1, 1])
        self.records.assign(tf.tensor_scatter_nd_update(self.records, row, tf.concat(parts, 0)[None]))
        return tf.constant(True)

    def row(self, ctx):
        """One logged step's statistics as a float32 row (JAX / PyTorch; the step is stored
        apart, in `record_steps`)."""
        parts = [keras.ops.zeros([_HEADER], "float32")]
        for statistic, labels, _ in self.slices:
            values = keras.ops.cast(statistic.compute(ctx), "float32")
            parts.append(keras.ops.reshape(values, [len(labels)]))
        return keras.ops.concatenate(parts, 0)

    def store(self, step, row, do_log):
        """Writes `row` into the ring when `do_log` holds (JAX / PyTorch); `row` `None`: nothing
        was measured (a host branch not taken)."""
        if row is None:
            return
        taken = keras.ops.cast(do_log, "int32")
        logged = self.logged.value + taken
        index = keras.ops.reshape(keras.ops.mod(logged - 1, self.rows), [1, 1])
        records = keras.ops.scatter_update(self.records.value, index, row[None])
        steps = keras.ops.scatter_update(self.record_steps.value, index,
                                         keras.ops.reshape(keras.ops.cast(step, "int32"), [1]))
        self.records.assign(keras.ops.where(do_log, records, self.records.value))
        self.record_steps.assign(keras.ops.where(do_log, steps, self.record_steps.value))
        self.logged.assign(logged)

    def count_nonfinite(self, step, bad):
        """Folds one step into `nonfinite` (a few scalar ops, no branch): `bad` is a bool scalar."""
        if _OPS and keras.backend.backend() == "torch":
            self._count_nonfinite_torch(step, bad)
            return
        held = _keras_compat.variable_value(self.nonfinite)
        dtype = keras.backend.standardize_dtype(self.nonfinite.dtype)  # int64; JAX / PyTorch int32
        # the count + 1; the first if none is pending; the latest: this step
        seen = held + keras.ops.convert_to_tensor([1, 0, 0], dtype)
        first_or_last = keras.ops.logical_or(held < 0, keras.ops.convert_to_tensor([False, False, True]))
        seen = keras.ops.where(first_or_last, keras.ops.cast(step, dtype), seen)
        self.nonfinite.assign(keras.ops.where(bad, seen, held))

    def _count_nonfinite_torch(self, step, bad):
        """`count_nonfinite` in three torch ops (PyTorch runs it eagerly every step: `keras.ops`
        would convert its constants from Python lists each time, several times dearer)."""
        import torch

        held = self.nonfinite.value
        constants = self.__dict__.get("_nonfinite_constants")
        if constants is None or constants[0].device != held.device:
            constants = (torch.tensor([1, 0, 0], dtype=held.dtype, device=held.device),
                         torch.tensor([False, False, True], device=held.device))
            self._nonfinite_constants = constants
        count, last = constants
        # the count + 1; the first if none is pending; the latest: this step
        seen = torch.where(torch.logical_or(held < 0, last), torch.as_tensor(step, dtype=held.dtype),
                           held + count)
        self.nonfinite.assign(torch.where(torch.as_tensor(bad), seen, held))

    def keep_weights(self, variables):
        for buffer, v in zip(self.weight_buffers, variables):
            buffer.assign(_keras_compat.variable_value(v))
        return tf.constant(True)

    def write_histograms(self, step, rows):
        self.histograms.assign(rows)
        self.hist_step.assign(step)
        return tf.constant(True)

    @property
    def histogram_size(self):
        """The number of entries of `histograms`, flat (what a JAX branch returns)."""
        return int(np.prod(self.histograms.shape))

    def store_histograms(self, step, values, due):
        """Writes flat `values` into `histograms` when `due` holds (JAX / PyTorch); `values`
        `None`: none were taken (a host branch not taken)."""
        if values is None:
            return
        rows = keras.ops.reshape(values, self.histograms.shape)
        self.histograms.assign(keras.ops.where(due, rows, self.histograms.value))
        self.hist_step.assign(keras.ops.where(due, keras.ops.cast(step, "int32"), self.hist_step.value))

    # -- on the host -------------------------------------------------------

    def carry_counters(self, other):
        """Sets this recorder's step counter, counters and schedule (`SHARED`) to `other`'s
        values, read on the host (a JAX recompile: new variables in the new optimizer)."""
        for name in SHARED:
            if hasattr(other, name):
                self.host_assign(getattr(self, name), other.host_read(getattr(other, name)))

    def host_read(self, variable):
        """A state variable's value on the host (JAX: the trainer's current state)."""
        if self.door is None:
            return variable.numpy()
        return self.door.read(variable, self.observer)

    def host_assign(self, variable, value):
        """Sets a state variable from the host (JAX: the next step starts from it)."""
        if self.door is None:
            variable.assign(value)
            return
        if keras.backend.standardize_dtype(variable.dtype) == "int32":  # e.g. the schedule's
            value = np.clip(value, -2 ** 31, 2 ** 31 - 1)  # "never" period: no int32 step reaches it
        self.door.assign(variable, np.asarray(value, variable.dtype), self.observer)

    def forget_after(self, step):
        """Drops the held rows of steps after `step` (the axis went back: they come again)."""
        self.host_step = min(self.host_step, step)
        spikes.forget_steps_after(self.records if self.door is None else self.record_steps, step,
                                  self.host_read, self.host_assign)

    def _host_rows(self):
        rows = self.host_read(self.records)
        if self.door is not None:
            rows = rows.astype(np.float64)
            rows[:, 0] = self.host_read(self.record_steps)
        return rows

    def read(self, after_step=-1):
        """Snapshots of the held logged steps later than `after_step`, oldest first."""
        rows = self._host_rows()
        rows = rows[rows[:, 0] > after_step]
        return [self._parse(r) for r in rows[np.argsort(rows[:, 0])]]

    def take(self, after_step=-1):
        """The logged steps not taken yet (later than `after_step`), and what the ring lost.

        Two device reads. Returns `(snapshots, lost, (first, last))`: the
        snapshots oldest first; `lost` logged steps were overwritten before
        this call (the ring holds the last `rows`), all of them among steps
        `first..last` (`lost == 0`: `None`).
        """
        logged = int(self.host_read(self.logged))
        rows = self._host_rows()
        rows = rows[np.argsort(rows[:, 0])]
        new = rows[rows[:, 0] > self.host_step]
        lost = max(0, logged - self.host_logged - self.rows)
        between = None
        if lost:
            last = int(new[0, 0]) - 1 if len(new) else int(rows[-1, 0])
            between = (self.host_step + 1, last)
        self.host_logged = logged
        if len(rows) and rows[-1, 0] >= 0:
            self.host_step = max(self.host_step, int(rows[-1, 0]))
        new = new[new[:, 0] > after_step]
        return [self._parse(r) for r in new], lost, between

    def _parse(self, row):
        overflow = bool(row[1])
        if overflow:  # the true gradient of an overflow step is unknown: counters only
            values = {tag: float(row[column]) for tag, column in self._counter_columns}
        else:
            values = dict(zip(self._all_tags, row[_HEADER:].tolist()))
        by_statistic = {statistic: row[where] for statistic, _, where in self.slices}
        snapshot = Snapshot(int(row[0]), overflow, values, by_statistic)
        snapshot.recorder = self  # whose statistics and groups the values are
        return snapshot

    def read_nonfinite(self):
        """`(count, first pending, latest)` of the non-finite steps (one device read)."""
        count, first, last = (int(x) for x in self.host_read(self.nonfinite))
        return count, first, last

    def nonfinite_reported(self, count, last):
        """Marks the non-finite steps up to now as reported (the next `first` is a new one)."""
        self.host_assign(self.nonfinite, [count, -1, last])

    def read_histograms(self):
        """`(step, array[2, groups, 2 + buckets])` of the latest histogram step, or `None`."""
        if not self.histograms_wanted:
            return None
        step = int(self.host_read(self.hist_step))
        return None if step < 0 else (step, self.host_read(self.histograms))

    def descriptions(self):
        """`{tag: description}` of every tag this recorder writes (made once)."""
        if "_descriptions" in self.__dict__:
            return self._descriptions
        out = {}
        for statistic, labels, _ in self.slices:
            for label, tag in zip(labels, self.tags[statistic]):
                text = statistic.description(label) or tags.describe(statistic.tag(label))
                if text:
                    out[tag] = text
        self._descriptions = out
        return out


_ALWAYS_WRITTEN = (statistics.Counter, statistics.LossScale)
