"""Observing an optimizer at its door: `observe(optimizer)` and the `Observer`.

Every Keras training path ends in `optimizer.apply(grads, variables)`:
Keras' `train_step`, a model's own `train_step`, a custom `GradientTape`
loop. Keras' `LossScaleOptimizer` wraps an optimizer at that door; gradmon
hooks it (the optimizer object stays the same: saving, learning-rate
schedules and callbacks that touch it are unchanged). The hooked `apply`
runs the `GradientPipeline`, measures the statistics on scheduled steps into
a `Recorder` and hands the update on.

This is the measuring side. The host side of each observer is its
`observer.host`, a `gradmon.publish.publisher.Publisher`: it owns the
schedule (which steps the device measures), reads the recorder back and
writes; the `Observer` is the handle users hold (`opt.gradmon`), so its
`flush`, `close` and `read_spikes` hand over to it.
"""

import atexit
import contextlib
import sys
import weakref

from gradmon.backend import lazy_tf as _lazy_tf
from gradmon.backend import distribute as _distribute, door as _door, keras_compat as _keras_compat
from gradmon.measure import door_step, recorder, spikes, statistics, transforms
from gradmon import tags
from gradmon._validation import check_log_dir, check_non_negative_int, invalid, warn_once
from gradmon.measure.pipeline import GradientPipeline
from gradmon.measure.settings import GradientSettings
from gradmon.publish.publisher import OWN_WRITER, Publisher

tf = _lazy_tf.tensorflow()

_HOOK = "_gradmon_observer"


