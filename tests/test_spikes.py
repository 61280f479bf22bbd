"""Spikes caught in the step (`on_spike`) and ZClip, against numpy replays of the norms."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon import tags
from gradmon.measure import transforms as T
from gradmon.publish.writer import MemoryWriter
from helpers import replay_spike_detector as replay_detector

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

NAN = float("nan")
THRESHOLD = gradmon.spikes.DEFAULT_SPIKE_THRESHOLD


# -- independent references (numpy, lists; no gradmon code) --------------------

def replay_zclip(norms, z_threshold, alpha, warmup, eps=1e-6):
    """ZClip as its reference code: clipped norms, thresholds, clipped flags."""
    buffer, ready, mean, var = [], False, 0.0, 0.0
    out, thresholds, flags = [], [], []
    for x in norms:
        if not ready:
            buffer.append(x)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((b - mean) ** 2 for b in buffer) / len(buffer)
                ready = True
            out.append(x), thresholds.append(NAN), flags.append(0.0)
            continue
        std = var ** 0.5
        z = (x - mean) / (std + eps)
        thresholds.append(mean + z_threshold * std)
        effective = x
        if z > z_threshold and var > 0:  # with no variance yet, nothing is clipped
            effective = mean + (z_threshold * std) / (z / z_threshold)
        flags.append(float(z > z_threshold and var > 0))
        out.append(effective)
        mean = alpha * mean + (1 - alpha) * effective
        var = alpha * var + (1 - alpha) * (effective - mean) ** 2
    return np.array(out), np.array(thresholds), np.array(flags)


def gradients_with_norms(norms, size=4, seed=0):
    """float32 gradients whose global norms are `norms` (random directions)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in norms:
        d = rng.normal(size=size)
        out.append((d / np.linalg.norm(d) * n).astype(np.float32))
    return out


def series(writer, tag):
    return dict(writer.scalars.get(tag, []))


def norm_sequence(steps=60, spikes=(), seed=1):
    rng = np.random.default_rng(seed)
    norms = 1.0 + 0.1 * rng.normal(size=steps)
    for step, value in spikes:
        norms[step - 1] = value
    return norms


