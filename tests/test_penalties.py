"""Penalties: values, logged numbers and the updates they make, on every Keras backend.

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_penalties.py`): gradmon's
own train step is TensorFlow's `GradientTape` step, a `jax.vjp` step replacing the JAX trainer's
stateless `train_step`, or a `torch.autograd.grad` step. The reference is independent of every
framework: closed forms in NumPy float64 of the data loss's gradient (a linear model and a 3-4-2
tanh MLP with MSE), of each penalty and of its gradient -- for the gradient-norm penalty the
double-backward term `w H g / ||g||` (p=2), with the exact Hessian `H` of linear least squares.
One SGD step of a monitored `fit` must move the weights by `-lr * (data gradient + penalty
gradient)`, and gradmon must log the penalty's value, share, own gradient norm and the losses.
"""

import os
import warnings

import keras
import numpy as np
import pytest

import gradmon
from gradmon.measure import penalties as P
from gradmon import tags
from helpers import latest_snapshot, read_events, replay_spike_detector

RNG = np.random.default_rng(21)
X = RNG.normal(size=(16, 3)).astype(np.float32)
Y = RNG.normal(size=(16, 2)).astype(np.float32)
X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
LR = 0.1
# rtol for float32 training against float64 closed forms
RTOL = 2e-5


def linear(seed=0, hidden=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((3,))]
    if hidden:
        layers.append(keras.layers.Dense(4, activation="tanh"))
    layers.append(keras.layers.Dense(2))
    return keras.Sequential(layers)


def weights_of(model):
    return [np.asarray(keras.ops.convert_to_numpy(v.value), dtype=np.float64) for v in model.trainable_variables]


def data_gradients(w):
    """d mean((f(X) - Y)^2) / d w for a linear model [W, b] or a tanh MLP [W1, b1, W2, b2], by hand."""
    if len(w) == 2:
        d = 2.0 * (X64 @ w[0] + w[1] - Y64) / Y64.size
        return [X64.T @ d, d.sum(0)]
    w1, b1, w2, b2 = w
    h = np.tanh(X64 @ w1 + b1)
    d = 2.0 * (h @ w2 + b2 - Y64) / Y64.size
    dh = (d @ w2.T) * (1.0 - h ** 2)
    return [X64.T @ dh, dh.sum(0), h.T @ d, d.sum(0)]


def data_loss(w):
    if len(w) == 2:
        out = X64 @ w[0] + w[1]
    else:
        out = np.tanh(X64 @ w[0] + w[1]) @ w[2] + w[3]
    return float(np.mean((out - Y64) ** 2))


def one_step(model, penalties, tmp_path=None):
    """One SGD step (one batch of 16) of a monitored fit; `(model, w0, w1, snapshot)`."""
    w0 = weights_of(model)
    m = gradmon.monitor(model, penalties=penalties)
    m.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    callbacks = [gradmon.GradientMonitor(str(tmp_path))] if tmp_path else []
    history = m.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    m.history_loss = history.history["loss"][0]
    return m, w0, weights_of(model), latest_snapshot(m)


def check_step(w0, w1, penalty_gradients):
    for a, g, pg, b in zip(w0, data_gradients(w0), penalty_gradients, w1):
        np.testing.assert_allclose(b, a - LR * (g + pg), rtol=RTOL, atol=1e-6)


def norm(arrays):
    return float(np.sqrt(sum((a ** 2).sum() for a in arrays)))


