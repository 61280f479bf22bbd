"""Gradient noise scale on linear regression, where per-example gradients are exact.

Runs on every backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_noise_scale.py`):
gradmon's own step takes the half-batch gradients with a `GradientTape` (TensorFlow), `jax.grad`
under `lax.cond` in the jitted step (JAX) or `torch.autograd.grad` on due steps (PyTorch).
"""

import keras
import numpy as np
import pytest

import gradmon
from gradmon import tags
from helpers import latest_snapshot


RNG = np.random.default_rng(31)
N, D, B = 2048, 3, 16
X = RNG.normal(size=(N, D)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5]) + 0.3 + RNG.normal(scale=0.5, size=N)).astype(np.float32)[:, None]


def per_example_gradients(w, b, x, y):
    """Gradients of (x.w + b - y)^2 for each example, [n, D + 1], float64."""
    r = x.astype(np.float64) @ w + b - y[:, 0]
    return 2 * r[:, None] * np.concatenate([x, np.ones((len(x), 1))], axis=1)


class Collect(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.snapshots = []

    def on_train_batch_end(self, batch, logs=None):
        self.snapshots.append(latest_snapshot(self.model))


def fit_frozen(steps):
    """Monitored fit with learning rate 0: every batch sees the same weights."""
    keras.utils.set_random_seed(2)
    model = gradmon.monitor(keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)]), noise_scale=True,
                            grouping="variable")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    collect = Collect()
    model.fit(X[:steps * B], Y[:steps * B], batch_size=B, shuffle=False, verbose=0, callbacks=[collect])
    w, b = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    return model, w[:, 0], b[0], collect.snapshots


def test_estimates_equal_the_formula_on_per_example_gradients():
    model, w, b, snaps = fit_frozen(steps=3)
    for i, snap in enumerate(snaps):
        g = per_example_gradients(w, b, X[i * B:(i + 1) * B], Y[i * B:(i + 1) * B])
        g1, g2 = g[:B // 2].mean(0), g[B // 2:].mean(0)
        big = (g1 + g2) / 2
        small_sq = (g1 @ g1 + g2 @ g2) / 2
        grad_sq = 2 * big @ big - small_sq
        trace = B * (small_sq - big @ big)
        assert snap.step == i + 1
        assert snap[tags.NOISE_GRAD_SQ] == pytest.approx(grad_sq, rel=1e-4)
        assert snap[tags.NOISE_TRACE_COV] == pytest.approx(trace, rel=1e-4)
        assert snap[tags.NOISE_SCALE] == pytest.approx(trace / grad_sq, rel=1e-4)
        # per layer (one Dense: kernel and bias are separate variables)
        k, c = slice(0, D), slice(D, D + 1)
        for path, sl in zip([v.path for v in model.trainable_variables], [k, c]):
            gs = 2 * big[sl] @ big[sl] - (g1[sl] @ g1[sl] + g2[sl] @ g2[sl]) / 2
            tc = B * ((g1[sl] @ g1[sl] + g2[sl] @ g2[sl]) / 2 - big[sl] @ big[sl])
            assert snap[tags.snr(path)] == pytest.approx(B * gs / tc, rel=1e-3)


def test_estimates_are_unbiased_for_the_population():
    model, w, b, snaps = fit_frozen(steps=N // B)
    g = per_example_gradients(w, b, X, Y)
    mean = g.mean(0)
    true_grad_sq = mean @ mean
    true_trace = np.trace(np.cov(g.T, bias=True))
    traces = np.array([s[tags.NOISE_TRACE_COV] for s in snaps])
    grad_sqs = np.array([s[tags.NOISE_GRAD_SQ] for s in snaps])
    se_trace = traces.std(ddof=1) / np.sqrt(len(traces))
    se_grad = grad_sqs.std(ddof=1) / np.sqrt(len(grad_sqs))
    assert abs(traces.mean() - true_trace) < 3.5 * se_trace
    assert abs(grad_sqs.mean() - true_grad_sq) < 3.5 * se_grad
    # the EMA of the last step equals the decayed averages recomputed here
    decay, et, eg = gradmon.statistics.NOISE_SCALE_EMA_DECAY, 0.0, 0.0
    for t, gq in zip(traces, grad_sqs):
        et, eg = decay * et + (1 - decay) * t, decay * eg + (1 - decay) * gq
    assert snaps[-1][tags.NOISE_SCALE_EMA] == pytest.approx(et / eg, rel=1e-5)


def test_noise_scale_tags_and_no_effect_on_training(tmp_path):
    finals = []
    for noise in (False, True):
        keras.utils.set_random_seed(4)
        inputs = keras.Input((D,))
        h = keras.layers.Dropout(0.2)(keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs)))
        model = gradmon.monitor(keras.Model(inputs, keras.layers.Dense(1)(h)), noise_scale=noise)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.fit(X[:128], Y[:128], batch_size=B, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path / str(noise)))])
        finals.append([v.numpy() for v in model.weights])
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a, b)
    from helpers import read_events

    events = read_events(str(tmp_path / "True" / "train"))
    assert sorted(events[tags.NOISE_SCALE]) == list(range(1, 9))
    assert tags.NOISE_SCALE_EMA in events
    assert any(t.startswith("gradients/snr/") for t in events)


def test_noise_scale_only_on_logged_steps_and_refused_with_an_own_train_step(tmp_path):
    model, *_ = fit_frozen(steps=1)
    events_dir = str(tmp_path)
    model.fit(X[:6 * B], Y[:6 * B], batch_size=B, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(events_dir, update_freq=3)])
    from helpers import read_events

    assert sorted(read_events(events_dir + "/train")[tags.NOISE_SCALE]) == [3, 6]

    class OwnStep(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    own = OwnStep([keras.Input((D,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="has its own `train_step`.*noise_scale need gradmon's own train step"):
        gradmon.monitor(own, noise_scale=True)


def test_noise_scale_argument_is_checked():
    with pytest.raises(ValueError, match="`noise_scale`.*Received: noise_scale='yes'"):
        gradmon.monitor(keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)]), noise_scale="yes")
