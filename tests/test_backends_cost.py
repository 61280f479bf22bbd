"""What gradmon costs per training step on every backend, counted rather than timed.

The overhead tables of docs/guide/performance.md are timings on a shared machine; these are
the causes behind them, counted (no test here times anything):

- Keras hands batch ends to callbacks asynchronously on JAX and PyTorch, unless a callback
  overrides `on_train_batch_end`: then every execution waits on the host for its logs, and
  the host stops running ahead of the device. `GradientMonitor` does its per-execution work
  from the train function instead, so a fit with it waits for no step's logs.
- An unlogged batch reads nothing from the device: the device reads of a fit do not grow
  with its unlogged batches (and, on JAX, no batch syncs the trainer's state back).
- An execution that holds no written step runs a train function that only updates (and
  counts), as on TensorFlow: on JAX a trace of its own, which keeps no pre-update weights,
  so XLA copies no weight in it beyond what it copies in Keras' own step.
- On JAX the compiled step adds, outside its one `lax.cond` (the measuring branch), no work
  over a full tensor but one finiteness check per gradient (the non-finite counter: its
  largest magnitude); the step that only updates has no `lax.cond` at all.

Runs under every backend (`KERAS_BACKEND=tensorflow|jax|torch`); the parts that concern one
backend only skip elsewhere.
"""

import collections
import threading

import keras
import numpy as np
import pytest

import gradmon
from gradmon.measure.observer import observer_of
from gradmon.measure.recorder import Recorder

BACKEND = keras.backend.backend()
INPUTS, BATCH = 7, 8


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((INPUTS,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(6)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(steps):
    rng = np.random.default_rng(1)
    return (rng.normal(size=(steps * BATCH, INPUTS)).astype("float32"),
            rng.integers(0, 6, size=steps * BATCH))


@pytest.fixture
def device_reads(monkeypatch):
    """Counts the host's reads of gradmon's device state (every one goes through
    `Recorder.host_read`) and, on JAX, the syncs of the trainer's whole state
    (`jax_state_sync`, what `Callback.model` does on JAX)."""
    counts = collections.Counter()
    host_read = Recorder.host_read

    def counted_read(self, variable):
        counts["reads"] += 1
        return host_read(self, variable)

    monkeypatch.setattr(Recorder, "host_read", counted_read)
    if BACKEND == "jax":
        from keras.src.backend.jax.trainer import JAXTrainer

        sync = JAXTrainer.jax_state_sync

        def counted_sync(self):
            counts["syncs"] += 1
            return sync(self)

        monkeypatch.setattr(JAXTrainer, "jax_state_sync", counted_sync)
    return counts


def _fit_counts(tmp_path, counts, steps, update_freq):
    x, y = _data(steps)
    model = _model()
    counts.clear()
    model.fit(x, y, batch_size=BATCH, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path / f"{steps}-{update_freq}"),
                                                 update_freq=update_freq)])
    return dict(counts)


def test_unlogged_batches_read_nothing_from_the_device(tmp_path, device_reads):
    # update_freq=100: none of these steps is written; the fit's reads are those of its begin
    # and end (the step counter, the ring, the non-finite counter), whatever its length
    short = _fit_counts(tmp_path, device_reads, 6, 100)
    long = _fit_counts(tmp_path, device_reads, 30, 100)
    assert short["reads"] > 0  # the counter sees the reads there are
    assert long == short
    # written steps are read (in batches of the ring's rows): there the reads grow
    every_short = _fit_counts(tmp_path, device_reads, 6, 1)
    every_long = _fit_counts(tmp_path, device_reads, 40, 1)
    assert every_long["reads"] > every_short["reads"]


def test_a_gradient_monitor_keeps_keras_batch_ends_asynchronous(tmp_path, monkeypatch):
    if BACKEND == "tensorflow":
        pytest.skip("Keras runs TensorFlow's callbacks synchronously (its backend is not thread safe)")
    from keras.src.callbacks import callback_list
    from keras.src.utils import python_utils

    waits = collections.Counter()
    pythonify = python_utils.pythonify_logs

    def counted(logs):
        # logs converted on the main thread: the host waits there for the step's results
        if logs and threading.current_thread() is threading.main_thread():
            waits["main thread"] += 1
        return pythonify(logs)

    monkeypatch.setattr(callback_list.python_utils, "pythonify_logs", counted)
    x, y = _data(12)

    class BatchEnds(keras.callbacks.Callback):  # what any callback with batch ends costs
        def on_train_batch_end(self, batch, logs=None):
            pass

    def waits_in_fit(callbacks):
        waits.clear()
        _model().fit(x, y, batch_size=BATCH, verbose=0, callbacks=callbacks)
        return waits["main thread"]

    plain = waits_in_fit([])  # the epoch's and the fit's ends: Keras' own
    assert waits_in_fit([BatchEnds()]) == plain + 12  # the counter sees a wait per batch
    monitor = gradmon.GradientMonitor(str(tmp_path), update_freq=5)
    assert waits_in_fit([monitor]) == plain
    # and its host work ran for every execution: it knows the steps and wrote the due ones
    assert monitor._host_step == 12
    assert monitor._observer.host.last_written == 10