def test_weight_penalty_value_gradient_and_logs(tmp_path):
    model = linear(hidden=True)
    m, w0, w1, snap = one_step(model, [P.WeightPenalty(l1=0.01, l2=0.05)], tmp_path)
    value = sum(0.01 * np.abs(w).sum() + 0.05 * (w ** 2).sum() for w in w0)
    data = data_loss(w0)
    assert snap[tags.penalty("weight")] == pytest.approx(value, rel=RTOL)
    assert snap[tags.LOSS_DATA] == pytest.approx(data, rel=RTOL)
    assert snap[tags.LOSS_TOTAL] == pytest.approx(data + value, rel=RTOL)
    assert m.history_loss == pytest.approx(data + value, rel=RTOL)  # the loss tracker gets the total
    assert snap[tags.penalty_share("weight")] == pytest.approx(value / (data + value), rel=RTOL)
    pen_grads = [0.01 * np.sign(w) + 0.1 * w for w in w0]
    assert snap[tags.penalty_grad_norm("weight")] == pytest.approx(norm(pen_grads), rel=RTOL)
    check_step(w0, w1, pen_grads)
    # the raw gradient statistics are those of the total gradient
    total = [g + pg for g, pg in zip(data_gradients(w0), pen_grads)]
    assert snap[tags.global_norm("raw")] == pytest.approx(norm(total), rel=RTOL)
    events = read_events(os.path.join(str(tmp_path), "train"))
    for tag in (tags.penalty("weight"), tags.penalty_share("weight"), tags.penalty_grad_norm("weight"),
                tags.LOSS_DATA, tags.LOSS_TOTAL):
        assert sorted(events[tag]) == [1]
    assert events[tags.LOSS_TOTAL][1] == pytest.approx(data + value, rel=RTOL)


def test_weight_penalty_include_chooses_the_weights():
    model = linear(hidden=True)
    m, w0, w1, snap = one_step(model, [P.WeightPenalty(l2=0.2, include=lambda v: "kernel" in v.path)])
    kernels = (0, 2)
    assert snap[tags.penalty("weight")] == pytest.approx(sum(0.2 * (w0[i] ** 2).sum() for i in kernels), rel=RTOL)
    check_step(w0, w1, [0.4 * w if i in kernels else 0 * w for i, w in enumerate(w0)])


@pytest.mark.parametrize("p", [2, 1, "inf"])
def test_gradient_norm_penalty_is_double_backprop(p):
    """Linear least squares, θ = [W; b] (4x2), Z = [X, 1]: g = 2/n Zᵀ(Zθ - Y) and its Hessian is
    2/n ZᵀZ per output, so d/dθ w||g||_p = w 2/n ZᵀZ s, s = g/||g|| (p=2), sign(g) (p=1), or
    sign(g) at the largest |g| (p=inf)."""
    model = linear(seed=3)
    weight = 0.3
    m, w0, w1, snap = one_step(model, [P.GradientNormPenalty(weight, p=p)])
    z = np.concatenate([X64, np.ones((len(X64), 1))], axis=1)
    g = np.concatenate([data_gradients(w0)[0], data_gradients(w0)[1][None]], axis=0)
    if p == 2:
        size, s = np.linalg.norm(g), g / np.linalg.norm(g)
    elif p == 1:
        size, s = np.abs(g).sum(), np.sign(g)
    else:
        size, s = np.abs(g).max(), np.zeros_like(g)
        at = np.unravel_index(np.argmax(np.abs(g)), g.shape)
        s[at] = np.sign(g[at])
    assert snap[tags.penalty("grad_norm")] == pytest.approx(weight * size, rel=RTOL)
    pen = weight * 2.0 / Y64.size * z.T @ z @ s
    assert snap[tags.penalty_grad_norm("grad_norm")] == pytest.approx(np.linalg.norm(pen), rel=1e-4)
    check_step(w0, w1, [pen[:3], pen[3]])


def test_gradient_norm_penalty_on_a_tanh_net_against_numerical_differences():
    """The double-backward gradient on a tanh MLP against central differences of the
    closed-form penalty w ||∇L(θ)|| (float64, step 1e-5)."""
    model = linear(seed=5, hidden=True)
    weight = 0.5
    m, w0, w1, snap = one_step(model, [P.GradientNormPenalty(weight)])

    def penalty(w):
        return weight * norm(data_gradients(w))

    assert snap[tags.penalty("grad_norm")] == pytest.approx(penalty(w0), rel=RTOL)
    numeric = []
    for i, w in enumerate(w0):
        grad = np.zeros_like(w)
        for at in np.ndindex(w.shape):
            plus = [v.copy() for v in w0]
            minus = [v.copy() for v in w0]
            plus[i][at] += 1e-5
            minus[i][at] -= 1e-5
            grad[at] = (penalty(plus) - penalty(minus)) / 2e-5
        numeric.append(grad)
    assert snap[tags.penalty_grad_norm("grad_norm")] == pytest.approx(norm(numeric), rel=1e-4)
    for a, g, pg, b in zip(w0, data_gradients(w0), numeric, w1):
        np.testing.assert_allclose(b, a - LR * (g + pg), rtol=1e-4, atol=1e-6)


