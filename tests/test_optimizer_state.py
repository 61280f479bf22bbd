"""Optimizer-state statistics (`moment_norm`, `cosines`) against numpy on the slots read
straight from the optimizer after the step, the weights around it and the gradient fed."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon import tags

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(12)


def model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh", name="a"),
                             keras.layers.Dense(2, name="b")])


def grads_for(variables, step):
    rng = np.random.default_rng(100 + step)
    return [rng.normal(size=v.shape).astype(np.float32) for v in variables]


# The slots each optimizer keeps, read here by hand from keras 3.15's `build` methods:
# (first-moment attribute, its sign in the gradient's direction), (second-moment attribute, squared?)
CASES = {
    "adam": (lambda: keras.optimizers.Adam(0.01), ("_momentums", 1.0), ("_velocities", True)),
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), ("momentums", -1.0), None),
    "rmsprop_momentum": (lambda: keras.optimizers.RMSprop(0.01, momentum=0.5), ("_momentums", 1.0),
                         ("_velocities", True)),
    "adagrad": (lambda: keras.optimizers.Adagrad(0.1), None, ("_accumulators", True)),
    "adamax": (lambda: keras.optimizers.Adamax(0.01), ("_m", 1.0), ("_u", False)),
    "sgd": (lambda: keras.optimizers.SGD(0.05), None, None),
    "rmsprop": (lambda: keras.optimizers.RMSprop(0.01), None, ("_velocities", True)),
    "adamw": (lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1), ("_momentums", 1.0),
              ("_velocities", True)),
    "nadam": (lambda: keras.optimizers.Nadam(0.01), ("_momentums", 1.0), ("_velocities", True)),
    "lamb": (lambda: keras.optimizers.Lamb(0.01), ("_momentums", 1.0), ("_velocities", True)),
    "lion": (lambda: keras.optimizers.Lion(0.01), ("_momentums", 1.0), None),
}


def run_steps(opt, variables, steps, scale=1.0, compiled=False, poison_last=False):
    """Feeds `grads_for(step) * scale`; returns (weights before the last step, its raw gradient)."""

    def apply(grads):
        opt.apply_gradients(zip(grads, variables))

    apply_fn = tf.function(apply) if compiled else apply
    before = raw = None
    for step in range(1, steps + 1):
        raw = grads_for(variables, step)
        if poison_last and step == steps:
            raw[0][0, 0] = np.nan
        before = [v.numpy().copy() for v in variables]
        apply_fn([tf.constant(g * scale) for g in raw])
    return before, raw


def expected(opt, variables, groups, first, second, before, raw):
    """Numpy: per-group moment norms and the two global cosines, from the optimizer's slots."""
    inner = opt.inner_optimizer if isinstance(opt, keras.optimizers.LossScaleOptimizer) else opt
    out = {}
    g = np.concatenate([r.ravel() for r in raw]).astype(np.float64)
    delta = np.concatenate([v.numpy().ravel() - b.ravel() for v, b in zip(variables, before)])
    out[tags.COSINE_UPDATE_GRADIENT] = -delta @ g / (np.linalg.norm(delta) * np.linalg.norm(g))
    for moment, slot in ((tags.FIRST_MOMENT, first), (tags.SECOND_MOMENT, second)):
        if slot is None:
            continue
        values = [getattr(inner, slot[0])[i].numpy().astype(np.float64) for i in range(len(variables))]
        for group in set(groups):
            parts = [values[i] for i, gid in enumerate(groups) if gid == group]
            if moment == tags.SECOND_MOMENT and slot[1]:
                norm = np.sqrt(sum(p.sum() for p in parts))  # ||sqrt(v)||
            else:
                norm = np.sqrt(sum((p**2).sum() for p in parts))
            out[tags.moment_norm(moment, group)] = norm
        if moment == tags.FIRST_MOMENT:
            m = slot[1] * np.concatenate([v.ravel() for v in values])
            out[tags.COSINE_GRADIENT_FIRST_MOMENT] = m @ g / (np.linalg.norm(m) * np.linalg.norm(g))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_moment_norms_and_cosines_match_numpy_on_the_slots(case):
    make, first, second = CASES[case]
    net = model()
    opt = gradmon.observe(make(), stats=["moment_norm", "cosines"], grouping="layer",
                          update_freq=3)
    variables = net.trainable_variables
    before, raw = run_steps(opt, variables, 3, compiled=case == "adam")
    (snapshot,) = opt.flush()
    assert snapshot.step == 3
    groups = [v.path.rsplit("/", 1)[0] for v in variables]
    want = expected(opt, variables, groups, first, second, before, raw)
    got = {t: v for t, v in snapshot.values.items() if t.startswith(tags.OPTIMIZER_PREFIX)}
    assert set(got) == set(want)  # a slot the optimizer lacks is no tag
    for tag, value in want.items():
        assert got[tag] == pytest.approx(value, rel=2e-5, abs=1e-7), tag
    if case == "sgd":  # plain gradient descent: the step is -lr * g
        assert got[tags.COSINE_UPDATE_GRADIENT] == pytest.approx(1.0, abs=1e-6)
    if case == "adagrad":  # per-coordinate steps: not along the gradient
        assert got[tags.COSINE_UPDATE_GRADIENT] < 0.999