def test_executions_without_a_written_step_run_the_train_function_that_only_updates(tmp_path,
                                                                                   monkeypatch):
    from gradmon.measure import observer as observer_module

    applied = []  # the `measuring` switch of each hooked apply run in Python (JAX, TF: traces)
    apply = observer_module.Observer.apply

    def counted(self, *args, **kwargs):
        applied.append(self.measuring)
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(observer_module.Observer, "apply", counted)
    x, y = _data(12)
    model = _model()
    monitor = gradmon.GradientMonitor(str(tmp_path), update_freq=5)
    picked = []  # a batch begin only: Keras still hands batch ends over asynchronously
    spy = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda batch, logs: picked.append(
        model.train_function is monitor._functions.measuring))
    model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[monitor, spy])
    due = [step % 5 == 0 for step in range(1, 13)]
    assert picked == due
    # each is traced once where the step is compiled; PyTorch runs the hooked apply every step
    assert applied == due if BACKEND == "torch" else sorted(applied) == [False, True]
    assert monitor._observer.host.last_written == 10


def _copies(hlo):
    """The arrays (not scalars) a compiled step copies, by shape."""
    import re

    return collections.Counter(shape for shape in re.findall(r"= (\S+) copy\(", hlo) if "[]" not in shape)


def _jax_steps(tmp_path, x, y):
    """Yields `(name, measuring, model, state)` to trace a step from: Keras' own model
    (`"keras", None`) and a monitored one both ways (`"gradmon", True` and `False`, the
    observer's `measuring` set while the caller traces)."""
    for name in ("keras", "gradmon"):
        model = _model()
        callbacks = [gradmon.GradientMonitor(str(tmp_path), update_freq=100)] if name == "gradmon" else []
        model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=callbacks)
        state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                     optimizer_variables=True, metrics_variables=True)
        observer = observer_of(model.optimizer) if name == "gradmon" else None
        for measuring in ((True, False) if observer is not None else (None,)):
            if observer is not None:
                observer.measuring = measuring
            try:
                yield name, measuring, model, state
            finally:
                if observer is not None:
                    observer.measuring = True


def test_the_jax_step_that_writes_nothing_copies_no_weight_beyond_keras(tmp_path):
    if BACKEND != "jax":
        pytest.skip("the compiled JAX step")
    import jax

    x, y = _data(2)
    copies = {}
    for name, measuring, model, state in _jax_steps(tmp_path, x, y):
        # a function of its own: a trace of its own; donated as Keras' train function does
        step = jax.jit(lambda state, data: model.train_step(state, data), donate_argnums=0)
        copies[name, measuring] = _copies(step.lower(state, (x[:BATCH], y[:BATCH])).compile().as_text())
    assert copies["gradmon", False] == copies["keras", None]
    # the counter sees copies: the measuring step keeps the pre-update weights for the update ratio
    assert copies["gradmon", True] - copies["keras", None]


def test_the_jax_step_adds_no_full_tensor_work_outside_its_cond(tmp_path):
    if BACKEND != "jax":
        pytest.skip("the compiled JAX step (jax.make_jaxpr)")
    import jax

    x, y = _data(2)
    eqns = {}
    for name, measuring, model, state in _jax_steps(tmp_path, x, y):
        step = lambda state, data: model.train_step(state, data)  # noqa: E731 (a trace of its own)
        jaxpr = jax.make_jaxpr(step)(state, (x[:BATCH], y[:BATCH])).jaxpr
        eqns[name, measuring] = collections.Counter(
            (e.primitive.name, tuple(tuple(v.aval.shape) for v in e.outvars)) for e in jaxpr.eqns)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    keras_step = eqns["keras", None]
    for measuring, conds in ((True, 1), (False, 0)):  # the measuring step; the one that only updates
        extra = eqns["gradmon", measuring] - keras_step
        assert not keras_step - eqns["gradmon", measuring]  # Keras' step is all there
        assert sum(n for (primitive, _), n in extra.items() if primitive == "cond") == conds
        full = collections.Counter({k: n for k, n in extra.items() if any(s in shapes for s in k[1])})
        # the finiteness check: each gradient's magnitudes, reduced to their largest (XLA fuses
        # the two: one read of the gradient, no boolean array)
        assert full == collections.Counter(("abs", (s,)) for s in shapes)


def test_the_jax_host_work_reads_the_state_its_execution_returned(tmp_path, monkeypatch):
    # GradientMonitor's work after a JAX execution runs before Keras holds the state the
    # execution returned: a host read takes it from there (door_jax._hold), once per execution
    # and only when the host reads; a state of another layout is left alone, warned of
    if BACKEND != "jax":
        pytest.skip("the JAX trainer's state")
    from gradmon.backend import door_jax

    held = []
    hold = door_jax._hold
    monkeypatch.setattr(door_jax, "_hold", lambda model, returned: held.append(1) or hold(model, returned))
    x, y = _data(12)
    keras.utils.set_random_seed(0)
    model = gradmon.monitor(keras.Sequential([keras.Input((INPUTS,)), keras.layers.Dense(6)]),
                            on_nonfinite="skip")  # its written steps are read right after them
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    monitor = gradmon.GradientMonitor(str(tmp_path), update_freq=5)
    written = []  # before each execution: the last step written
    spy = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda batch, logs: written.append(
        monitor._observer.host.last_written))
    model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[monitor, spy])
    assert len(held) == 2  # the two executions whose host work read the device, no other
    # step 5 was read and written right after its execution, from the state it returned
    assert written == [0] * 5 + [5] * 5 + [10] * 2
    assert monitor._observer.returned is None
    model._jax_state = {"held": "before"}  # what the trainer held (after fit: None)
    with pytest.warns(UserWarning, match="not .trainable, non_trainable, optimizer, metrics"):
        hold(model, ({}, ([],)))  # one list: a layout gradmon does not know
    assert dict(model._jax_state) == {"held": "before"}  # left alone
    model._jax_state = None
