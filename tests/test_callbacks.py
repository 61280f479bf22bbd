"""GradientMonitor: event files read back with TensorBoard's own reader."""

import os

import keras
import numpy as np
import pytest

import gradmon
from gradmon import tags
from gradmon import transforms as T
from helpers import global_norm, numpy_stats, read_descriptions, read_events, tape_gradients

RNG = np.random.default_rng(5)
X = RNG.normal(size=(40, 5)).astype(np.float32)
Y = RNG.normal(size=(40, 2)).astype(np.float32)


def model(transform=None, **kwargs):
    keras.utils.set_random_seed(4)
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
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
])
def test_callback_rejects_invalid_arguments(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=rf"`{argument}`.*Received: {argument}="):
        gradmon.GradientMonitor(str(tmp_path), **kwargs)


def test_callback_on_a_plain_model_fails_before_training(tmp_path):
    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="needs a monitored model.*Received: model=Sequential"):
        plain.fit(X, Y, verbose=0, callbacks=[gradmon.GradientMonitor(str(tmp_path))])


def test_unwritable_log_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = model()
    with pytest.raises(ValueError, match="`log_dir`.*Expected a writable directory"):
        m.fit(X, Y, verbose=0, callbacks=[gradmon.GradientMonitor(str(blocker))])
    assert int(m.gradient_state.step.numpy()) == 0


def test_numpy_stats_helper_is_not_trivial():
    # guards the reference itself: a known vector
    np.testing.assert_allclose(numpy_stats([3.0, 0.0, -4.0, 0.0]), [5.0, 4.0, 2.5, 0.5, 0.0])