# Closed forms after the first step from zero slots (keras' update rules, written out), per
# variable: the first moment in the gradient's direction, the second-moment norm
# (||sqrt(v)||, Adamax ||u||).
norm = np.linalg.norm
FIRST_STEP = {
    "adam": (lambda: keras.optimizers.Adam(0.01, beta_1=0.9, beta_2=0.999),
             lambda g: 0.1 * g, lambda g: np.sqrt(0.001) * norm(g)),
    "nadam": (lambda: keras.optimizers.Nadam(0.01, beta_1=0.9, beta_2=0.999),
              lambda g: 0.1 * g, lambda g: np.sqrt(0.001) * norm(g)),
    "lamb": (lambda: keras.optimizers.Lamb(0.01, beta_1=0.9, beta_2=0.999),
             lambda g: 0.1 * g, lambda g: np.sqrt(0.001) * norm(g)),
    "adamax": (lambda: keras.optimizers.Adamax(0.01, beta_1=0.9), lambda g: 0.1 * g, norm),
    "lion": (lambda: keras.optimizers.Lion(0.01, beta_2=0.99), lambda g: 0.01 * g, None),
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), lambda g: 0.05 * g, None),
    "rmsprop_momentum": (lambda: keras.optimizers.RMSprop(0.01, rho=0.9, momentum=0.5, epsilon=1e-7),
                         lambda g: 0.01 * g / np.sqrt(0.1 * g**2 + 1e-7),
                         lambda g: np.sqrt(0.1) * norm(g)),
    "adagrad": (lambda: keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.1), None,
                lambda g: np.sqrt(np.sum(0.1 + g**2))),
}


@pytest.mark.parametrize("case", list(FIRST_STEP))
def test_first_step_moment_norms_match_the_update_rules_closed_forms(case):
    """Independent of which slot gradmon reads: the norms the update rules give after one step."""
    make, first, second = FIRST_STEP[case]
    net = model()
    opt = gradmon.observe(make(), stats=["moment_norm", "cosines"], grouping="variable")
    _, raw = run_steps(opt, net.trainable_variables, 1)
    (snapshot,) = opt.flush()
    raw = [g.astype(np.float64) for g in raw]
    for v, g in zip(net.trainable_variables, raw):
        first_tag, second_tag = (tags.moment_norm(m, v.path) for m in tags.MOMENTS)
        assert (first_tag in snapshot) == (first is not None)
        assert (second_tag in snapshot) == (second is not None)
        if first is not None:
            assert snapshot[first_tag] == pytest.approx(norm(first(g)), rel=1e-5)
        if second is not None:
            assert snapshot[second_tag] == pytest.approx(second(g), rel=1e-5)
    if first is not None:
        g = np.concatenate([r.ravel() for r in raw])
        m = np.concatenate([first(r).ravel() for r in raw])
        assert snapshot[tags.COSINE_GRADIENT_FIRST_MOMENT] == pytest.approx(
            g @ m / (norm(g) * norm(m)), rel=1e-5)


