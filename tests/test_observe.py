"""Gradients observed wherever they are applied: custom loops, own train steps, two optimizers."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon import tags
from gradmon.measure import transforms as T
from helpers import global_norm, read_descriptions, read_events, tape_gradients

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(11)
X = RNG.normal(size=(32, 4)).astype(np.float32)
Y = RNG.normal(size=(32, 2)).astype(np.float32)
MSE = keras.losses.MeanSquaredError()
MAE = keras.losses.MeanAbsoluteError()
LR = 0.05


def net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(2)])


def numpy_global_clip(grads, max_norm):
    n = global_norm(grads)
    return [g * min(1.0, max_norm / n) for g in grads]


def loop(model, optimizer, steps, compiled):
    """The article's custom loop: tape, tape.gradient, optimizer.apply_gradients."""
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = MSE(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    step = tf.function(step, jit_compile=compiled == "xla") if compiled else step
    expected = []
    for i in range(steps):
        x, y = X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8]
        expected.append(tape_gradients(model, MSE, x, y))
        step(x, y)
    return expected


@pytest.mark.parametrize("compiled", [None, "graph", "xla"])
def test_custom_loop_norms_and_clip_ratios_equal_a_numpy_replay(tmp_path, compiled):
    model = net()
    w0 = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=str(tmp_path),
                          transform=T.clip_by_global_norm(0.3), update_freq=2, grouping="variable")
    assert isinstance(opt, keras.optimizers.SGD)
    expected = loop(model, opt, 4, compiled)
    if compiled:
        opt.flush()
        opt.flush()  # idempotent
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == [2, 4]
    for step in (2, 4):
        grads = expected[step - 1]
        assert events[tags.global_norm("raw")][step] == pytest.approx(global_norm(grads), rel=1e-5)
        clipped = numpy_global_clip(grads, 0.3)
        assert events[tags.CLIP_RATIO][step] == pytest.approx(global_norm(clipped) / global_norm(grads), rel=1e-5)
        path = model.trainable_variables[0].path
        assert events[tags.group_stat("transformed", "norm", path)][step] == pytest.approx(
            np.linalg.norm(clipped[0]), rel=1e-5)
    # the weights moved by the clipped gradients: replay all four steps in numpy
    replay = [w.copy() for w in w0]
    for grads in expected:
        replay = [w - LR * c for w, c in zip(replay, numpy_global_clip(grads, 0.3))]
    for a, v in zip(replay, model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), a, rtol=1e-5, atol=1e-6)


def test_custom_loop_without_transform_trains_as_plain():
    weights = []
    for observed in (False, True):
        model = net(seed=1)
        opt = keras.optimizers.Adam(0.01)
        if observed:
            opt = gradmon.observe(opt)
        loop(model, opt, 4, "graph")
        weights.append([v.numpy() for v in model.weights])
        if observed:
            snapshots = opt.flush()
            assert [s.step for s in snapshots] == [1, 2, 3, 4]  # no log_dir: only measured
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_two_named_optimizers_share_one_run(tmp_path):
    generator, critic = net(seed=2), net(seed=3)
    g_opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=str(tmp_path), name="generator")
    c_opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=str(tmp_path), name="critic",
                            transform=T.clip_by_value(0.01))
    expected_g = loop(generator, g_opt, 2, None)
    expected_c = loop(critic, c_opt, 2, None)
    events = read_events(os.path.join(str(tmp_path), "train"))
    for name, expected in (("generator", expected_g), ("critic", expected_c)):
        tag = tags.prefixed(name, tags.global_norm("raw"))
        assert events[tag] == {1: pytest.approx(global_norm(expected[0]), rel=1e-5),
                               2: pytest.approx(global_norm(expected[1]), rel=1e-5)}
    assert tags.prefixed("critic", tags.CLIP_RATIO) in events
    assert tags.prefixed("generator", tags.CLIP_RATIO) not in events
    assert not any(t.startswith("gradients/") for t in events)


def test_observe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`optimizer`.*Received: optimizer='adam'"):
        gradmon.observe("adam")
    with pytest.raises(ValueError, match="`update_freq`.*positive integer.*Received: update_freq=0"):
        gradmon.observe(keras.optimizers.SGD(), update_freq=0)
    with pytest.raises(ValueError, match="`log_dir`.*non-empty"):
        gradmon.observe(keras.optimizers.SGD(), log_dir="")
    with pytest.raises(ValueError, match="`name`"):
        gradmon.observe(keras.optimizers.SGD(), name="")
    opt = gradmon.observe(keras.optimizers.SGD())
    first = opt.gradmon
    assert gradmon.observe(opt) is opt and opt.gradmon is not first  # a cell run again: replaced
    assert gradmon.observer.observer_of(opt) is opt.gradmon