class Observer:
    """Measures (and transforms) what an optimizer applies.

    Args:
        settings: a `gradmon.measure.settings.GradientSettings` (transform,
            grouping, statistics, policies, tag prefix, buffer), or `None` for
            the defaults. Defaults to `None`.
    """

    def __init__(self, settings=None):
        self.settings = settings = GradientSettings() if settings is None else settings
        self.pipeline = GradientPipeline(settings.transform, settings.on_nonfinite, settings.on_spike)
        self.spikes = None  # the SpikeTracker, built with the recorder when on_spike is set
        self._batch = None  # this step's batch size for the spike detector (`observe_batch`)
        self.extras_source = None  # gradmon's own train step: penalties, noise scale
        self.recorder = None  # the recorder of the latest trace
        self.rings = []  # every recorder the host reads (one per variable list traced)
        self._by_variables = {}  # (variable ids, optimizer id) -> (settings key, recorder)
        self.histograms = False
        self._key = None
        self.min_rows = 1  # e.g. steps_per_execution
        self._restored_step = None
        self.fit_owner = None  # weakref to the monitored model whose `fit` writes (monitor())
        # the host side: the schedule, reading back, warnings, writing (`observer.host`)
        self.host = Publisher(self)
        # read while tracing: False traces an update that measures nothing (steps the host
        # knows are not written run such a trace; see GradientMonitor)
        self.measuring = True
        self.trainer = None  # weakref to the model whose `fit` runs the steps (JAX: its state)
        self.carried = None  # a functional JAX loop's optimizer variables, while `flush` reads them
        # what `fit`'s JAX train function returned, while `GradientMonitor` does the host work of
        # that execution (before Keras holds it): host reads take the state from there
        self.returned = None

    def watch_model(self, model):
        """Notes the model whose `fit` runs the observed steps: on JAX the host reads the
        state its trainer holds between steps (`gradmon.backend.door_jax`)."""
        self.trainer = weakref.ref(model)

    grouping = property(lambda self: self.settings.grouping)
    selected = property(lambda self: self.settings.selected)
    custom = property(lambda self: self.settings.custom)
    name = property(lambda self: self.settings.name)
    buffer_steps = property(lambda self: self.settings.buffer_steps)
    spike_threshold = property(lambda self: self.settings.spike_threshold)

    def restore_step(self, step):
        """Continues the step axis at `step` (after loading a saved model)."""
        self._restored_step = int(step)
        if int(step) < self.host.last_written:  # an earlier state: the steps after it come again
            self.host.rewind(int(step))
        self.host.last_written = int(step)
        if self.recorder is not None:
            self.recorder.host_assign(self.recorder.step, int(step))

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
        door = _door.current()
        if hasattr(door, "hook_loss_scale") and _keras_compat.is_loss_scale_optimizer(optimizer):
            original = door.hook_loss_scale(optimizer)  # JAX: its stateless_apply calls `apply`

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
        if self.host.writer is not None and self.host.monitor is None:
            self.close()
        self.unhook(optimizer)

    def _adopt(self, old):
        """Takes over a replaced observer's recorders: traces made before still write into them,
        so they are read here, and the step axis goes on (their step counter is shared)."""
        self.rings += [r for r in old.rings if r not in self.rings]
        self.host.adopt(old.host)
        if self._restored_step is None and old.recorder is None:
            self._restored_step = old._restored_step

    def unhook(self, optimizer):
        """Undoes `hook`: `optimizer.apply` (and its own all-reduce) are Keras' again."""
        if getattr(optimizer, _HOOK, None) is not self:
            return
        for name in ("apply", "stateless_apply", "build", _HOOK, "flush", "gradmon"):
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
        door = _door.current()
        if door is not None:
            _door.check_supported(self, clip, spec.loss_scaled)
        scope = tf.init_scope() if door is None else _door.state_owner(optimizer)
        with scope, _distribute.strategy_scope(strategy):
            if not optimizer.built and variables:
                # slots cannot be created inside tf.cond (not observe()'s hooked build on JAX:
                # this call builds gradmon's state itself)
                type(optimizer).build(optimizer, variables)
            if self.transform is not None:
                self.transform.build(variables)  # e.g. zclip's running statistics
            if self.on_spike is not None and self.spikes is None:
                self.spikes = spikes.SpikeTracker(self.spike_threshold, rows, loss=self._knows_loss)
            # the step counter and counters: those of this optimizer's other recorders, if any
            same = [r for r in self.rings if r.optimizer_id == id(optimizer)]
            shared = same[-1] if same else self.recorder
            carried = None
            if shared is not None and not same and _door.state_in_optimizer():
                # JAX: the counters ride in the old optimizer's state, which the new one's
                # jitted step never carries: new variables in this one's, from their values
                carried, shared = shared, None
            self.recorder = recorder.Recorder(spec, stats, rows, self.histograms, self.name, variables,
                                              shared=shared)
            self.recorder.spikes = self.spikes
            self.recorder.door, self.recorder.observer = door, self
            self.recorder.optimizer_id = id(optimizer)
            if carried is not None:
                self.recorder.carry_counters(carried)
            if shared is None:
                _start_step_axis(self, optimizer, carried is None)
            if held is not None:  # these variables, other settings: its steps are read now
                self.host.retire(held[1])
            self.rings.append(self.recorder)
            self._by_variables[variables_key] = (key, self.recorder)
            if getattr(self, "_restored_state", None):  # a loaded model's counters and statistics
                from gradmon import saving

                saving.apply_restored(self)
            self.host.push()
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

    @property
    def step(self):
        """Observed updates so far (one device-to-host read)."""
        rec = self.recorder or (self.rings[-1] if self.rings else None)  # adopted ones too
        if rec is None:
            return self._restored_step or 0
        return int(rec.host_read(rec.step))

    # -- the hooked apply --------------------------------------------------

    def apply(self, optimizer, original_apply, grads, trainable_variables=None):
        """The hooked `optimizer.apply`: pipeline, schedule, measure, update."""
        grads = list(grads)
        if not grads:
            return original_apply(grads, trainable_variables)
        variables = list(trainable_variables) if trainable_variables is not None \
            else _keras_compat.optimizer_variables(optimizer)
        self.host.check_outside_fit()  # in Python: each eager step, each trace
        if not _lazy_tf.is_tensorflow():
            return door_step.apply_at_door(self, optimizer, original_apply, grads, variables)
        self._warn_missing(variables, grads)
        self.ensure_built(optimizer, variables)
        rec, extras = self.recorder, self._take_extras()
        batch = self._take_batch()  # taken with the extras: before any all-reduce
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
                                    lambda: rec.write_histograms(step, door_step.histograms(rec.spec, prepared)),
                                    lambda: tf.constant(False))
        _run_step(rec, step, do_log, update, extras)
        if tf.executing_eagerly():
            spiked = spike is not None and bool(spike.spike)
            if self.host.writer is not None and (self._eager_due(step) or spiked):
                self.flush(report=False)
            elif spiked:
                self.read_spikes()  # warns, naming the step

    def _take_batch(self):
        """This step's batch size for the spike detector (`observe_batch`, or `fit`'s), taken;
        with `on_spike` set and none given, warned once."""
        batch, self._batch = self._batch, None
        if batch is None and self.on_spike is not None:
            self.host.no_batch_size()
        return batch

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
        its gradient is noisier by nature, not a spike. In the `fit` of a monitored
        model (`gradmon.monitor`, or a `GradientMonitor` among the callbacks) gradmon
        does it by itself; in a custom loop (or a plain `fit` of a model compiled with
        an observed optimizer) call it in the same step (the same `tf.function`)
        before `apply_gradients`, or every step is judged (warned once). Without
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
        if not _lazy_tf.is_tensorflow():
            door_step.count(self, verdict, step, prepared)
            return
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
        return self.host.schedule.due(step) or bool(self.on_nonfinite != "warn")

    def _warn_missing(self, variables, grads):
        missing = [getattr(v, "path", None) or v.name for v, g in zip(variables, grads) if g is None]
        if missing:
            warn_once(("no-gradient", id(self), tuple(missing)),
                      f"gradmon: no gradient for variables {missing}; they are reported "
                      f"under `{tags.NO_GRADIENT}` and have zero gradient statistics.")

    # -- the host side (`Publisher`): the handle users hold is this object --------

    @property
    def stopped(self):
        """Whether a non-finite step (`on_nonfinite="stop"`) or a spike (`on_spike="stop"`)
        stopped the updates."""
        return self.recorder is not None and bool(self.recorder.host_read(self.recorder.halted))

    @property
    def spikes_seen(self):
        """`(step, z)` of the spikes read back so far."""
        return self.host.spikes_seen

    def set_schedule(self, every=None, log_at=None, hist_every=None):
        """Measures at steps divisible by `every` (0: never), at step `log_at`, and
        histograms every `hist_every` steps (0: never) (`Publisher.set_schedule`)."""
        self.host.set_schedule(every, log_at, hist_every)

    def flush(self, writer=OWN_WRITER, latest_only=False, histograms=True, report=True,
              optimizer_variables=None):
        """Writes the measured steps not yet written (idempotent); returns their snapshots
        (`Publisher.flush`).

        Args:
            optimizer_variables: on JAX, in a loop that calls `optimizer.stateless_apply`
                (inside `jax.jit`), the optimizer variables that loop carries: the list the
                latest `stateless_apply` returned, in the order of `optimizer.variables`.
                gradmon's state is among them; it is read from there, and what the host
                writes into it (which non-finite steps were reported) is written back into
                that list, which the loop's next step then carries. `None`: the state is in
                the optimizer's variables (eager loops, `fit`, TensorFlow, PyTorch; or a JAX
                loop that assigned its values back first). Defaults to `None`.
        """
        with self.reading(optimizer_variables):
            return self.host.flush(writer, latest_only, histograms, report)

    @contextlib.contextmanager
    def reading(self, optimizer_variables=None):
        """Within it, host reads and writes of gradmon's state use `optimizer_variables` (the
        values a functional JAX loop carries, see `flush`); `None`: the variables themselves."""
        if optimizer_variables is None:
            yield
            return
        optimizer = getattr(self, "optimizer", None)
        expected = len(optimizer.variables) if optimizer is not None else None
        if not isinstance(optimizer_variables, (list, tuple)) or len(optimizer_variables) != expected:
            raise invalid("optimizer_variables", f"a list of the {expected} values of "
                          "`optimizer.variables`, in order, as `optimizer.stateless_apply` returns them",
                          _shape_of(optimizer_variables))
        held, self.carried = self.carried, optimizer_variables
        try:
            yield
        finally:
            self.carried = held

    def read_spikes(self, report=True):
        """The spikes not read yet, `[(step, z), ...]`; warns naming their steps
        (`Publisher.read_spikes`)."""
        return self.host.read_spikes(report)

    def close(self, optimizer_variables=None):
        """Writes what is left (and the health report) and releases the event file
        `observe(log_dir=...)` opened (`Publisher.close`).

        Args:
            optimizer_variables: as for `flush`: a functional JAX loop's optimizer
                variables, where gradmon's state is. Defaults to `None`.
        """
        with self.reading(optimizer_variables):
            self.host.close()

    def __del__(self):
        # an observer dropped before the end of the process (its optimizer and its traces gone)
        # writes what it measured, as at exit; not while the interpreter shuts down (atexit did)
        host = getattr(self, "host", None)
        if sys.is_finalizing() or host is None or host.writer is None or host.monitor is not None:
            return
        try:
            with tf.init_scope() if _lazy_tf.is_tensorflow() else contextlib.nullcontext():
                host.finish("its optimizer was dropped")
        except Exception:  # nothing may escape a finaliser
            pass


