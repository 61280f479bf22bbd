"""`GradientMonitor`: schedules gradmon's measurements in `fit` and writes them. It computes nothing.

The callback sets the observer's one `Schedule` (`gradmon.publish.schedule`,
held by the observer's `Publisher`): which steps to measure (only the steps it
writes, `"epoch"` included). It reads the device only after an execution
that held such a step (the host mirrors the step counter, and asks the same
schedule which step is due next), so a step that writes nothing costs no
device-to-host copy. Written steps wait in the device's ring while it has
room (at most `_READ_WITHIN_SECONDS`): one read serves many of them.

`PolicyWatch` (a `fit` without a `GradientMonitor`) is in `gradmon.publish.policy`,
importable from here as before.
"""

import contextlib
import time
import warnings

import keras

from gradmon.backend import distribute as _distribute
from gradmon.publish import layout, schedule
from gradmon import monitored
from gradmon._validation import check_log_dir, check_non_negative_int, check_positive_int, invalid
from gradmon.publish.policy import PolicyWatch, stop_training, write_unread  # noqa: F401 (public here)
from gradmon.publish.writer import MetricWriter, SummaryWriter, write_report


def _with_measuring(observer, train_function, measuring):
    """`train_function` with `observer.measuring` set while it runs (and so while it traces).

    On JAX and PyTorch the `GradientMonitor` of a running `fit` does its host work for the
    execution right after it, here (`GradientMonitor.after_train_function`), not in
    `on_train_batch_end`: overriding that makes Keras wait for every step's logs.
    """

    def function(*args):  # (iterator); on JAX (state, iterator)
        observer.measuring = measuring
        try:
            result = train_function(*args)
            monitor = observer.host.monitor
            if monitor is not None and monitor.fitting_async:
                monitor.after_train_function(result)
            return result
        except StopIteration:
            raise  # the end of the data: Keras ends the epoch
        except BaseException:
            write_unread(observer)  # e.g. Ctrl-C: `on_train_end` will not come
            raise
        finally:
            observer.measuring = True

    return function


@contextlib.contextmanager
def _own_jax_trace(model):
    """Within it, `model.train_step` is a function of its own (JAX).

    `jax.jit` keeps one cache of traces per function, and Keras' JAX trainer jits
    `model.train_step`, a bound method equal to itself at every call: two train functions
    made in turn would share one trace, so the one that only updates would measure too
    (keeping the pre-update weights, which XLA copies every step).
    """
    if keras.backend.backend() != "jax":
        yield
        return
    held = model.__dict__.get("train_step")
    step = model.train_step

    def train_step(*args, **kwargs):
        return step(*args, **kwargs)

    object.__setattr__(model, "train_step", train_step)  # not a tracked attribute
    try:
        yield
    finally:
        if held is None:
            model.__dict__.pop("train_step", None)
        else:
            object.__setattr__(model, "train_step", held)


_TRAIN_FUNCTIONS = "_gradmon_train_functions"


class _TrainFunctions:
    """A model's two train functions, kept on the model: one measuring, one that only updates
    (for the executions the host knows hold no written step: no conditional at all).

    Each is traced once, the first time it runs. They belong to the model, its observer and
    its optimizer, not to a callback: a new `GradientMonitor`, a new `fit` and a new
    `update_freq` reuse them (the schedule is in variables). They are made again only when
    what their traces hold changes: the observer, the optimizer, steps per execution, XLA,
    eager running, histograms, the recorder, or Keras' own train function (a `compile`).
    """

    def __init__(self, model, observer):
        self.observer, self.optimizer = observer, model.optimizer
        self.settings = _trace_settings(model, observer)
        self.recorder = observer.recorder  # None until the first trace builds it
        made = []
        for measuring in (True, False):
            with contextlib.nullcontext() if measuring else _own_jax_trace(model):
                model.make_train_function(force=True)
            made.append(_with_measuring(observer, model.train_function, measuring))
        self.measuring, self.plain = made

    def serve(self, model, observer):
        """Whether these are still right for `model` (they are its train function, and were
        traced for this observer, optimizer, recorder and settings)."""
        if model.train_function is not self.measuring and model.train_function is not self.plain:
            return False  # Keras dropped them (compile) or something replaced them
        if self.recorder is None:
            self.recorder = observer.recorder  # built by their first trace
        return (self.observer is observer and self.optimizer is model.optimizer
                and self.recorder is observer.recorder
                and self.settings == _trace_settings(model, observer))


def _trace_settings(model, observer):
    return (observer.min_rows, observer.histograms, model.steps_per_execution, model.jit_compile,
            model.run_eagerly)


