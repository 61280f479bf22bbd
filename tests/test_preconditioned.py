"""Preconditioned sharpness, the optimizer's own edge of stability, the gradient overlap.

References are independent of the code under test: `P` is written out here
from each Keras optimizer's `update_step` and checked by replaying one real
update (`w_after = w_before - lr * u / P`); thresholds are checked against
the Keras optimizer's own dynamics on a quadratic (it converges just below
the threshold and diverges just above); spectra against `eigvalsh` of an
explicit `P^-1/2 H P^-1/2`; the overlap against an explicit
eigendecomposition and a tape gradient.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon import hessian, tags
from gradmon.hessian import preconditioner
from helpers import explicit_hessian, read_events

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(21)
X = RNG.normal(size=(48, 4)).astype(np.float32)
Y = RNG.normal(size=(48, 1)).astype(np.float32)
LR = 0.1
SHAPES = [(3, 2), (4,)]


def slot(optimizer, name, variable):
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return np.asarray(getattr(optimizer, name)[optimizer._get_variable_index(variable)], np.float64)


def reference_p(opt, v):
    """`P` with `update = lr * u / P`, read from the slots as Keras' update_step (keras 3.15) uses them."""
    opt = getattr(opt, "inner_optimizer", opt)
    t, eps = int(opt.iterations.numpy()), opt.epsilon
    if isinstance(opt, keras.optimizers.Adam):
        vel = slot(opt, "_velocity_hats" if opt.amsgrad else "_velocities", v)
        alpha = np.sqrt(1 - opt.beta_2**t) / (1 - opt.beta_1**t)  # Keras: lr * alpha * m / (sqrt(v) + eps)
        return (np.sqrt(vel) + eps) / alpha
    if isinstance(opt, keras.optimizers.Adamax):  # lr * m / ((1 - b1^t) (u + eps))
        return (1 - opt.beta_1**t) * (slot(opt, "_u", v) + eps)
    if isinstance(opt, keras.optimizers.Nadam):  # lr * m_hat / (sqrt(v / (1 - b2^t)) + eps)
        return np.sqrt(slot(opt, "_velocities", v) / (1 - opt.beta_2**t)) + eps
    if isinstance(opt, keras.optimizers.RMSprop):  # lr * g / sqrt(v [- mg^2] + eps)
        denominator = slot(opt, "_velocities", v) + eps
        if opt.centered:
            denominator -= slot(opt, "_average_gradients", v) ** 2
        return np.sqrt(denominator)
    if isinstance(opt, keras.optimizers.Adagrad):  # lr * g / sqrt(acc + eps)
        return np.sqrt(slot(opt, "_accumulators", v) + eps)
    raise AssertionError(type(opt))


def nadam_m_hat(opt, m, g, t):
    """Nadam's m_hat at step t (Keras' update_step), its momentum-schedule product replayed from 1."""
    b1 = opt.beta_1
    u = lambda s: b1 * (1 - 0.5 * 0.96**s)  # noqa: E731
    product = np.prod([u(s) for s in range(1, t + 1)])
    return u(t + 1) * m / (1 - product * u(t + 1)) + (1 - u(t)) * g / (1 - product)


