"""The non-finite and spike policies heard on the host: `PolicyWatch`, `stop_training`.

The policies act on the device (`gradmon.measure.pipeline`): a refused update
never runs. What the host adds is hearing them: ending `fit` once a `"stop"`
policy halted the updates, and warning of non-finite updates and spikes.
`GradientMonitor` does it while it writes; `PolicyWatch` does it in a `fit`
without one (a monitored model adds it by itself). Nothing here imports the
Keras glue (`gradmon.monitored`), which imports this module.
"""

import warnings

import keras


def stop_training(model, observer):
    """Ends `fit` after a `"stop"` policy halted the updates; warns and prints why. Returns the step."""
    step, cause, policy = observer.host.stop_cause()
    model.stop_training = True
    message = (f"gradmon: {cause} at step {step} ({policy}='stop'): that "
               "update and every later one were not applied; training stops.")
    warnings.warn(message, stacklevel=3)
    print(message)
    return step


def hears_policies(callback):
    """Whether `callback` ends `fit` at a `"stop"` and warns (a `GradientMonitor`, a `PolicyWatch`)."""
    return bool(getattr(callback, "hears_policies", False))


def write_unread(observer):
    """Writes the measured steps that `observer`'s `GradientMonitor` holds unread in the ring,
    for a `fit` that ends by an exception (no `on_train_end`). Never raises: that exception
    is what the user must see (a failed write is warned of, with its count)."""
    monitor = observer.host.monitor if observer is not None else None
    if monitor is not None:
        monitor.write_unread()


class PolicyWatch(keras.callbacks.Callback):
    """Makes the non-finite and spike policies heard in a `fit` without a `GradientMonitor`.

    A monitored model adds it to `fit` by itself when no `GradientMonitor` is
    among the callbacks (which does the same and writes). It reads one flag
    per execution under a `"stop"` policy, and the non-finite counter plus
    (with `on_spike`) the spike ring at each epoch's end: it ends `fit` when
    the updates stopped, and warns of spikes (naming their steps) and of
    updates with non-finite gradients (their count and steps; applied under
    `"warn"`, refused under `"skip"`).
    """

    hears_policies = True

    def __init__(self):
        super().__init__()
        self.stopped_at = None
        self._observer = None

    @staticmethod
    def needed(observer):
        # every policy: even "warn" is heard at the epoch end (a non-finite update is counted
        # on the device at every step; one read per epoch)
        return True

    def on_train_begin(self, logs=None):
        # added to monitored models only: they carry their observer
        self._observer = getattr(self.model, "_gradmon_observer", None)
        if self._observer is not None:
            self._observer.host.take_nonfinite()  # those before this fit are not this fit's epochs'
        self.stopped_at = None

    def on_train_batch_end(self, batch, logs=None):
        observer = self._observer
        if observer is not None and observer.pipeline.stops and self.stopped_at is None \
                and observer.stopped:
            self.stopped_at = stop_training(self.model, observer)

    def on_epoch_end(self, epoch, logs=None):
        observer = self._observer
        if observer is None or observer.recorder is None or self.stopped_at is not None:
            return
        observer.read_spikes()  # warns, naming their steps
        taken = observer.host.take_nonfinite()
        if taken is not None:
            _warn_nonfinite_epoch(observer, epoch, *taken)


def _warn_nonfinite_epoch(observer, epoch, count, first, last):
    steps = f"step {last}" if count == 1 else f"steps {first} to {last}"
    done = "were not applied"
    if observer.on_nonfinite == "warn" and not observer.recorder.spec.loss_scaled:
        done = "were applied: the weights may now be NaN/inf"
    warnings.warn(
        f"gradmon: {count} update(s) in epoch {epoch + 1} had non-finite gradients "
        f"({steps}) and {done} (on_nonfinite={observer.on_nonfinite!r}); add a "
        "gradmon.GradientMonitor to the callbacks to see their layers.", stacklevel=3)