class _Shown(str):
    def __repr__(self):
        return str(self)


def _start_step_axis(observer, optimizer, fresh):
    """Sets a new step counter (no other recorder's to share) where the axis goes on: a loaded
    model's step, else, for a `fresh` counter (none carried over), the updates the optimizer was
    given before gradmon saw it (a restored checkpoint, plain fits first), as Keras' own step
    count does."""
    if fresh and observer._restored_step is None:
        before = _keras_compat.updates_before(optimizer)
        if before:
            observer.restore_step(before)
    if observer._restored_step is not None:
        observer.recorder.host_assign(observer.recorder.step, observer._restored_step)


def _shape_of(values):
    """How an `optimizer_variables` argument looks, for its error (not every array printed)."""
    if isinstance(values, (list, tuple)):
        return _Shown(f"<{type(values).__name__} of {len(values)} values>")
    return values


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

    observer = Observer(GradientSettings.from_arguments(locals(), "observe"))
    observer.set_schedule(every=check_positive_int("update_freq", update_freq),
                          hist_every=check_non_negative_int("histogram_freq", histogram_freq))
    observer.histograms = observer.host.schedule.hist_every > 0
    if log_dir is not None:
        log_dir = check_log_dir(log_dir)
        if _distribute.is_chief(None):  # JAX processes, torch.distributed ranks: process 0 writes
            observer.host.writer = SummaryWriter.shared(log_dir, "train").open()
    observer.hook(optimizer)  # replaces an earlier observer of it (a notebook cell run again)
    object.__setattr__(optimizer, "flush", observer.flush)
    object.__setattr__(optimizer, "gradmon", observer)
    door = _door.current()
    if door is not None and not door.EAGER:
        _build_with_state(observer, optimizer)
    if observer.host.writer is not None:
        write_at_exit(observer)
    return optimizer