ADAPTIVE = {
    "adam": lambda: keras.optimizers.Adam(LR),
    "amsgrad": lambda: keras.optimizers.Adam(LR, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(LR, weight_decay=0.1),
    "adamax": lambda: keras.optimizers.Adamax(LR),
    "nadam": lambda: keras.optimizers.Nadam(LR),
    "rmsprop": lambda: keras.optimizers.RMSprop(LR),
    "rmsprop_centered": lambda: keras.optimizers.RMSprop(LR, centered=True),
    "rmsprop_momentum": lambda: keras.optimizers.RMSprop(LR, momentum=0.5),
    "adagrad": lambda: keras.optimizers.Adagrad(LR),
    "loss_scale_adam": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(LR)),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_diagonal_reproduces_the_optimizers_update(name):
    """P from the slots equals Keras' formula, and the update just applied was lr * u / P."""
    opt = ADAPTIVE[name]()
    rng = np.random.default_rng(5)
    variables = [keras.Variable(rng.normal(size=s).astype("float32")) for s in SHAPES]
    opt.build(variables)
    scale = 1024.0 if name == "loss_scale_adam" else 1.0  # the LSO unscales what it is given

    def step():
        grads = [rng.normal(size=s).astype("float32") for s in SHAPES]
        opt.apply([tf.constant(g * scale) for g in grads], variables)
        return [g.astype(np.float64) for g in grads]

    assert preconditioner.diagonal(opt, variables) is None  # no update applied yet
    for _ in range(3):
        step()
    inner = getattr(opt, "inner_optimizer", opt)
    before = [v.numpy().astype(np.float64) for v in variables]
    moms_before = [slot(inner, "_momentums", v) for v in variables] if name == "rmsprop_momentum" else None
    grads = step()
    t = int(inner.iterations.numpy())
    assert t == 4
    diagonal = preconditioner.diagonal(opt, variables)
    for i, (v, p, w0, g) in enumerate(zip(variables, diagonal, before, grads)):
        assert p.shape == v.shape
        np.testing.assert_allclose(p, reference_p(opt, v), rtol=1e-12)
        if name in ("rmsprop", "rmsprop_centered", "adagrad"):
            u = g
        elif name == "rmsprop_momentum":  # momentum <- mu momentum + lr g / P; w -= momentum
            np.testing.assert_allclose(slot(inner, "_momentums", v) - 0.5 * moms_before[i], LR * g / p,
                                       rtol=1e-5, atol=1e-7)
            u = slot(inner, "_momentums", v) * p / LR
        elif name == "nadam":
            u = nadam_m_hat(inner, slot(inner, "_momentums", v), g, t)
        else:
            u = slot(inner, "_m" if name == "adamax" else "_momentums", v)
        expected = w0 - LR * u / p
        if name == "adamw":  # decoupled decay, applied before the update
            expected -= LR * 0.1 * w0
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6)
        assert np.median(np.abs(LR * u / p)) > 1e-2  # the update is far above the tolerance


def test_no_diagonal_where_none_is_applied():
    variables = [keras.Variable(np.ones(3, "float32"))]
    assert preconditioner.diagonal(keras.optimizers.Adam(), variables) is None  # not built
    for opt in (keras.optimizers.SGD(0.1, momentum=0.9), keras.optimizers.Lion()):
        opt.build(variables)
        opt.apply([tf.ones(3)], variables)
        assert preconditioner.diagonal(opt, variables) is None
        assert not preconditioner.is_adaptive(opt)
    other = keras.optimizers.Adam()
    other.build([keras.Variable(np.ones(2, "float32"))])
    other.iterations.assign(3)
    with pytest.raises(ValueError, match="Invalid value for argument `variables`"):
        preconditioner.diagonal(other, variables)


# --------------------------------------------------------------------------
# Thresholds: Keras' own update on f(w) = a w^2 / 2, P frozen by a huge second moment.

BIG = 1e6  # the second moment (or Adamax's u): P ~ 1e3, the gradients' share negligible

THRESHOLDS = {
    "sgd": (lambda: keras.optimizers.SGD(1.0), None, 2.0),
    "momentum": (lambda: keras.optimizers.SGD(1.0, momentum=0.9), None, 3.8),
    "nesterov": (lambda: keras.optimizers.SGD(1.0, momentum=0.9, nesterov=True), None, 3.8 / 2.8),
    "adam": (lambda: keras.optimizers.Adam(1.0, beta_2=0.99999), "_velocities", 38.0),
    "adamw": (lambda: keras.optimizers.AdamW(1.0, weight_decay=0.0, beta_2=0.99999), "_velocities", 38.0),
    "adamax": (lambda: keras.optimizers.Adamax(1.0, beta_2=0.99999), "_u", 38.0),
    "nadam": (lambda: keras.optimizers.Nadam(1.0, beta_2=0.99999), "_velocities", 3.8 / 0.28),
    "rmsprop": (lambda: keras.optimizers.RMSprop(1.0, rho=0.99999), "_velocities", 2.0),
    "rmsprop_momentum": (lambda: keras.optimizers.RMSprop(1.0, rho=0.99999, momentum=0.5),
                         "_velocities", 3.0),
    "adagrad": (lambda: keras.optimizers.Adagrad(1.0), "_accumulators", 2.0),
}


