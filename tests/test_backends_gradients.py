"""gradmon observing `fit` on the suite's Keras backend, and on JAX and PyTorch from TensorFlow.

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_backends_gradients.py`).
The reference is independent of every framework: a two-layer tanh MLP with an MSE loss whose
gradients are written out by hand in NumPy (float64) and replayed step by step with SGD, from the
same weights (set from NumPy) and batches (`shuffle=False`). The logged raw and transformed global
norms, per-layer statistics, update ratios, clip ratios and fractions (gradmon's transforms and the
optimizer's own clipping) equal the replay's to float32 precision, and
a `fit` without a transform ends on the weights of a plain `fit`. On JAX and PyTorch what gradmon
does not do there yet raises `NotImplementedError` naming the backend and the feature.
Under TensorFlow, `test_backend_in_subprocess` runs this module under JAX and PyTorch in the
TensorFlow-free interpreters of `helpers.backend_python` (skipped when absent, and under `make
test`, which runs every backend's suite itself).
"""

import os
import sys

import keras
import numpy as np
import pytest

import gradmon
from helpers import (
    clip_global_norm, finish_module_run, read_events, replay_tanh_mlp, runs_from_the_tensorflow_suite,
    tanh_mlp_gradients)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKEND = keras.backend.backend()
LR, BATCH, STEPS, HIDDEN = 0.1, 8, 4, 8
LAYERS = ("dense", "dense_1")
PER_LAYER = ["norm", "max_abs", "rms", "zero_fraction", "nonfinite", "grad_to_weight", "update_ratio"]


def _data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(BATCH * STEPS, 4)).astype("float32")
    y = rng.normal(size=(BATCH * STEPS, 1)).astype("float32")
    x[:, 3] = 0.0  # a row of the first kernel's gradient is exactly zero (zero_fraction)
    weights = [rng.normal(size=(4, HIDDEN)).astype("float32"), 0.1 * rng.normal(size=HIDDEN).astype("float32"),
               rng.normal(size=(HIDDEN, 1)).astype("float32"), 0.1 * rng.normal(size=1).astype("float32")]
    return x, y, weights


def _model(weights, steps_per_execution=1, **clipping):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="dense")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense_1")(hidden))
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(LR, **clipping), loss="mse",
                  steps_per_execution=steps_per_execution)
    return model


def _clip_norm(g, c):
    norms = [np.sqrt(np.sum(a ** 2)) for a in g]
    return [a * c / max(n, c) for a, n in zip(g, norms)], [np.mean([n > c for n in norms])]


def _clip_value(g, c):
    size = sum(a.size for a in g)
    return [np.clip(a, -c, c) for a in g], [sum(np.sum(np.abs(a) > c) for a in g) / size]


# case: (gradmon transform, optimizer clipping, the NumPy replay's transform: g -> (g, fractions))
CASES = {
    "none": (None, {}, None),
    "clip_by_global_norm": (lambda: gradmon.transforms.clip_by_global_norm(0.5), {},
                            lambda g: clip_global_norm(g, 0.5)),
    "clip_by_norm": (lambda: gradmon.transforms.clip_by_norm(0.3), {}, lambda g: _clip_norm(g, 0.3)),
    "clip_by_value": (lambda: gradmon.transforms.clip_by_value(0.05), {}, lambda g: _clip_value(g, 0.05)),
    "chain": (lambda: gradmon.transforms.chain(gradmon.transforms.clip_by_value(0.2),
                                               gradmon.transforms.clip_by_global_norm(0.5)), {},
              lambda g: _chained(g, lambda h: _clip_value(h, 0.2), lambda h: clip_global_norm(h, 0.5))),
    "optimizer_global_clipnorm": (None, {"global_clipnorm": 0.5}, lambda g: clip_global_norm(g, 0.5)),
    "optimizer_clipnorm_with_transform": (lambda: gradmon.transforms.clip_by_value(0.2), {"clipnorm": 0.3},
                                          lambda g: _chained(g, lambda h: _clip_value(h, 0.2),
                                                             lambda h: _clip_norm(h, 0.3))),
}


def _chained(g, *transforms):
    fractions = []
    for t in transforms:
        g, f = t(g)
        fractions += f
    return g, fractions


def _replay(weights, x, y, clip=None):
    """Per step: the numbers gradmon logs, from the hand-written gradient; and the final weights."""
    return replay_tanh_mlp(weights, x, y, LR, BATCH, STEPS, clip, layers=LAYERS)


