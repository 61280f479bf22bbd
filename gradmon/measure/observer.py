"""Observing an optimizer at its door: `observe(optimizer)` and the `Observer`.

Every Keras training path ends in `optimizer.apply(grads, variables)`:
Keras' `train_step`, a model's own `train_step`, a custom `GradientTape`
loop. Keras' `LossScaleOptimizer` wraps an optimizer at that door; gradmon
hooks it (the optimizer object stays the same: saving, learning-rate
schedules and callbacks that touch it are unchanged). The hooked `apply`
runs the `GradientPipeline`, measures the statistics on scheduled steps into
a `Recorder` and hands the update on. The host reads the recorder back
(`flush`) and writes through a writer.
"""

import atexit
import sys
import time
import warnings
import weakref

import tensorflow as tf

from gradmon.backend import distribute as _distribute, keras_compat as _keras_compat
from gradmon.measure import recorder, spikes, statistics, transforms
from gradmon import tags
from gradmon._validation import (check_choice, check_log_dir, check_non_negative_int, check_positive,
                                 invalid, warn_once)
from gradmon.measure.pipeline import GradientPipeline

GROUPINGS = ("variable", "layer")
_HOOK = "_gradmon_observer"
_NEVER = 2 ** 62  # a period no run reaches: "never" without a branch on the device
_OWN_WRITER = object()  # `flush()`'s default: the observer's own writer
# flush() writes the health report at most this often; close() always
_REPORT_EVERY_SECONDS = 60.0
MAX_BUFFER_STEPS = 65536  # and the ring's bytes at most `recorder.MAX_RING_BYTES`


def histogram_rows(grads, segment_ids, num_groups):
    """Per-group `[min, max, counts...]` over the finite entries, TensorBoard's bucketing."""
    buckets = recorder.HISTOGRAM_BUCKETS
    per_group = [[] for _ in range(num_groups)]
    for g, gid in zip(grads, segment_ids):
        if g is not None:
            per_group[gid].append(tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1]))
    rows = []
    for values in per_group:
        if not values:
            rows.append(tf.zeros([buckets + 2]))
            continue
        v = tf.concat(values, axis=0)
        finite = tf.math.is_finite(v)
        big, any_finite = tf.float32.max, tf.reduce_any(finite)
        # with no finite entry at all the histogram is empty, over [0, 0]
        lo = tf.where(any_finite, tf.reduce_min(tf.where(finite, v, big)), 0.0)
        hi = tf.where(any_finite, tf.reduce_max(tf.where(finite, v, -big)), 0.0)
        width = (hi - lo) / buckets
        index = tf.where(width > 0, tf.floor(tf.math.divide_no_nan(v - lo, width)),
                         tf.fill(tf.shape(v), float(buckets - 1)))
        index = tf.cast(tf.clip_by_value(index, 0, buckets - 1), tf.int32)
        counts = tf.math.unsorted_segment_sum(tf.cast(finite, tf.float32), index, buckets)
        rows.append(tf.concat([[lo, hi], counts], axis=0))
    return tf.stack(rows)