def quadratic_growth(opt, second_moment, factor, steps):
    """max |w| over the last 20 of `steps` updates of `opt` on a w^2 / 2 (w0 = 1e-4), with
    a = factor * threshold (* P), over |w0|."""
    w = keras.Variable(np.array([1e-4], "float32"))
    opt.build([w])
    inner = getattr(opt, "inner_optimizer", opt)
    curvature = factor * preconditioner.stability_threshold(opt).value
    if second_moment is not None:
        inner.iterations.assign(10**7)  # bias corrections and Nadam's momentum schedule settled
        getattr(inner, second_moment)[0].assign([BIG])
        if isinstance(inner, keras.optimizers.Nadam):  # settle its schedule's running product
            inner._u_product.assign(0.0)
        curvature *= preconditioner.diagonal(opt, [w])[0][0]  # a = factor * threshold * P
    a = tf.constant(curvature, tf.float32)

    @tf.function
    def run():
        peak = tf.constant(0.0)
        for i in tf.range(steps):
            opt.apply([a * w.value], [w])
            if i >= steps - 20:
                peak = tf.maximum(peak, tf.abs(w.value[0]))
        return peak

    return float(run()) / 1e-4


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_threshold_is_where_the_optimizer_diverges(name):
    """Below the threshold (0.9x) Keras' update converges on a quadratic; above it (1.1x) it diverges."""
    make, second_moment, value_at_lr_1 = THRESHOLDS[name]
    threshold = preconditioner.stability_threshold(make())
    assert threshold.value == pytest.approx(value_at_lr_1, rel=1e-6)
    assert threshold.preconditioned == (second_moment is not None)
    assert quadratic_growth(make(), second_moment, 0.9, 150) < 0.05
    assert quadratic_growth(make(), second_moment, 1.1, 60) > 50


def test_threshold_scales_with_the_current_learning_rate():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])
    opt = keras.optimizers.Adam(schedule)
    opt.build([keras.Variable(np.ones(1, "float32"))])
    assert preconditioner.stability_threshold(opt).value == pytest.approx(380.0, rel=1e-6)
    opt.iterations.assign(5)
    assert preconditioner.stability_threshold(opt).value == pytest.approx(3800.0, rel=1e-6)
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.5, momentum=0.5))
    assert preconditioner.stability_threshold(wrapped).value == pytest.approx(3.0 / 0.5)
    assert preconditioner.stability_threshold(keras.optimizers.Lion()) is None
    assert preconditioner.stability_threshold(keras.optimizers.SGD(0.0)) is None  # no edge at lr 0
    assert preconditioner.stability_threshold(keras.optimizers.Adadelta()) is None


# --------------------------------------------------------------------------
# Spectra against an explicit Hessian.


def mse(model, x, y):
    return tf.reduce_mean(tf.square(model(x, training=False) - y))


def trained(optimizer, steps=6):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=8, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    return model


def explicit_preconditioned(model, x, y):
    """Descending eigenvalues and eigenvectors of P^-1/2 H P^-1/2, P from the slots as written above."""
    h = explicit_hessian(model, mse, x, y)
    p = np.concatenate([reference_p(model.optimizer, v).ravel() for v in model.trainable_variables])
    scale = 1 / np.sqrt(p)
    values, vectors = np.linalg.eigh(scale[:, None] * h * scale[None, :])
    return values[::-1], vectors[:, ::-1]