def test_sgd_momentum_first_step_points_along_the_gradient():
    """m_1 = -lr * g_1: in the gradient's direction, the cosine is exactly 1, not -1."""
    net = model()
    opt = gradmon.observe(keras.optimizers.SGD(0.1, momentum=0.9), stats="cosines")
    run_steps(opt, net.trainable_variables, 1)
    (snapshot,) = opt.flush()
    assert snapshot[tags.COSINE_GRADIENT_FIRST_MOMENT] == pytest.approx(1.0, abs=1e-6)
    assert snapshot[tags.COSINE_UPDATE_GRADIENT] == pytest.approx(1.0, abs=1e-6)


def test_under_a_loss_scale_optimizer_the_unscaled_gradient_is_used():
    net = model()
    opt = gradmon.observe(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)),
                          stats=["moment_norm", "cosines"], grouping="variable", update_freq=2)
    variables = net.trainable_variables
    scale = float(opt.dynamic_scale.numpy()) if opt.built else 32768.0
    before, raw = run_steps(opt, variables, 2, scale=scale)
    (snapshot,) = opt.flush()
    paths = [v.path for v in variables]
    want = expected(opt, variables, paths, *CASES["adam"][1:], before, raw)
    got = {t: v for t, v in snapshot.values.items() if t.startswith(tags.OPTIMIZER_PREFIX)}
    assert set(got) == set(want) and len(got) == 2 * len(paths) + 2
    for tag, value in want.items():
        assert got[tag] == pytest.approx(value, rel=2e-5), tag


def test_a_skipped_update_has_undefined_cosines_and_unchanged_moments():
    net = model()
    opt = gradmon.observe(keras.optimizers.Adam(0.01), stats=["moment_norm", "cosines"],
                          on_nonfinite="skip")
    variables = net.trainable_variables
    run_steps(opt, variables, 1)
    first = opt.flush()[0].values
    with pytest.warns(UserWarning, match="non-finite"):
        before, _ = run_steps(opt, variables, 1, poison_last=True)
        last = opt.flush()[-1].values
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(variables, before))  # not applied
    assert np.isnan(last[tags.COSINE_UPDATE_GRADIENT])
    assert np.isnan(last[tags.COSINE_GRADIENT_FIRST_MOMENT])
    for tag, value in first.items():
        if tag.startswith("optimizer/") and "/norm/" in tag:
            assert last[tag] == value  # the slots were left as they were


def test_indexed_slices_gradients_of_an_embedding():
    """An embedding's IndexedSlices gradient (repeated rows) gives the dense gradient's cosines."""
    keras.utils.set_random_seed(4)
    emb = keras.layers.Embedding(50, 6)
    emb.build((None,))
    ids = tf.constant([[1, 7, 7, 3]])
    opt = gradmon.observe(keras.optimizers.Adam(0.01), stats=["moment_norm", "cosines"])
    for _ in range(2):
        before = emb.embeddings.numpy().copy()
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(emb(ids) ** 2 * tf.constant([1.0, 2.0, 3.0, 4.0])[None, :, None])
        (grad,) = tape.gradient(loss, emb.trainable_variables)
        assert isinstance(grad, tf.IndexedSlices)
        dense = tf.convert_to_tensor(grad).numpy().astype(np.float64)
        opt.apply_gradients([(grad, emb.embeddings)])
    snapshot = opt.flush()[-1]
    delta = emb.embeddings.numpy().astype(np.float64) - before
    m = opt._momentums[0].numpy().astype(np.float64)
    g = dense.ravel()
    assert snapshot[tags.COSINE_UPDATE_GRADIENT] == pytest.approx(
        -delta.ravel() @ g / (np.linalg.norm(delta) * np.linalg.norm(g)), rel=1e-5)
    assert snapshot[tags.COSINE_GRADIENT_FIRST_MOMENT] == pytest.approx(
        m.ravel() @ g / (np.linalg.norm(m) * np.linalg.norm(g)), rel=1e-5)
    v = opt._velocities[0].numpy().astype(np.float64)
    group = emb.embeddings.path.rsplit("/", 1)[0]
    assert snapshot[tags.moment_norm(tags.SECOND_MOMENT, group)] == pytest.approx(np.sqrt(v.sum()), rel=1e-5)


