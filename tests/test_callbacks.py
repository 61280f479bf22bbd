"""GradientMonitor: event files read back with TensorBoard's own reader."""

import os

import keras
import numpy as np
import pytest

import gradmon
from gradmon import tags
from gradmon.measure import transforms as T
from helpers import global_norm, numpy_stats, read_descriptions, read_events, tape_gradients

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(5)
X = RNG.normal(size=(40, 5)).astype(np.float32)
Y = RNG.normal(size=(40, 2)).astype(np.float32)


def model(transform=None, **kwargs):
    keras.utils.set_random_seed(4)
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    kwargs = {"grouping": "variable", "stats": "all", **kwargs}  # every per-variable tag
    m = gradmon.monitor(base, transform=transform, **kwargs)
    m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return m


def test_tags_steps_and_values_across_two_fits(tmp_path):
    m = model(T.clip_by_global_norm(0.2))
    paths = [v.path for v in m.trainable_variables]
    logdir = str(tmp_path)
    cb = gradmon.GradientMonitor(logdir, histogram_freq=3)
    m.fit(X, Y, batch_size=10, epochs=2, shuffle=False, verbose=0, callbacks=[cb])  # 8 steps
    # the gradient of step 9 (first of the second fit), computed independently
    grads = tape_gradients(m, keras.losses.MeanSquaredError(), X[:10], Y[:10])
    m.fit(X, Y, batch_size=10, epochs=1, shuffle=False, verbose=0, callbacks=[cb])  # 4 more
    events = read_events(os.path.join(logdir, "train"))
    assert sorted(events[tags.global_norm("raw")]) == list(range(1, 13))
    assert sorted(events[tags.CLIP_RATIO]) == list(range(1, 13))
    for p in paths:
        for kind in ("raw", "transformed"):
            for stat in tags.GROUP_STATS:
                assert sorted(events[tags.group_stat(kind, stat, p)]) == list(range(1, 13))
            assert sorted(events[tags.histogram(kind, p)]) == [3, 6, 9, 12]
        assert sorted(events[tags.grad_to_weight(p)]) == list(range(1, 13))
        assert sorted(events[tags.update_ratio(p)]) == list(range(1, 13))
    assert events[tags.global_norm("raw")][9] == pytest.approx(global_norm(grads), rel=1e-5)
    assert events[tags.CLIP_RATIO][9] == pytest.approx(min(1.0, 0.2 / global_norm(grads)), rel=1e-5)
    for p, g in zip(paths, grads):
        assert events[tags.group_stat("raw", "norm", p)][9] == pytest.approx(np.linalg.norm(g), rel=1e-5)
        assert events[tags.group_stat("raw", "max_abs", p)][9] == pytest.approx(np.abs(g).max(), rel=1e-5)
        hist = events[tags.histogram("raw", p)][9]
        assert hist.shape == (30, 3)
        assert hist[:, 2].sum() == g.size
        assert hist[0, 0] == pytest.approx(g.min(), rel=1e-5) and hist[-1, 1] == pytest.approx(g.max(), rel=1e-5)
        counts, _ = np.histogram(g.ravel(), bins=30, range=(g.min(), g.max()))
        # bucket edges agree up to float32 rounding of values that sit on an edge
        assert np.abs(hist[:, 2] - counts).sum() <= 2
    descriptions = read_descriptions(os.path.join(logdir, "train"))
    assert all(descriptions[t] for t in events), [t for t in events if not descriptions.get(t)]


def test_update_freq_and_keras_tensorboard_side_by_side(tmp_path):
    m = model()
    logdir = str(tmp_path)
    m.fit(X, Y, batch_size=10, epochs=2, verbose=0, validation_data=(X, Y),
          callbacks=[gradmon.GradientMonitor(logdir, update_freq=3),
                     keras.callbacks.TensorBoard(logdir, update_freq=1, histogram_freq=1)])
    events = read_events(os.path.join(logdir, "train"))
    assert sorted(events[tags.global_norm("raw")]) == [3, 6]
    assert tags.CLIP_RATIO not in events  # no transform, no clipping to report
    assert "epoch_loss" in events and "batch_loss" in events  # Keras' summaries are intact
    assert any(t.endswith("histogram") or "kernel" in t for t in events if not t.startswith("gradients/"))
    assert "epoch_loss" in read_events(os.path.join(logdir, "validation"))


def test_numpy_integers_are_accepted(tmp_path):
    cb = gradmon.GradientMonitor(str(tmp_path), update_freq=np.int64(10), histogram_freq=np.int32(5))
    assert (cb.update_freq, cb.histogram_freq) == (10, 5)


