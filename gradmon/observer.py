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

import tensorflow as tf

import warnings

from gradmon import _distribute, _keras_compat, recorder, spikes, statistics, tags, transforms
from gradmon._validation import (check_choice, check_log_dir, check_non_negative_int, check_positive,
                                 invalid, warn_once)
from gradmon.pipeline import GradientPipeline

GROUPINGS = ("variable", "layer")
_HOOK = "_gradmon_observer"
_NEVER = 2 ** 62  # a period no run reaches: "never" without a branch on the device
_OWN_WRITER = object()  # `flush()`'s default: the observer's own writer


def group_names(variables, grouping, prefix=None):
    """Group of each variable and the distinct group names, unique as tags.

    Two paths that sanitise to the same tag (`a>b` and `a_b`) get distinct
    names (`a_b`, `a_b_2`): no series is silently merged into another. Under
    an observer named `prefix`, a leading `prefix/` is left out
    (`tags.group_label`).
    """
    names, ids, by_path, taken = [], [], {}, set()
    for v in variables:
        path = getattr(v, "path", None) or v.name
        if grouping == "layer" and "/" in path:
            path = path.rsplit("/", 1)[0]
        path = tags.group_label(path, prefix)
        if path not in by_path:
            name, n = tags.sanitize(path), 1
            while name in taken:
                n += 1
                name = f"{tags.sanitize(path)}_{n}"
            taken.add(name)
            by_path[path] = len(names)
            names.append(name)
        ids.append(by_path[path])
    return names, ids


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
        buffer_steps: logged steps held between two reads. Defaults to `16`.
        on_spike: `None` (spikes not tracked), `"warn"`, `"skip"` or `"stop"`. Defaults to `None`.
        spike_threshold: z-score above which the raw global norm is a spike.
            Defaults to `6.0`.
    """

    def __init__(self, transform=None, grouping="layer", stats=None, on_nonfinite="warn",
                 name=None, buffer_steps=16, on_spike=None,
                 spike_threshold=spikes.DEFAULT_SPIKE_THRESHOLD):
        self.pipeline = GradientPipeline(transform, on_nonfinite, on_spike)
        self.spike_threshold = check_positive("spike_threshold", spike_threshold)
        self.spikes = None  # the SpikeTracker, built with the recorder when on_spike is set
        self.spikes_seen = []  # (step, z) of the spikes read back so far
        self._spike_count_read = 0
        self._spikes_written = -1  # the step of the last spike written
        self.grouping = check_choice("grouping", grouping, GROUPINGS)
        self.selected, self.custom = statistics.check_stats(stats)
        if name is not None and (not isinstance(name, str) or not tags.sanitize(name).strip("_")):
            raise invalid("name", "a non-empty string (a tag prefix) or None", name)
        self.name = name
        self.buffer_steps = max(1, check_non_negative_int("buffer_steps", buffer_steps))
        self.extras_source = None  # gradmon's own train step: penalties, noise scale
        self.recorder = None
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
        if current is not None:
            raise ValueError(
                f"The optimizer {optimizer.name!r} is already observed by another gradmon observer. "
                "Expected one observer per optimizer: use one `gradmon.observe` / `gradmon.monitor` "
                f"/ `GradientMonitor` for it. Received: optimizer={optimizer!r}")
        original = type(optimizer).apply.__get__(optimizer)

        def apply(grads, trainable_variables=None):
            return self.apply(optimizer, original, grads, trainable_variables)

        object.__setattr__(optimizer, "apply", apply)
        object.__setattr__(optimizer, _HOOK, self)
        # one all-reduce per step under a strategy: the pipeline's
        _keras_compat.skip_optimizer_all_reduce(optimizer)
        self.optimizer = optimizer
        return optimizer

    def unhook(self, optimizer):
        """Undoes `hook`: `optimizer.apply` (and its own all-reduce) are Keras' again."""
        if getattr(optimizer, _HOOK, None) is not self:
            return
        for name in ("apply", _HOOK, "flush", "gradmon"):
            optimizer.__dict__.pop(name, None)
        _keras_compat.restore_optimizer_all_reduce(optimizer)

    # -- building (outside any tf.function) ---------------------------------

    def ensure_built(self, optimizer, variables):
        """(Re)creates the recorder for these variables and settings; True if it did."""
        rows = max(self.min_rows, self.buffer_steps)
        extras = self.extras_source.spec_extras() if self.extras_source else {}
        # the optimizer too: its clipping and loss scaling shape the statistics (a recompile)
        key = (tuple(id(v) for v in variables), id(optimizer), rows, self.histograms,
               tuple(sorted(extras.items())))
        if self._key == key:
            return False
        clip = transforms.from_optimizer(_keras_compat.base_optimizer(optimizer))
        observed = self.pipeline.observed_transform(clip)
        groups, ids = group_names(variables, self.grouping, self.name)
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
            old = self.recorder
            self.recorder = recorder.Recorder(spec, stats, rows, self.histograms, self.name, variables)
            self.recorder.spikes = self.spikes
            if old is not None:
                self.recorder.step.assign(old.step.numpy())
                self.recorder.skipped.assign(old.skipped.numpy())
                self.recorder.overflow.assign(old.overflow.numpy())
            elif self._restored_step is not None:
                self.recorder.step.assign(self._restored_step)
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
        if self.recorder is None:
            return self._restored_step or 0
        return int(self.recorder.step.numpy())

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
        step = rec.step.assign_add(1, read_value=True)
        clip = transforms.from_optimizer(_keras_compat.base_optimizer(optimizer))
        scale = _keras_compat.loss_scale(optimizer)
        prepared = self.pipeline.prepare(grads, variables, scale, clip)
        if prepared.scale is not None:
            extras["loss_scale"] = tf.identity(prepared.scale)  # before the update changes it
        spike = None
        if self.spikes is not None:  # every step, measured or not: the statistics are running
            spike = self.spikes.update(step, spikes.global_norm(prepared.raw), extras.get("loss"))
            extras["spike"] = spike
        verdict = self.pipeline.verdict(prepared, rec.spec.loss_scaled,
                                        rec.halted if self.pipeline.stops else None,
                                        None if spike is None else spike.spike)
        update = _Update(optimizer, original_apply, prepared, variables, verdict)
        if verdict is not None:
            self._count(verdict, step)
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
                self.flush()
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
            from gradmon.own_step import Extras

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

    def _count(self, verdict, step):
        rec = self.recorder
        rec.skipped.assign_add(tf.cast(verdict.skipped, tf.int64))
        rec.overflow.assign_add(tf.cast(verdict.overflow, tf.int64))
        if verdict.halts is not None:
            first = tf.logical_and(verdict.halts, tf.logical_not(rec.halted))
            rec.halted_at.assign(tf.where(first, step, rec.halted_at))
            rec.halted.assign(tf.logical_or(rec.halted, verdict.halts))

    def _eager_due(self, step):
        return self.is_scheduled(int(step)) or bool(self.on_nonfinite != "warn")

    def _warn_missing(self, variables, grads):
        missing = [v.path for v, g in zip(variables, grads) if g is None]
        if missing:
            warn_once(("no-gradient", id(self), tuple(missing)),
                      f"gradmon: no gradient for variables {missing}; they are reported "
                      f"under `{tags.NO_GRADIENT}` and have zero gradient statistics.")

    # -- host side -----------------------------------------------------------

    def read(self):
        """Snapshots of the measured steps not yet read, oldest first (marks them read)."""
        if self.recorder is None:
            return []
        snapshots = self.recorder.read(self.last_written)
        if snapshots:
            self._check_lost(snapshots[0].step)
            self.last_written = snapshots[-1].step
        return snapshots

    def _check_lost(self, first_held):
        """Warns once if scheduled steps were overwritten in the ring before being read."""
        first_due = self.last_written + 1
        while first_due < first_held and not self.is_scheduled(first_due):
            first_due += 1
        if first_due < first_held and self.last_written >= 0:
            warn_once(("lost", id(self)),
                      f"gradmon: measured steps {first_due}..{first_held - 1} were overwritten before "
                      f"they were written; call flush() more often or raise buffer_steps "
                      f"(now {self.recorder.rows}).")

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

    def flush(self, writer=_OWN_WRITER, latest_only=False, histograms=True):
        """Writes the measured steps not yet written (idempotent); returns their snapshots.

        Args:
            writer: where to write; defaults to the writer of `observe(log_dir=...)`
                (`None`: read and warn only, e.g. a non-chief worker).
            latest_only: write only the latest of them (`update_freq="epoch"`).
            histograms: also look for new histograms (two device reads).
        """
        writer = self.writer if writer is _OWN_WRITER else writer
        snapshots = self.read()
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
        for snapshot in snapshots:
            report_nonfinite(self, snapshot)
        return snapshots

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
        from gradmon.layout import build_layout

        if self.recorder is None or (id(writer), id(self.recorder)) in getattr(self, "_headers", ()):
            return
        writer.write_layout(build_layout(self.recorder))
        writer.write_texts(0, {tags.config(self.name): self.config_text()})
        # remembered per writer (a writer may serve several observers: one entry per observer)
        done = getattr(self, "_headers", set())
        done.add((id(writer), id(self.recorder)))
        self._headers = done

    def close(self):
        """Writes what is left and releases the event file `observe(log_dir=...)` opened."""
        self.flush()
        if self.writer is not None and self.monitor is None:
            self.writer.close()
            self.writer = None

    def write_histograms(self, writer):
        """Writes the latest histograms if they were not written yet (two device reads)."""
        latest = self.recorder.read_histograms() if self.recorder is not None else None
        if latest is None or latest[0] == getattr(self, "_last_hist", None):
            return
        self._last_hist = latest[0]
        writer.write_histograms(latest[0], histogram_summaries(self.recorder, latest[1]))


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
    return [tf.identity(v.value) for v in variables]


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
        before = None if rec.weight_buffers is None else [b.value() for b in rec.weight_buffers]
        after = _weights(update.variables) if any(s.needs_update for s in rec.statistics) else None
        ctx = statistics.StepContext(
            rec.spec, update.prepared.raw, update.prepared.observed, update.prepared.fractions,
            update.variables, update.optimizer, skipped, before, after, extras, counters, rec.state)
        return rec.write(step, ctx, overflow)

    _keras_compat.lazy_cond(do_log, measure, lambda: tf.constant(False))


