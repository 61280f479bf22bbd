"""zclip, adaptive_clip, user callables and chains of them in `fit`, on the suite's Keras backend.

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_backends_transforms.py`).
The reference is independent of every framework: a two-layer tanh MLP with an MSE loss whose
gradients are written out by hand in NumPy (float64), transformed by the published rules written
out here (ZClip's warm-up, moving averages and reciprocal clipping; AGC's unit-wise bound), and
replayed step by step with SGD from the same weights and batches (`shuffle=False`). The logged raw
and transformed global norms, clip ratios, clip fractions (each chain member's too) and zclip
thresholds equal the replay's to float32 precision, and the weights after `fit` equal the
replay's. One batch has 20x the targets: a gradient spike that zclip clips.

Every decision the replay takes (a unit or a norm over its bound, an entry over the callable's
limit) is checked to lie at least 1e-4 (relative) from its bound, so that float32 takes the same.
"""

import keras
import numpy as np
import pytest

import gradmon
from helpers import read_events, tanh_mlp_gradients

T = gradmon.transforms
LR, BATCH, STEPS, HIDDEN = 0.1, 8, 10, 8
SPIKE = 7  # the step whose batch has 20x the targets
MARGIN = 1e-4
LIMIT = 0.05  # the user callable halves entries above it


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH * STEPS, 4)).astype("float32")
    y = rng.normal(size=(BATCH * STEPS, 1)).astype("float32")
    x[:, 3] = 0.0  # a row of the first kernel's gradient is exactly zero (left as it is)
    y[(SPIKE - 1) * BATCH:SPIKE * BATCH] *= 20.0
    weights = [rng.normal(size=(4, HIDDEN)).astype("float32"),
               0.1 * rng.normal(size=HIDDEN).astype("float32"),
               rng.normal(size=(HIDDEN, 1)).astype("float32"), 0.1 * rng.normal(size=1).astype("float32")]
    return x, y, weights


def _over(value, bound):
    """`value > bound`, for a value clear of its bound (float32 decides alike)."""
    assert abs(value - bound) > MARGIN * abs(bound), (value, bound)
    return value > bound


def _norm(g):
    return np.sqrt(sum(np.sum(a ** 2) for a in g))


def halve_large(grads, params):
    """A user transform in `keras.ops`: halves the entries above `LIMIT` in absolute value."""
    return [keras.ops.where(keras.ops.abs(g) > LIMIT, g * 0.5, g) for g in grads]


def _halve_large(g, w):
    over = [np.vectorize(_over)(np.abs(a), LIMIT) for a in g]
    changed = sum(o.sum() for o in over) / sum(a.size for a in g)
    return [np.where(o, a * 0.5, a) for a, o in zip(g, over)], [changed], {}


def _clip_global(max_norm):
    def clip(g, w):
        norm = _norm(g)
        over = _over(norm, max_norm)
        return [a * (max_norm / norm if over else 1.0) for a in g], [float(over)], {}
    return clip


def _unit_norms(a):
    """AGC's units: the output columns of a kernel, a whole vector."""
    return np.linalg.norm(a, axis=0) if a.ndim == 2 else np.array([np.linalg.norm(a)])


def _adaptive(clip_factor, eps=1e-3):
    """Brock et al. (2021): a unit whose gradient norm exceeds `clip_factor * max(||W||, eps)`
    is rescaled to that bound."""
    def clip(g, w):
        out, over = [], []
        for a, p in zip(g, w):
            bound = clip_factor * np.maximum(_unit_norms(p), eps)
            norms = _unit_norms(a)
            clipped = np.array([_over(n, b) for n, b in zip(norms, bound)])
            scale = np.where(clipped, bound / norms, 1.0)
            out.append(a * (scale if a.ndim == 2 else scale[0]))
            over += list(clipped)
        return out, [np.mean(over)], {}
    return clip


