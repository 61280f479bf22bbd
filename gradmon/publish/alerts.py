"""What the host warns of, in words: lost steps, non-finite updates, spikes.

Pure text and `warnings.warn`; the numbers come from the `Publisher`'s device
reads. Each warning names the steps and says what the policy did.
"""

import warnings

from gradmon import tags
from gradmon._validation import warn_once
from gradmon.measure import statistics


def lost_steps_text(lost, first, last, due):
    """The steps among `first..last` that were measured and lost, in words (`due`: the
    schedule's due steps there, `Schedule.due_steps`)."""
    if len(due) != lost:  # refused steps are measured too: only the range is known
        return f"among steps {first}..{last}"
    if lost <= 4:
        return "step" + ("s " + ", ".join(map(str, due[:-1])) + " and " if lost > 1 else " ") + str(due[-1])
    return f"steps {due[0]}, {due[1]}, ..., {due[-1]}"


def in_a_loop_flush():
    """How a custom loop of this backend hands its measured steps over, in words."""
    if _jax():  # the jitted step returns the state: flush reads it from there
        return ("in a jitted JAX loop call `opt.flush(optimizer_variables=...)` (the optimizer "
                "variables your step returns)")
    import keras

    return "in a tf.function loop call `opt.flush()`" if keras.backend.backend() == "tensorflow" \
        else "in a custom loop call `opt.flush()`"


def loop_close():
    """The call that ends a custom loop's observation, on this backend."""
    return "`opt.gradmon.close(optimizer_variables=...)`" if _jax() else "`opt.gradmon.close()`"


def _jax():
    import keras

    return keras.backend.backend() == "jax"


def outside_fit(model, measured):
    """Warns once per model that its optimizer applied gradients outside its `fit` (a custom loop,
    `train_on_batch`), where nothing reads what gradmon measures (`measured`: the optimizer is
    observed, so the transform and policies act; else nothing of gradmon runs there)."""
    what = ("gradmon transforms and measures these updates, but nothing writes them or warns of "
            "non-finite gradients there (in `fit`, `gradmon.GradientMonitor` does)" if measured else
            "gradmon does not observe these updates (no statistic, transform or non-finite check: "
            "it observes the optimizer once `fit` starts)")
    warn_once(("outside-fit", id(model)),
              f"gradmon: the optimizer of the monitored model {model.name!r} applied gradients "
              "outside the model's `fit` (a custom loop, `train_on_batch`, or the `fit` of another "
              f"model sharing it): {what}. To observe a custom loop, observe its optimizer: "
              "`opt = gradmon.observe(optimizer, log_dir=..., "
              f"transform=...)`, and {in_a_loop_flush()} every few "
              "steps.")


def no_batch_size(observer):
    """Warns once per observer that its spike detector gets no batch sizes (`on_spike` set, and
    neither a monitored model's `fit` nor `observe_batch` hands them over)."""
    warn_once(("no-batch-size", id(observer)),
              f"gradmon: on_spike={observer.on_spike!r}, but no batch size reaches the spike detector: "
              "every step is judged as a full batch, so a smaller last batch of an epoch (its "
              "gradient is noisier by nature) can be taken for a spike. In `fit`, monitor the model "
              "(`gradmon.monitor(model)`, or a `gradmon.GradientMonitor` in the callbacks), which hands "
              "each batch's size over; in a custom loop call `opt.gradmon.observe_batch(x)` before "
              "`apply_gradients` (not needed when every batch has the same size).")


def report_lost(lost, between, rows, buffer_steps, every, never_read, due, stacklevel):
    """Warns (every time) that `lost` measured steps among `between` were overwritten on the
    device (a ring of `rows`) before a read."""
    first, last = between
    ring = f"the device holds the last {rows} measured steps (buffer_steps={buffer_steps})"
    if never_read:
        loop = in_a_loop_flush()
        cause = (f"flush() was never called before; {ring}. {loop[0].upper() + loop[1:]} at "
                 "least every that many measured steps; in `model.fit` add "
                 "`gradmon.GradientMonitor(log_dir)` to the callbacks")
    else:
        cause = f"{ring}. Call `opt.flush()` at least every {rows} measured steps"
        if every > 1:
            cause += f" ({rows * every} updates at update_freq={every})"
    warnings.warn(
        f"gradmon: {lost} measured step{'s' if lost > 1 else ''} "
        f"({lost_steps_text(lost, first, last, due)}) {'were' if lost > 1 else 'was'} overwritten "
        f"on the device before {'they were' if lost > 1 else 'it was'} written: {cause}, or "
        "raise buffer_steps.", stacklevel=stacklevel + 1)