@pytest.mark.parametrize("make", [lambda: keras.optimizers.Adam(0.05),
                                  lambda: keras.optimizers.RMSprop(0.01, centered=True)])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_preconditioned_spectrum_matches_explicit(make, method):
    model = trained(make())
    exact, vectors = explicit_preconditioned(model, X, Y)
    assert exact[0] > 2 * np.linalg.eigvalsh(explicit_hessian(model, mse, X, Y))[-1]  # P^-1 matters here
    spec = hessian.spectrum(model, (X, Y), top_k=2, tol=1e-6, seed=0, method=method,
                            preconditioner=model.optimizer)
    np.testing.assert_allclose(spec.eigenvalues, exact[:2], rtol=1e-4)
    assert np.all(spec.residuals <= 1e-4 * exact[0])
    assert abs(spec.eigenvectors[0] @ vectors[:, 0]) == pytest.approx(1.0, abs=1e-4)
    # the residuals are those of that operator: recomputed here from the explicit matrix
    h = explicit_hessian(model, mse, X, Y)
    p = np.concatenate([reference_p(model.optimizer, v).ravel() for v in model.trainable_variables])
    a = h / np.sqrt(p)[:, None] / np.sqrt(p)[None, :]
    for u, value in zip(spec.eigenvectors, spec.eigenvalues):
        assert np.linalg.norm(a @ u - value * u) <= 1e-4 * exact[0]


def test_preconditioner_as_arrays_and_warm_start():
    model = trained(keras.optimizers.Adam(0.05))
    exact, _ = explicit_preconditioned(model, X, Y)
    hvp = hessian.make_hvp(model, (X, Y))
    diagonal = [reference_p(model.optimizer, v) for v in model.trainable_variables]
    op = hessian.precondition(hvp, diagonal)
    flat = hessian.spectrum(hvp, top_k=1, tol=1e-6, seed=1, preconditioner=np.concatenate(
        [d.ravel() for d in diagonal]))
    cold = hessian.spectrum(op, top_k=1, tol=1e-6, seed=0)
    warm = hessian.spectrum(op, top_k=1, tol=1e-6, init_vectors=cold)
    for spec in (flat, cold, warm):
        assert spec.eigenvalues[0] == pytest.approx(exact[0], rel=1e-5)
    assert warm.hvp_count < cold.hvp_count
    assert hvp.count == flat.hvp_count + cold.hvp_count + warm.hvp_count  # every product is one HVP
    h = explicit_hessian(model, mse, X, Y)  # trace(P^-1/2 H P^-1/2) = sum_i H_ii / P_i
    p = np.concatenate([d.ravel() for d in diagonal])
    estimate = hessian.trace(op, num_samples=200, seed=0)
    assert abs(estimate.value - np.sum(np.diag(h) / p)) <= 4 * estimate.stderr


@pytest.mark.parametrize("kwargs", [dict(preconditioner=keras.optimizers.SGD()),
                                    dict(preconditioner=np.ones(3)), dict(preconditioner=[np.ones((4, 5))]),
                                    dict(preconditioner=-np.ones(31))])
def test_bad_preconditioner_is_named(kwargs):
    model = trained(keras.optimizers.SGD(0.01), steps=1)
    with pytest.raises(ValueError, match="Invalid value for argument `preconditioner`"):
        hessian.spectrum(model, (X, Y), **kwargs)


def test_gradient_overlap_matches_explicit_eigendecomposition():
    model = trained(keras.optimizers.SGD(0.05))
    h = explicit_hessian(model, mse, X, Y)
    values, vectors = np.linalg.eigh(h)
    with tf.GradientTape() as tape:
        loss = mse(model, X, Y)
    g = np.concatenate([t.numpy().ravel() for t in tape.gradient(loss, model.trainable_variables)]).astype(np.float64)
    hvp = hessian.make_hvp(model, (X, Y))
    spec = hessian.spectrum(hvp, top_k=3, tol=1e-7, seed=0)
    exact = np.sum((vectors[:, -3:].T @ g) ** 2) / (g @ g)
    assert 0.05 < exact < 0.999  # neither trivial end
    assert hessian.gradient_overlap(spec, hvp) == pytest.approx(exact, rel=1e-4)
    assert hessian.gradient_overlap(spec.eigenvectors, g) == pytest.approx(exact, rel=1e-4)
    mixed = np.array([[1.0, 1.0], [1.0, -2.0]]) @ vectors[:, -2:].T  # spans v_1, v_2, not orthonormal
    pair = np.sum((vectors[:, -2:].T @ g) ** 2) / (g @ g)
    assert hessian.gradient_overlap(mixed, g) == pytest.approx(pair, rel=1e-8)
    assert hessian.gradient_overlap(vectors.T, g) == pytest.approx(1.0, rel=1e-10)
    assert np.isnan(hessian.gradient_overlap(spec, np.zeros_like(g)))


