"""Train functions belong to the model: new GradientMonitors, fits and schedules trace nothing again.

Traces are counted by `Observer.apply` calls made while tracing (the hooked
`optimizer.apply` runs in Python only when a train function is traced), each
with the observer's `measuring` switch of that trace.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon.measure import observer as observer_module
from gradmon import tags
from gradmon.publish.writer import MemoryWriter
from helpers import global_norm, tape_gradients

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(18)
X = RNG.normal(size=(40, 5)).astype(np.float32)
Y = RNG.normal(size=(40, 2)).astype(np.float32)
NORM = tags.global_norm("raw")


@pytest.fixture
def traces(monkeypatch):
    """The `measuring` switch of every trace of a train step, in order."""
    seen = []
    apply = observer_module.Observer.apply

    def counting_apply(self, *args, **kwargs):
        if not tf.executing_eagerly():
            seen.append(self.measuring)
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(observer_module.Observer, "apply", counting_apply)
    return seen


class OwnStep(keras.Model):
    """A model with its own `train_step` (observed at its optimizer)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(3, activation="tanh")
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss}


class Mixed(gradmon.GradientMonitorMixin, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(3, activation="tanh")
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


def sequential():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(2)])


def make(kind="plain", loss="mse"):
    keras.utils.set_random_seed(3)
    compile_args = {}
    if kind == "own train_step":
        m = OwnStep()
        m(X[:1])
    elif kind == "mixin":
        m = Mixed()
        m(X[:1])
    elif kind == "monitor()":
        m = gradmon.monitor(sequential(), stats=["norm"])
    else:
        m = sequential()
        compile_args = {"steps_per_execution=2": {"steps_per_execution": 2},
                        "jit_compile": {"jit_compile": True}}.get(kind, {})
    m.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss, **compile_args)
    return m


def written_steps(writer):
    return [step for step, _ in writer.scalars.get(NORM, [])]


def due(first, last, every):
    return [s for s in range(first, last + 1) if s % every == 0]


def test_ten_fits_with_ten_new_monitors_trace_each_train_function_once(traces):
    m = make()
    for i in range(10):  # 10 steps per fit; update_freq changes from fit to fit
        every = 1 if i == 9 else 2 + i % 4
        if i == 9:  # the first step of the last fit, computed independently
            grads = tape_gradients(m, keras.losses.MeanSquaredError(), X[:4], Y[:4])
        writer = MemoryWriter()
        m.fit(X, Y, batch_size=4, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(writer=writer, update_freq=every)])
        assert written_steps(writer) == due(10 * i + 1, 10 * i + 10, every)
    assert sorted(traces) == [False, True]  # one measuring trace, one that only updates
    assert writer.scalars[NORM][0] == (91, pytest.approx(global_norm(grads), rel=1e-5))
    # a recompile drops them (Keras' own train function is new): traced again, with the new loss
    m.compile(optimizer=m.optimizer, loss="mae")
    grads = tape_gradients(m, keras.losses.MeanAbsoluteError(), X[:4], Y[:4])
    writer = MemoryWriter()
    m.fit(X[:4], Y[:4], batch_size=4, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    assert len(traces) == 3
    assert writer.scalars[NORM] == [(101, pytest.approx(global_norm(grads), rel=1e-5))]


@pytest.mark.parametrize("kind", ["steps_per_execution=2", "jit_compile", "own train_step",
                                  "monitor()", "mixin"])
def test_new_monitors_reuse_the_traces_on_every_kind_of_model(traces, kind):
    m = make(kind)
    for i in range(3):  # 10 steps per fit
        writer = MemoryWriter()
        m.fit(X, Y, batch_size=4, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(writer=writer, update_freq=3 + i)])
        assert written_steps(writer) == due(10 * i + 1, 10 * i + 10, 3 + i)
    assert sorted(traces) == [False, True]


