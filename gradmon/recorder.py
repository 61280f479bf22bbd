"""Device-side state of one observed optimizer, and its host-side reading.

The step stores numbers in a few non-trainable variables; the host reads them
back and turns them into `{tag: value}`. The layout of a record row follows
from the list of active statistics (`gradmon.statistics`): nothing here knows
any particular statistic.

A record row is `[step, overflow flag, values of statistic 1..., statistic 2...]`
in float64, one row per logged step, in a ring of `rows` rows (so the logged
steps of a multi-step execution, or of a `tf.function` loop between two
`flush()` calls, are all kept).
"""

import numpy as np
import tensorflow as tf

from gradmon import _distribute, statistics, tags

HISTOGRAM_BUCKETS = 30
_HEADER = 2  # step, overflow flag


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

    def __init__(self, spec, statistics, rows, histograms, prefix=None, variables=()):
        variable = _distribute.replica_local_variable
        self.spec, self.prefix = spec, prefix
        self.statistics = [s for s in statistics if s.active(spec)]
        self.slices, offset = [], _HEADER
        for s in self.statistics:
            labels = list(s.labels(spec))
            self.slices.append((s, labels, slice(offset, offset + len(labels))))
            offset += len(labels)
        self.state = {s: s.build(spec) for s in self.statistics}
        # the pre-update weights of a logged step, for statistics that need them (one
        # copy of the trainable weights, filled on logged steps only)
        self.weight_buffers = None
        if any(s.needs_weights for s in self.statistics):
            self.weight_buffers = [variable(tf.zeros(v.shape, v.dtype)) for v in variables]
        self.spikes = None  # the observer's SpikeTracker (`on_spike`), if any
        self.step = variable(0, dtype=tf.int64, name="gradmon_step")
        self.skipped = variable(0, dtype=tf.int64, name="gradmon_skipped")
        self.overflow = variable(0, dtype=tf.int64, name="gradmon_overflow")
        # set once a step is refused under a "stop" policy: no later step applies
        self.halted = variable(False, dtype=tf.bool, name="gradmon_halted")
        self.halted_at = variable(-1, dtype=tf.int64, name="gradmon_halted_at")  # the step that did
        # the schedule (owned by the host): every `every` steps, and at step `log_at`
        self.every = variable(1, dtype=tf.int64, name="gradmon_every")
        self.log_at = variable(-1, dtype=tf.int64, name="gradmon_log_at")
        self.hist_every = variable(0, dtype=tf.int64, name="gradmon_hist_every")
        self.records = variable(np.concatenate(
            [-np.ones([rows, 1]), np.zeros([rows, offset - 1])], axis=1), dtype=tf.float64)
        self.histograms_wanted = histograms
        if histograms:
            self.hist_step = variable(-1, dtype=tf.int64)
            # [raw (, transformed), group, (min, max, counts...)]
            kinds = 2 if spec.has_transform else 1
            self.histograms = variable(tf.zeros([kinds, spec.num_groups, HISTOGRAM_BUCKETS + 2]))
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

    def scheduled(self, step, every, log_at):
        # `every` is never 0 on the device: "never" is stored as a period no run reaches
        return tf.logical_or(tf.equal(tf.math.floormod(step, every), 0), tf.equal(step, log_at))

    def should_log(self, step):
        return self.scheduled(step, self.every, self.log_at)

    def should_histogram(self, step):
        if not self.histograms_wanted:
            return tf.constant(False)
        return tf.equal(tf.math.floormod(step, self.hist_every), 0)

    def write(self, step, ctx, overflow):
        """Stores one logged step's statistics (an overflow step keeps only the counters)."""
        parts = [tf.stack([tf.cast(step, tf.float64), tf.cast(overflow, tf.float64)])]
        for statistic, labels, _ in self.slices:
            values = tf.reshape(tf.cast(statistic.compute(ctx), tf.float64), [len(labels)])
            parts.append(values)
        row = tf.reshape(tf.math.floormod(step, self.rows), [1, 1])
        self.records.assign(tf.tensor_scatter_nd_update(self.records, row, tf.concat(parts, 0)[None]))
        return tf.constant(True)

    def keep_weights(self, variables):
        for buffer, v in zip(self.weight_buffers, variables):
            buffer.assign(v.value)
        return tf.constant(True)

    def write_histograms(self, step, rows):
        self.histograms.assign(rows)
        self.hist_step.assign(step)
        return tf.constant(True)

    # -- on the host -------------------------------------------------------

    def read(self, after_step=-1):
        """Snapshots of the held logged steps later than `after_step`, oldest first."""
        rows = self.records.numpy()
        rows = rows[rows[:, 0] > after_step]
        return [self._parse(r) for r in rows[np.argsort(rows[:, 0])]]

    def _parse(self, row):
        overflow = bool(row[1])
        if overflow:  # the true gradient of an overflow step is unknown: counters only
            values = {tag: float(row[column]) for tag, column in self._counter_columns}
        else:
            values = dict(zip(self._all_tags, row[_HEADER:].tolist()))
        by_statistic = {statistic: row[where] for statistic, _, where in self.slices}
        return Snapshot(int(row[0]), overflow, values, by_statistic)

    def read_histograms(self):
        """`(step, array[2, groups, 2 + buckets])` of the latest histogram step, or `None`."""
        if not self.histograms_wanted or int(self.hist_step.numpy()) < 0:
            return None
        return int(self.hist_step.numpy()), self.histograms.numpy()

    def descriptions(self):
        """`{tag: description}` of every tag this recorder writes."""
        out = {}
        for statistic, labels, _ in self.slices:
            for label, tag in zip(labels, self.tags[statistic]):
                text = statistic.description(label) or tags.describe(statistic.tag(label))
                if text:
                    out[tag] = text
        return out


_ALWAYS_WRITTEN = (statistics.Counter, statistics.LossScale)
