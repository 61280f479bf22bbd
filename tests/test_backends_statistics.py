"""Histograms, optimizer-state statistics and custom statistics on every Keras backend.

Runs under TensorFlow, JAX and PyTorch alike (`KERAS_BACKEND=jax|torch python -m pytest
tests/test_backends_statistics.py`). The references are NumPy, independent of every framework:

- the histogram buckets: TensorBoard's rule (30 equal-width buckets over [min, max] of the finite
  entries, `floor((v - min) / width)`, the maximum in the last bucket) written out in NumPy, on
  the very gradients of the step: the model's loss is linear in its weights (`sum(y * f(x))`), so
  each gradient is `x[i] * y[j]` with `y` a power of two, exact in float32 on every backend;
- `moment_norm`, `cosines` and the custom statistic of docs/ARCHITECTURE.md ("How to add a
  statistic", run as written there): Keras' Adam update rule replayed in NumPy (float64) on
  those gradients, from the same weights.
"""

import os
import re

import keras
import numpy as np
import pytest

import gradmon
from gradmon import tags
from gradmon.measure import moments
from helpers import read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
BUCKETS = 30
STEPS, INPUTS, UNITS = 4, 5, (3, 2)  # two parallel Dense layers, outputs concatenated
LR, BETA_1, BETA_2, EPSILON = 0.01, 0.9, 0.999, 1e-7
CLIP = 0.3  # clip_by_value: the transformed histograms are of np.clip(g, -CLIP, CLIP)


def numpy_histogram(arrays, nudge=0.0):
    """`[min, max, counts...]` of the finite entries of float32 `arrays`, by the rule alone
    (`nudge`: each entry's bucket position `(v - min) / width` moved by this much first)."""
    v = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float32) if arrays else np.zeros(0, np.float32)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.zeros(BUCKETS + 2)
    lo, hi = v.min(), v.max()
    width = np.float32((hi - lo) / np.float32(BUCKETS))
    if width > 0:
        index = np.clip(np.floor((v - lo) / width + nudge), 0, BUCKETS - 1).astype(int)
    else:
        index = np.full(v.size, BUCKETS - 1)
    return np.concatenate([[lo, hi], np.bincount(index, minlength=BUCKETS)])


def test_histogram_rows_equal_numpy_bucketing():
    """Per group (several tensors, none, empty, NaN/inf entries, all equal, all non-finite)."""
    rng = np.random.default_rng(3)
    wide = rng.normal(size=(6, 7)).astype(np.float32)
    wide[0, :3] = [np.nan, np.inf, -np.inf]
    tensors = [wide, rng.normal(size=9).astype(np.float32) * 40, None, np.full(4, 0.25, np.float32),
               np.array([np.nan, np.inf], np.float32), np.zeros(0, np.float32),
               rng.integers(-3, 4, size=50).astype(np.float32)]
    groups = [0, 0, 1, 2, 3, 3, 4]

    def rows(*present):  # as in the step: jitted on JAX (eager JAX compiles op by op, slowly)
        given = iter(present)
        return moments.histogram_rows([None if t is None else next(given) for t in tensors], groups, 6, BUCKETS)

    if BACKEND == "jax":
        import jax

        rows = jax.jit(rows)
    got = keras.ops.convert_to_numpy(rows(*[keras.ops.convert_to_tensor(t) for t in tensors if t is not None]))
    for group in range(6):
        members = [t for t, g in zip(tensors, groups) if g == group and t is not None]
        want = numpy_histogram(members)
        np.testing.assert_array_equal(got[group, :2], want[:2], err_msg=f"group {group}")
        # an entry on an inner edge (group 4's integers) may fall on either side of it: jitted XLA
        # divides by the width as a multiplication by its reciprocal, a float32 rounding away
        below, above = (np.cumsum(numpy_histogram(members, n)[2:]) for n in (1e-4, -1e-4))
        assert np.all(below <= np.cumsum(got[group, 2:])) and np.all(np.cumsum(got[group, 2:]) <= above), \
            (group, got[group], want)
        if group != 4:  # no entry near an inner edge: exactly numpy's buckets
            np.testing.assert_array_equal(got[group], want, err_msg=f"group {group}")
    assert got[0, 2:].sum() == 6 * 7 - 3 + 9  # every finite entry counted once
    assert got[2, 2:].tolist() == [0] * (BUCKETS - 1) + [4]  # all equal: the last bucket
    assert not got[3].any() and not got[5].any()  # nothing finite; no gradient at all