def _fit(tmp_path, transform=None, monitor=True, **clipping):
    x, y, weights = _data()
    model = _model(weights, **clipping)
    callbacks = []
    if monitor:  # a plain model with the callback alone; `gradmon.monitor` for a transform
        model = model if transform is None else gradmon.monitor(model, transform=transform)
        callbacks = [gradmon.GradientMonitor(str(tmp_path))]
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return model, (read_events(str(tmp_path)) if monitor else None)


def _logged(events, tag):
    """The values of `tag` by step; per-layer tags may name the layer with its model's prefix."""
    found = [t for t in events if t == tag or t.replace(t.split("/")[-2] + "/", "", 1) == tag]
    assert len(found) == 1, (tag, sorted(events))
    return events[found[0]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_logs_the_numbers_of_a_numpy_replay(tmp_path, case):
    transform, clipping, replay = CASES[case]
    model, events = _fit(tmp_path, transform and transform(), **clipping)
    x, y, weights = _data()
    expected, final = _replay(weights, x, y, replay)
    tags = [t for t in expected[0] if replay is not None or "transformed" not in t and "clip" not in t]
    for tag in tags:
        values = _logged(events, tag)
        assert sorted(values) == list(range(1, STEPS + 1)), (tag, values)
        got = np.array([values[s] for s in range(1, STEPS + 1)])
        want = np.array([row[tag] for row in expected])
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=tag)
    if replay is not None:  # the transform acted: it clipped, and the weights followed it
        assert min(row["gradients/clip/ratio"] for row in expected) < 0.9
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_compiling_again_with_a_new_optimizer_continues_the_step_axis(tmp_path):
    """Two fits of half the steps each, a new `SGD` compiled in between (a new callback each
    time): every step is logged once, on one step axis, with the replay's numbers. On JAX the
    step counter rides in the optimizer's state: the second optimizer's jitted step carried
    none of it, and its steps were lost behind a warning that no update was applied."""
    x, y, weights = _data()
    model = gradmon.monitor(_model(weights))
    half = BATCH * STEPS // 2
    for part in (slice(0, half), slice(half, None)):
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        model.fit(x[part], y[part], batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    events = read_events(str(tmp_path))
    expected, final = _replay(weights, x, y)
    values = _logged(events, "gradients/raw/global_norm")
    assert sorted(values) == list(range(1, STEPS + 1)), values
    np.testing.assert_allclose([values[s] for s in range(1, STEPS + 1)],
                               [row["gradients/raw/global_norm"] for row in expected], rtol=2e-5)
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class Net(gradmon.GradientMonitorMixin, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="dense")
        self.out = keras.layers.Dense(1, name="dense_1")

    def call(self, x):
        return self.out(self.hidden(x))


def test_the_mixin_logs_the_numbers_of_a_numpy_replay(tmp_path):
    x, y, weights = _data()
    model = Net(gradient_transform=gradmon.transforms.clip_by_global_norm(0.5))
    model(x[:1])
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    events = read_events(str(tmp_path))
    expected, final = _replay(weights, x, y, lambda g: clip_global_norm(g, 0.5))
    for tag in expected[0]:
        got = [_logged(events, tag)[step] for step in range(1, STEPS + 1)]
        np.testing.assert_allclose(got, [row[tag] for row in expected], rtol=2e-5, atol=1e-7, err_msg=tag)
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_every_per_layer_statistic_of_a_numpy_replay(tmp_path):
    x, y, weights = _data()
    model = gradmon.monitor(_model(weights), stats=PER_LAYER)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    events = read_events(str(tmp_path))
    w = [np.asarray(v, np.float64) for v in weights]
    for step in range(1, STEPS + 1):
        rows = slice((step - 1) * BATCH, step * BATCH)
        g = tanh_mlp_gradients(w, x[rows].astype(np.float64), y[rows].astype(np.float64))
        for i, name in enumerate(LAYERS):
            flat = np.concatenate([g[2 * i].ravel(), g[2 * i + 1].ravel()])
            weight = np.sqrt(np.sum(w[2 * i] ** 2) + np.sum(w[2 * i + 1] ** 2))
            want = {"norm": np.linalg.norm(flat), "max_abs": np.max(np.abs(flat)),
                    "rms": np.sqrt(np.mean(flat ** 2)), "zero_fraction": np.mean(flat == 0),
                    "nonfinite": 0.0}
            for stat, value in want.items():
                got = _logged(events, f"gradients/raw/{stat}/{name}")[step]
                np.testing.assert_allclose(got, value, rtol=2e-5, err_msg=f"{stat} {name} {step}")
            np.testing.assert_allclose(_logged(events, f"gradients/grad_to_weight/{name}")[step],
                                       np.linalg.norm(flat) / weight, rtol=2e-5)
        w = [v - LR * a for v, a in zip(w, g)]
    assert _logged(events, "gradients/raw/zero_fraction/dense")[1] == pytest.approx(8 / (4 * HIDDEN + HIDDEN))


def test_fit_without_a_transform_ends_on_the_weights_of_a_plain_fit(tmp_path):
    observed, _ = _fit(tmp_path / "observed")
    plain, _ = _fit(tmp_path / "plain", monitor=False)
    for a, b in zip(observed.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_steps_per_execution_and_update_freq(tmp_path):
    x, y, weights = _data()
    # Keras on PyTorch runs one step per execution
    model = gradmon.monitor(_model(weights, steps_per_execution=1 if BACKEND == "torch" else 2))
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path), update_freq=3)])
    values = _logged(read_events(str(tmp_path)), "gradients/raw/global_norm")
    assert sorted(values) == [3, 6], values
    first, _ = _replay(weights, x, y)
    np.testing.assert_allclose(values[3], first[2]["gradients/raw/global_norm"], rtol=2e-5)


