"""The observed step on JAX and PyTorch: the hooked `apply` at the door, in `keras.ops`.

`Observer.apply` runs the TensorFlow step itself; on the other backends it
hands over to `apply_at_door` here. The same pipeline, policies and
statistics run in `keras.ops`; what the framework must do its own way comes
from its door module (`gradmon.backend.door`): the row of a due step is
computed in a value-returning branch and stored outside it (JAX: pure
`lax.cond` branches; PyTorch: a host branch), and every assignment is
unconditional (on JAX pure values decide what is written).
"""

import keras

from gradmon.backend import door as _door, keras_compat as _keras_compat
from gradmon.measure import moments, recorder, spikes, statistics, transforms
from gradmon.measure.pipeline import apply_unless_refused


def apply_at_door(observer, optimizer, original_apply, grads, variables):
    """The hooked `apply` of `observer` on JAX and PyTorch: pipeline, policies, update, row."""
    door = _door.current()
    observer._warn_missing(variables, grads)
    observer.ensure_built(optimizer, variables)
    rec = observer.recorder
    step = rec.step.value + 1
    rec.step.assign(step)
    clip = transforms.from_optimizer(_keras_compat.base_optimizer(optimizer))
    prepared = observer.pipeline.prepare(grads, variables, _keras_compat.loss_scale(optimizer), clip)
    verdict, extras = _policies(observer, rec, step, prepared)
    update = lambda: original_apply(prepared.to_apply, variables)  # noqa: E731
    touched = list(variables) + list(optimizer.variables)
    if not observer.measuring:
        # a step the host knows writes nothing (`GradientMonitor` picks `fit`'s train function
        # per execution, as on TensorFlow): the update and the counters, no branch at all; on
        # JAX its own trace, which keeps no pre-update weights (no copy of them in XLA)
        apply_unless_refused(verdict, update, touched, door)
        return
    do_log = _logs_refused(observer, rec.should_log(step), verdict)
    _advance_noise_ema(rec, extras, do_log)
    if rec.histograms_wanted:  # of the gradients, before the update (as on TensorFlow)
        due = rec.should_histogram(step)
        taken = door.cond(due, lambda: keras.ops.reshape(histograms(rec.spec, prepared), [-1]),
                          rec.histogram_size)
        rec.store_histograms(step, taken, due)
    weights = any(s.needs_weights or s.needs_update for s in rec.statistics)
    before = door.weights(variables, do_log) if weights else None
    apply_unless_refused(verdict, update, touched, door)
    skipped = keras.ops.convert_to_tensor(False) if verdict is None else verdict.skipped

    def measure():
        counters = {"skipped": rec.skipped.value, "overflow": rec.overflow.value,
                    "nonfinite": rec.nonfinite.value[0]}
        if observer.spikes is not None:
            counters["spikes"] = observer.spikes.count.value
        after = [v.value for v in variables] if weights else None
        ctx = statistics.StepContext(
            rec.spec, prepared.raw, prepared.observed, prepared.fractions, variables, optimizer,
            skipped, before, after, extras, counters, rec.state)
        row = rec.row(ctx)
        if rec.spec.loss_scaled:  # a loss-scale overflow: the host keeps only the counters
            row = keras.ops.where(keras.ops.arange(row.shape[0]) == 1,
                                  keras.ops.cast(verdict.overflow, "float32"), row)
        return row

    rec.store(step, door.cond(do_log, measure, int(rec.records.shape[1])), do_log)
    # on the host (PyTorch; JAX's `apply` outside jit): observe(log_dir=...) writes as it goes
    if (door.EAGER or door.on_host(step)) and observer.host.writer is not None \
            and observer._eager_due(int(step)):
        observer.flush(report=False)


def _policies(observer, rec, step, prepared):
    """The spike detector and the policies: judges the raw norm (`on_spike`), decides the
    update and counts. Returns `(verdict, extras)`."""
    batch = observer._take_batch()  # `fit` hands the batch size over (watch_batches)
    # gradmon's own train step's numbers (penalties, noise scale, the loss), set in this step
    extras, spike = observer._take_extras(), None
    if prepared.scale is not None:
        extras["loss_scale"] = prepared.scale  # before the update changes it
    if observer.spikes is not None:  # every step, measured or not: the statistics are running
        observer.spikes.observer = observer  # JAX: the host reads the trainer's state
        spike = observer.spikes.update(step, spikes.global_norm(prepared.raw), extras.get("loss"), batch)
        extras["spike"] = spike
    verdict = observer.pipeline.verdict(prepared, rec.spec.loss_scaled,
                                        rec.halted.value if observer.pipeline.stops else None,
                                        None if spike is None else spike.spike)
    count(observer, verdict, step, prepared)
    return verdict, extras


def _logs_refused(observer, do_log, verdict):
    """`do_log`, or a non-finite step refused by the policy: the host must see it, to stop
    or to name the variables."""
    if verdict is None or observer.on_nonfinite == "warn":
        return do_log
    ops = keras.ops
    return ops.logical_or(do_log, ops.logical_and(ops.logical_not(verdict.finite),
                                                  ops.logical_not(verdict.overflow)))


def _advance_noise_ema(rec, extras, do_log):
    """The noise scale's EMAs advance here, on due steps, outside the pure branch that
    computes the row; the row reads the new values (`extras["noise"]["ema"]`)."""
    noise = extras.get("noise")
    for statistic in rec.statistics:
        if noise is not None and isinstance(statistic, statistics.NoiseScale):
            ema = rec.state[statistic]
            new = statistic.next_ema(ema.value, noise)
            ema.assign(keras.ops.where(do_log, new, ema.value))
            extras["noise"] = dict(noise, ema=new)


def count(observer, verdict, step, prepared):
    """The counters of one step (`Observer._count` in `keras.ops`: 32-bit counters)."""
    ops, rec = keras.ops, observer.recorder
    if verdict is None:
        rec.count_nonfinite(step, ops.logical_not(observer.pipeline.finite_applied(prepared)))
        return
    rec.count_nonfinite(step, ops.logical_and(ops.logical_not(verdict.finite),
                                              ops.logical_not(verdict.overflow)))
    rec.skipped.assign(rec.skipped.value + ops.cast(verdict.skipped, "int32"))
    rec.overflow.assign(rec.overflow.value + ops.cast(verdict.overflow, "int32"))
    if verdict.halts is not None:
        first = ops.logical_and(verdict.halts, ops.logical_not(rec.halted.value))
        rec.halted_at.assign(ops.where(first, ops.cast(step, "int32"), rec.halted_at.value))
        rec.halted.assign(ops.logical_or(rec.halted.value, verdict.halts))


def histograms(spec, prepared):
    """`[kinds, groups, 2 + buckets]`: raw, and transformed only when something transforms
    (every backend)."""
    kinds = [prepared.raw] + ([prepared.observed] if spec.has_transform else [])
    return keras.ops.stack([moments.histogram_rows(g, spec.segment_ids, spec.num_groups,
                                                   recorder.HISTOGRAM_BUCKETS) for g in kinds])