def test_a_reused_callback_moved_to_another_model_and_back(traces):
    a, b = make(), make()
    writer = MemoryWriter()
    monitor = gradmon.GradientMonitor(writer=writer, update_freq=4)
    for m in (a, a, b, a, b):
        m.fit(X, Y, batch_size=4, shuffle=False, verbose=0, callbacks=[monitor])
    assert sorted(traces) == [False, False, True, True]  # two per model, none when coming back
    # each model's own step axis: a 1..20, b 1..10, a 21..30, b 11..20
    assert written_steps(writer) == due(1, 20, 4) + due(1, 10, 4) + due(21, 30, 4) + due(11, 20, 4)


@pytest.fixture
def flushes(monkeypatch):
    """For each read of the ring by the callback, how many written steps its writer held before."""
    seen = []
    flush = observer_module.Observer.flush

    def counting_flush(self, writer=None, *args, **kwargs):
        seen.append(len(writer.scalars.get(NORM, [])) if writer is not None else None)
        return flush(self, writer, *args, **kwargs)

    monkeypatch.setattr(observer_module.Observer, "flush", counting_flush)
    return seen


@pytest.mark.parametrize("within", [float("inf"), 0.0])
def test_written_steps_are_read_in_batches_the_ring_can_hold(monkeypatch, flushes, within):
    """Every step written; the ring (16 rows) is read when the next step could overwrite an
    unread row, at the epoch's end and at the train end; or after each step when the
    written steps may wait no time at all."""
    from gradmon.publish import callbacks
    from gradmon import monitored

    monkeypatch.setattr(callbacks, "_READ_WITHIN_SECONDS", within)
    m = make()
    grads = tape_gradients(m, keras.losses.MeanSquaredError(), X[:2], Y[:2])
    writer = MemoryWriter()
    m.fit(X, Y, batch_size=2, shuffle=False, verbose=0,
          callbacks=[gradmon.GradientMonitor(writer=writer, update_freq=1)])  # 20 steps
    assert monitored.observer_for(m).recorder.rows == 16
    assert written_steps(writer) == list(range(1, 21))
    assert writer.scalars[NORM][0][1] == pytest.approx(global_norm(grads), rel=1e-5)
    if within == 0.0:
        assert flushes == list(range(20)) + [20, 20]
        return
    assert flushes == [0, 16, 20]  # after step 16, the epoch's end, the train end

    # a fit an exception ends gets no on_train_end: what its monitor held unread is written
    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise KeyboardInterrupt

    plain, first, second, third = make(), MemoryWriter(), MemoryWriter(), MemoryWriter()
    with pytest.raises(KeyboardInterrupt):  # its first fit: gradmon's fit wrapper is not in it
        plain.fit(X, Y, batch_size=2, verbose=0,
                  callbacks=[gradmon.GradientMonitor(writer=first), Interrupt()])
    assert written_steps(first) == []  # held in the ring...
    plain.fit(X[:2], Y[:2], batch_size=2, verbose=0, callbacks=[gradmon.GradientMonitor(writer=second)])
    assert written_steps(first) == [1, 2, 3]  # ...and written by their monitor when the next fit begins
    assert written_steps(second) == [4]
    with pytest.raises(KeyboardInterrupt):  # a later fit: written on the way out
        plain.fit(X, Y, batch_size=2, verbose=0,
                  callbacks=[gradmon.GradientMonitor(writer=third), Interrupt()])
    assert written_steps(third) == [5, 6, 7]


def test_every_histogram_step_is_read_before_the_next_replaces_it(monkeypatch):
    from gradmon.publish import callbacks

    monkeypatch.setattr(callbacks, "_READ_WITHIN_SECONDS", float("inf"))
    m = make()
    writer = MemoryWriter()
    m.fit(X, Y, batch_size=2, shuffle=False, verbose=0,
          callbacks=[gradmon.GradientMonitor(writer=writer, update_freq=100, histogram_freq=5)])
    assert len(writer.histograms) == 2  # the two layers' raw gradients
    for series in writer.histograms.values():
        assert [step for step, _ in series] == [5, 10, 15, 20]