def test_update_freq_epoch_and_stat_selection(tmp_path):
    m = model(stats=["norm", "update_ratio"])
    history = m.fit(X, Y, batch_size=10, epochs=3, verbose=0,
                    callbacks=[gradmon.GradientMonitor(str(tmp_path), update_freq="epoch")])
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == [4, 8, 12]
    assert set(history.history) == {"loss"}  # per-variable stats stay out of the logs
    p = m.trainable_variables[0].path
    assert tags.group_stat("raw", "norm", p) in events
    assert tags.update_ratio(p) in events
    assert tags.group_stat("raw", "rms", p) not in events and tags.grad_to_weight(p) not in events


@pytest.mark.parametrize("kwargs,argument", [
    (dict(update_freq=0), "update_freq"),
    (dict(update_freq="batch"), "update_freq"),
    (dict(update_freq=True), "update_freq"),
    (dict(histogram_freq=-1), "histogram_freq"),
    (dict(histogram_freq=1.5), "histogram_freq"),
    (dict(update_freq=np.float64(2.0)), "update_freq"),
])
def test_callback_rejects_invalid_arguments(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=rf"`{argument}`.*Received: {argument}="):
        gradmon.GradientMonitor(str(tmp_path), **kwargs)


class CountingStatistic(gradmon.statistics.Statistic):
    """A user statistic that counts how often the step computes it (a device counter)."""

    name = "count"

    def tag(self, label):
        return "gradients/test/computations"

    def build(self, spec):
        import tensorflow as tf

        return tf.Variable(0, dtype=tf.int64, trainable=False)

    def compute(self, ctx):
        import tensorflow as tf

        counter = ctx.state[self]
        return tf.cast(counter.assign_add(1), tf.float32)[None]


@pytest.mark.parametrize("update_freq,written", [("epoch", [4, 8, 12]), (5, [5, 10])])
def test_only_written_steps_are_computed(tmp_path, update_freq, written):
    counting = CountingStatistic()
    m = model(stats=["norm", counting])
    m.fit(X, Y, batch_size=10, epochs=3, verbose=0,
          callbacks=[gradmon.GradientMonitor(str(tmp_path), update_freq=update_freq)])
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == written
    # 12 steps trained, the statistics computed exactly on the written ones
    assert int(m.gradient_observer.recorder.state[counting].numpy()) == len(written)
    assert events["gradients/test/computations"] == {s: float(i + 1) for i, s in enumerate(written)}


@pytest.mark.parametrize("update_freq", [1, 3])
def test_callback_observes_a_plain_model_without_changing_its_training(tmp_path, update_freq):
    """Bit for bit, also when unwritten steps run the train function that measures nothing."""
    weights = []
    for observed in (False, True):
        keras.utils.set_random_seed(4)
        plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="tanh"),
                                  keras.layers.Dense(2)])
        plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        grads = tape_gradients(plain, keras.losses.MeanSquaredError(), X[:10], Y[:10])
        callbacks = [gradmon.GradientMonitor(str(tmp_path), update_freq=update_freq)] if observed else []
        plain.fit(X, Y, batch_size=10, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        weights.append([v.numpy() for v in plain.weights])
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == list(range(update_freq, 9, update_freq))
    if update_freq == 1:
        assert events[tags.global_norm("raw")][1] == pytest.approx(global_norm(grads), rel=1e-5)
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_unwritten_steps_run_a_train_function_that_measures_nothing(tmp_path):
    """Counted: the measuring trace runs only for executions holding a written step."""
    counting = CountingStatistic()
    m = model(stats=["norm", counting])
    m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=2)
    calls = []
    monitor = gradmon.GradientMonitor(str(tmp_path), update_freq=5)
    spy = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda batch, logs: calls.append(
        m.train_function is monitor._functions.measuring))
    m.fit(X, Y, batch_size=2, epochs=1, verbose=0, callbacks=[monitor, spy])  # 20 steps, 10 executions
    # executions (1,2) (3,4) (5,6) ...: measuring only for those holding 5, 10, 15, 20
    assert calls == [False, False, True, False, True, False, False, True, False, True]
    assert int(m.gradient_observer.recorder.state[counting].numpy()) == 4
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == [5, 10, 15, 20]


def test_two_monitors_on_one_model_are_refused_before_training(tmp_path):
    m = model()
    first, second = gradmon.GradientMonitor(str(tmp_path / "a")), gradmon.GradientMonitor(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="already has a GradientMonitor in this fit.*one GradientMonitor"):
        m.fit(X, Y, verbose=0, callbacks=[first, second])
    assert m.gradient_observer.step == 0
    # a later fit with a new monitor (callbacks made per call) takes over
    m.fit(X, Y, batch_size=10, verbose=0, callbacks=[gradmon.GradientMonitor(str(tmp_path / "c"))])
    m.fit(X, Y, batch_size=10, verbose=0, callbacks=[gradmon.GradientMonitor(str(tmp_path / "c"))])
    events = read_events(os.path.join(str(tmp_path / "c"), "train"))
    assert sorted(events[tags.global_norm("raw")]) == list(range(1, 9))