# --------------------------------------------------------------------------
# HessianMonitor: the tags, against the explicit matrices.


MONITORED = {
    "adam": (lambda: keras.optimizers.Adam(0.05), 3.8 / (0.1 * 0.05)),
    "loss_scale_adam": (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05)),
                        3.8 / (0.1 * 0.05)),
    "nesterov": (lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True), 3.8 / (2.8 * 0.05)),
    "lion": (lambda: keras.optimizers.Lion(0.001), None),
}


@pytest.mark.parametrize("name", sorted(MONITORED))
def test_monitor_writes_the_optimizers_edge_of_stability(tmp_path, name):
    make, threshold = MONITORED[name]
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=make(), loss="mse")
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=4, top_k=2, tol=1e-6)
    model.fit(X, Y, batch_size=6, epochs=1, shuffle=False, verbose=0, callbacks=[cb])  # 8 steps
    weights = [v.numpy() for v in model.weights + model.optimizer.variables]
    events = read_events(os.path.join(str(tmp_path), "train"))
    lr = float(keras.ops.convert_to_numpy(getattr(model.optimizer, "inner_optimizer", model.optimizer).learning_rate))
    plain = np.linalg.eigvalsh(explicit_hessian(model, mse, X, Y))[::-1]
    assert events[tags.GD_EDGE_OF_STABILITY][8] == pytest.approx(plain[0] * lr / 2, rel=1e-4)
    adaptive = preconditioner.is_adaptive(model.optimizer)
    assert (tags.preconditioned_eigenvalue(1) in events) == adaptive
    if adaptive:
        exact, _ = explicit_preconditioned(model, X, Y)
        assert sorted(events[tags.preconditioned_eigenvalue(1)]) == [4, 8]
        for i in (1, 2):
            assert events[tags.preconditioned_eigenvalue(i)][8] == pytest.approx(exact[i - 1], rel=1e-4)
            assert events[tags.preconditioned_residual(i)][8] <= 1e-5 * exact[0]
        sharpness = exact[0]
    else:
        sharpness = plain[0]
    if threshold is None:
        assert tags.EDGE_OF_STABILITY not in events and tags.STABILITY_THRESHOLD not in events
    else:
        assert events[tags.STABILITY_THRESHOLD][8] == pytest.approx(threshold, rel=1e-6)
        assert events[tags.EDGE_OF_STABILITY][8] == pytest.approx(sharpness / threshold, rel=1e-4)
    _, vectors = np.linalg.eigh(explicit_hessian(model, mse, X, Y))
    with tf.GradientTape() as tape:
        loss = mse(model, X, Y)
    g = np.concatenate([t.numpy().ravel() for t in tape.gradient(loss, model.trainable_variables)]).astype(np.float64)
    overlap = np.sum((vectors[:, -2:].T @ g) ** 2) / (g @ g)
    assert events[tags.GRADIENT_OVERLAP][8] == pytest.approx(overlap, rel=1e-3)
    cb.probe(9)  # a probe changes no weight or slot
    for before, v in zip(weights, model.weights + model.optimizer.variables):
        np.testing.assert_array_equal(before, v.numpy())


def test_monitor_without_preconditioned_probe_writes_no_ratio(tmp_path):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=2, preconditioned=False,
                                gradient_overlap=False)
    model.fit(X, Y, batch_size=12, epochs=1, verbose=0, callbacks=[cb])
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert tags.EDGE_OF_STABILITY not in events  # Adam's threshold is on the preconditioned sharpness
    assert tags.GRADIENT_OVERLAP not in events
    assert not [t for t in events if t.startswith(tags.PRECONDITIONED_EIGENVALUE_PREFIX)]
    assert events[tags.STABILITY_THRESHOLD][4] == pytest.approx(3800.0, rel=1e-6)
    assert sorted(events[tags.GD_EDGE_OF_STABILITY]) == [2, 4]
    with pytest.raises(ValueError, match=r"`preconditioned`.*Received: preconditioned='no'"):
        gradmon.HessianMonitor(str(tmp_path), data=(X, Y), preconditioned="no")