def _nonfinite_where(rec, first, last, snapshots):
    """`(groups, made_by_transform)`: the groups with NaN/inf gradient entries in the measured
    steps among `first..last` (`stats` with "nonfinite"), and whether those steps' raw
    gradient was finite (the transform made the NaN)."""
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


def _hidden_nonfinite(observer, snapshots):
    """Warns once when measured steps had non-finite raw gradients the transform made finite."""
    rec = observer.recorder
    raw_total = tags.prefixed(rec.prefix, tags.nonfinite_total(tags.RAW)) if rec else None
    hidden = [s.step for s in snapshots if not s.overflow and s.values.get(raw_total, 0) > 0]
    if hidden:  # what was applied was finite: the transform made it so
        warn_once(("nonfinite-raw", id(observer)),
                  f"gradmon: non-finite raw gradients at step {hidden[0]}, made finite by the "
                  f"transform; the update was applied (on_nonfinite={observer.on_nonfinite!r}).")


def _policy_text(policy, one, loss_scaled):
    """What the policy did with non-finite updates (`one`: a single step)."""
    if policy == "stop":
        return (": the update was not applied" if one else ": these updates were not applied") + \
            ", and no later update will be."
    if policy == "skip":
        return f": such updates are skipped; their number is logged as `{tags.SKIPPED_STEPS}`."
    if loss_scaled:
        return (": the LossScaleOptimizer skipped the update (its loss scale is at most 1, so "
                "this is not a loss-scale overflow).")
    return (": the update was applied" if one else ": the update was applied each time") + \
        (f"; the weights may now be NaN/inf, and a run of such steps that goes on is warned of "
         f"once (all are counted in `{tags.NONFINITE_STEPS}`). Use on_nonfinite='skip' or "
         "'stop' to protect the weights.")


def report_nonfinite(observer, taken, snapshots=(), stacklevel=3):
    """Warns of the steps whose update was non-finite (`Publisher.take_nonfinite`), naming their
    count and range; never claims an update that did not happen.

    Each new run of such steps is warned of; a run that only went on since the last warning
    (every step since non-finite, e.g. weights that became NaN) is counted in
    `gradients/nonfinite_steps` without a new warning.
    """
    if taken is None:
        _hidden_nonfinite(observer, snapshots)
        return
    count, first, last = taken
    host = observer.host
    previous, host.nonfinite_warned = host.nonfinite_warned, (first, last)
    if previous is not None and first == previous[1] + 1 and count == last - first + 1:
        return  # the same run of non-finite steps went on
    rec = observer.recorder
    groups, made = _nonfinite_where(rec, first, last, snapshots)
    at = f"at step {last}"  # the first step first, however many followed before this read
    if count > 1:
        at = f"at step {first} and {count - 1} more step{'s' if count > 2 else ''} up to step {last}"
    where = f" in {groups}" if groups else ""
    made = " (the raw gradient was finite: the transform made it non-finite)" if made else ""
    message = f"gradmon: non-finite gradients {at}{where}{made} (on_nonfinite={observer.on_nonfinite!r})"
    message += _policy_text(observer.on_nonfinite, count == 1, rec.spec.loss_scaled)
    warnings.warn(message, stacklevel=stacklevel)


def report_spikes(observer, spiked, stacklevel=3):
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
    warnings.warn(message, stacklevel=stacklevel)


def report_lost_spikes(observer, lost, rows):
    warn_once(("lost-spikes", id(observer)),
              f"gradmon: {lost} spikes were overwritten before they were read (the ring holds "
              f"{rows}); they are counted in `{tags.SPIKE_COUNT}` but not written under "
              f"`{tags.SPIKE_AT}`.")