# Written steps wait in the device's ring while it has room for the next execution's, and at
# most this long: one read (and one sync) for many written steps, yet TensorBoard sees them soon.
_READ_WITHIN_SECONDS = 2.0


def _check_update_freq(update_freq):
    if update_freq == "epoch":
        return update_freq
    if isinstance(update_freq, str):
        raise invalid("update_freq", 'a positive integer (steps) or "epoch"', update_freq)
    try:
        return check_positive_int("update_freq", update_freq)
    except ValueError:
        raise invalid("update_freq", 'a positive integer (steps) or "epoch"', update_freq) from None


class GradientMonitor(keras.callbacks.Callback):
    """Writes the gradient statistics of a model's training to TensorBoard.

    Works with any compiled model: gradients are observed where the optimizer
    applies them, so Keras' `train_step`, a model's own `train_step` and
    `gradmon.monitor` models are all observed. Configure transforms,
    statistics and the non-finite policy with `gradmon.monitor(model, ...)`
    (or the mixin); this callback decides what is written when.

    Summaries go to `<log_dir>/train`, the run directory that
    `keras.callbacks.TensorBoard(log_dir)` uses; the step is the number of
    updates the model's optimizer has been given (it continues across `fit`
    calls, and across saving and loading a monitored model; an optimizer that
    trained before gradmon saw it continues from its `iterations`). Tags are listed
    in `gradmon.tags`. With `steps_per_execution > 1` every logged step is
    written at its own step; histograms are taken at most once per execution.
    Under multi-worker training only the chief writes. One `GradientMonitor`
    per model.

    Args:
        log_dir: directory of the TensorBoard run (a non-empty path), or
            `None` when `writer` is given.
        update_freq: write statistics every this many training steps, or
            `"epoch"` for the last step of each epoch. Only written steps
            are measured. Defaults to `1`.
        histogram_freq: write gradient histograms every this many training
            steps; `0` disables them. Defaults to `0`.
        writer: a `gradmon.writer.MetricWriter` to write to instead of the
            event file of `log_dir` (e.g. `gradmon.writer.MemoryWriter()` in
            tests). Defaults to `None`.

    Example:
        >>> model.compile(optimizer="adam", loss="mse")
        >>> model.fit(x, y, callbacks=[gradmon.GradientMonitor("runs/exp1", update_freq=10)])
    """

    hears_policies = True  # ends fit at a "stop" and warns: no PolicyWatch beside it

    def __init__(self, log_dir=None, update_freq=1, histogram_freq=0, writer=None):
        super().__init__()
        if writer is not None and not isinstance(writer, MetricWriter):
            raise invalid("writer", "a gradmon.writer.MetricWriter or None", writer)
        self.log_dir = None if writer is not None and log_dir is None else check_log_dir(log_dir)
        self.update_freq = _check_update_freq(update_freq)
        self.histogram_freq = check_non_negative_int("histogram_freq", histogram_freq)
        self._writer = writer if writer is not None else SummaryWriter.shared(self.log_dir, "train")
        self._observer = None
        self._writes = True
        self.stopped_at = None
        # Keras dispatches batch ends asynchronously on JAX and PyTorch, unless a callback
        # overrides `on_train_batch_end` (then every execution waits for its logs on the host):
        # there the train function runs this callback's host work (`after_train_function`)
        self._async = keras.backend.backend() != "tensorflow"
        if self._async:
            self.on_train_batch_end = super().on_train_batch_end  # Keras' default: nothing waits
        self.fitting_async = False  # in a fit, on JAX / PyTorch
        self._begin = 0  # the first step (of the epoch) of the running execution

    def set_model(self, model):
        super().set_model(model)
        monitored.observer_for(model)  # observe a model that is not monitored yet

    def _claim(self):
        """Takes the model's observer; two GradientMonitors in one `fit` are an error (a later
        `fit` with a new GradientMonitor takes over: `params` is shared by one fit's callbacks)."""
        observer = monitored.observer_for(self.model)
        other = observer.host.monitor
        if other is not None and other is not self and other.params is self.params:
            raise ValueError(
                f"The model {self.model.name!r} already has a GradientMonitor in this fit (log_dir="
                f"{other.log_dir!r}). Expected one GradientMonitor per model: one callback with "
                "the update_freq / histogram_freq you need. "
                f"Received: a second GradientMonitor(log_dir={self.log_dir!r})")
        self.adopt(observer)

    def adopt(self, observer):
        """Takes over writing for `observer` (also after `configure_gradients` replaced it).

        An observer with an event file of its own (`observe(opt, log_dir=...)`) first writes
        there what it measured and not yet wrote, and closes that file (`Observer.close`).
        From then on this callback writes for it: during `fit`, and for a later `opt.flush()`
        (e.g. a custom loop after the fit), which writes to this callback's run (`flush_writer`),
        where the fit's steps went, on the same step axis.
        """
        host = observer.host
        if host.writer is not None and host.monitor is None:
            observer.close()  # its steps so far to its own file, which is then closed
        self._observer, self._schedule = observer, host.schedule
        host.monitor = self
        monitored.write_at_exit(observer)  # a custom loop after the fit that never flushes: written at exit
        host.writer = None  # writing goes through this callback (chief only)
        wants = self.histogram_freq > 0
        if observer.histograms != wants:
            observer.histograms = wants
            self.model.train_function = None  # the histogram branch is traced or not

    @property
    def flush_writer(self):
        """Where `opt.flush()` writes for an observer this callback adopted: this callback's
        writer, or `None` where it does not write (a non-chief worker)."""
        return self._writer if self._writes else None

    def on_train_begin(self, logs=None):
        write_unread(monitored.observer_for(self.model))  # by the monitor of an interrupted fit
        self._claim()
        self._writes = _distribute.is_chief(getattr(self.model, "distribute_strategy", None))
        if self._writes:
            self._writer.open()  # an unwritable log_dir fails before the first step
        self._take_functions(monitored.prepare_model(self.model))
        host = self._observer.host
        host.set_schedule(every=0 if self.update_freq == "epoch" else self.update_freq,
                          log_at=-1, hist_every=self.histogram_freq)
        self._begin_step = self._observer.step  # also the first epoch's mirror base
        host.last_written = max(host.last_written, self._begin_step)
        self.stopped_at = None
        self._applied_checked = False
        self._hist_seen = None  # a callback moved from another model saw that model's steps
        self._unread, self._read_by = 0, float("inf")
        # refused steps (skip / stop) and spikes take rows or ring slots the host cannot
        # foresee: read after each execution that held a written step, as they happen
        self._defers = self._observer.on_nonfinite == "warn" and self._observer.on_spike is None
        self.fitting_async = self._async
        # what `after_train_function` needs, known for the whole fit
        self._per_execution = int(getattr(self._model, "steps_per_execution", 1) or 1)
        self._steps = self.params.get("steps") if self.params else None

    def _take_functions(self, rebuild):
        """The model's two train functions (`_TrainFunctions`), made only when it has none that
        fit: a new callback, a new `fit` or a new schedule reuses them, untraced again."""
        model, observer = self.model, self._observer
        functions = model.__dict__.get(_TRAIN_FUNCTIONS)
        if rebuild or functions is None or not functions.serve(model, observer):
            functions = _TrainFunctions(model, observer)
            object.__setattr__(model, _TRAIN_FUNCTIONS, functions)  # not a tracked attribute
        if model.train_function is not functions.measuring:
            model.train_function = functions.measuring  # (an interrupted fit left the other)
        self._functions = functions

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = batch  # JAX / PyTorch: `after_train_function` ends this execution
        if self._observer.on_nonfinite != "warn":
            return  # refused steps must be measured, to name them: always the measuring one
        # measure when this execution (the next steps_per_execution steps) holds a due step;
        # `_model`: on JAX `self.model` syncs the trainer's whole state back
        measure = self._host_step + self._observer.min_rows >= self._next_due
        function = self._functions.measuring if measure else self._functions.plain
        if self._model.train_function is not function:
            self._model.train_function = function

    def after_train_function(self, result):
        """`on_train_batch_end`'s work, on JAX and PyTorch, run by the train function right after
        its execution (`_with_measuring`): in the main thread, before Keras looks at
        `stop_training`, as on TensorFlow, while Keras hands the logs to the callbacks
        asynchronously. The execution's last step is its first plus steps per execution, within
        the epoch's steps where Keras knows them."""
        end = self._begin + self._per_execution - 1
        if self._steps:
            end = min(end, self._steps - 1)
        observer = self._observer
        observer.returned = result  # JAX: a host read takes this execution's state from it
        try:
            self._after_execution(end)
        finally:
            observer.returned = None

    def on_train_batch_end(self, batch, logs=None):
        # TensorFlow (JAX / PyTorch: `after_train_function`, see `__init__`)
        self._after_execution(batch)

    def on_epoch_begin(self, epoch, logs=None):
        # one read per epoch (none for the first): the mirror's base
        self._host_step = self._observer.step if self._begin_step is None else self._begin_step
        self._begin_step = None
        self._epoch_start_step = self._host_step
        self._batch_seen = -1
        steps = self.params.get("steps") if self.params else None
        if self.update_freq == "epoch":
            # the last step of the epoch; unknown length: measure every step, write the last
            self._observer.host.set_schedule(every=0 if steps else 1,
                                             log_at=self._host_step + steps if steps else -1)
        self._next_due = self._schedule.next_due_after(self._host_step)

    def _after_execution(self, batch):
        # `batch` is the last step of the execution (steps_per_execution)
        previous = self._host_step
        self._host_step += batch - self._batch_seen
        self._batch_seen = batch
        if self._host_step >= self._next_due:
            self._next_due = self._schedule.next_due_after(self._host_step)
        if self._observer.pipeline.stops and self.stopped_at is None and self._observer.stopped:
            self.stopped_at = stop_training(self.model, self._observer)
            self._write()  # the steps measured up to the stop (its spike already named)
            return
        if self.update_freq == "epoch":
            return
        every, now = self._schedule.every, self._host_step
        if schedule.passed(every, previous, now):
            if not self._unread:
                self._read_by = time.monotonic() + _READ_WITHIN_SECONDS
            self._unread += schedule.multiples(every, previous, now)
        histogram = schedule.passed(self._schedule.hist_every, previous, now)
        if (self._unread or histogram) and (histogram or self._read_due(now)):
            self._write()  # a histogram is held on the device only until the next one

    def _read_due(self, now):
        """Whether the written steps held in the ring must be read now: the next execution
        could overwrite one, it is `_READ_WITHIN_SECONDS` since the first, or reads wait for
        nothing (`_defers`)."""
        recorder, every = self._observer.recorder, self._schedule.every
        upcoming = schedule.multiples(every, now, now + self._observer.min_rows)
        return (not self._defers or recorder is None or self._unread + upcoming > recorder.rows
                or time.monotonic() >= self._read_by)

    def on_epoch_end(self, epoch, logs=None):
        self._write(latest_only=self.update_freq == "epoch")
        self._report()
        if not self._applied_checked:
            self._check_applied()

    def _check_applied(self):
        """Warns once per fit when the watched optimizer applied nothing in the first epoch that
        held a step due to be written: the model trains with optimizers of its own (a GAN
        compiled without one), which this callback does not see. No device read of its own:
        the epoch's write read nothing measured after the epoch began."""
        due = self.update_freq == "epoch" or schedule.passed(self._schedule.every,
                                                             self._epoch_start_step, self._host_step)
        if self._batch_seen < 0 or not due:
            return
        self._applied_checked = True
        if self._observer.host.last_written > self._epoch_start_step:
            return
        optimizer = getattr(self.model, "optimizer", None)
        warnings.warn(
            f"gradmon: GradientMonitor watches the optimizer of model {self.model.name!r} "
            f"({getattr(optimizer, 'name', None)!r}), which applied no update in "
            f"{self._batch_seen + 1} training steps: the model trains with other optimizers "
            "(e.g. a GAN's own), and nothing is written. Observe the optimizers the model uses: "
            "gradmon.observe(opt, log_dir=..., name=...) for each, and flush() them.", stacklevel=2)

    def on_train_end(self, logs=None):
        self.fitting_async = False
        if self.model.train_function is self._functions.plain:
            self.model.train_function = self._functions.measuring  # e.g. train_on_batch measures
        self._write(latest_only=self.update_freq == "epoch")
        self._report()
        if self._writes:
            self._writer.close()

    def _report(self):
        """Writes the health report of the run so far (Text tab) and, for a model of more than
        `layout.FOCUS_LIMIT` groups, the per-layer charts of the layers it finds that matter."""
        if not self._writes:
            return
        layout.write_focus(self._writer, self._observer.recorder, write_report(self._writer),
                           self._observer.name)

    def write_unread(self):
        """Writes the measured steps held unread in the ring, for a `fit` that ends by an
        exception (no `on_train_end`). Never raises: that exception is what the user must
        see (a failed write is warned of, with its count)."""
        self.fitting_async = False  # no `on_train_end` will come
        unread = getattr(self, "_unread", 0)
        if not unread:
            return
        try:
            self._write()
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"gradmon: {unread} measured step(s) of an interrupted fit could not be "
                          f"written ({type(error).__name__}: {error}).", stacklevel=3)

    def _write(self, latest_only=False):
        self._unread = 0  # everything measured so far is read
        # histograms only when a histogram step passed since the last look (host schedule)
        seen, self._hist_seen = getattr(self, "_hist_seen", None), getattr(self, "_host_step", None)
        histograms = seen is None or self._hist_seen is None or \
            schedule.passed(self._schedule.hist_every, seen, self._hist_seen)
        return self._observer.flush(self._writer if self._writes else None, latest_only, histograms)