# -- custom loops -------------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True])
def test_custom_loop_zscores_and_spikes_equal_a_numpy_replay(compiled):
    norms = norm_sequence(spikes=[(30, 6.0), (31, 5.0), (45, 9.0), (38, NAN)])
    grads = gradients_with_norms(norms)
    v = keras.Variable(np.zeros(4, np.float32))
    opt = gradmon.observe(keras.optimizers.SGD(0.01), on_spike="warn", spike_threshold=4.0,
                          buffer_steps=64)
    apply = lambda g: opt.apply_gradients([(g, v)])  # noqa: E731
    apply = tf.function(apply) if compiled else apply
    writer = MemoryWriter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, g in enumerate(grads, 1):
            apply(tf.constant(g))
            if i % 10 == 0:
                opt.flush(writer)
    # the device norm is the float32 gradient's: replay on the same float32 arrays
    measured = [np.linalg.norm(g.astype(np.float64)) for g in grads]
    zs, found, counts = replay_detector(measured, 4.0)
    assert [s for s, _ in found] == [30, 31, 45]  # the spikes the replay sees, the NaN step not one
    written = series(writer, tags.SPIKE_ZSCORE)
    assert sorted(written) == list(range(1, 61))
    np.testing.assert_allclose([written[s] for s in range(1, 61)], zs, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert np.isnan([written[s] for s in range(1, 26)]).all()  # warm-up: no verdict
    assert [series(writer, tags.SPIKE_COUNT)[s] for s in range(1, 61)] == counts
    at = series(writer, tags.SPIKE_AT)
    assert sorted(at) == [30, 31, 45]
    for step, z in found:
        assert at[step] == pytest.approx(z, rel=1e-5)
    assert tags.SPIKE_LOSS_ZSCORE not in writer.scalars  # a custom loop hands no loss over
    # (a loop without observe_batch is told once that every batch is judged as a full one)
    messages = [str(c.message) for c in caught
                if "spike" in str(c.message) and "no batch size" not in str(c.message)]
    assert any("spike at step 30" in m or "steps 30" in m for m in messages)
    assert any("45 (z = " in m for m in messages)
    assert all("the update was applied" in m for m in messages)


@pytest.mark.parametrize("compiled", [False, True])
def test_custom_loop_observe_batch_judges_only_full_batches(compiled):
    """Steps 30, 45 and 60 are partial batches of 3 examples with a 3x norm: with `observe_batch`
    they are neither judged nor folded in (z NaN, the replay skips them), and the real spike at
    full step 38 is still caught; without it, the partial batches are judged and flagged."""
    sizes = [3 if step in (30, 45, 60) else 16 for step in range(1, 61)]
    norms = norm_sequence(60, spikes=[(30, 3.0), (45, 3.0), (60, 3.0), (38, 8.0)], seed=5)
    grads = gradients_with_norms(norms, seed=6)
    measured = [np.linalg.norm(g.astype(np.float64)) for g in grads]
    results = {}
    for handed in (True, False):
        v = keras.Variable(np.zeros(4, np.float32))
        opt = gradmon.observe(keras.optimizers.SGD(0.01), on_spike="warn", buffer_steps=64)

        def step(x, g):
            if handed:
                opt.gradmon.observe_batch(x)  # counts x's leading dimension
            opt.apply_gradients([(g, v)])

        if compiled:
            step = tf.function(step, input_signature=[tf.TensorSpec([None, 2]), tf.TensorSpec([4])])
        writer = MemoryWriter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for size, g in zip(sizes, grads):
                step(tf.zeros([size, 2]), tf.constant(g))
            opt.flush(writer)
        results[handed] = (series(writer, tags.SPIKE_ZSCORE), [s for s, _ in opt.gradmon.spikes_seen])
    zs, found, _ = replay_detector(measured, THRESHOLD, batches=sizes)
    written, spiked = results[True]
    np.testing.assert_allclose([written[s] for s in range(1, 61)], zs, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert np.isnan([written[s] for s in (30, 45, 60)]).all() and np.isfinite(written[31])
    assert spiked == [s for s, _ in found] == [38]
    # not handed over: every step judged (the previous behaviour), the partial batches flagged
    unmasked, _, _ = replay_detector(measured, THRESHOLD)
    written, spiked = results[False]
    np.testing.assert_allclose([written[s] for s in range(1, 61)], unmasked, rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    assert {30, 38, 45, 60} <= set(spiked)


def test_custom_loop_loss_zscore_equals_a_numpy_replay_of_its_losses():
    model = linear(seed=1)
    opt = gradmon.observe(keras.optimizers.SGD(0.01), on_spike="warn")
    mse = keras.losses.MeanSquaredError()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = mse(y, model(x, training=True))
        opt.gradmon.observe_loss(loss)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    losses = [float(step(X[i:i + 4], Y[i:i + 4])) for i in range(0, 160, 4)]
    writer = MemoryWriter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.flush(writer)
    replay, _, _ = replay_detector(losses, THRESHOLD, log=False)  # the loss itself
    written = series(writer, tags.SPIKE_LOSS_ZSCORE)
    assert sorted(written) == list(range(25, 41))  # the ring holds the latest 16 logged steps
    np.testing.assert_allclose([written[s] for s in range(25, 41)], replay[24:], rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    assert np.isnan(written[25]) and written[SPIKE_BATCH] > 6.0  # the batch scaled by 30


def test_skip_leaves_the_weights_of_a_run_without_that_step():
    norms = norm_sequence(40, spikes=[(33, 8.0)], seed=2)
    grads = gradients_with_norms(norms, seed=3)
    v = keras.Variable(np.ones(4, np.float32))
    opt = gradmon.observe(keras.optimizers.SGD(0.5), on_spike="skip", spike_threshold=5.0)
    step = tf.function(lambda g: opt.apply_gradients([(g, v)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for g in grads:
            step(tf.constant(g))
        snapshots = opt.flush()
    expected = np.ones(4, np.float32)
    for i, g in enumerate(grads, 1):
        if i != 33:
            expected = expected - np.float32(0.5) * g  # plain SGD, in float32 as Keras
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert int(opt.iterations.numpy()) == 39
    assert opt.gradmon.spikes_seen[0][0] == 33 and len(opt.gradmon.spikes_seen) == 1
    assert snapshots[-1][tags.SKIPPED_STEPS] == 1
    assert any("spike at step 33" in str(c.message) and "skipped" in str(c.message) for c in caught)


def test_zclip_clips_as_a_numpy_replay_of_zclip():
    norms = norm_sequence(40, spikes=[(15, 4.0), (16, 3.0), (30, 2.0)], seed=4)
    grads = gradients_with_norms(norms, seed=5)
    v = keras.Variable(np.zeros(4, np.float32))
    transform = T.zclip(z_threshold=2.5, alpha=0.9, warmup_steps=10)
    opt = gradmon.observe(keras.optimizers.SGD(1.0), transform=transform, buffer_steps=64)
    step = tf.function(lambda g: opt.apply_gradients([(g, v)]))
    for g in grads:
        step(tf.constant(g))
    writer = MemoryWriter()
    opt.flush(writer)
    measured = [np.linalg.norm(g.astype(np.float64)) for g in grads]
    clipped, thresholds, flags = replay_zclip(measured, 2.5, 0.9, 10)
    assert flags[14] == flags[15] == 1.0 and flags.sum() >= 2
    out = series(writer, tags.global_norm("transformed"))
    np.testing.assert_allclose([out[s] for s in range(1, 41)], clipped, rtol=1e-5)
    written = series(writer, tags.zclip_threshold())
    np.testing.assert_allclose([written[s] for s in range(1, 41)], thresholds, rtol=1e-5, equal_nan=True)
    fraction = series(writer, tags.CLIP_FRACTION)
    assert [fraction[s] for s in range(1, 41)] == list(flags)
    # what the optimizer applied: each gradient rescaled to the clipped norm (SGD, lr 1)
    expected = -sum(g.astype(np.float64) * (c / m) for g, c, m in zip(grads, clipped, measured))
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_zclip_in_a_chain_reports_its_member_fraction_and_serializes():
    chain = T.chain(T.clip_by_value(10.0), T.zclip(z_threshold=3.0, warmup_steps=5))
    assert chain.fraction_names() == ["clip_by_value", "zclip"]
    again = T.deserialize(T.serialize(chain))
    assert again.transforms[1].get_config() == {"z_threshold": 3.0, "alpha": 0.97, "warmup_steps": 5,
                                                "eps": 1e-6}
    norms = norm_sequence(12, spikes=[(9, 50.0)], seed=6)
    grads = gradients_with_norms(norms, seed=7)
    v = keras.Variable(np.zeros(4, np.float32))
    opt = gradmon.observe(keras.optimizers.SGD(0.1), transform=chain)
    writer = MemoryWriter()
    for g in grads:  # eager
        opt.apply_gradients([(tf.constant(g), v)])
    opt.flush(writer)
    member = series(writer, tags.clip_fraction_of("zclip"))
    assert member[9] == 1.0 and sum(member.values()) == 1.0
    assert np.isnan(series(writer, tags.zclip_threshold())[5])
    assert np.isfinite(series(writer, tags.zclip_threshold())[6])


def test_two_zclips_in_a_chain_have_a_threshold_each():
    norms = norm_sequence(6, seed=8)
    v = keras.Variable(np.zeros(4, np.float32))
    opt = gradmon.observe(keras.optimizers.SGD(0.1), transform=T.chain(
        T.zclip(warmup_steps=2), T.clip_by_value(0.3), T.zclip(warmup_steps=4)))
    for g in gradients_with_norms(norms, seed=9):
        opt.apply_gradients([(tf.constant(g), v)])
    values = opt.flush()[-1].values
    first, second = values[tags.zclip_threshold("zclip")], values[tags.zclip_threshold("zclip_2")]
    assert np.isfinite(first) and np.isfinite(second) and first != second


# -- fit --------------------------------------------------------------------------

RNG = np.random.default_rng(11)
X = RNG.normal(size=(160, 3)).astype(np.float32)
Y = (X @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 * RNG.normal(size=(160, 1))).astype(np.float32)
SPIKE_BATCH = 30
X[4 * (SPIKE_BATCH - 1):4 * SPIKE_BATCH] *= 30.0  # batch 30 (1-based, batch size 4) is a spike
Y[4 * (SPIKE_BATCH - 1):4 * SPIKE_BATCH] *= 30.0


def linear(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


class WeightsBefore(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([w.numpy().astype(np.float64) for w in self.model.trainable_variables])


def numpy_norm_and_loss(kernel, bias, x, y):
    """Keras' MSE on a Dense(1) layer and its gradient's global norm, by hand."""
    residual = x.astype(np.float64) @ kernel + bias - y
    g_kernel, g_bias = 2 * x.T @ residual / len(x), 2 * residual.sum(0) / len(x)
    return np.sqrt((g_kernel ** 2).sum() + (g_bias ** 2).sum()), float(np.mean(residual ** 2))


def test_fit_warn_writes_the_spike_at_its_step_and_trains_as_plain_keras():
    plain = linear()
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    plain.fit(X, Y, batch_size=4, shuffle=False, verbose=0)
    model = gradmon.monitor(linear(), on_spike="warn")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    writer, before = MemoryWriter(), WeightsBefore()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, Y, batch_size=4, shuffle=False, verbose=0,
                  callbacks=[before, gradmon.GradientMonitor(writer=writer, update_freq=7)])
    for a, b in zip(plain.trainable_variables, model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # "warn" applies: plain Keras
    pairs = [numpy_norm_and_loss(k, b, X[i * 4:i * 4 + 4], Y[i * 4:i * 4 + 4])
             for i, (k, b) in enumerate(before.weights)]
    zs, found, counts = replay_detector([p[0] for p in pairs], THRESHOLD)
    loss_zs, _, _ = replay_detector([p[1] for p in pairs], THRESHOLD, log=False)
    # the spiked batch, and what its applied update did to the next batches
    assert found[0][0] == SPIKE_BATCH
    at = series(writer, tags.SPIKE_AT)
    assert list(at) == [s for s, _ in found]
    for step, z in found:
        assert at[step] == pytest.approx(z, rel=1e-4)
    written, loss_written = series(writer, tags.SPIKE_ZSCORE), series(writer, tags.SPIKE_LOSS_ZSCORE)
    assert sorted(written) == list(range(7, 41, 7))  # logged steps only; the spike step is not one
    steps = sorted(written)
    np.testing.assert_allclose([written[s] for s in steps], zs[np.array(steps) - 1], rtol=1e-4,
                               atol=1e-5, equal_nan=True)
    np.testing.assert_allclose([loss_written[s] for s in steps], loss_zs[np.array(steps) - 1],
                               rtol=1e-4, atol=1e-5, equal_nan=True)
    assert np.isnan(written[7]) and np.isfinite(written[28]) and np.isfinite(loss_written[35])
    assert [series(writer, tags.SPIKE_COUNT)[s] for s in steps] == [counts[s - 1] for s in steps]
    assert any(f"spike at step {SPIKE_BATCH}" in str(c.message) for c in caught)


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_fit_stop_stops_at_the_spike_with_the_weights_of_the_steps_before(steps_per_execution):
    reference = linear()
    reference.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    reference.fit(X[:4 * (SPIKE_BATCH - 1)], Y[:4 * (SPIKE_BATCH - 1)], batch_size=4, shuffle=False,
                  verbose=0)
    model = gradmon.monitor(linear(), on_spike="stop")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=steps_per_execution)
    monitor = gradmon.GradientMonitor(writer=MemoryWriter(), update_freq=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, Y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    for a, b in zip(reference.trainable_variables, model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # the later steps of the spike's execution (29-32 with 4 per execution) are refused too
    last = SPIKE_BATCH if steps_per_execution == 1 else 32
    assert monitor.stopped_at == SPIKE_BATCH and model.gradient_observer.step == last
    assert int(model.optimizer.iterations.numpy()) == SPIKE_BATCH - 1
    assert any("spike (z = " in str(c.message) and f"step {SPIKE_BATCH} (on_spike='stop')"
               in str(c.message) for c in caught)


def test_fit_without_on_spike_is_plain_keras():
    plain = linear(seed=3)
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    plain.fit(X, Y, batch_size=8, shuffle=False, verbose=0)
    model = gradmon.monitor(linear(seed=3))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(X, Y, batch_size=8, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(writer=MemoryWriter(), update_freq=3)])
    for a, b in zip(plain.trainable_variables, model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert model.gradient_observer.spikes is None


# -- cost and arguments -------------------------------------------------------

def _traced_ops(**kwargs):
    v = keras.Variable(np.zeros(3, np.float32))
    opt = gradmon.observe(keras.optimizers.SGD(0.1), **kwargs)
    function = tf.function(lambda g: opt.apply_gradients([(g, v)]))
    graph = function.get_concrete_function(tf.TensorSpec([3], tf.float32)).graph
    return [op.name for op in graph.get_operations()]


def test_without_on_spike_the_step_has_no_spike_op():
    plain, tracked = _traced_ops(), _traced_ops(on_spike="warn")
    assert not any("gradmon_spikes" in name for name in plain)
    assert any("gradmon_spikes" in name for name in tracked)  # the check can fail
    assert len(tracked) > len(plain)


def test_bad_arguments_are_keras_worded():
    opt = keras.optimizers.SGD()
    with pytest.raises(ValueError, match="argument `on_spike`.*Received: on_spike='panic'"):
        gradmon.observe(opt, on_spike="panic")
    with pytest.raises(ValueError, match="argument `spike_threshold`.*Received: spike_threshold=-1"):
        gradmon.observe(opt, on_spike="warn", spike_threshold=-1)
    with pytest.raises(ValueError, match="argument `alpha`.*Received: alpha=1"):
        T.zclip(alpha=1)
    with pytest.raises(ValueError, match="argument `warmup_steps`.*Received: warmup_steps=0"):
        T.zclip(warmup_steps=0)
    with pytest.raises(ValueError, match="argument `on_spike`"):
        gradmon.monitor(linear(), on_spike=True)


def test_on_spike_survives_saving(tmp_path):
    model = gradmon.monitor(linear(), on_spike="skip", spike_threshold=4.5, transform=T.zclip())
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X[:8], Y[:8], batch_size=4, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    config = loaded.gradient_config.get_config()
    assert config["on_spike"] == "skip" and config["spike_threshold"] == 4.5
    assert config["transform"]["class_name"] == "zclip"


def test_loss_scale_overflows_are_not_spikes():
    """mixed_float16 on unnormalised targets: the first steps overflow while the loss scale
    adapts; the detector sees unscaled norms, skips nothing, and training is plain Keras'."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        y = (Y * 300.0).astype(np.float32)
        results = []
        for policy in (None, "skip"):
            keras.utils.set_random_seed(3)
            base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                     keras.layers.Dense(1, dtype="float32")])
            model = gradmon.monitor(base, on_spike=policy)
            model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
            writer = MemoryWriter()
            model.fit(X, y, batch_size=2, shuffle=False, verbose=0,
                      callbacks=[gradmon.GradientMonitor(writer=writer)])
            results.append(([v.numpy() for v in model.weights], writer))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    (plain, _), (skip, writer) = results
    for a, b in zip(plain, skip):
        np.testing.assert_array_equal(a, b)
    overflows = series(writer, tags.OVERFLOW_STEPS)[80]
    assert overflows > 0 and series(writer, tags.SKIPPED_STEPS)[80] == overflows
    assert series(writer, tags.SPIKE_COUNT)[80] == 0
    z = series(writer, tags.SPIKE_ZSCORE)  # written on the steps that did not overflow
    assert len(z) == 80 - overflows
    judged = [s for s in sorted(z) if np.isfinite(z[s])]
    assert judged == sorted(z)[25:]  # the first 25 finite norms are the warm-up


class OwnStep(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.trainable_variables),
                                           self.trainable_variables))
        return {"loss": loss}


class MixedOwnStep(gradmon.GradientMonitorMixin, OwnStep):
    pass


@pytest.mark.parametrize("kind", ["monitor", "mixin"])
def test_a_model_with_its_own_train_step_is_judged_on_the_norm_only(kind):
    keras.utils.set_random_seed(0)
    if kind == "mixin":
        model = MixedOwnStep(gradient_on_spike="warn")
    else:
        model = OwnStep()
        assert gradmon.monitor(model, on_spike="warn") is model  # its own step is kept
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    writer = MemoryWriter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, Y, batch_size=4, shuffle=False, verbose=0,
                  callbacks=[gradmon.GradientMonitor(writer=writer, update_freq=10)])
    assert tags.SPIKE_LOSS_ZSCORE not in writer.scalars  # no loss reaches the optimizer's door
    assert SPIKE_BATCH in series(writer, tags.SPIKE_AT)
    assert np.isfinite(series(writer, tags.SPIKE_ZSCORE)[40])
    assert any(f"spike at step {SPIKE_BATCH}" in str(c.message) or f"steps {SPIKE_BATCH} " in str(c.message)
               for c in caught)


@pytest.mark.parametrize("kind", ["monitor", "own_step", "mixin"])
def test_fit_judges_only_full_batches_whatever_the_train_step(kind):
    """158 examples in batches of 4: steps 40 and 80 (two epochs) hold 2 examples. gradmon's
    own step, a model's own `train_step` kept by `monitor` and the mixin's all hand the batch
    size over: those steps are neither judged nor folded in, against a replay of the norms (and
    losses) computed by hand from the weights before each batch."""
    keras.utils.set_random_seed(0)
    if kind == "monitor":
        model = gradmon.monitor(linear(), on_spike="warn")
    elif kind == "mixin":
        model = MixedOwnStep(gradient_on_spike="warn")
    else:
        model = OwnStep()
        gradmon.monitor(model, on_spike="warn")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model(X[:1])  # built: the weights before the first batch are read
    writer, before = MemoryWriter(), WeightsBefore()
    x, y = X[:158], Y[:158]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                  callbacks=[before, gradmon.GradientMonitor(writer=writer, update_freq=1)])
    sizes = ([4] * 39 + [2]) * 2
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 158, 4)] * 2
    pairs = [numpy_norm_and_loss(k, b, xb, yb) for (k, b), (xb, yb) in zip(before.weights, batches)]
    zs, found, _ = replay_detector([p[0] for p in pairs], THRESHOLD, batches=sizes)
    written = series(writer, tags.SPIKE_ZSCORE)
    assert sorted(written) == list(range(1, 81))
    np.testing.assert_allclose([written[s] for s in range(1, 81)], zs, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert np.isnan(written[40]) and np.isnan(written[80]) and np.isfinite(written[41])
    observer = gradmon.observer.observer_of(model.optimizer)
    assert [s for s, _ in observer.spikes_seen] == [s for s, _ in found]
    assert SPIKE_BATCH in [s for s, _ in found]
    if kind == "monitor":  # the loss too: the loss itself, full batches only
        loss_zs, _, _ = replay_detector([p[1] for p in pairs], THRESHOLD, log=False, batches=sizes)
        loss_written = series(writer, tags.SPIKE_LOSS_ZSCORE)
        np.testing.assert_allclose([loss_written[s] for s in range(1, 81)], loss_zs, rtol=1e-4,
                                   atol=1e-5, equal_nan=True)


# -- a fit without GradientMonitor: the policies are still heard ------------------

def gradmon_warnings(caught):
    return [str(c.message) for c in caught if str(c.message).startswith("gradmon:")]


def test_stop_without_a_gradient_monitor_ends_fit_naming_the_step():
    """Without the watch a stopped model went on fitting (refusing every update) in silence."""
    model = gradmon.monitor(linear(), on_spike="stop")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(X, Y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 1  # ended in the first epoch, not after three
    assert int(model.optimizer.iterations.numpy()) == SPIKE_BATCH - 1
    messages = gradmon_warnings(caught)
    assert len(messages) == 1 and f"spike (z = " in messages[0] and \
        f"at step {SPIKE_BATCH} (on_spike='stop')" in messages[0]


def test_nonfinite_stop_without_a_gradient_monitor_names_the_exact_step():
    x = X.copy()
    x[4 * 6] = np.nan  # batch 7; nothing is measured without a GradientMonitor
    model = gradmon.monitor(linear(), on_nonfinite="stop")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, Y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.History()])  # the user's list, kept
    assert int(model.optimizer.iterations.numpy()) == 6
    assert gradmon_warnings(caught) == [
        "gradmon: non-finite gradients at step 7 (on_nonfinite='stop'): that update and every later "
        "one were not applied; training stops."]


def test_skip_and_warn_without_a_gradient_monitor_are_heard_at_the_epoch_end():
    x = X.copy()
    x[4 * 2] = np.nan  # batch 3: refused under skip
    model = gradmon.monitor(linear(), on_nonfinite="skip", on_spike="warn")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # positional callbacks (x, y, batch_size, epochs, verbose, callbacks): the watch joins them
        model.fit(x, Y, 4, 1, 0, [keras.callbacks.History()], shuffle=False)
    messages = gradmon_warnings(caught)
    assert any(m.startswith("gradmon: gradient-norm spike") and f" {SPIKE_BATCH} (z = " in m
               and "the update was applied" in m for m in messages)
    assert any(m.startswith("gradmon: 1 update(s) in epoch 1 had non-finite gradients") for m in messages)
    assert int(model.optimizer.iterations.numpy()) == len(X) // 4 - 1


def test_a_gradient_monitor_replaces_the_watch():
    model = gradmon.monitor(linear(), on_spike="stop")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    monitor = gradmon.GradientMonitor(writer=MemoryWriter(), update_freq=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, Y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    assert monitor.stopped_at == SPIKE_BATCH
    assert len(gradmon_warnings(caught)) == 1  # one message, not the watch's too


def test_a_model_with_its_own_train_step_is_watched_too():
    keras.utils.set_random_seed(0)
    model = OwnStep()
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    assert gradmon.monitor(model, on_spike="stop") is model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(X, Y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 1
    assert int(model.optimizer.iterations.numpy()) == SPIKE_BATCH - 1
    assert len(gradmon_warnings(caught)) == 1


def test_spikes_refused_by_skip_are_not_reported_as_non_finite_updates():
    """The watch told refused spikes from non-finite updates by the spikes it read at the epoch end;
    in an eager fit they are read (and warned of) at their step, and the ring may overflow: a spike
    skipped under on_spike='skip' was then reported as an update with non-finite gradients."""
    model = gradmon.monitor(linear(), on_spike="skip")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", run_eagerly=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, Y, batch_size=4, shuffle=False, verbose=0)
    messages = gradmon_warnings(caught)
    assert any(m.startswith(f"gradmon: gradient-norm spike at step {SPIKE_BATCH} ") for m in messages)
    assert not any("non-finite" in m for m in messages), messages
    assert int(model.optimizer.iterations.numpy()) == len(X) // 4 - 1


@pytest.mark.parametrize("first", [0.0, 1.0])
def test_a_warm_up_without_variance_judges_nothing_until_the_norms_vary(first):
    """Equal norms in the warm-up (all-zero gradients, or a constant norm) give var = 0. ZClip's
    reference would clip every later norm to the mean, and the detector would call every later
    step a spike and fold it in at the mean: for good. Here nothing is judged until the norms
    vary (replays above: the same rule). The detector judges the log-norm: a zero norm is no
    value at all (its warm-up starts with the first non-zero norm)."""
    norms = [first] * 25 + [1.5, 1.6, 1.4, 1.5, 1.55, 1.45, 1.5, 30.0, 1.5]
    zs, found, _ = replay_detector(norms, THRESHOLD)
    clipped, _, flags = replay_zclip(norms, 2.5, 0.97, 25)
    assert np.isnan(zs[25])
    if first:
        assert found and found[-1][0] == 33  # the real outlier is still caught
    else:
        assert found == [] and np.isnan(zs).all()  # 9 non-zero norms: still in the warm-up
    var_ = tf.Variable(np.zeros(4, np.float32))
    opt = gradmon.observe(keras.optimizers.SGD(0.0), transform=T.zclip(), on_spike="warn", stats=["norm"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in norms:  # along one axis: the norm is exactly n (a constant has no variance)
            g = np.array([n, 0, 0, 0], np.float32)
            opt.apply_gradients([(tf.constant(g), var_)])
        snapshots = opt.gradmon.flush(MemoryWriter())
    tail = snapshots[-(len(norms) - 25):]  # the ring holds the last 16 steps
    assert [s.step for s in tail] == list(range(26, len(norms) + 1))
    np.testing.assert_allclose([s.values[tags.SPIKE_ZSCORE] for s in tail], zs[25:], rtol=1e-5,
                               equal_nan=True)
    np.testing.assert_allclose([s.values[tags.global_norm(tags.TRANSFORMED)] for s in tail],
                               clipped[25:], rtol=1e-5)
    assert clipped[25] == 1.5 and flags[-2] == 1.0  # not clipped to 0; the outlier clipped
    assert [s for s, _ in opt.gradmon.spikes_seen] == [s for s, _ in found]
