"""Penalties: values and gradients against closed forms and an explicit Hessian."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon.measure import penalties as P
from gradmon import tags
from helpers import explicit_hessian, latest_snapshot, read_events, tape_gradients

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(21)
X = RNG.normal(size=(16, 3)).astype(np.float32)
Y = RNG.normal(size=(16, 2)).astype(np.float32)
LR = 0.1
MSE = keras.losses.MeanSquaredError()


def linear(seed=0, hidden=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((3,))]
    if hidden:
        layers.append(keras.layers.Dense(4, activation="tanh"))
    layers.append(keras.layers.Dense(2))
    return keras.Sequential(layers)


def one_step(model, penalties, tmp_path=None):
    w0 = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    g0 = tape_gradients(model, MSE, X, Y)
    m = gradmon.monitor(model, penalties=penalties)
    m.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    callbacks = [gradmon.GradientMonitor(str(tmp_path))] if tmp_path else []
    m.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    w1 = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    return m, w0, g0, w1, latest_snapshot(m)


def test_weight_penalty_value_gradient_and_logs(tmp_path):
    model = linear()
    m, w0, g0, w1, snap = one_step(model, [P.WeightPenalty(l1=0.01, l2=0.05)], tmp_path)
    value = sum(0.01 * np.abs(w).sum() + 0.05 * (w**2).sum() for w in w0)
    data = float(np.mean((X.astype(np.float64) @ w0[0] + w0[1] - Y) ** 2))
    assert snap[tags.penalty("weight")] == pytest.approx(value, rel=1e-5)
    assert snap[tags.LOSS_DATA] == pytest.approx(data, rel=1e-5)
    assert snap[tags.LOSS_TOTAL] == pytest.approx(data + value, rel=1e-5)
    assert snap[tags.penalty_share("weight")] == pytest.approx(value / (data + value), rel=1e-5)
    pen_grads = [0.01 * np.sign(w) + 0.1 * w for w in w0]
    assert snap[tags.penalty_grad_norm("weight")] == pytest.approx(
        np.sqrt(sum((g**2).sum() for g in pen_grads)), rel=1e-5)
    for a, g, pg, b in zip(w0, g0, pen_grads, w1):
        np.testing.assert_allclose(b, a - LR * (g + pg), rtol=1e-5, atol=1e-7)
    # the raw gradient statistics are those of the total gradient
    total = [g + pg for g, pg in zip(g0, pen_grads)]
    assert snap[tags.global_norm("raw")] == pytest.approx(np.sqrt(sum((t**2).sum() for t in total)), rel=1e-5)
    events = read_events(os.path.join(str(tmp_path), "train"))
    for tag in (tags.penalty("weight"), tags.penalty_share("weight"), tags.penalty_grad_norm("weight"),
                tags.LOSS_DATA, tags.LOSS_TOTAL):
        assert sorted(events[tag]) == [1]
    assert events[tags.LOSS_TOTAL][1] == pytest.approx(data + value, rel=1e-5)


def mse_of(model, x, y):
    return tf.reduce_mean(tf.square(model(x, training=False) - y))


def test_gradient_norm_penalty_is_double_backprop():
    """d/dθ (w ||∇L||) = w H ∇L / ||∇L||, with H the explicit Hessian."""
    model = linear(hidden=True)
    H = explicit_hessian(model, mse_of, X, Y)
    weight = 0.3
    m, w0, g0, w1, snap = one_step(model, [P.GradientNormPenalty(weight)])
    g = np.concatenate([x.ravel() for x in g0])
    assert snap[tags.penalty("grad_norm")] == pytest.approx(weight * np.linalg.norm(g), rel=1e-5)
    pen = weight * H @ g / np.linalg.norm(g)
    assert snap[tags.penalty_grad_norm("grad_norm")] == pytest.approx(np.linalg.norm(pen), rel=1e-4)
    step = np.concatenate([(a - b).ravel() for a, b in zip(w0, w1)]) / LR
    np.testing.assert_allclose(step, g + pen, rtol=1e-4, atol=1e-6)


def test_r1_and_wgan_gp_on_a_linear_critic():
    """Linear model f(x) = xW + b: ∇x sum(f) = W·1 for every example (closed form)."""
    for penalty, closed_form in [
        (P.InputGradientPenalty(0.7, kind="r1"),
         lambda W: (0.7 / 2 * np.sum(W.sum(1) ** 2), 0.7 * np.outer(W.sum(1), np.ones(2)))),
        (P.InputGradientPenalty(0.7, kind="wgan-gp", target=1.0),
         lambda W: (0.7 * (np.linalg.norm(W.sum(1)) - 1) ** 2,
                    np.outer(2 * 0.7 * (np.linalg.norm(W.sum(1)) - 1) * W.sum(1) / np.linalg.norm(W.sum(1)),
                             np.ones(2)))),
    ]:
        model = linear(seed=4)
        m, w0, g0, w1, snap = one_step(model, [penalty])
        value, grad_w = closed_form(w0[0])
        assert snap[tags.penalty(penalty.name)] == pytest.approx(value, rel=1e-5)
        np.testing.assert_allclose(w1[0], w0[0] - LR * (g0[0] + grad_w), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w1[1], w0[1] - LR * g0[1], rtol=1e-5, atol=1e-7)


def test_penalties_of_weight_zero_change_nothing():
    finals = []
    for penalties in (None, [P.WeightPenalty(l1=0.0, l2=0.0), P.GradientNormPenalty(0.0),
                             P.InputGradientPenalty(0.0, kind="r1")]):
        model = gradmon.monitor(linear(seed=6, hidden=True), penalties=penalties)
        keras.utils.set_random_seed(1)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.fit(X, Y, batch_size=4, epochs=2, verbose=0)
        finals.append([v.numpy() for v in model.weights])
    for a, b in zip(*finals):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_input_gradient_penalty_value_helper_matches_closed_form():
    critic = linear(seed=8)
    W = critic.trainable_variables[0].numpy().astype(np.float64)
    real, fake = X, RNG.normal(size=X.shape).astype(np.float32)
    pen = P.InputGradientPenalty(2.0, kind="wgan-gp", target=0.5).value(critic, real, fake)
    assert float(pen) == pytest.approx(2.0 * (np.linalg.norm(W.sum(1)) - 0.5) ** 2, rel=1e-5)


@pytest.mark.parametrize("factory,argument", [
    (lambda: P.WeightPenalty(l1=-1.0), "l1"),
    (lambda: P.WeightPenalty(l2="x"), "l2"),
    (lambda: P.GradientNormPenalty(0.1, p=3), "p"),
    (lambda: P.InputGradientPenalty(0.1, kind="gp"), "kind"),
    (lambda: P.InputGradientPenalty(-0.1), "weight"),
    (lambda: gradmon.monitor(linear(), penalties=[P.WeightPenalty(l2=1.0), "l2"]), "penalties"),
    (lambda: gradmon.monitor(linear(), penalties=[P.WeightPenalty(l2=1.0), P.WeightPenalty(l1=1.0)]), "penalties"),
])
def test_invalid_penalty_arguments(factory, argument):
    with pytest.raises(ValueError, match=rf"`{argument}`.*Received: {argument}="):
        factory()


def test_numpy_scalars_are_accepted_like_python_numbers():
    assert P.WeightPenalty(l1=np.float32(0.5), l2=np.int64(2)).get_config()["l2"] == 2.0
    assert P.GradientNormPenalty(np.float64(0.1)).weight == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"`weight`.*Received: weight=np.float64\(-1.0\)"):
        P.GradientNormPenalty(np.float64(-1.0))