def test_nonfinite_steps_are_counted_and_warned_of(tmp_path):
    x, y, weights = _data()
    x[2 * BATCH, 0] = np.nan  # step 3's gradient is NaN, and so are the weights after it
    model = gradmon.monitor(_model(weights))
    with pytest.warns(UserWarning, match="non-finite"):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    events = read_events(str(tmp_path))
    assert _logged(events, "gradients/nonfinite_steps") == {1: 0.0, 2: 0.0, 3: 1.0, 4: 2.0}
    sizes = sum(w.size for w in weights)
    assert _logged(events, "gradients/raw/nonfinite") == {1: 0.0, 2: 0.0, 3: sizes, 4: sizes}


@pytest.mark.skipif(BACKEND == "tensorflow", reason="JAX / PyTorch only")
def test_optimizer_saves_without_gradmon_state(tmp_path):
    model, _ = _fit(tmp_path)
    store = {}
    model.optimizer.save_own_variables(store)
    plain, _ = _fit(tmp_path / "plain", monitor=False)
    assert len(store) == len(plain.optimizer.variables)
    fresh = _model(_data()[2])
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.optimizer.load_own_variables(store)  # no "Skipping variable loading" mismatch
    assert int(fresh.optimizer.iterations.numpy()) == STEPS


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch: an eager custom loop")
def test_observe_in_a_torch_custom_loop_logs_the_numbers_of_a_numpy_replay(tmp_path):
    import torch

    x, y, weights = _data()
    model = _model(weights)
    opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=str(tmp_path), update_freq=2,
                          transform=gradmon.transforms.clip_by_global_norm(0.5))
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        loss = keras.ops.mean(keras.ops.square(model(x[rows]) - torch.from_numpy(y[rows])))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            opt.apply([v.value.grad for v in model.trainable_variables], model.trainable_variables)
    events = read_events(str(tmp_path))  # written as it went, before close()
    expected, final = _replay(weights, x, y, lambda g: clip_global_norm(g, 0.5))
    for tag in expected[0]:
        values = _logged(events, tag)
        assert sorted(values) == [2, 4], (tag, values)
        np.testing.assert_allclose([values[2], values[4]], [expected[1][tag], expected[3][tag]],
                                   rtol=2e-5, atol=1e-7, err_msg=tag)
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    opt.gradmon.close()


@pytest.mark.skipif(BACKEND == "tensorflow", reason="JAX / PyTorch only")
@pytest.mark.parametrize("case", ["transform"])
def test_what_is_not_supported_yet_names_the_backend_and_the_feature(tmp_path, case):
    x, y, weights = _data()
    model = _model(weights)
    callbacks = [gradmon.GradientMonitor(str(tmp_path))]
    feature = {"transform": "gradient transform"}[case]
    with pytest.raises(NotImplementedError, match=rf"{BACKEND}.*") as raised:
        if case == "transform":
            class Written(gradmon.transforms.GradientTransform):  # for TensorFlow: not `keras_ops`
                def __call__(self, grads, params):
                    return grads, {}

            model = gradmon.monitor(model, transform=Written())
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    assert feature in str(raised.value) and f"'{BACKEND}' backend" in str(raised.value)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow is the backend")
def test_observing_imports_no_tensorflow():
    assert "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def subprocess_runs():
    """This module under JAX and under PyTorch (`helpers.runs_from_the_tensorflow_suite`)."""
    yield from runs_from_the_tensorflow_suite(os.path.abspath(__file__), ["-k", "not subprocess"])


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_in_subprocess(subprocess_runs, backend):
    output = finish_module_run(subprocess_runs, backend)
    last = output.strip().splitlines()[-1]  # JAX skips the PyTorch loop
    assert {"jax": "16 passed", "torch": "17 passed"}[backend] in last, output[-2000:]
