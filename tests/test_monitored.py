"""The monitored train step against independently computed gradients (plain tape + numpy)."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon.measure import transforms as T
from gradmon import tags
from helpers import global_norm, group_row, latest_snapshot, numpy_stats, tape_gradients

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 6)).astype(np.float32)
Y = RNG.integers(0, 3, size=32)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(jit_compile=False),
    "xla": dict(jit_compile=True),
}
LR = 0.1


def mlp(seed=0, relu=False):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu" if relu else "tanh"),
        keras.layers.Dense(3),
    ])


def one_step(model, transform=None, optimizer=None, mode="graph", sample_weight=None, **monitor_kwargs):
    """Fits `monitor(model)` one full-batch step; returns (monitored, w0, grads at w0, state snapshot)."""
    w0 = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    grads = tape_gradients(model, LOSS, X, Y, sample_weight)
    monitor_kwargs = {"grouping": "variable", "stats": "all", **monitor_kwargs}
    m = gradmon.monitor(model, transform=transform, **monitor_kwargs)
    m.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss=LOSS, **MODES[mode])
    m.fit(X, Y, sample_weight=sample_weight, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    return m, w0, grads, latest_snapshot(m)


def assert_group_stats(snapshot, kind, arrays, paths, rtol=1e-5):
    for p, a in zip(paths, arrays):
        np.testing.assert_allclose(group_row(snapshot, kind, p), numpy_stats(a), rtol=rtol, atol=1e-7)


def paths_of(model):
    return [v.path for v in model.trainable_variables]


@pytest.mark.parametrize("mode", list(MODES))
def test_raw_statistics_match_numpy(mode):
    model = mlp(relu=True)
    m, w0, grads, snap = one_step(model, mode=mode)
    assert snap.step == 1
    assert m.gradient_observer.recorder.spec.groups == paths_of(model)
    assert_group_stats(snap, "raw", grads, paths_of(model))
    assert snap[tags.global_norm("raw")] == pytest.approx(global_norm(grads), rel=1e-5)
    assert snap[tags.nonfinite_total("raw")] == 0 and snap[tags.NO_GRADIENT] == 0
    assert tags.CLIP_RATIO not in snap and tags.global_norm("transformed") not in snap
    w1 = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    for p, g, a, b in zip(paths_of(model), grads, w0, w1):
        # a zero-initialised bias: the ratios are undefined (NaN), not 0
        expected = np.linalg.norm(g) / np.linalg.norm(a) if np.linalg.norm(a) else np.nan
        assert snap[tags.grad_to_weight(p)] == pytest.approx(expected, rel=1e-5, nan_ok=True)
        expected = np.linalg.norm(b - a) / np.linalg.norm(a) if np.linalg.norm(a) else np.nan
        assert snap[tags.update_ratio(p)] == pytest.approx(expected, rel=1e-4, nan_ok=True)
        # SGD: the step taken is exactly lr * raw gradient
        np.testing.assert_allclose(b, a - LR * g, rtol=1e-5, atol=1e-7)


def numpy_clip(name, arg, grads, params):
    if name == "clip_by_value":
        return [np.clip(g, -arg, arg) for g in grads], np.mean(np.concatenate([np.abs(g).ravel() > arg for g in grads]))
    if name == "clip_by_norm":
        return [g * min(1, arg / np.linalg.norm(g)) for g in grads], np.mean([np.linalg.norm(g) > arg for g in grads])
    if name == "clip_by_global_norm":
        n = global_norm(grads)
        return [g * min(1, arg / n) for g in grads], float(n > arg)
    raise AssertionError(name)


TRANSFORM_CASES = {
    "clip_by_value": (lambda: T.clip_by_value(0.05), None, ("clip_by_value", 0.05)),
    "clip_by_norm": (lambda: T.clip_by_norm(0.1), None, ("clip_by_norm", 0.1)),
    "clip_by_global_norm": (lambda: T.clip_by_global_norm(0.1), None, ("clip_by_global_norm", 0.1)),
    "optimizer_clipnorm": (lambda: None, dict(clipnorm=0.1), ("clip_by_norm", 0.1)),
    "optimizer_global_clipnorm": (lambda: None, dict(global_clipnorm=0.1), ("clip_by_global_norm", 0.1)),
    "optimizer_clipvalue": (lambda: None, dict(clipvalue=0.05), ("clip_by_value", 0.05)),
}


@pytest.mark.parametrize("case", list(TRANSFORM_CASES))
def test_transformed_statistics_clip_ratio_and_applied_step(case):
    make, opt_kwargs, (name, arg) = TRANSFORM_CASES[case]
    model = mlp()
    m, w0, grads, snap = one_step(model, transform=make(), optimizer=keras.optimizers.SGD(LR, **(opt_kwargs or {})))
    clipped, fraction = numpy_clip(name, arg, grads, w0)
    assert_group_stats(snap, "raw", grads, paths_of(model))
    assert_group_stats(snap, "transformed", clipped, paths_of(model))
    assert snap[tags.global_norm("transformed")] == pytest.approx(global_norm(clipped), rel=1e-5)
    assert snap[tags.CLIP_RATIO] == pytest.approx(global_norm(clipped) / global_norm(grads), rel=1e-5)
    assert snap[tags.CLIP_FRACTION] == pytest.approx(fraction, rel=1e-6)
    assert 0 < snap[tags.CLIP_RATIO] < 1
    # the step applied equals clipping by hand
    for a, c, v in zip(w0, clipped, model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), a - LR * c, rtol=1e-5, atol=1e-7)


def test_adaptive_clip_and_chain_with_optimizer_clipping():
    model = mlp()
    transform = T.chain(T.adaptive_clip(0.02), T.clip_by_value(0.04))
    m, w0, grads, snap = one_step(model, transform=transform,
                                  optimizer=keras.optimizers.SGD(LR, global_clipnorm=0.05))
    out, units, clipped_units = [], 0, 0
    for g, w in zip(grads, w0):
        axes = tuple(range(w.ndim - 1)) if w.ndim > 1 else None
        wn = np.sqrt(np.sum(w**2, axis=axes, keepdims=w.ndim > 1))
        gn = np.sqrt(np.sum(g**2, axis=axes, keepdims=g.ndim > 1))
        bound = 0.02 * np.maximum(wn, 1e-3)
        out.append(np.where(gn > bound, g * bound / np.maximum(gn, 1e-6), g))
        units += np.size(gn)
        clipped_units += np.sum(gn > bound)
    agc_fraction = clipped_units / units
    value_clipped, value_fraction = numpy_clip("clip_by_value", 0.04, out, w0)
    final, global_fraction = numpy_clip("clip_by_global_norm", 0.05, value_clipped, w0)
    fractions = {n: snap[tags.clip_fraction_of(n)] for n in ("adaptive_clip", "clip_by_value", "clip_by_global_norm")}
    assert fractions == pytest.approx(
        {"adaptive_clip": agc_fraction, "clip_by_value": value_fraction, "clip_by_global_norm": global_fraction})
    assert snap[tags.CLIP_FRACTION] == pytest.approx(max(agc_fraction, value_fraction, global_fraction))
    assert snap[tags.CLIP_RATIO] == pytest.approx(global_norm(final) / global_norm(grads), rel=1e-5)
    assert_group_stats(snap, "transformed", final, paths_of(model))
    for a, c, v in zip(w0, final, model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), a - LR * c, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_no_observer_effect(mode):
    """Without a transform, a monitored fit ends on exactly the weights of a plain fit."""
    weights = []
    for monitored in (False, True):
        model = mlp(seed=3)
        if monitored:
            model = gradmon.monitor(model)
        keras.utils.set_random_seed(7)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, **MODES[mode])
        callbacks = [gradmon.GradientMonitor(f"/tmp/gradmon-test-noobs-{mode}")] if monitored else []
        model.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
        weights.append([v.numpy() for v in model.weights])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_sample_weights_and_two_inputs():
    keras.utils.set_random_seed(1)
    a, b = keras.Input((6,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(4, activation="tanh")(a), b])
    out = keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.01))(h)
    model = keras.Model([a, b], out)
    xb = RNG.normal(size=(32, 2)).astype(np.float32)
    sw = RNG.uniform(0.0, 2.0, size=32).astype(np.float32)
    w0 = [v.numpy() for v in model.trainable_variables]
    grads = tape_gradients(model, LOSS, [X, xb], Y, sw)
    m = gradmon.monitor(model, grouping="variable", stats="all")
    m.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS)
    m.fit([X, xb], Y, sample_weight=sw, batch_size=32, epochs=1, shuffle=False, verbose=0)
    snap = latest_snapshot(m)
    assert_group_stats(snap, "raw", grads, paths_of(model))
    for a0, g, v in zip(w0, grads, model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), a0 - LR * g, rtol=1e-5, atol=1e-7)


def test_layer_grouping_pools_a_layers_variables():
    model = mlp()
    m, w0, grads, snap = one_step(model, grouping="layer")
    layers = m.gradient_observer.recorder.spec.groups
    assert layers == [p.rsplit("/", 1)[0] for p in paths_of(model)[::2]]
    for i, layer in enumerate(layers):
        pooled = np.concatenate([grads[2 * i].ravel(), grads[2 * i + 1].ravel()])
        np.testing.assert_allclose(group_row(snap, "raw", layer), numpy_stats(pooled), rtol=1e-5)
        w = np.concatenate([w0[2 * i].ravel(), w0[2 * i + 1].ravel()])
        assert snap[tags.grad_to_weight(layer)] == pytest.approx(
            np.linalg.norm(pooled) / np.linalg.norm(w), rel=1e-5)


class Net(gradmon.GradientMonitorMixin, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.unused = keras.layers.Dense(2)
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.hidden(x))


def test_mixin_subclass_with_transform_and_unused_variables():
    keras.utils.set_random_seed(2)
    net = Net(gradient_transform=T.clip_by_global_norm(0.1), gradient_grouping="variable")
    net(X[:1])
    net.unused(X[:1, :8])  # built but never used in call: no gradient
    w0 = [v.numpy().astype(np.float64) for v in net.trainable_variables]
    grads = tape_gradients(net, LOSS, X, Y)
    assert sum(g is None for g in grads) == 2
    net.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    unused_paths = [v.path for v in net.unused.trainable_variables]
    assert any("no gradient" in str(w.message) and all(p in str(w.message) for p in unused_paths)
               for w in caught), [str(w.message) for w in caught]
    snap = latest_snapshot(net)
    assert snap[tags.NO_GRADIENT] == 2
    present = [g for g in grads if g is not None]
    clipped, _ = numpy_clip("clip_by_global_norm", 0.1, present, None)
    assert snap[tags.CLIP_RATIO] == pytest.approx(0.1 / global_norm(present), rel=1e-5)
    it = iter(clipped)
    for a, g, v in zip(w0, grads, net.trainable_variables):
        expected = a if g is None else a - LR * next(it)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-7)
    # configure_gradients switches the transform off: now the plain SGD step
    net.configure_gradients(transform=None, stats=["norm"])
    w1 = [v.numpy().astype(np.float64) for v in net.trainable_variables]
    grads = tape_gradients(net, LOSS, X, Y)
    net.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    assert latest_snapshot(net).step == 2
    for a, g, v in zip(w1, grads, net.trainable_variables):
        if g is not None:
            np.testing.assert_allclose(v.numpy(), a - LR * g, rtol=1e-5, atol=1e-7)


def test_monitor_shares_weights_with_the_original():
    model = mlp()
    m = gradmon.monitor(model)
    assert [id(v) for v in m.trainable_variables] == [id(v) for v in model.trainable_variables]
    np.testing.assert_allclose(m.predict(X, verbose=0), model.predict(X, verbose=0))


def test_monitor_of_a_compiled_model_is_compiled_alike():
    """The optimizer instance, loss, metrics and steps_per_execution carry over; training is Keras'."""
    plain = mlp()
    plain.compile(keras.optimizers.Adam(0.01), LOSS, metrics=["accuracy"], steps_per_execution=2)
    model = mlp()
    opt = keras.optimizers.Adam(0.01)
    model.compile(opt, LOSS, metrics=["accuracy"], steps_per_execution=2)
    m = gradmon.monitor(model)
    assert m.compiled and m.optimizer is opt and m.steps_per_execution == 2
    history = m.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    expected = plain.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert set(history.history) == set(expected.history) == {"loss", "accuracy"}
    for a, b in zip(m.trainable_variables, plain.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not gradmon.monitor(mlp()).compiled  # an uncompiled model: compile the result yourself


@pytest.mark.parametrize("kwargs,argument", [
    (dict(grouping="neuron"), "grouping"),
    (dict(stats=["norm", "kurtosis"]), "stats"),
    (dict(stats=[]), "stats"),
    (dict(transform=3.0), "transform"),
    (dict(stats=5), "stats"),
    (dict(penalties=5), "penalties"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"),
    (dict(noise_scale="no"), "noise_scale"),
])
def test_monitor_rejects_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"`{argument}`.*Received: {argument}="):
        gradmon.monitor(mlp(), **kwargs)


def test_monitor_rejects_non_models():
    with pytest.raises(ValueError, match="Expected a keras.Model. Received: model="):
        gradmon.monitor("model")


def bn_model(seed=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(keras.layers.Dense(16)(inputs)))
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def test_observer_effect_under_xla_is_as_documented(tmp_path):
    """The scoped claim of docs/guide/penalties.md: without XLA bit for bit; under XLA, where the extra reads of
    the gradient can change how XLA fuses the step (seen with BatchNorm), the first step is
    identical and later ones differ by float32 rounding that training amplifies."""
    class FirstStep(keras.callbacks.Callback):  # the weights after step 1 (the first batch of 8)
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                results[jit, monitored, 0] = [v.numpy() for v in self.model.weights]

    results = {}
    for jit, monitored in [(j, m) for j in (False, True) for m in (False, True)]:
        model = gradmon.monitor(bn_model()) if monitored else bn_model()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, jit_compile=jit)
        callbacks = [FirstStep()] + ([gradmon.GradientMonitor(str(tmp_path / f"{jit}"))] if monitored else [])
        model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        results[jit, monitored, 1] = [v.numpy() for v in model.weights]
    assert len(results) == 8
    for a, b in zip(results[False, False, 1], results[False, True, 1]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(results[True, False, 0], results[True, True, 0]):
        np.testing.assert_array_equal(a, b)  # one step: identical
    for a, b in zip(results[True, False, 1], results[True, True, 1]):
        np.testing.assert_allclose(a, b, atol=1e-3)