class _ZClip:
    """ZClip (Kumar et al. 2025, reference rule): the first `warmup` norms only collected (then
    their mean and population variance), later moving averages with decay `alpha` of the norm
    after clipping (the variance against the new mean); a norm with z-score above `z_threshold`
    is clipped to `mean + z_threshold**2 * std / z`. The threshold logged is `mean + z_threshold
    * std` (NaN in the warm-up)."""

    def __init__(self, z_threshold, alpha, warmup, eps=1e-6, name="zclip"):
        self.z_threshold, self.alpha, self.warmup, self.eps, self.name = z_threshold, alpha, warmup, eps, name
        self.collected, self.mean, self.var = [], None, None

    def __call__(self, g, w):
        norm = _norm(g)
        if self.mean is None:
            self.collected.append(norm)
            if len(self.collected) == self.warmup:
                self.mean, self.var = np.mean(self.collected), np.var(self.collected)
            return g, [0.0], {self.name: np.nan}
        std = np.sqrt(self.var)
        threshold = self.mean + self.z_threshold * std
        z = (norm - self.mean) / (std + self.eps)
        clipped = _over(z, self.z_threshold)
        kept = self.mean + self.z_threshold ** 2 * std / z if clipped else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * kept
        self.var = self.alpha * self.var + (1 - self.alpha) * (kept - self.mean) ** 2
        return [a * kept / norm for a in g], [float(clipped)], {self.name: threshold}


def _chained(*members):
    def run(g, w):
        fractions, thresholds = [], {}
        for member in members:
            g, f, t = member(g, w)
            fractions += f
            thresholds.update(t)
        return g, fractions, thresholds
    return run


# case: (gradmon transform, its NumPy replay (fresh state), the chain's member names or None)
CASES = {
    "zclip": (lambda: T.zclip(z_threshold=2.0, alpha=0.9, warmup_steps=4),
              lambda: _ZClip(2.0, 0.9, 4), None),
    "adaptive_clip": (lambda: T.adaptive_clip(1.0), lambda: _adaptive(1.0), None),
    "callable": (lambda: halve_large, lambda: _halve_large, None),
    "chain": (lambda: T.chain(T.zclip(z_threshold=2.0, alpha=0.9, warmup_steps=4), T.adaptive_clip(1.5),
                              T.clip_by_global_norm(3.0), halve_large,
                              T.zclip(z_threshold=1.5, warmup_steps=3)),
              lambda: _chained(_ZClip(2.0, 0.9, 4), _adaptive(1.5), _clip_global(3.0), _halve_large,
                               _ZClip(1.5, 0.97, 3, name="zclip_2")),
              ["zclip", "adaptive_clip", "clip_by_global_norm", "halve_large", "zclip_2"]),
}


def _replay(replay, weights, x, y, lr=LR):
    """Per step: the numbers gradmon logs; and the final weights."""
    w = [np.asarray(v, np.float64) for v in weights]
    logged = []
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        g = tanh_mlp_gradients(w, x[rows].astype(np.float64), y[rows].astype(np.float64))
        applied, fractions, thresholds = replay(g, w)
        raw, out = _norm(g), _norm(applied)
        logged.append({"raw": raw, "transformed": out, "ratio": out / raw, "fractions": fractions,
                       "thresholds": thresholds})
        w = [v - lr * a for v, a in zip(w, applied)]
    return logged, w


def _series(events, tag):
    values = events[tag]
    assert sorted(values) == list(range(1, STEPS + 1)), (tag, values)
    return np.array([values[s] for s in range(1, STEPS + 1)])