def _data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(STEPS, INPUTS)).astype(np.float32)
    # powers of two: every gradient entry x[i] * y[j] is exact in float32
    y = (2.0 ** rng.integers(-2, 3, size=(STEPS, sum(UNITS))) * rng.choice([-1, 1], size=(STEPS, sum(UNITS))))
    weights = [rng.normal(size=(INPUTS, u)).astype(np.float32) for u in UNITS]
    return x, y.astype(np.float32), weights


def _model(weights):
    inputs = keras.Input((INPUTS,))
    outputs = keras.layers.Concatenate()([keras.layers.Dense(u, use_bias=False, name=f"layer_{i}")(inputs)
                                          for i, u in enumerate(UNITS)])
    model = keras.Model(inputs, outputs, name="net")
    model.set_weights(weights)
    return model


def _linear_loss(y_true, y_pred):
    return keras.ops.sum(y_true * y_pred, axis=-1)


def _gradients(x, y, step):
    """Per layer, d sum(y * (x W)) / dW at `step` (batch of one): `x^T y`, exact in float32."""
    out, first = [], 0
    for u in UNITS:
        out.append(np.outer(x[step], y[step, first:first + u]).astype(np.float32))
        first += u
    return out


def _adam_replay(weights, x, y):
    """Per step (1-based): the weights before and after, the raw gradient, Adam's m and v of the
    clipped gradient (Keras' rule: w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps))."""
    w = [np.asarray(a, np.float64) for a in weights]
    m = [np.zeros_like(a) for a in w]
    v = [np.zeros_like(a) for a in w]
    out = {}
    for t in range(1, STEPS + 1):
        g = [a.astype(np.float64) for a in _gradients(x, y, t - 1)]
        applied = [np.clip(a, -CLIP, CLIP) for a in g]  # the transform's output reaches Adam
        m = [BETA_1 * a + (1 - BETA_1) * b for a, b in zip(m, applied)]
        v = [BETA_2 * a + (1 - BETA_2) * b ** 2 for a, b in zip(v, applied)]
        alpha = LR * np.sqrt(1 - BETA_2 ** t) / (1 - BETA_1 ** t)
        new = [a - alpha * b / (np.sqrt(c) + EPSILON) for a, b, c in zip(w, m, v)]
        out[t] = {"before": w, "after": new, "g": g, "m": m, "v": v}
        w = new
    return out