class Observer:
    """Measures (and transforms) what an optimizer applies.

    Args:
        transform: gradient transform, or `None`. Defaults to `None`.
        grouping: `"layer"` (one row per layer: its variables taken as one vector)
            or `"variable"` (one row per variable). Defaults to `"layer"`.
        stats: names from `gradmon.STAT_NAMES` and/or `Statistic` instances,
            `None` for the defaults
            (`gradmon.statistics.DEFAULT_STATS`: norm, update ratio) or `"all"`. Defaults to `None`.
        on_nonfinite: `"warn"`, `"skip"` or `"stop"`. Defaults to `"warn"`.
        name: prefix of every tag (`"critic"` -> `critic/gradients/...`), or `None`.
        buffer_steps: logged steps held between two reads (whatever the schedule; at most
            `MAX_BUFFER_STEPS`, and a ring of at most 256 MiB). Defaults to `16`.
        on_spike: `None` (spikes not tracked), `"warn"`, `"skip"` or `"stop"`. Defaults to `None`.
        spike_threshold: z-score of the log of the raw global norm above which it is a spike
            (full batches only). Defaults to `5.0`.
    """

    def __init__(self, transform=None, grouping="layer", stats=None, on_nonfinite="warn",
                 name=None, buffer_steps=16, on_spike=None,
                 spike_threshold=spikes.DEFAULT_SPIKE_THRESHOLD):
        self.pipeline = GradientPipeline(transform, on_nonfinite, on_spike)
        self.spike_threshold = check_positive("spike_threshold", spike_threshold)
        self.spikes = None  # the SpikeTracker, built with the recorder when on_spike is set
        self.spikes_seen = []  # (step, z) of the spikes read back so far
        self._batch = None  # this step's batch size for the spike detector (`observe_batch`)
        self._spike_count_read = 0
        self._spikes_written = -1  # the step of the last spike written
        self.grouping = check_choice("grouping", grouping, GROUPINGS)
        self.selected, self.custom = statistics.check_stats(stats)
        if name is not None and (not isinstance(name, str) or not tags.sanitize(name).strip("_")):
            raise invalid("name", "a non-empty string (a tag prefix) or None", name)
        self.name = name
        self.buffer_steps = max(1, check_non_negative_int("buffer_steps", buffer_steps))
        if self.buffer_steps > MAX_BUFFER_STEPS:
            raise invalid("buffer_steps", f"at most {MAX_BUFFER_STEPS} logged steps held on the "
                          "device (call flush() more often instead)", buffer_steps)
        self.extras_source = None  # gradmon's own train step: penalties, noise scale
        self.recorder = None  # the recorder of the latest trace
        self._rings = []  # every recorder `flush` reads (one per variable list traced)
        self._by_variables = {}  # (variable ids, optimizer id) -> (settings key, recorder)
        self._pending = []  # snapshots read from a retired recorder, not written yet
        self._reads = 0  # host reads of the measured steps (`read`)
        self.histograms = False
        self._key = None
        self.every, self.log_at, self.hist_every = 1, -1, 0
        self.last_written = -1
        self.writer = None
        self.min_rows = 1  # e.g. steps_per_execution
        self._restored_step = None
        self.monitor = None  # the GradientMonitor writing for this observer, if any
        # read while tracing: False traces an update that measures nothing (steps the host
        # knows are not written run such a trace; see GradientMonitor)
        self.measuring = True

    def restore_step(self, step):
        """Continues the step axis at `step` (after loading a saved model)."""
        self._restored_step = int(step)
        self.last_written = max(self.last_written, int(step))
        if self.recorder is not None:
            self.recorder.step.assign(int(step))

    @property
    def transform(self):
        return self.pipeline.transform

    @property
    def on_nonfinite(self):
        return self.pipeline.on_nonfinite

    @property
    def on_spike(self):
        return self.pipeline.on_spike

    # -- hooking -----------------------------------------------------------

    def hook(self, optimizer):
        """Routes `optimizer.apply` (and so `apply_gradients`) through this observer."""
        current = getattr(optimizer, _HOOK, None)
        if current is self:
            return optimizer
        if current is not None:  # e.g. a notebook cell run again: this observer replaces it
            current.release(optimizer)
            self._adopt(current)
        original = type(optimizer).apply.__get__(optimizer)

        def apply(grads, trainable_variables=None):
            return self.apply(optimizer, original, grads, trainable_variables)

        object.__setattr__(optimizer, "apply", apply)
        object.__setattr__(optimizer, _HOOK, self)
        # one all-reduce per step under a strategy: the pipeline's
        _keras_compat.skip_optimizer_all_reduce(optimizer)
        self.optimizer = optimizer
        return optimizer

    def release(self, optimizer):
        """Hands `optimizer` over to another observer: writes what this one measured (to its own
        writer, which it then closes) and unhooks it."""
        if self.writer is not None and self.monitor is None:
            self.close()
        self.unhook(optimizer)

    def _adopt(self, old):
        """Takes over a replaced observer's recorders: traces made before still write into them,
        so they are read here, and the step axis goes on (their step counter is shared)."""
        self._rings += [r for r in old._rings if r not in self._rings]
        self._pending += old._pending
        old._pending = []
        if self._restored_step is None and old.recorder is None:
            self._restored_step = old._restored_step

    def unhook(self, optimizer):
        """Undoes `hook`: `optimizer.apply` (and its own all-reduce) are Keras' again."""
        if getattr(optimizer, _HOOK, None) is not self:
            return
        for name in ("apply", _HOOK, "flush", "gradmon"):
            optimizer.__dict__.pop(name, None)
        _keras_compat.restore_optimizer_all_reduce(optimizer)

    # -- building (outside any tf.function) ---------------------------------

    def ensure_built(self, optimizer, variables):
        """Makes `recorder` the recorder of these variables and settings, creating it if needed;
        True if `recorder` changed.

        One optimizer applied from several traces with different variables (two
        models sharing it, a subset then all variables) gets one recorder per
        variable list, all kept and read by `flush`, sharing one step counter and
        schedule (`recorder.SHARED`): no trace writes into a recorder nobody reads.
        """
        rows = max(self.min_rows, self.buffer_steps)
        extras = self.extras_source.spec_extras() if self.extras_source else {}
        # the optimizer too: its clipping and loss scaling shape the statistics (a recompile)
        variables_key = (tuple(id(v) for v in variables), id(optimizer))
        key = variables_key + (rows, self.histograms, tuple(sorted(extras.items())))
        if self._key == key:
            return False
        held = self._by_variables.get(variables_key)
        if held is not None and held[0] == key:  # a trace with other variables ran in between
            self.recorder, self._key = held[1], key
            return True
        clip = transforms.from_optimizer(_keras_compat.base_optimizer(optimizer))
        observed = self.pipeline.observed_transform(clip)
        groups, ids = tags.group_names(variables, self.grouping, self.name)
        spec = statistics.Spec(
            groups, ids, has_transform=observed is not None,
            fraction_names=observed.fraction_names() if observed else (),
            loss_scaled=_keras_compat.is_loss_scale_optimizer(optimizer),
            moment_slots=_keras_compat.moment_slots(optimizer),
            full_moments=bool(set(self.selected) & {"max_abs", "rms", "zero_fraction", "nonfinite"}),
            **extras)
        stats = statistics.default_statistics(self.selected) + self._spike_statistics(observed) + self.custom
        strategy = getattr(optimizer, "_distribution_strategy", None)
        with tf.init_scope(), _distribute.strategy_scope(strategy):
            if not optimizer.built and variables:
                optimizer.build(variables)  # slots cannot be created inside tf.cond
            if self.transform is not None:
                self.transform.build(variables)  # e.g. zclip's running statistics
            if self.on_spike is not None and self.spikes is None:
                self.spikes = spikes.SpikeTracker(self.spike_threshold, rows, loss=self._knows_loss)
            # the step counter and counters: those of this optimizer's other recorders, if any
            same = [r for r in self._rings if r.optimizer_id == id(optimizer)]
            shared = same[-1] if same else self.recorder
            self.recorder = recorder.Recorder(spec, stats, rows, self.histograms, self.name, variables,
                                              shared=shared)
            self.recorder.spikes = self.spikes
            self.recorder.optimizer_id = id(optimizer)
            if shared is None and self._restored_step is not None:
                self.recorder.step.assign(self._restored_step)
            if held is not None:  # these variables, other settings: its steps are read now
                self._retire(held[1])
            self._rings.append(self.recorder)
            self._by_variables[variables_key] = (key, self.recorder)
            if getattr(self, "_restored_state", None):  # a loaded model's counters and statistics
                from gradmon import saving

                saving.apply_restored(self)
            self._push_schedule()
        tags.register_descriptions(self.recorder.descriptions())
        self._key = key
        return True

    @property
    def _knows_loss(self):
        """Whether the loss reaches the step (gradmon's own train step hands it over)."""
        return self.extras_source is not None and getattr(self.extras_source, "loss", False)

    def _spike_statistics(self, observed):
        """The spike z-scores and count (with `on_spike`) and each zclip member's threshold."""
        out = []
        if self.on_spike is not None:
            out += [spikes.SpikeScores(loss=self._knows_loss), spikes.spike_count()]
        if observed is None:
            return out
        # the chain's (unique) fraction names follow its members, each member's in a run
        names, first = observed.fraction_names(), 0
        for member in observed.members():
            if isinstance(member, transforms.zclip):
                out.append(spikes.ZClipThreshold(member, names[first]))
            first += len(member.fraction_names())
        return out

    # -- the schedule (set by the host) -------------------------------------

    def set_schedule(self, every=None, log_at=None, hist_every=None):
        """Measures at steps divisible by `every` (0: never), at step `log_at`, and
        histograms every `hist_every` steps (0: never)."""
        if every is not None:
            self.every = int(every)
        if log_at is not None:
            self.log_at = int(log_at)
        if hist_every is not None:
            self.hist_every = int(hist_every)
        self._push_schedule()

    def _push_schedule(self):
        if self.recorder is not None:
            self.recorder.every.assign(self.every if self.every > 0 else _NEVER)
            self.recorder.log_at.assign(self.log_at)
            self.recorder.hist_every.assign(self.hist_every if self.hist_every > 0 else _NEVER)

    def is_scheduled(self, step):
        """Host mirror of the device schedule."""
        return (self.every > 0 and step % self.every == 0) or step == self.log_at

    @property
    def step(self):
        """Observed updates so far (one device-to-host read)."""
        rec = self.recorder or (self._rings[-1] if self._rings else None)  # adopted ones too
        if rec is None:
            return self._restored_step or 0
        return int(rec.step.numpy())

    # -- the hooked apply --------------------------------------------------

    def apply(self, optimizer, original_apply, grads, trainable_variables=None):
        """The hooked `optimizer.apply`: pipeline, schedule, measure, update."""
        grads = list(grads)
        if not grads:
            return original_apply(grads, trainable_variables)
        variables = list(trainable_variables) if trainable_variables is not None \
            else _keras_compat.optimizer_variables(optimizer)
        self._warn_missing(variables, grads)
        self.ensure_built(optimizer, variables)
        rec, extras = self.recorder, self._take_extras()
        batch, self._batch = self._batch, None  # taken with the extras: before any all-reduce
        step = rec.step.assign_add(1, read_value=True)
        clip = transforms.from_optimizer(_keras_compat.base_optimizer(optimizer))
        scale = _keras_compat.loss_scale(optimizer)
        prepared = self.pipeline.prepare(grads, variables, scale, clip)
        if prepared.scale is not None:
            extras["loss_scale"] = tf.identity(prepared.scale)  # before the update changes it
        spike = None
        if self.spikes is not None:  # every step, measured or not: the statistics are running
            spike = self.spikes.update(step, spikes.global_norm(prepared.raw), extras.get("loss"), batch)
            extras["spike"] = spike
        verdict = self.pipeline.verdict(prepared, rec.spec.loss_scaled,
                                        rec.halted if self.pipeline.stops else None,
                                        None if spike is None else spike.spike)
        update = _Update(optimizer, original_apply, prepared, variables, verdict)
        self._count(verdict, step, prepared)
        if not self.measuring:
            update.run()
            return
        do_log = rec.should_log(step)
        if verdict is not None:
            if self.on_nonfinite != "warn":
                # the host must see a refused step, to stop or to name the variables
                do_log = tf.logical_or(do_log, tf.logical_and(
                    tf.logical_not(verdict.finite), tf.logical_not(verdict.overflow)))
        if rec.histograms_wanted:
            _keras_compat.lazy_cond(rec.should_histogram(step),
                                    lambda: rec.write_histograms(step, _histograms(rec.spec, prepared)),
                                    lambda: tf.constant(False))
        _run_step(rec, step, do_log, update, extras)
        if tf.executing_eagerly():
            spiked = spike is not None and bool(spike.spike)
            if self.writer is not None and (self._eager_due(step) or spiked):
                self.flush(report=False)
            elif spiked:
                self.read_spikes()  # warns, naming the step

    def _take_extras(self):
        extras = {}
        if self.extras_source is not None:
            extras = self.extras_source.take_extras()
        return extras

    def observe_loss(self, loss):
        """Hands this step's loss to the spike detector (`gradients/spike/loss_zscore`).

        For custom loops: call it in the same step (the same `tf.function`),
        before `apply_gradients`, from the first step on. gradmon's own train
        step does it by itself; without `on_spike` it does nothing.

        Args:
            loss: the scalar loss of the batch (unscaled: not multiplied by a loss scale).
        """
        if self.on_spike is None:
            return
        if self.extras_source is None:
            from gradmon.measure.train_step import Extras

            self.extras_source = Extras(loss=True)
        elif not getattr(self.extras_source, "loss", False):
            return  # a model's own train_step: no loss reaches the step
        if self.recorder is not None and not any(
                isinstance(s, spikes.SpikeScores) and s.loss for s in self.recorder.statistics):
            warn_once(("late-loss", id(self)),
                      "gradmon: observe_loss() was first called after the first update; the loss "
                      "z-score is written only when the loss is observed from the first step on.")
            return
        self.extras_source.pending["loss"] = loss

    def observe_batch(self, batch):
        """Hands this step's batch (or its size) to the spike detector.

        A batch smaller than the largest seen so far (the last, partial batch of
        an epoch) is then neither judged nor folded into the running statistics:
        its gradient is noisier by nature, not a spike. In `fit` gradmon does it
        by itself; in a custom loop call it in the same step (the same
        `tf.function`) before `apply_gradients`, or every step is judged. Without
        `on_spike` it does nothing.

        Args:
            batch: the batch (`x`, `(x, y)`, any nest: the leading dimension of
                its first tensor is counted) or the number of examples; `None` forgets it.
        """
        if self.on_spike is None or batch is None:
            self._batch = None
            return
        self._batch = spikes.batch_size(batch)

    def _count(self, verdict, step, prepared):
        rec = self.recorder
        if verdict is None:  # "warn", no loss scaling, no refused spikes: only the finiteness
            rec.count_nonfinite(step, tf.logical_not(self.pipeline.finite_applied(prepared)))
            return
        rec.count_nonfinite(step, tf.logical_and(tf.logical_not(verdict.finite),
                                                 tf.logical_not(verdict.overflow)))
        rec.skipped.assign_add(tf.cast(verdict.skipped, tf.int64))
        rec.overflow.assign_add(tf.cast(verdict.overflow, tf.int64))
        if verdict.halts is not None:
            first = tf.logical_and(verdict.halts, tf.logical_not(rec.halted))
            rec.halted_at.assign(tf.where(first, step, rec.halted_at))
            rec.halted.assign(tf.logical_or(rec.halted, verdict.halts))

    def _eager_due(self, step):
        return self.is_scheduled(int(step)) or bool(self.on_nonfinite != "warn")

    def _warn_missing(self, variables, grads):
        missing = [getattr(v, "path", None) or v.name for v, g in zip(variables, grads) if g is None]
        if missing:
            warn_once(("no-gradient", id(self), tuple(missing)),
                      f"gradmon: no gradient for variables {missing}; they are reported "
                      f"under `{tags.NO_GRADIENT}` and have zero gradient statistics.")

    # -- host side -----------------------------------------------------------

    def read(self, count_lost=True):
        """Snapshots of the measured steps not yet read, oldest first (marks them read).

        Measured steps overwritten on the device before this read are warned of
        every time, with their count and steps (two device reads per recorder).

        Args:
            count_lost: warn of overwritten steps (`False`: only the latest was
                wanted, e.g. `update_freq="epoch"` over an epoch of unknown length).
        """
        snapshots, self._pending = self._pending, []
        for rec in self._rings:
            snapshots += self._take(rec, count_lost)
        self._reads += 1
        snapshots.sort(key=lambda snapshot: snapshot.step)
        if snapshots:
            self.last_written = max(self.last_written, snapshots[-1].step)
        return snapshots

    def _take(self, rec, count_lost=True):
        snapshots, lost, between = rec.take(self.last_written)
        if lost and count_lost:
            self._report_lost(rec, lost, *between)
        return snapshots

    def _retire(self, rec):
        """Stops reading `rec` (replaced for the same variables): its measured steps are kept for
        the next `flush`."""
        self._pending += self._take(rec)
        self._rings.remove(rec)

    def _lost_steps(self, lost, first, last):
        """The steps among `first..last` that were measured and lost, in words."""
        every = self.every if self.every > 0 else None
        start = max(first, 1)
        due = [] if every is None else list(range(-(-start // every) * every, last + 1, every)[:lost + 1])
        if first <= self.log_at <= last and self.log_at not in due:
            due = sorted(due + [self.log_at])
        if len(due) != lost:  # refused steps are measured too: only the range is known
            return f"among steps {first}..{last}"
        if lost <= 4:
            return "step" + ("s " + ", ".join(map(str, due[:-1])) + " and " if lost > 1 else " ") + str(due[-1])
        return f"steps {due[0]}, {due[1]}, ..., {due[-1]}"

    def _report_lost(self, rec, lost, first, last):
        """Warns (every time) that `lost` measured steps of `rec` were overwritten before a read."""
        ring = f"the device holds the last {rec.rows} measured steps (buffer_steps={self.buffer_steps})"
        if self._reads == 0:
            cause = (f"flush() was never called before; {ring}. In a tf.function loop call "
                     "`opt.flush()` at least every that many measured steps; in `model.fit` add "
                     "`gradmon.GradientMonitor(log_dir)` to the callbacks")
        else:
            cause = f"{ring}. Call `opt.flush()` at least every {rec.rows} measured steps"
            if self.every > 1:
                cause += f" ({rec.rows * self.every} updates at update_freq={self.every})"
        warnings.warn(
            f"gradmon: {lost} measured step{'s' if lost > 1 else ''} "
            f"({self._lost_steps(lost, first, last)}) {'were' if lost > 1 else 'was'} overwritten "
            f"on the device before {'they were' if lost > 1 else 'it was'} written: {cause}, or "
            "raise buffer_steps.", stacklevel=5)

    @property
    def stopped(self):
        """Whether a non-finite step (`on_nonfinite="stop"`) or a spike (`on_spike="stop"`)
        stopped the updates."""
        return self.recorder is not None and bool(self.recorder.halted.numpy())

    def stop_cause(self):
        """`(step, cause, policy)` of the step that stopped the updates (host side, once `stopped`).

        The step is recorded on the device when it halts, measured or not; a
        spike is named with its z-score.
        """
        step = int(self.recorder.halted_at.numpy())
        spiked = dict(self.spikes_seen + self.read_spikes(report=False))  # the stop names it
        if self.on_spike == "stop" and (step in spiked or self.on_nonfinite != "stop"):
            z = f" (z = {spiked[step]:.1f})" if step in spiked else ""  # unless the ring lost it
            return step, f"a gradient-norm spike{z}", "on_spike"
        return step, "non-finite gradients", "on_nonfinite"

    def read_spikes(self, report=True):
        """The spikes not read yet, `[(step, z), ...]` oldest first; warns naming their steps.

        Two device reads (the count and a small ring); also appended to `spikes_seen`.

        Args:
            report: warn of the new spikes. Defaults to `True`.
        """
        if self.spikes is None:
            return []
        count, held = self.spikes.read()
        last = self.spikes_seen[-1][0] if self.spikes_seen else -1
        new = [(s, z) for s, z in held if s > last]
        if count - self._spike_count_read > len(new):
            warn_once(("lost-spikes", id(self)),
                      f"gradmon: {count - self._spike_count_read - len(new)} spikes were overwritten "
                      f"before they were read (the ring holds {self.spikes.rows}); they are counted in "
                      f"`{tags.SPIKE_COUNT}` but not written under `{tags.SPIKE_AT}`.")
        self._spike_count_read = count
        self.spikes_seen += new
        if new and report:
            report_spikes(self, new)
        return new

    def flush(self, writer=_OWN_WRITER, latest_only=False, histograms=True, report=True):
        """Writes the measured steps not yet written (idempotent); returns their snapshots.

        Args:
            writer: where to write; defaults to the writer of `observe(log_dir=...)`,
                or, once a `GradientMonitor` has adopted this observer (which closed that
                writer), to the monitor's (`GradientMonitor.flush_writer`). `None`: read and
                warn only, e.g. a non-chief worker.
            latest_only: write only the latest of them (`update_freq="epoch"`).
            histograms: also look for new histograms (two device reads).
            report: with the observer's own writer, also write the health report of the
                run so far (`gradmon.writer.write_report`) when steps were written.
                Defaults to `True`.
        """
        own = writer is _OWN_WRITER
        writer = self.writer if writer is _OWN_WRITER else writer
        if own and writer is None and self.monitor is not None:
            writer = self.monitor.flush_writer  # adopted by a GradientMonitor: its run
        read = snapshots = self.read(count_lost=not latest_only)
        if latest_only:
            snapshots = snapshots[-1:]
        self.read_spikes()
        spiked = [(s, z) for s, z in self.spikes_seen if s > self._spikes_written]
        if writer is not None and self.recorder is not None:
            self.write_header(writer)
            if spiked:
                self._spikes_written = spiked[-1][0]
            at = tags.prefixed(self.name, tags.SPIKE_AT)
            for snapshot in snapshots:
                while spiked and spiked[0][0] <= snapshot.step:  # in step order
                    writer.write_scalars(spiked[0][0], {at: spiked.pop(0)[1]})
                writer.write_scalars(snapshot.step, snapshot.values)
            for step, z in spiked:
                writer.write_scalars(step, {at: z})
            if self.histograms and histograms:
                self.write_histograms(writer)
            if own and report and snapshots:
                self._report(writer, every_seconds=_REPORT_EVERY_SECONDS)
        report_nonfinite(self, self.take_nonfinite(), read)
        return snapshots

    def take_nonfinite(self):
        """`(count, first, last)` of the steps whose update was non-finite since the last call
        (counted on the device at every step, measured or not; loss-scale overflows left out),
        or `None` when there were none. One device read (two when there were some)."""
        if self.recorder is None:
            return None
        count, first, last = self.recorder.read_nonfinite()
        new = count - getattr(self, "_nonfinite_taken", 0)
        if new <= 0:
            return None
        self.recorder.nonfinite_reported(count, last)
        self._nonfinite_taken = count
        return new, (first if first >= 0 else last), last

    def config_text(self):
        """The monitoring configuration as JSON (written once per run as `tags.CONFIG`)."""
        import json

        return json.dumps({
            "grouping": self.grouping, "stats": list(self.selected),
            "custom_stats": [type(s).__name__ for s in self.custom],
            "transform": None if self.transform is None else repr(self.transform),
            "on_nonfinite": self.on_nonfinite, "name": self.name,
            "on_spike": self.on_spike, "spike_threshold": self.spike_threshold,
        })

    def write_header(self, writer):
        """Writes the custom-scalars layout and the configuration once per recorder."""
        from gradmon.publish.layout import build_layout, group_runs

        # remembered per writer (a writer may serve several observers: one entry per observer)
        done = getattr(self, "_headers", set())
        for rec in self._rings:
            if (id(writer), id(rec)) in done:
                continue
            writer.assign_runs(group_runs(rec))  # each layer a run: its own colour
            writer.write_layout(build_layout(rec))
            writer.write_texts(0, {tags.config(self.name): self.config_text()})
            done.add((id(writer), id(rec)))
        self._headers = done

    def _report(self, writer, every_seconds=0.0):
        """The health report of the run so far (Text tab), and the per-layer charts of the layers
        it finds that matter (`gradmon.layout.write_focus`); at most once per `every_seconds`
        (a loop that flushes often does not judge its whole history at every flush)."""
        from gradmon.publish.layout import write_focus
        from gradmon.publish.writer import write_report

        now = time.monotonic()
        if now - getattr(self, "_reported_at", float("-inf")) < every_seconds:
            return
        self._reported_at = now
        write_focus(writer, self.recorder, write_report(writer), self.name)

    def close(self):
        """Writes what is left (and the health report) and releases the event file
        `observe(log_dir=...)` opened."""
        self.flush()
        if self.writer is not None and self.monitor is None:
            self._report(self.writer)  # unchanged since the last one: not written again
            self.writer.close()
            self.writer = None

    def finish(self, when="the end of the process"):
        """At exit (or when dropped): writes what was measured and not written (`close`), and
        warns when nothing had read the measured steps before (never raises)."""
        if self.writer is None or self.monitor is not None:
            return
        try:
            never_read, ran = self._reads == 0, self.recorder is not None
            written = self.flush()
            self.close()
            if never_read and ran:
                warnings.warn(
                    f"gradmon: nothing wrote the measured steps of the optimizer "
                    f"{getattr(self.optimizer, 'name', '')!r} (observe(log_dir=...)) before "
                    f"{when}: {len(written)} were written then (up to step {self.step}). In `model.fit` add `gradmon.GradientMonitor(log_dir)` to the "
                    "callbacks; in a tf.function loop call `opt.flush()` every at most "
                    f"{max(self.min_rows, self.buffer_steps)} measured steps (buffer_steps) and "
                    "`opt.gradmon.close()` at the end.", stacklevel=2)
        except Exception as error:  # never end the process with a traceback of ours
            sys.stderr.write(f"gradmon: the measured steps not written yet could not be written at "
                             f"{when}: {type(error).__name__}: {error}\n")

    def __del__(self):
        # an observer dropped before the end of the process (its optimizer and its traces gone)
        # writes what it measured, as at exit; not while the interpreter shuts down (atexit did)
        if sys.is_finalizing() or getattr(self, "writer", None) is None or self.monitor is not None:
            return
        try:
            with tf.init_scope():
                self.finish("its optimizer was dropped")
        except Exception:  # nothing may escape a finaliser
            pass

    def write_histograms(self, writer):
        """Writes the latest histograms if they were not written yet (two device reads per recorder)."""
        for rec in self._rings:
            latest = rec.read_histograms()
            if latest is None or latest[0] == rec.host_histogram:
                continue
            rec.host_histogram = latest[0]
            writer.write_histograms(latest[0], histogram_summaries(rec, latest[1]))


def _histograms(spec, prepared):
    """`[kinds, groups, 2 + buckets]`: raw, and transformed only when something transforms."""
    kinds = [prepared.raw] + ([prepared.observed] if spec.has_transform else [])
    return tf.stack([histogram_rows(g, spec.segment_ids, spec.num_groups) for g in kinds])


class _Update:
    """The optimizer update of one step, applied as the verdict says."""

    def __init__(self, optimizer, original_apply, prepared, variables, verdict):
        self.optimizer, self.original_apply = optimizer, original_apply
        self.prepared, self.variables, self.verdict = prepared, variables, verdict

    def _call(self, grads):
        # the pipeline all-reduced them already (`hook` told the optimizer not to)
        self.original_apply(grads, self.variables)

    def run(self):
        if self.verdict is None or not self.verdict.may_refuse:
            self._call(self.prepared.to_apply)
            return tf.constant(True)
        return _distribute.cond_apply(self.verdict.apply, self._call, (self.prepared.to_apply,))


def _weights(variables):
    return [tf.identity(_keras_compat.variable_value(v)) for v in variables]


def _run_step(rec, step, do_log, update, extras):
    """Applies the update and, on logged steps, measures around it.

    The update never sits inside a `tf.cond` (a conditional update costs
    every step, and under a strategy it cannot be in one at all): on logged
    steps the pre-update weights are copied into the recorder's buffers
    first, then the update runs, then the statistics are computed. Unlogged
    steps copy nothing and compute nothing.
    """
    verdict = update.verdict
    skipped = tf.constant(False) if verdict is None else verdict.skipped
    overflow = tf.constant(False) if verdict is None else verdict.overflow
    counters = {"skipped": rec.skipped, "overflow": rec.overflow}
    if rec.spikes is not None:
        counters["spikes"] = rec.spikes.count
    if rec.weight_buffers is not None:
        _keras_compat.lazy_cond(do_log, lambda: rec.keep_weights(update.variables), lambda: tf.constant(False))
    update.run()

    def measure():
        counters["nonfinite"] = rec.nonfinite.value()[0]  # read after this step counted itself
        before = None if rec.weight_buffers is None else [b.value() for b in rec.weight_buffers]
        after = _weights(update.variables) if any(s.needs_update for s in rec.statistics) else None
        ctx = statistics.StepContext(
            rec.spec, update.prepared.raw, update.prepared.observed, update.prepared.fractions,
            update.variables, update.optimizer, skipped, before, after, extras, counters, rec.state)
        return rec.write(step, ctx, overflow)

    _keras_compat.lazy_cond(do_log, measure, lambda: tf.constant(False))


def histogram_summaries(rec, histograms):
    """`{tag: buckets}` for `Recorder.read_histograms()`' array."""
    from gradmon.publish.writer import histogram_buckets

    kinds = [tags.RAW, tags.TRANSFORMED] if rec.spec.has_transform else [tags.RAW]
    out = {}
    for k, kind in enumerate(kinds):
        for i, group in enumerate(rec.spec.groups):
            low, high, counts = histograms[k, i, 0], histograms[k, i, 1], histograms[k, i, 2:]
            out[tags.prefixed(rec.prefix, tags.histogram(kind, group))] = histogram_buckets(low, high, counts)
    return out


def _nonfinite_text(observer, count, first, last, snapshots):
    """`(where, made_by_transform)`: the groups with NaN/inf gradient entries in the measured
    steps among `first..last` (`stats` with "nonfinite"), and whether those steps' raw
    gradient was finite (the transform made the NaN)."""
    rec = observer.recorder
    inside = [s for s in snapshots if first <= s.step <= last and not s.overflow]
    raw_total = tags.prefixed(rec.prefix, tags.nonfinite_total(tags.RAW))
    made = bool(inside) and rec.spec.has_transform and all(s.values.get(raw_total) == 0 for s in inside)
    bad = {tags.RAW: set(), tags.TRANSFORMED: set()}
    for snapshot in inside:
        for statistic, vector in snapshot.by_statistic.items():
            if isinstance(statistic, statistics.GradientMoment) and statistic.name == "nonfinite":
                bad[statistic.kind].update(g for g, n in zip(rec.spec.groups, vector) if n > 0)
    groups = bad[tags.TRANSFORMED] if made else bad[tags.RAW]
    return [g for g in rec.spec.groups if g in groups], made


def report_nonfinite(observer, taken, snapshots=()):
    """Warns of the steps whose update was non-finite (`Observer.take_nonfinite`), naming their
    count and range; never claims an update that did not happen.

    Each new run of such steps is warned of; a run that only went on since the last warning
    (every step since non-finite, e.g. weights that became NaN) is counted in
    `gradients/nonfinite_steps` without a new warning.
    """
    rec, policy = observer.recorder, observer.on_nonfinite
    if taken is None:
        raw_total = tags.prefixed(rec.prefix, tags.nonfinite_total(tags.RAW)) if rec else None
        hidden = [s.step for s in snapshots if not s.overflow and s.values.get(raw_total, 0) > 0]
        if hidden:  # what was applied was finite: the transform made it so
            warn_once(("nonfinite-raw", id(observer)),
                      f"gradmon: non-finite raw gradients at step {hidden[0]}, made finite by the "
                      f"transform; the update was applied (on_nonfinite={policy!r}).")
        return
    count, first, last = taken
    previous = getattr(observer, "_nonfinite_warned", None)
    observer._nonfinite_warned = (first, last)
    if previous is not None and first == previous[1] + 1 and count == last - first + 1:
        return  # the same run of non-finite steps went on
    groups, made = _nonfinite_text(observer, count, first, last, snapshots)
    at = f"at step {last}"  # the first step first, however many followed before this read
    if count > 1:
        at = f"at step {first} and {count - 1} more step{'s' if count > 2 else ''} up to step {last}"
    where = f" in {groups}" if groups else ""
    made = " (the raw gradient was finite: the transform made it non-finite)" if made else ""
    message = f"gradmon: non-finite gradients {at}{where}{made} (on_nonfinite={policy!r})"
    one = count == 1
    if policy == "stop":
        message += (": the update was not applied" if one else ": these updates were not applied") + \
            ", and no later update will be."
    elif policy == "skip":
        message += (": such updates are skipped; their number is logged as "
                    f"`{tags.SKIPPED_STEPS}`.")
    elif rec.spec.loss_scaled:
        message += (": the LossScaleOptimizer skipped the update (its loss scale is at most 1, so "
                    "this is not a loss-scale overflow).")
    else:
        message += (": the update was applied" if one else ": the update was applied each time") + \
            (f"; the weights may now be NaN/inf, and a run of such steps that goes on is warned of "
             f"once (all are counted in `{tags.NONFINITE_STEPS}`). Use on_nonfinite='skip' or "
             "'stop' to protect the weights.")
    warnings.warn(message, stacklevel=3)


def report_spikes(observer, spiked):
    """Warns about new spikes `[(step, z), ...]`, naming their steps and what the policy did."""
    policy = observer.on_spike
    where = ", ".join(f"{step} (z = {z:.1f})" for step, z in spiked[:5])
    if len(spiked) > 5:
        where += f" and {len(spiked) - 5} more"
    plural = "s" if len(spiked) > 1 else ""
    message = (f"gradmon: gradient-norm spike{plural} at step{plural} {where}, above z = "
               f"{observer.spike_threshold:g} (on_spike={policy!r})")
    if policy == "stop":
        message += ": the update was not applied, and no later update will be."
    elif policy == "skip":
        message += f": such updates are skipped; their number is logged as `{tags.SKIPPED_STEPS}`."
    else:
        message += ": the update was applied. Use on_spike='skip' or 'stop' to protect the weights."
    warnings.warn(message, stacklevel=3)


def observe(optimizer, log_dir=None, transform=None, name=None, update_freq=1, histogram_freq=0,
            grouping="layer", stats=None, on_nonfinite="warn", buffer_steps=16, on_spike=None,
            spike_threshold=spikes.DEFAULT_SPIKE_THRESHOLD):
    """Observes (and optionally transforms) the gradients an optimizer applies.

    For custom training loops: the returned optimizer is `optimizer` itself,
    with its `apply` / `apply_gradients` routed through gradmon. In an eager
    loop it writes by itself on logged steps; in a `tf.function` (or XLA)
    loop call `opt.flush()` from Python now and then (idempotent): it writes
    the measured steps not yet written (up to `buffer_steps` of them). What
    is measured and not written when the process ends is written at exit,
    with a warning (as is every measured step lost to a full buffer).

    Observing an optimizer again (a notebook cell run again) replaces the
    earlier observer: it writes what it measured and closes its file; the
    step axis goes on. One optimizer applied from several `tf.function`s
    (two models sharing it, a subset of the variables then all of them) is
    measured and written in all of them, on one step axis.

    Args:
        optimizer: a `keras.optimizers.Optimizer` (a `LossScaleOptimizer` too).
        log_dir: TensorBoard run directory (summaries go to `<log_dir>/train`,
            with `GradientMonitor`'s tags), or `None` to only measure
            (`opt.flush()` returns the snapshots). Defaults to `None`.
        transform: gradient transform from `gradmon.transforms`, a callable
            `(grads, params) -> grads`, or `None`. Defaults to `None`.
        name: tag prefix, so that several optimizers share one run
            (`name="critic"` -> `critic/gradients/raw/global_norm`). Defaults to `None`.
        update_freq: measure every this many updates. Defaults to `1`.
        histogram_freq: histograms every this many updates (0: none). Defaults to `0`.
        grouping: `"layer"` (one row per layer: its variables taken as one vector)
            or `"variable"` (one row per variable). Defaults to `"layer"`.
        stats: names from `gradmon.STAT_NAMES` and/or `gradmon.statistics.Statistic`
            instances, `None` for the defaults
            (`gradmon.statistics.DEFAULT_STATS`: norm, update ratio) or `"all"`. Defaults to `None`.
        on_nonfinite: `"warn"`, `"skip"` or `"stop"` (stop: no later update is
            applied; check `opt.gradmon.stopped`). Defaults to `"warn"`.
        buffer_steps: logged steps held on the device between two `flush()`, whatever
            `update_freq` is (at most 65536, and a ring of at most 256 MiB); measured steps
            overwritten before a `flush()` are warned of, with their count. Defaults to `16`.
        on_spike: what a step whose raw global norm is a spike does (z-score
            above `spike_threshold` against the running mean and std of the
            recent norms, `gradmon.spikes`): `"warn"` (apply it), `"skip"`,
            `"stop"`, or `None` (spikes not tracked: no cost). Defaults to `None`.
        spike_threshold: z-score of the log-norm above which a norm is a spike. Defaults to `5.0`.
            (The loss's z-score is written too when each step calls
            `opt.gradmon.observe_loss(loss)` before `apply_gradients`; a step that
            calls `opt.gradmon.observe_batch(x)` is judged only when its batch is
            a full one, as in `fit`: a partial last batch is no spike.)

    Returns:
        `optimizer`, observed; `optimizer.flush()` writes, `optimizer.gradmon` is the
        `Observer` (`optimizer.gradmon.close()` releases the event file at the end).

    Example:
        >>> opt = gradmon.observe(keras.optimizers.Adam(1e-3), log_dir="runs/loop",
        ...                       transform=gradmon.transforms.clip_by_global_norm(1.0))
        >>> with tf.GradientTape() as tape:
        ...     loss = loss_fn(y, model(x, training=True))
        >>> opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
        ...                         model.trainable_variables))
    """
    from gradmon.publish.writer import SummaryWriter

    if isinstance(optimizer, type):
        raise invalid("optimizer", "a keras.optimizers.Optimizer instance (e.g. "
                      f"{optimizer.__name__}(learning_rate=1e-3)), not the class", optimizer)
    if not hasattr(optimizer, "apply_gradients") or not hasattr(optimizer, "apply"):
        raise invalid("optimizer", "a keras.optimizers.Optimizer", optimizer)
    from gradmon._validation import check_positive_int

    observer = Observer(transform, grouping, stats, on_nonfinite, name, buffer_steps, on_spike,
                        spike_threshold)
    observer.set_schedule(every=check_positive_int("update_freq", update_freq),
                          hist_every=check_non_negative_int("histogram_freq", histogram_freq))
    observer.histograms = observer.hist_every > 0
    if log_dir is not None:
        log_dir = check_log_dir(log_dir)
        observer.writer = SummaryWriter.shared(log_dir, "train").open()
    observer.hook(optimizer)  # replaces an earlier observer of it (a notebook cell run again)
    object.__setattr__(optimizer, "flush", observer.flush)
    object.__setattr__(optimizer, "gradmon", observer)
    if observer.writer is not None:
        _WRITE_AT_EXIT.add(observer)
    return optimizer


# observers with an event file of their own: what they measured and nobody wrote is written at
# exit (a tf.function loop that never called flush(), a fit without GradientMonitor)
_WRITE_AT_EXIT = weakref.WeakSet()


@atexit.register
def _write_at_exit():
    for observer in list(_WRITE_AT_EXIT):
        observer.finish()


def observer_of(optimizer):
    """The `Observer` hooked into `optimizer`, or `None`."""
    return getattr(optimizer, _HOOK, None)