def test_selected_by_name_and_in_all_not_in_the_defaults():
    assert {"moment_norm", "cosines"} <= set(gradmon.statistics.check_stats("all")[0])
    assert not {"moment_norm", "cosines"} & set(gradmon.statistics.check_stats(None)[0])
    net = model()
    opt = gradmon.observe(keras.optimizers.Adam(0.01))
    run_steps(opt, net.trainable_variables, 1)
    assert not [t for t in opt.flush()[0].values if t.startswith(tags.OPTIMIZER_PREFIX)]


def test_descriptions_say_what_each_number_is():
    assert "sqrt(sum v)" in tags.describe(tags.moment_norm(tags.SECOND_MOMENT, "dense"))
    assert "first-moment" in tags.describe(tags.moment_norm(tags.FIRST_MOMENT, "dense"))
    assert "-raw gradient" in tags.describe(tags.COSINE_UPDATE_GRADIENT)
    assert tags.describe(tags.COSINE_GRADIENT_FIRST_MOMENT)


def test_observing_the_optimizer_state_leaves_training_as_it_was():
    """Weights and slots after compiled steps are bit-identical to an unobserved optimizer's."""
    results = []
    for observed in (False, True):
        net = model()
        opt = keras.optimizers.Adam(0.01)
        if observed:
            opt = gradmon.observe(opt, stats=["moment_norm", "cosines"])
        run_steps(opt, net.trainable_variables, 3, compiled=True)
        if observed:
            assert len(opt.flush()) == 3
        results.append([v.numpy() for v in net.trainable_variables + opt._momentums + opt._velocities])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_adam_first_step_update_cosine_is_that_of_lr_times_the_sign_of_g():
    """Adam's first step is lr * m_hat / (sqrt(v_hat) + eps) with m_hat = g, v_hat = g^2:
    about lr * sign(g), so cos(update, -g) = ||g||_1 / (sqrt(n) ||g||), far from 1."""
    net = model()
    opt = gradmon.observe(keras.optimizers.Adam(0.01, epsilon=1e-7), stats="cosines")
    _, raw = run_steps(opt, net.trainable_variables, 1)
    (snapshot,) = opt.flush()
    g = np.concatenate([r.ravel() for r in raw]).astype(np.float64)
    alpha = 0.01 * np.sqrt(1 - 0.999) / (1 - 0.9)
    step = alpha * 0.1 * g / (np.sqrt(0.001) * np.abs(g) + 1e-7)
    expected = step @ g / (norm(step) * norm(g))
    assert expected == pytest.approx(np.abs(g).sum() / (np.sqrt(g.size) * norm(g)), rel=1e-4)
    assert snapshot[tags.COSINE_UPDATE_GRADIENT] == pytest.approx(expected, rel=1e-4)


def test_a_spike_refused_by_on_spike_skip_has_undefined_cosines():
    """After the 25-step warm-up, a 50x norm at step 35 is refused: its cosines are NaN, the
    steps around it are defined."""
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = gradmon.observe(keras.optimizers.Adam(1e-3), on_spike="skip", stats="cosines")
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="spike at step 35"):
        for step in range(1, 37):
            scale = 50.0 if step == 35 else 1.0
            opt.apply_gradients(zip([tf.constant((scale * (1 + 0.05 * rng.normal(size=v.shape))).astype("float32"))
                                     for v in net.trainable_variables], net.trainable_variables))
        cosines = {s.step: s[tags.COSINE_UPDATE_GRADIENT] for s in opt.flush()}
    assert np.isnan(cosines[35]) and np.isfinite(cosines[34]) and np.isfinite(cosines[36])
