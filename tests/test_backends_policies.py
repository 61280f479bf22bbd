"""The non-finite and spike policies on the suite's Keras backend (TensorFlow, JAX, PyTorch).

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_backends_policies.py`).
The reference is independent of every framework: a two-layer tanh MLP with an MSE loss whose
gradients are written out by hand in NumPy (float64) and replayed step by step with SGD from the
same weights (set from NumPy) and batches (`shuffle=False`), with its own running mean / variance of
the log-norms (the detector of `gradmon.spikes`, in plain Python). `on_nonfinite="skip"` ends on the
weights of the replay that leaves the non-finite step out; `"stop"` ends `fit` at that step on the
weights of the steps before it; the logged spike z-scores equal the replay's, and `on_spike`
`"warn"` / `"skip"` / `"stop"` apply / leave out / stop at the replay's spikes. Under a
`LossScaleOptimizer` the statistics are those of the unscaled gradients and an overflow is counted
as one (the loss scale follows the dynamic rule, the step is left out, no policy warning).
"""

import re
import warnings

import keras
import numpy as np
import pytest

import gradmon
from gradmon.measure.observer import observer_of
from helpers import read_events, tanh_mlp_gradients

LR, BATCH, HIDDEN = 0.1, 8, 6
NAN = float("nan")


def _weights(seed=7):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, HIDDEN)).astype("float32"), 0.1 * rng.normal(size=HIDDEN).astype("float32"),
            rng.normal(size=(HIDDEN, 1)).astype("float32"), 0.1 * rng.normal(size=1).astype("float32")]


def _data(steps, seed=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH * steps, 4)).astype("float32")
    y = rng.normal(size=(BATCH * steps, 1)).astype("float32")
    return x, y


def _model(weights, steps_per_execution=1, **settings):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="dense")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense_1")(hidden))
    model.set_weights(weights)
    model = gradmon.monitor(model, **settings)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", steps_per_execution=steps_per_execution)
    return model