class OwnStep(keras.Model):
    """A model with its own train_step: its own tape and its own MAE loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, activation="tanh")
        self.out = keras.layers.Dense(2)
        self.mae_tracker = keras.metrics.Mean(name="mae_loss")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = MAE(y, self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.mae_tracker.update_state(loss)
        return {"mae_loss": self.mae_tracker.result()}


class MixedOwnStep(gradmon.GradientMonitorMixin, OwnStep):
    pass


def own_step_model(kind, seed=4):
    keras.utils.set_random_seed(seed)
    if kind == "mixin":
        model = MixedOwnStep()
    else:
        model = OwnStep()
    model(X[:1])
    if kind == "monitor":
        assert gradmon.monitor(model) is model  # kept, observed in place
    return model


@pytest.mark.parametrize("kind", ["monitor", "mixin"])
def test_own_train_step_is_kept_and_observed(tmp_path, kind):
    plain = own_step_model("plain")
    plain.compile(optimizer=keras.optimizers.SGD(LR))
    first_grads = tape_gradients(plain, MAE, X[:16], Y[:16])
    plain_history = plain.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    model = own_step_model(kind)
    model.compile(optimizer=keras.optimizers.SGD(LR))
    history = model.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                        callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    assert set(history.history) == {"mae_loss"}
    assert history.history == plain_history.history
    for a, b in zip(plain.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == [1, 2, 3, 4]
    assert events[tags.global_norm("raw")][1] == pytest.approx(global_norm(first_grads), rel=1e-5)


def test_own_train_step_with_penalties_or_noise_scale_fails_before_training():
    model = own_step_model("plain")
    with pytest.raises(ValueError, match="has its own `train_step`.*penalties need gradmon's own"):
        gradmon.monitor(model, penalties=[gradmon.penalties.WeightPenalty(l2=0.1)])
    mixed = own_step_model("mixin")
    with pytest.raises(ValueError, match="has its own `train_step`.*noise_scale"):
        mixed.configure_gradients(noise_scale=True)


def test_mixin_after_keras_model_is_a_clear_error():
    with pytest.raises(TypeError, match="must come before keras.Model.*Expected: class Wrong"):
        class Wrong(keras.Model, gradmon.GradientMonitorMixin):
            pass


class CosineToMomentum(gradmon.statistics.Statistic):
    """The documented user statistic (docs/ARCHITECTURE.md): cosine between each variable's
    gradient and Adam's first moment."""

    name = "cosine_to_momentum"
    needs_update = True  # read the moment after this step's update

    def labels(self, spec):
        return [str(i) for i in range(len(spec.segment_ids))]  # one per variable

    def tag(self, label):
        return f"gradients/cosine_to_momentum/{label}"

    def description(self, label):
        return "cos(gradient, Adam's first moment) of variable " + label

    def compute(self, ctx):
        from gradmon.backend import keras_compat as _keras_compat

        rows = []
        for g, v in zip(ctx.raw, ctx.variables):
            m = _keras_compat.optimizer_slot(ctx.optimizer, "momentums", v)
            g, m = tf.reshape(g, [-1]), tf.reshape(m, [-1])
            rows.append(tf.reduce_sum(g * m) / (tf.norm(g) * tf.norm(m)))
        return tf.stack(rows)


def test_a_user_statistic_with_its_own_tag_and_description(tmp_path):
    model = net(seed=5)
    opt = gradmon.observe(keras.optimizers.Adam(0.01), log_dir=str(tmp_path),
                          stats=["norm", CosineToMomentum()])
    m_prev = None
    expected = []
    for i in range(2):
        x, y = X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8]
        g = tape_gradients(model, MSE, x, y)[0]
        m_prev = (0.1 * g) if m_prev is None else 0.9 * m_prev + 0.1 * g  # Adam's first moment
        expected.append(float(np.sum(g * m_prev) / (np.linalg.norm(g) * np.linalg.norm(m_prev))))
        with tf.GradientTape() as tape:
            loss = MSE(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    events = read_events(os.path.join(str(tmp_path), "train"))
    tag = "gradients/cosine_to_momentum/0"
    assert events[tag][1] == pytest.approx(1.0, rel=1e-5)  # m_1 = 0.1 g_1
    assert events[tag][2] == pytest.approx(expected[1], rel=1e-4)
    assert read_descriptions(os.path.join(str(tmp_path), "train"))[tag] == \
        "cos(gradient, Adam's first moment) of variable 0"
    layer = model.trainable_variables[0].path.rsplit("/", 1)[0]
    assert tags.group_stat("raw", "norm", layer) in events
    assert tags.group_stat("raw", "rms", layer) not in events


class TwoWeights(keras.layers.Layer):
    def build(self, shape):
        self.first = self.add_weight(name="a>b", shape=(shape[-1], 2))
        self.second = self.add_weight(name="a_b", shape=(shape[-1], 2))

    def call(self, x):
        return x @ self.first + 2.0 * (x @ self.second)


def test_variables_that_sanitise_alike_keep_distinct_tags(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), TwoWeights(name="pair")])
    grads = tape_gradients(model, MSE, X[:8], Y[:8])
    paths = [v.path for v in model.trainable_variables]
    assert [p.rsplit("/", 2)[-2:] for p in paths] == [["pair", "a>b"], ["pair", "a_b"]]
    opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=str(tmp_path), grouping="variable")
    with tf.GradientTape() as tape:
        loss = MSE(Y[:8], model(X[:8], training=True))
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    events = read_events(os.path.join(str(tmp_path), "train"))
    norms = {t: v[1] for t, v in events.items() if t.startswith("gradients/raw/norm/")}
    assert len(norms) == 2  # two variables, two series
    assert sorted(norms.values()) == pytest.approx(sorted(np.linalg.norm(g) for g in grads), rel=1e-5)