def histogram_summaries(rec, histograms):
    """`{tag: buckets}` for `Recorder.read_histograms()`' array."""
    from gradmon.writer import histogram_buckets

    kinds = [tags.RAW, tags.TRANSFORMED] if rec.spec.has_transform else [tags.RAW]
    out = {}
    for k, kind in enumerate(kinds):
        for i, group in enumerate(rec.spec.groups):
            low, high, counts = histograms[k, i, 0], histograms[k, i, 1], histograms[k, i, 2:]
            out[tags.prefixed(rec.prefix, tags.histogram(kind, group))] = histogram_buckets(low, high, counts)
    return out


def report_nonfinite(observer, snapshot):
    """Warns (once per kind) about a step with non-finite gradients; never claims an update
    that did not happen."""
    rec, policy = observer.recorder, observer.on_nonfinite
    raw = snapshot.by_statistic
    nonfinite_tag = tags.prefixed(rec.prefix, tags.nonfinite_total(tags.RAW))
    if snapshot.overflow or not snapshot.values.get(nonfinite_tag, 0) > 0:
        return
    bad = []
    for statistic, vector in raw.items():
        if isinstance(statistic, statistics.GradientMoment) and statistic.name == "nonfinite" \
                and statistic.kind == tags.RAW:
            bad = [g for g, n in zip(rec.spec.groups, vector) if n > 0]
    where = f" in {bad}" if bad else ""
    message = f"gradmon: non-finite gradients at step {snapshot.step}{where} (on_nonfinite={policy!r})"
    if policy == "stop":
        message += ": the update was not applied, and no later update will be."
    elif policy == "skip":
        message += f": such updates are skipped; their number is logged as `{tags.SKIPPED_STEPS}`."
    elif rec.spec.loss_scaled:
        message += (": the LossScaleOptimizer skipped the update (its loss scale is at most 1, so "
                    "this is not a loss-scale overflow).")
    else:
        message += ": the update was applied. Use on_nonfinite='skip' or 'stop' to protect the weights."
    warn_once(("nonfinite", policy, id(observer)), message)


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
    the measured steps not yet written (up to `buffer_steps` of them).

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
        buffer_steps: logged steps held on the device between two `flush()`. Defaults to `16`.
        on_spike: what a step whose raw global norm is a spike does (z-score
            above `spike_threshold` against the running mean and std of the
            recent norms, `gradmon.spikes`): `"warn"` (apply it), `"skip"`,
            `"stop"`, or `None` (spikes not tracked: no cost). Defaults to `None`.
        spike_threshold: z-score above which a norm is a spike. Defaults to `6.0`.
            (The loss's z-score is written too when each step calls
            `opt.gradmon.observe_loss(loss)` before `apply_gradients`.)

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
    from gradmon.writer import SummaryWriter

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
    observer.hook(optimizer)
    object.__setattr__(optimizer, "flush", observer.flush)
    object.__setattr__(optimizer, "gradmon", observer)
    return optimizer


def observer_of(optimizer):
    """The `Observer` hooked into `optimizer`, or `None`."""
    return getattr(optimizer, _HOOK, None)