def _flat(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _documented_statistic():
    """The custom statistic of docs/ARCHITECTURE.md's "How to add a statistic", as written there."""
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")) as f:
        text = f.read()
    code = re.findall(r"```python\n(.*?)```", text[text.index("## How to add a statistic"):], re.DOTALL)[0]
    namespace = {}
    exec(code, namespace)
    return namespace["UpdateCosine"]()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `fit` of 4 Adam steps: histograms every 2 steps (raw and clip_by_value'd), moment norms,
    cosines and the documented custom statistic every step, written to an event file."""
    x, y, weights = _data()
    log_dir = str(tmp_path_factory.mktemp("statistics"))
    custom = _documented_statistic()
    model = gradmon.monitor(_model(weights), stats=["norm", "moment_norm", "cosines", custom],
                            transform=gradmon.transforms.clip_by_value(CLIP))
    model.compile(optimizer=keras.optimizers.Adam(LR, beta_1=BETA_1, beta_2=BETA_2, epsilon=EPSILON),
                  loss=_linear_loss)
    model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(log_dir, histogram_freq=2)])
    return {"events": read_events(os.path.join(log_dir, "train")), "x": x, "y": y, "custom": custom,
            "replay": _adam_replay(weights, x, y), "weights": model.get_weights()}


def test_histograms_are_numpy_buckets_of_the_steps_gradients(run):
    events, x, y = run["events"], run["x"], run["y"]
    for i in range(len(UNITS)):
        for kind in (tags.RAW, tags.TRANSFORMED):
            tag = tags.histogram(kind, f"layer_{i}")
            assert sorted(events[tag]) == [2, 4], (tag, sorted(events.get(tag, {})))
            for step in (2, 4):
                g = _gradients(x, y, step - 1)[i]
                if kind == tags.TRANSFORMED:
                    g = np.clip(g, -CLIP, CLIP)
                row = numpy_histogram([g])
                written = events[tag][step]  # TensorBoard's [k, 3]: left edge, right edge, count
                assert written.shape == (BUCKETS, 3)
                np.testing.assert_array_equal(written[:, 2], row[2:], err_msg=f"{tag} at {step}")
                np.testing.assert_allclose([written[0, 0], written[-1, 1]], row[:2], rtol=1e-6)
                np.testing.assert_allclose(written[:, 0], np.linspace(row[0], row[1], BUCKETS + 1)[:-1],
                                           rtol=1e-6, atol=1e-7)


def test_moment_norms_and_cosines_equal_the_numpy_adam_replay(run):
    events, replay = run["events"], run["replay"]
    for step in range(1, STEPS + 1):
        r = replay[step]
        for i in range(len(UNITS)):
            group = f"layer_{i}"
            want = {tags.moment_norm(tags.FIRST_MOMENT, group): np.linalg.norm(r["m"][i]),
                    tags.moment_norm(tags.SECOND_MOMENT, group): np.sqrt(r["v"][i].sum())}  # ||sqrt(v)||
            for tag, value in want.items():
                assert events[tag][step] == pytest.approx(value, rel=2e-5), (tag, step)
        g, delta = _flat(r["g"]), _flat(r["after"]) - _flat(r["before"])
        assert events[tags.COSINE_UPDATE_GRADIENT][step] == pytest.approx(_cos(-delta, g), rel=1e-4)
        assert events[tags.COSINE_GRADIENT_FIRST_MOMENT][step] == pytest.approx(_cos(g, _flat(r["m"])), rel=2e-5)


def test_the_documented_custom_statistic_equals_numpy_on_every_backend(run):
    events, replay, custom = run["events"], run["replay"], run["custom"]
    for i in range(len(UNITS)):
        tag = custom.tag(f"layer_{i}")
        assert sorted(events[tag]) == list(range(1, STEPS + 1)), tag
        for step in range(1, STEPS + 1):
            r = replay[step]
            expected = _cos(-(r["after"][i] - r["before"][i]).ravel(), r["g"][i].ravel())
            assert events[tag][step] == pytest.approx(expected, rel=1e-4), (tag, step)


def test_observing_leaves_the_adam_steps_as_numpy_computes_them(run):
    for got, want in zip(run["weights"], run["replay"][STEPS]["after"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _LoggedSteps(gradmon.statistics.Statistic):
    """A statistic with a state variable: how many logged steps it has seen."""

    def tag(self, label):
        return "custom/logged_steps"

    def build(self, spec):
        return keras.Variable(0.0, trainable=False)

    def compute(self, ctx):
        seen = ctx.state[self]
        seen.assign(seen + 1.0)
        return keras.ops.reshape(seen.value, [1])


def test_a_custom_statistic_with_state(tmp_path):
    """Runs where its `compute` may assign (TensorFlow, PyTorch); refused on JAX, whose branch is pure."""
    x, y, weights = _data()
    model = gradmon.monitor(_model(weights), stats=["norm", _LoggedSteps()])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=_linear_loss)
    fit = lambda: model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0,  # noqa: E731
                            callbacks=[gradmon.GradientMonitor(str(tmp_path), update_freq=2)])
    if BACKEND == "jax":
        with pytest.raises(NotImplementedError, match="custom statistics with state variables"):
            fit()
        return
    fit()
    assert read_events(str(tmp_path / "train"))["custom/logged_steps"] == {2: 1.0, 4: 2.0}