def _batches(x, y):
    """`(step, x, y)` of each batch, the last one partial where `len(x)` is no multiple of BATCH."""
    for step in range(-(-len(x) // BATCH)):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        yield step + 1, x[rows].astype(np.float64), y[rows].astype(np.float64)


class _Detector:
    """The on_spike detector in plain Python: the log of each norm; the first `warmup` finite
    values set the mean and population variance, then EMAs (the variance against the new mean);
    a value is judged against the statistics before it (z undefined while the variance is 0),
    and a spike is folded in at mean + threshold * std."""

    def __init__(self, threshold=5.0, alpha=0.97, warmup=25):
        self.threshold, self.alpha, self.warmup = threshold, alpha, warmup
        self.buffer, self.mean, self.var = [], None, None

    def judge(self, norm):
        """`(z, spike)` of this norm; folds it in."""
        x, z = np.log(norm), NAN
        if self.mean is None:
            self.buffer.append(x)
            if len(self.buffer) == self.warmup:
                self.mean, self.var = np.mean(self.buffer), np.var(self.buffer)
            return z, False
        std = np.sqrt(self.var)
        if self.var > 0:
            z = (x - self.mean) / (std + 1e-12)
        spike = z > self.threshold
        if spike:
            x = self.mean + self.threshold * std
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return z, bool(spike)


def _replay(weights, x, y, refuse=(), stop_at=None, on_spike=None):
    """SGD from `weights` over the batches; the steps in `refuse` are not applied, nor any step
    from `stop_at` on; with `on_spike` a detector judges every raw norm and `"skip"` / `"stop"`
    refuse its spikes; a partial batch is neither judged nor folded in (z NaN). Returns
    `(weights, z-scores, spikes [(step, z)], applied steps)`."""
    w = [np.asarray(v, np.float64) for v in weights]
    detector = _Detector() if on_spike else None
    zscores, spikes, applied = [], [], 0
    for step, xb, yb in _batches(x, y):
        g = tanh_mlp_gradients(w, xb, yb)
        refused = step in refuse or (stop_at is not None and step >= stop_at)
        if detector is not None and len(xb) < BATCH:
            zscores.append(NAN)
        elif detector is not None:
            z, spike = detector.judge(np.sqrt(sum(np.sum(a ** 2) for a in g)))
            zscores.append(z)
            if spike:
                spikes.append((step, z))
                if on_spike == "stop" and stop_at is None:
                    stop_at = step
                refused = refused or on_spike in ("skip", "stop")
        if not refused:
            w = [v - LR * a for v, a in zip(w, g)]
            applied += 1
    return w, np.array(zscores), spikes, applied


def _gradmon_warnings(caught):
    return [str(c.message) for c in caught if str(c.message).startswith("gradmon:")]


def _fit(model, x, y, log_dir=None, epochs=1):
    callbacks = [] if log_dir is None else [gradmon.GradientMonitor(str(log_dir))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                            callbacks=callbacks)
    return history, _gradmon_warnings(caught)


def _assert_weights(model, expected):
    for v, w in zip(model.get_weights(), expected):
        np.testing.assert_allclose(v, w, rtol=2e-5, atol=2e-6)


def _iterations(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


# -- on_nonfinite ---------------------------------------------------------------------------

NAN_STEP, NAN_STEPS = 3, 6


def _with_nan(step=NAN_STEP, steps=NAN_STEPS):
    x, y = _data(steps)
    x[(step - 1) * BATCH + 2, 1] = np.nan  # one entry of one row: that step's gradient is NaN
    return x, y


def test_skip_ends_on_the_weights_of_the_replay_without_the_nonfinite_step(tmp_path):
    x, y = _with_nan()
    weights = _weights()
    model = _model(weights, on_nonfinite="skip")
    history, messages = _fit(model, x, y, tmp_path)
    expected, _, _, applied = _replay(weights, x, y, refuse={NAN_STEP})
    _assert_weights(model, expected)
    assert _iterations(model) == applied == NAN_STEPS - 1  # the refused update left no trace
    assert messages == [f"gradmon: non-finite gradients at step {NAN_STEP} (on_nonfinite='skip'): such "
                        "updates are skipped; their number is logged as `gradients/skipped_steps`."]
    events = read_events(str(tmp_path / "train"))
    counted = {s: float(s >= NAN_STEP) for s in range(1, NAN_STEPS + 1)}
    assert events["gradients/skipped_steps"] == counted
    assert events["gradients/nonfinite_steps"] == counted
    assert np.isnan(events["gradients/raw/global_norm"][NAN_STEP])


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_stop_ends_fit_at_the_nonfinite_step_on_the_weights_before_it(tmp_path, steps_per_execution):
    if steps_per_execution > 1 and keras.backend.backend() == "torch":
        pytest.skip("Keras' PyTorch trainer runs one step per execution")
    x, y = _with_nan()
    weights = _weights()
    model = _model(weights, steps_per_execution, on_nonfinite="stop")
    history, messages = _fit(model, x, y, tmp_path, epochs=2)
    expected, _, _, applied = _replay(weights, x, y, stop_at=NAN_STEP)
    _assert_weights(model, expected)
    assert len(history.history["loss"]) == 1  # the first epoch did not finish its steps' updates
    assert _iterations(model) == applied == NAN_STEP - 1
    stop = (f"gradmon: non-finite gradients at step {NAN_STEP} (on_nonfinite='stop'): that update "
            "and every later one were not applied; training stops.")
    assert messages[0] == stop
    assert observer_of(model.optimizer).stopped
    events = read_events(str(tmp_path / "train"))
    assert max(events["gradients/skipped_steps"]) >= NAN_STEP  # written up to the stop
    assert events["gradients/skipped_steps"][NAN_STEP] == 1.0


def test_stop_without_a_gradient_monitor_ends_fit_naming_the_step():
    x, y = _with_nan()
    weights = _weights()
    model = _model(weights, on_nonfinite="stop")
    history, messages = _fit(model, x, y, epochs=3)
    _assert_weights(model, _replay(weights, x, y, stop_at=NAN_STEP)[0])
    assert len(history.history["loss"]) == 1
    assert messages[0].startswith(f"gradmon: non-finite gradients at step {NAN_STEP} (on_nonfinite='stop')")


def test_skip_without_a_gradient_monitor_is_heard_at_the_epoch_end():
    x, y = _with_nan()
    weights = _weights()
    model = _model(weights, on_nonfinite="skip")
    history, messages = _fit(model, x, y, epochs=2)
    two_epochs = _replay(weights, np.concatenate([x, x]), np.concatenate([y, y]),
                         refuse={NAN_STEP, NAN_STEP + NAN_STEPS})
    _assert_weights(model, two_epochs[0])
    assert len(history.history["loss"]) == 2
    assert [re.sub(r"; add a gradmon.*", "", m) for m in messages] == [
        f"gradmon: 1 update(s) in epoch {e} had non-finite gradients (step {s}) and were not applied "
        "(on_nonfinite='skip')" for e, s in ((1, NAN_STEP), (2, NAN_STEP + NAN_STEPS))]


# -- on_spike -------------------------------------------------------------------------------

SPIKE_STEPS, SPIKE_AT = 36, 30  # the last step a partial batch of 3 (not judged)


def _spiky_data():
    """Batches whose targets are 30x larger at step SPIKE_AT: its gradient norm jumps ~30x."""
    x, y = _data(SPIKE_STEPS, seed=9)
    x, y = x[:-BATCH + 3], y[:-BATCH + 3]
    y[(SPIKE_AT - 1) * BATCH:SPIKE_AT * BATCH] *= 30.0
    return x, y


@pytest.mark.parametrize("policy", ["warn", "skip", "stop"])
def test_spike_zscores_and_policy_equal_a_numpy_replay(tmp_path, policy):
    x, y = _spiky_data()
    weights = _weights()
    model = _model(weights, on_spike=policy)
    history, messages = _fit(model, x, y, tmp_path, epochs=2 if policy == "stop" else 1)
    expected, zscores, spikes, applied = _replay(weights, x, y, on_spike=policy)
    assert spikes and spikes[0][0] == SPIKE_AT  # the scenario: the replay sees the injected spike
    _assert_weights(model, expected)
    assert _iterations(model) == applied
    events = read_events(str(tmp_path / "train"))
    logged = events["gradients/spike/zscore"]
    written = sorted(logged)
    assert written == list(range(1, len(written) + 1))
    assert len(written) == (SPIKE_AT if policy == "stop" else SPIKE_STEPS)
    np.testing.assert_allclose([logged[s] for s in written], zscores[:len(written)], rtol=1e-4, atol=1e-4)
    assert np.isnan(zscores[:25]).all() and np.isfinite(zscores[25:SPIKE_STEPS - 1]).all()
    assert np.isnan(logged.get(SPIKE_STEPS, np.nan))  # the partial batch: no z
    count = events["gradients/spike/count"]
    assert count == {s: float(sum(t <= s for t, _ in spikes)) for s in written}
    seen = observer_of(model.optimizer).spikes_seen
    assert [s for s, _ in seen] == [s for s, _ in spikes if s in written]
    np.testing.assert_allclose([z for _, z in seen], [z for s, z in spikes if s in written], rtol=1e-4)
    if policy == "stop":
        assert len(history.history["loss"]) == 1
        assert messages[0].startswith(f"gradmon: a gradient-norm spike (z = {spikes[0][1]:.1f}) at step "
                                      f"{SPIKE_AT} (on_spike='stop'): that update and every later one")
        return
    what = {"warn": "the update was applied", "skip": "such updates are skipped"}[policy]
    assert messages and all(what in m for m in messages)
    named = [int(s) for m in messages for s in re.findall(r"(\d+) \(z = ", m)]
    assert named == [s for s, _ in spikes]
    if policy == "skip":
        assert events["gradients/skipped_steps"][SPIKE_STEPS] == float(len(spikes))


# -- LossScaleOptimizer ---------------------------------------------------------------------

def _scales(initial, growth, overflows, steps):
    """The dynamic loss scale each step starts with: doubled after `growth` finite steps in a
    row, halved (and the run restarted) at an overflow."""
    scale, run, out = initial, 0, []
    for step in range(1, steps + 1):
        out.append(scale)
        if step in overflows:
            scale, run = scale / 2, 0
        else:
            run += 1
            if run == growth:
                scale, run = scale * 2, 0
    return out


def test_loss_scale_overflows_are_counted_and_statistics_are_of_unscaled_gradients(tmp_path):
    x, y = _with_nan()
    weights = _weights()
    model = _model(weights)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR), initial_scale=1024.0,
                                                                dynamic_growth_steps=2), loss="mse")
    _, messages = _fit(model, x, y, tmp_path)
    assert messages == []  # an overflow is the optimizer's business: no policy warning
    expected, _, _, applied = _replay(weights, x, y, refuse={NAN_STEP})
    _assert_weights(model, expected)
    assert _iterations(model) == applied
    events = read_events(str(tmp_path / "train"))
    steps = range(1, NAN_STEPS + 1)
    assert events["gradients/loss_scale"] == dict(zip(steps, _scales(1024.0, 2, {NAN_STEP}, NAN_STEPS)))
    assert events["gradients/overflow_steps"] == {s: float(s >= NAN_STEP) for s in steps}
    assert events["gradients/skipped_steps"] == {s: float(s >= NAN_STEP) for s in steps}
    assert events["gradients/nonfinite_steps"] == {s: 0.0 for s in steps}
    # the overflow step writes counters only; the others the norms of the unscaled gradient
    norms = events["gradients/raw/global_norm"]
    assert sorted(norms) == [s for s in steps if s != NAN_STEP]
    w = [np.asarray(v, np.float64) for v in weights]
    for step, xb, yb in _batches(x, y):
        g = tanh_mlp_gradients(w, xb, yb)
        if step != NAN_STEP:
            np.testing.assert_allclose(norms[step], np.sqrt(sum(np.sum(a ** 2) for a in g)), rtol=2e-5)
            w = [v - LR * a for v, a in zip(w, g)]


@pytest.mark.parametrize("bad", [NAN, float("inf"), -float("inf"), None])
def test_the_finiteness_check_equals_numpy_entry_by_entry(bad):
    # what the non-finite counter and the policies judge each step (PyTorch: two reductions per
    # gradient, no boolean tensor), against NumPy's isfinite; the float16 gradient's finite entries
    # sum to inf (a check by sums would call it non-finite), an empty gradient is finite
    from gradmon.measure.pipeline import all_finite

    rng = np.random.default_rng(3)
    for trial in range(8):
        arrays = [rng.normal(size=(5, 4)).astype("float32"), rng.normal(size=7).astype("float32"),
                  np.array([6e4, 6e4, -1.0], "float16"), np.zeros([0, 3], "float32")]
        if bad is not None:
            which = trial % 3
            arrays[which].reshape(-1)[rng.integers(arrays[which].size)] = bad
        expected = all(np.isfinite(a).all() for a in arrays)
        grads = [keras.ops.convert_to_tensor(a) for a in arrays]
        assert bool(keras.ops.convert_to_numpy(all_finite(grads))) == expected
    assert expected == (bad is None)  # the counter sees non-finite entries