def test_r1_and_wgan_gp_on_a_linear_critic():
    """Linear model f(x) = xW + b: ∇x sum(f) = W·1 for every example (closed form), whatever
    the interpolates."""
    for penalty, closed_form in [
        (P.InputGradientPenalty(0.7, kind="r1"),
         lambda W: (0.7 / 2 * np.sum(W.sum(1) ** 2), 0.7 * np.outer(W.sum(1), np.ones(2)))),
        (P.InputGradientPenalty(0.7, kind="wgan-gp", target=1.0),
         lambda W: (0.7 * (np.linalg.norm(W.sum(1)) - 1) ** 2,
                    np.outer(2 * 0.7 * (np.linalg.norm(W.sum(1)) - 1) * W.sum(1) / np.linalg.norm(W.sum(1)),
                             np.ones(2)))),
    ]:
        model = linear(seed=4)
        m, w0, w1, snap = one_step(model, [penalty])
        value, grad_w = closed_form(w0[0])
        assert snap[tags.penalty(penalty.name)] == pytest.approx(value, rel=RTOL)
        assert snap[tags.penalty_grad_norm(penalty.name)] == pytest.approx(np.linalg.norm(grad_w), rel=RTOL)
        check_step(w0, w1, [grad_w, np.zeros(2)])


def test_r1_on_a_tanh_critic():
    """f(x) = sum(tanh(x W1 + b1) W2 + b2): ∇x f = W1 ((1 - h²) ⊙ (W2·1)) per example; the
    penalty γ/2 mean ||∇x f||² and its weight gradient against central differences."""
    model = linear(seed=9, hidden=True)
    gamma = 0.8
    m, w0, w1, snap = one_step(model, [P.InputGradientPenalty(gamma, kind="r1")])

    def penalty(w):
        h = np.tanh(X64 @ w[0] + w[1])
        grads = ((1 - h ** 2) * w[2].sum(1)) @ w[0].T
        return gamma / 2 * np.mean((grads ** 2).sum(1))

    assert snap[tags.penalty("r1")] == pytest.approx(penalty(w0), rel=RTOL)
    numeric = []
    for i, w in enumerate(w0):
        grad = np.zeros_like(w)
        for at in np.ndindex(w.shape):
            plus, minus = [v.copy() for v in w0], [v.copy() for v in w0]
            plus[i][at] += 1e-6
            minus[i][at] -= 1e-6
            grad[at] = (penalty(plus) - penalty(minus)) / 2e-6
        numeric.append(grad)
    for a, g, pg, b in zip(w0, data_gradients(w0), numeric, w1):
        np.testing.assert_allclose(b, a - LR * (g + pg), rtol=1e-4, atol=1e-6)