def test_an_injected_memory_writer_gets_what_the_event_file_would(tmp_path):
    from gradmon.publish.writer import MemoryWriter

    m = model()
    memory = MemoryWriter()
    m.fit(X, Y, batch_size=10, epochs=1, shuffle=False, verbose=0,
          callbacks=[gradmon.GradientMonitor(writer=memory, update_freq=2)])
    steps = [s for s, _ in memory.scalars[tags.global_norm("raw")]]
    assert steps == [2, 4]
    assert memory.layout is not None
    with pytest.raises(ValueError, match="`writer`.*Received: writer='file'"):
        gradmon.GradientMonitor(writer="file")


def test_empty_log_dir_is_rejected():
    with pytest.raises(ValueError, match="`log_dir`.*non-empty.*Received: log_dir=''"):
        gradmon.GradientMonitor("")


def test_unwritable_log_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = model()
    with pytest.raises(ValueError, match="`log_dir`.*Expected a writable directory"):
        m.fit(X, Y, verbose=0, callbacks=[gradmon.GradientMonitor(str(blocker))])
    assert m.gradient_observer.step == 0


def test_numpy_stats_helper_is_not_trivial():
    # guards the reference itself: a known vector
    np.testing.assert_allclose(numpy_stats([3.0, 0.0, -4.0, 0.0]), [5.0, 4.0, 2.5, 0.5, 0.0])


def test_unwritten_steps_cost_no_device_read(tmp_path, monkeypatch):
    """The host knows the schedule: it reads the device only after executions that held a
    written step (plus once per later epoch for the step counter and once at each epoch end),
    and the ring holds written steps until it could overflow (here: until the epoch ends)."""
    from gradmon.publish import callbacks as callbacks_module
    from gradmon.measure import observer as observer_module
    from gradmon.measure import recorder as recorder_module

    monkeypatch.setattr(callbacks_module, "_READ_WITHIN_SECONDS", float("inf"))  # no clock

    reads = []
    original_take = recorder_module.Recorder.take
    monkeypatch.setattr(recorder_module.Recorder, "take",
                        lambda self, after_step=-1: reads.append("records") or original_take(self, after_step))
    original_step = observer_module.Observer.step.fget
    monkeypatch.setattr(observer_module.Observer, "step",
                        property(lambda self: reads.append("step") or original_step(self)))
    m = model()
    m.fit(X, Y, batch_size=2, epochs=2, verbose=0,
          callbacks=[gradmon.GradientMonitor(str(tmp_path), update_freq=7)])  # 40 steps
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == [7, 14, 21, 28, 35]
    # records: 2 epoch ends + 1 train end (5 written steps fit in the ring's 16 rows);
    # step: train begin (the first epoch's base too) and the second epoch's begin
    assert reads.count("records") == 3
    assert reads.count("step") == 2


def test_epoch_schedule_on_a_dataset_of_unknown_length(tmp_path):
    import tensorflow as tf

    m = model()
    data = tf.data.Dataset.from_tensor_slices((X, Y)).filter(lambda x, y: True).batch(10)
    assert data.cardinality() == tf.data.UNKNOWN_CARDINALITY
    last_batch = {}
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: last_batch.update(
        {len(ends): int(m.optimizer.iterations.numpy())}), on_epoch_end=lambda epoch, logs: ends.append(0))
    ends = []
    m.fit(data, epochs=2, verbose=0,
          callbacks=[gradmon.GradientMonitor(str(tmp_path), update_freq="epoch"), record])
    events = read_events(os.path.join(str(tmp_path), "train"))
    # the last completed step of each epoch (Keras 3.15 also runs an update past the end
    # of an unknown-length first epoch that no batch callback sees: 4, then 9)
    assert sorted(events[tags.global_norm("raw")]) == [last_batch[0], last_batch[1]]
    assert last_batch[0] == 4


def test_a_recompile_with_another_optimizer_rebuilds_what_is_measured(tmp_path):
    m = model()
    m.fit(X, Y, batch_size=10, epochs=1, verbose=0, callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    m.compile(optimizer=keras.optimizers.SGD(0.05, global_clipnorm=1e-3), loss="mse")
    m.fit(X, Y, batch_size=10, epochs=1, verbose=0, callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    events = read_events(os.path.join(str(tmp_path), "train"))
    # the second optimizer clips: its clipping is now observed, and the step axis continues
    assert sorted(events[tags.CLIP_RATIO]) == [5, 6, 7, 8]
    assert all(v < 1 for v in events[tags.CLIP_RATIO].values())
    assert sorted(events[tags.global_norm("raw")]) == list(range(1, 9))