def _model(weights):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="dense")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense_1")(hidden))
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_logs_the_numbers_of_a_numpy_replay(tmp_path, case):
    make, replay, members = CASES[case]
    x, y, weights = _data()
    model = gradmon.monitor(_model(weights), transform=make())
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    events = read_events(str(tmp_path))
    expected, final = _replay(replay(), weights, x, y)

    def check(tag, want):
        np.testing.assert_allclose(_series(events, tag), want, rtol=2e-5, atol=1e-7, err_msg=tag,
                                   equal_nan=True)

    check("gradients/raw/global_norm", [row["raw"] for row in expected])
    check("gradients/transformed/global_norm", [row["transformed"] for row in expected])
    check("gradients/clip/ratio", [row["ratio"] for row in expected])
    fractions = np.array([row["fractions"] for row in expected])
    check("gradients/clip/fraction", fractions.max(axis=1))
    for i, name in enumerate(members or []):
        check(f"gradients/clip/fraction/{name}", fractions[:, i])
    # every member clipped on some step (but the chain's last zclip: its statistics are checked)
    acted = fractions.max(axis=0)[:4]
    assert acted.min() > 0, f"a member never clipped: the case tests nothing of it {acted}"
    zclips = [name for name in expected[-1]["thresholds"]]
    for name in zclips:
        want = [row["thresholds"][name] for row in expected]
        check(f"gradients/{name}/threshold", want)
        assert np.isnan(want[0]) and np.isfinite(want[-1])
    assert sorted(t for t in events if t.endswith("/threshold")) == sorted(
        f"gradients/{name}/threshold" for name in zclips)
    if case == "zclip":  # the spike is clipped, and only it
        assert list(fractions[:, 0]) == [float(step == SPIKE) for step in range(1, STEPS + 1)]
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_zclip_statistics_carry_over_a_recompile_with_a_new_optimizer():
    """On JAX zclip's statistics ride in the optimizer's state: compiling the model again with a
    new optimizer carries them into its state (as on TensorFlow and PyTorch, where they stay)."""
    x, y, weights = _data()
    zclip = T.zclip(z_threshold=2.0, alpha=0.9, warmup_steps=4)
    model = gradmon.monitor(_model(weights), transform=zclip)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(LR / 2), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    replay = _ZClip(2.0, 0.9, 4)
    _, middle = _replay(replay, weights, x, y)
    _, final = _replay(replay, middle, x, y, lr=LR / 2)
    seen, mean, var = keras.ops.convert_to_numpy(zclip.state)
    assert seen == 2 * STEPS
    np.testing.assert_allclose([mean, var], [replay.mean, replay.var], rtol=2e-5)
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX: a functional custom loop")
def test_zclip_in_a_jitted_jax_custom_loop_logs_the_numbers_of_a_numpy_replay(tmp_path):
    """`gradmon.observe` in a functional loop: zclip's statistics ride in the optimizer variables
    the jitted step carries (`stateless_apply`) and `opt.flush(optimizer_variables=...)` reads."""
    import jax

    x, y, weights = _data()
    model = _model(weights)
    opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=str(tmp_path), buffer_steps=STEPS,
                          transform=T.zclip(z_threshold=2.0, alpha=0.9, warmup_steps=4))
    opt.build(model.trainable_variables)  # gradmon's state (zclip's too) is built with it
    trainable = [v.value for v in model.trainable_variables]
    carried = [v.value for v in opt.variables]

    def loss(trainable, xb, yb):
        pred, _ = model.stateless_call(trainable, [], xb)
        return keras.ops.mean(keras.ops.square(pred - yb))

    @jax.jit
    def step(trainable, carried, xb, yb):
        trainable, carried = opt.stateless_apply(carried, jax.grad(loss)(trainable, xb, yb), trainable)
        return trainable, carried

    for i in range(STEPS):
        rows = slice(i * BATCH, (i + 1) * BATCH)
        trainable, carried = step(trainable, carried, x[rows], y[rows])
    opt.flush(optimizer_variables=carried)
    opt.gradmon.close()
    events = read_events(str(tmp_path))
    expected, final = _replay(_ZClip(2.0, 0.9, 4), weights, x, y)
    np.testing.assert_allclose(_series(events, "gradients/zclip/threshold"),
                               [row["thresholds"]["zclip"] for row in expected], rtol=2e-5, equal_nan=True)
    np.testing.assert_allclose(_series(events, "gradients/transformed/global_norm"),
                               [row["transformed"] for row in expected], rtol=2e-5)
    clipped = [float(step == SPIKE) for step in range(1, STEPS + 1)]
    assert list(_series(events, "gradients/clip/fraction")) == clipped
    for got, want in zip(trainable, final):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