def _build_with_state(observer, optimizer):
    """JAX: gradmon's state is made with the optimizer's variables, so that a loop that takes
    `optimizer.variables` after `optimizer.build(...)` (and passes them to `stateless_apply`
    inside `jax.jit`) carries it: now if the optimizer is built, else when it is built."""
    original = type(optimizer).build.__get__(optimizer)

    def build(variables):
        original(variables)
        observer.ensure_built(optimizer, list(variables))

    object.__setattr__(optimizer, "build", build)
    if optimizer.built:
        build(_keras_compat.optimizer_variables(optimizer))


# observers with an event file of their own, or a GradientMonitor's: what they measured and nobody
# wrote is written at exit (a tf.function loop that never called flush(), a fit without
# GradientMonitor, a custom loop after a monitored fit)
_WRITE_AT_EXIT = weakref.WeakSet()


def write_at_exit(observer):
    """What `observer` measured and nobody wrote is written at exit (`Publisher.finish`)."""
    _WRITE_AT_EXIT.add(observer)


@atexit.register
def _write_at_exit():
    for observer in list(_WRITE_AT_EXIT):
        observer.host.finish()


def observer_of(optimizer):
    """The `Observer` hooked into `optimizer`, or `None`."""
    return getattr(optimizer, _HOOK, None)