def test_wgan_gp_draws_new_interpolates_every_step():
    """On a tanh critic the input gradient depends on the interpolates: two steps at learning
    rate 0 give two different penalty values (a key per step on JAX, not one frozen draw)."""
    model = gradmon.monitor(linear(seed=2, hidden=True), penalties=[P.InputGradientPenalty(1.0)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    values = []

    class Collect(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            values.append(latest_snapshot(model)[tags.penalty("wgan_gp")])

    model.fit(X, Y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[Collect()])
    assert len(values) == 3 and len(set(values)) == 3, values


def test_penalties_of_weight_zero_change_nothing():
    finals = []
    for penalties in (None, [P.WeightPenalty(l1=0.0, l2=0.0), P.GradientNormPenalty(0.0),
                             P.InputGradientPenalty(0.0, kind="r1")]):
        model = gradmon.monitor(linear(seed=6, hidden=True), penalties=penalties)
        keras.utils.set_random_seed(1)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.fit(X, Y, batch_size=4, epochs=2, verbose=0)
        finals.append([keras.ops.convert_to_numpy(v.value) for v in model.weights])
    for a, b in zip(*finals):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_mixin_with_gradient_penalties():
    class Net(gradmon.GradientMonitorMixin, keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    keras.utils.set_random_seed(0)
    net = Net(gradient_penalties=[P.WeightPenalty(l2=0.25)])
    net(X[:1])
    w0 = weights_of(net)
    net.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    net.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert latest_snapshot(net)[tags.penalty("weight")] == pytest.approx(
        sum(0.25 * (w ** 2).sum() for w in w0), rel=RTOL)
    check_step(w0, weights_of(net), [0.5 * w for w in w0])


def test_input_gradient_penalty_value_helper_matches_closed_form():
    critic = linear(seed=8)
    W = weights_of(critic)[0]
    real, fake = X, RNG.normal(size=X.shape).astype(np.float32)
    pen = P.InputGradientPenalty(2.0, kind="wgan-gp", target=0.5).value(critic, real, fake)
    assert float(keras.ops.convert_to_numpy(pen)) == pytest.approx(
        2.0 * (np.linalg.norm(W.sum(1)) - 0.5) ** 2, rel=RTOL)


def test_input_gradient_penalty_refuses_integer_inputs():
    inputs = keras.Input((3,), dtype="int32")
    critic = keras.Model(inputs, keras.layers.Dense(1)(keras.ops.cast(inputs, "float32")))
    with pytest.raises(ValueError, match="floating-point inputs"):
        P.InputGradientPenalty(1.0, kind="r1").value(critic, X.astype(np.int32))


@pytest.mark.tensorflow_only
def test_gradient_norm_penalty_matches_an_explicit_tensorflow_hessian():
    """d/dθ (w ||∇L||) = w H ∇L / ||∇L||, with H TensorFlow's explicit Hessian of a tanh net."""
    import tensorflow as tf

    from helpers import explicit_hessian

    def mse_of(model, x, y):
        return tf.reduce_mean(tf.square(model(x, training=False) - y))

    model = linear(hidden=True)
    H = explicit_hessian(model, mse_of, X, Y)
    weight = 0.3
    m, w0, w1, snap = one_step(model, [P.GradientNormPenalty(weight)])
    g = np.concatenate([x.ravel() for x in data_gradients(w0)])
    assert snap[tags.penalty("grad_norm")] == pytest.approx(weight * np.linalg.norm(g), rel=1e-5)
    pen = weight * H @ g / np.linalg.norm(g)
    assert snap[tags.penalty_grad_norm("grad_norm")] == pytest.approx(np.linalg.norm(pen), rel=1e-4)
    step = np.concatenate([(a - b).ravel() for a, b in zip(w0, w1)]) / LR
    np.testing.assert_allclose(step, g + pen, rtol=1e-4, atol=1e-6)


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


def test_own_step_hands_the_penalized_loss_to_the_spike_detector():
    """on_spike with a penalty: gradmon's own step hands the total loss (data + penalty, as the
    loss tracker gets it) to the spike detector; its loss z-scores equal a NumPy replay of the
    losses computed from the weights before each batch."""
    from gradmon.publish.writer import MemoryWriter

    rng = np.random.default_rng(3)
    x = rng.normal(size=(160, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + rng.normal(scale=0.3, size=(160, 1))).astype(np.float32)
    x[120:124] *= 30.0  # one batch far off: a loss spike
    keras.utils.set_random_seed(0)
    model = gradmon.monitor(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]),
                            penalties=[P.WeightPenalty(l2=0.05)], on_spike="warn")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    before = []

    class WeightsBefore(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            before.append(weights_of(self.model))  # JAX: `self.model` syncs the state

    writer = MemoryWriter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0,
                  callbacks=[WeightsBefore(), gradmon.GradientMonitor(writer=writer, update_freq=7)])
    losses = []
    for i, (kernel, bias) in enumerate(before):
        xb, yb = x[4 * i:4 * i + 4].astype(np.float64), y[4 * i:4 * i + 4].astype(np.float64)
        losses.append(np.mean((xb @ kernel + bias - yb) ** 2) + 0.05 * ((kernel ** 2).sum() + (bias ** 2).sum()))
    zs, _, _ = replay_spike_detector(losses, gradmon.spikes.DEFAULT_SPIKE_THRESHOLD, log=False)  # the loss itself
    written = {s: float(v) for s, v in writer.scalars[tags.SPIKE_LOSS_ZSCORE]}
    steps = sorted(written)
    assert steps == list(range(7, 41, 7))
    np.testing.assert_allclose([written[s] for s in steps], zs[np.array(steps) - 1], rtol=1e-4, atol=1e-5,
                               equal_nan=True)
    assert np.isfinite(written[35]) and zs[30] > gradmon.spikes.DEFAULT_SPIKE_THRESHOLD


@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="Keras' PyTorch trainer refuses steps_per_execution > 1")
def test_steps_per_execution_logs_the_same_penalties_and_noise_scale():
    """Several steps per execution (JAX: several train steps in one jitted function): each step's
    penalty numbers and half-batch moments reach its own apply, as with one step at a time."""
    from gradmon.publish.writer import MemoryWriter

    logged = []
    for steps_per_execution in (1, 4):
        model = gradmon.monitor(linear(seed=7, hidden=True), noise_scale=True,
                                penalties=[P.WeightPenalty(l2=0.1), P.GradientNormPenalty(0.2)])
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", steps_per_execution=steps_per_execution)
        writer = MemoryWriter()
        model.fit(X, Y, batch_size=4, shuffle=False, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
        logged.append({tag: dict(writer.scalars[tag]) for tag in (
            tags.penalty("grad_norm"), tags.penalty_grad_norm("weight"), tags.LOSS_TOTAL, tags.NOISE_SCALE)})
    for tag, one in logged[0].items():
        assert sorted(one) == [1, 2, 3, 4], tag
        np.testing.assert_allclose([logged[1][tag][s] for s in one], list(one.values()), rtol=1e-6, err_msg=tag)


def test_a_loss_scale_optimizer_changes_no_penalty_number_and_no_update():
    """Under `LossScaleOptimizer` (scale 1024, no overflow) every part of the loss is scaled
    alike and unscaled before use: the gradient-norm penalty sees the unscaled data gradient,
    the logged penalty gradient norms are unscaled, and the step equals plain SGD's closed form."""
    penalties = [P.WeightPenalty(l2=0.05), P.GradientNormPenalty(0.3)]
    model = linear(seed=3)
    w0 = weights_of(model)
    m = gradmon.monitor(model, penalties=penalties)
    m.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR), initial_scale=1024.0),
              loss="mse")
    m.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    snap, w1 = latest_snapshot(m), weights_of(model)
    z = np.concatenate([X64, np.ones((len(X64), 1))], axis=1)
    g = np.concatenate([data_gradients(w0)[0], data_gradients(w0)[1][None]], axis=0)
    grad_norm_part = 0.3 * 2.0 / Y64.size * z.T @ z @ g / np.linalg.norm(g)
    assert snap[tags.penalty("grad_norm")] == pytest.approx(0.3 * np.linalg.norm(g), rel=RTOL)
    assert snap[tags.penalty_grad_norm("grad_norm")] == pytest.approx(np.linalg.norm(grad_norm_part), rel=1e-4)
    assert snap[tags.penalty_grad_norm("weight")] == pytest.approx(norm([0.1 * w for w in w0]), rel=RTOL)
    check_step(w0, w1, [0.1 * w0[0] + grad_norm_part[:3], 0.1 * w0[1] + grad_norm_part[3]])
