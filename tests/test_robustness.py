"""Monitoring where Keras trains: mixed precision, steps_per_execution, NaN policies,
save and resume, interruption, bad input."""

import os
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon import tags
from gradmon.measure import transforms as T
from helpers import global_norm, latest_snapshot, read_events, tape_gradients

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(41)
X = RNG.normal(size=(48, 5)).astype(np.float32)
Y = RNG.normal(size=(48, 2)).astype(np.float32)
MSE = keras.losses.MeanSquaredError()


def mlp(seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                             keras.layers.Dense(2, dtype=dtype)])


def with_nan_at(step, batch_size=8):
    x = X.copy()
    x[(step - 1) * batch_size] = np.nan  # one example of batch `step` (1-based)
    return x


class Snapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([v.numpy().copy() for v in self.model.trainable_variables])


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_statistics_are_unscaled_and_overflows_are_counted(mixed_precision, tmp_path):
    base = mlp(dtype="float32")
    grads = tape_gradients(base, MSE, X[:8], Y[:8])
    model = gradmon.monitor(base, transform=T.clip_by_value(0.05))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    snaps = Snapshots()
    model.fit(with_nan_at(3), Y, batch_size=8, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path)), snaps])
    events = read_events(os.path.join(str(tmp_path), "train"))
    # step 1: true gradient (loss scale 32768 divided out), float16 compute
    assert events[tags.global_norm("raw")][1] == pytest.approx(global_norm(grads), rel=2e-2)
    # step 3 had a NaN at a loss scale above 1: the LossScaleOptimizer's business (skipped,
    # scale halved), counted as an overflow; its unknown gradient is not written
    assert events[tags.OVERFLOW_STEPS][2] == 0 and events[tags.OVERFLOW_STEPS][3] == 1
    assert events[tags.SKIPPED_STEPS][3] == 1
    assert events[tags.LOSS_SCALE][3] == 32768 and events[tags.LOSS_SCALE][4] == 16384
    assert 3 not in events[tags.global_norm("raw")] and 3 not in events[tags.nonfinite_total("raw")]
    assert 3 not in events[tags.CLIP_RATIO]
    for a, b in zip(snaps.weights[1], snaps.weights[2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["warn", "skip", "stop"])
def test_mixed_precision_trains_as_without_gradmon_under_every_policy(mixed_precision, tmp_path, policy):
    """Unnormalised targets: the first steps overflow while the loss scale adapts."""
    y = (Y * 3000.0).astype(np.float32)
    results = []
    for observed in (False, True):
        base = mlp(seed=3, dtype="float32")
        model = gradmon.monitor(base, on_nonfinite=policy) if observed else base
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        callbacks = [gradmon.GradientMonitor(str(tmp_path))] if observed else []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(X, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        results.append((history.history["loss"], [v.numpy() for v in model.weights],
                        int(model.optimizer.iterations.numpy()), float(model.optimizer.dynamic_scale.numpy())))
    (plain_loss, plain_w, plain_it, plain_scale), (loss, w, it, scale) = results
    assert loss == plain_loss and it == plain_it and scale == plain_scale
    for a, b in zip(plain_w, w):
        np.testing.assert_array_equal(a, b)
    assert loss[-1] < loss[0] and it > 0
    events = read_events(os.path.join(str(tmp_path), "train"))
    overflows = events[tags.OVERFLOW_STEPS][36]
    assert overflows == 36 - it > 0  # every overflow was a step the LossScaleOptimizer skipped
    assert events[tags.SKIPPED_STEPS][36] == overflows
    assert not any("non-finite" in str(c.message) for c in caught)
    assert all(np.isfinite(v) for v in events[tags.global_norm("raw")].values())


@pytest.mark.parametrize("policy", ["skip", "stop", "warn"])
def test_nonfinite_policies(policy, tmp_path):
    model = gradmon.monitor(mlp(), on_nonfinite=policy, stats="all")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    snaps = Snapshots()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(with_nan_at(3), Y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path)), snaps])
    messages = " ".join(str(w.message) for w in caught)
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert events[tags.nonfinite_total("raw")][3] > 0
    # under "warn" the weights turn NaN at step 3, so the later steps are non-finite too; the
    # written steps wait in the ring and are read together: one warning may name the run
    assert re.search(r"non-finite gradients at (step 3\b|\d+ steps between step 3 )", messages)
    assert model.trainable_variables[0].path.rsplit("/", 1)[0] in messages  # its layer
    if policy == "warn":
        assert all(np.isnan(w).any() for w in snaps.weights[2])
        assert re.search(r"the updates? (was|were) applied", messages)
        return
    assert "was applied" not in messages
    for a, b in zip(snaps.weights[1], snaps.weights[2]):
        np.testing.assert_array_equal(a, b)  # step 3 left the weights as they were
    assert events[tags.SKIPPED_STEPS][3] == 1
    if policy == "skip":
        assert len(snaps.weights) == 6 and sorted(events[tags.global_norm("raw")]) == list(range(1, 7))
        assert all(np.isfinite(w).all() for w in snaps.weights[-1])
    else:
        assert len(snaps.weights) == 3 and max(events[tags.global_norm("raw")]) == 3


def test_stop_applies_no_later_step_of_the_same_execution(tmp_path):
    model = gradmon.monitor(mlp(), on_nonfinite="stop")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=4)
    before = [v.numpy().copy() for v in model.trainable_variables]
    reference = mlp()
    reference.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    reference.fit(X[:8], Y[:8], batch_size=4, shuffle=False, verbose=0)  # the two good steps
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model.fit(with_nan_at(3, batch_size=4), Y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    # steps 1-2 applied, step 3 refused, step 4 (same execution) refused too; fit ended
    for a, b in zip(reference.trainable_variables, model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert model.gradient_observer.step == 4
    assert not all(np.array_equal(a, b.numpy()) for a, b in zip(before, model.trainable_variables))


def test_steps_per_execution_logs_every_step_at_its_own_step(tmp_path):
    logged = []
    for spe in (1, 4):
        model = gradmon.monitor(mlp(seed=2))
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=spe)
        model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path / str(spe)))])
        logged.append(read_events(str(tmp_path / str(spe) / "train")))
    one, four = logged
    assert sorted(four[tags.global_norm("raw")]) == list(range(1, 13))
    for step in range(1, 13):
        assert four[tags.global_norm("raw")][step] == pytest.approx(one[tags.global_norm("raw")][step], rel=1e-5)


def test_save_and_resume_continue_the_step_axis(tmp_path):
    logdir = str(tmp_path / "run")
    model = gradmon.monitor(mlp(), transform=T.chain(T.clip_by_value(0.5), T.adaptive_clip(0.1)),
                            penalties=[gradmon.penalties.WeightPenalty(l2=1e-3)], grouping="layer")
    model.compile(optimizer="adam", loss="mse")
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0, callbacks=[gradmon.GradientMonitor(logdir)])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.gradient_config.get_config() == model.gradient_config.get_config()
    assert loaded.gradient_observer.step == 6
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(X, Y, batch_size=8, epochs=2, initial_epoch=1, verbose=0,
               callbacks=[gradmon.GradientMonitor(logdir)])
    events = read_events(os.path.join(logdir, "train"))
    assert sorted(events[tags.global_norm("raw")]) == list(range(1, 13))
    assert sorted(events[tags.penalty("weight")]) == list(range(1, 13))


def test_subclassed_wrapper_saves_and_loads(tmp_path):
    @keras.saving.register_keras_serializable(package="gradmon_tests")
    class Tiny(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = gradmon.monitor(Tiny(), transform=T.clip_by_norm(1.0))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X, Y, batch_size=16, verbose=0)
    path = str(tmp_path / "wrapped.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    assert loaded.gradient_observer.step == 3
    assert loaded.gradient_config.get_config()["transform"] == T.serialize(T.clip_by_norm(1.0))


def test_interrupted_fit_leaves_readable_events(tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise KeyboardInterrupt

    model = gradmon.monitor(mlp())
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, Y, batch_size=8, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path)), Interrupt()])
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == [1, 2, 3]


def test_transform_returning_the_wrong_structure_is_a_clear_error():
    model = gradmon.monitor(mlp(), transform=lambda grads, params: grads[:1])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="must return one gradient per variable. Expected 4 gradients. Received: 1"):
        model.fit(X, Y, verbose=0)


def test_transform_returning_none_is_a_clear_error():
    model = gradmon.monitor(mlp(), transform=lambda grads, params: None)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="`transform`.*returned None"):
        model.fit(X, Y, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_input_gradient_penalty_on_integer_inputs_is_a_clear_error():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((3,), dtype="int32")
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Embedding(10, 4)(tokens)))
    model = gradmon.monitor(keras.Model(tokens, out),
                            penalties=[gradmon.penalties.InputGradientPenalty(1.0, kind="r1")])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="Expected floating-point inputs.*Received: inputs of dtypes \\['int(32|64)'\\]"):
        model.fit(RNG.integers(0, 10, size=(8, 3)), Y[:8], verbose=0)


def test_embedding_gradients_are_exact_without_densifying():
    keras.utils.set_random_seed(1)
    tokens = keras.Input((4,), dtype="int32")
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 3)(tokens)))
    base = keras.Model(tokens, out)
    ids = RNG.integers(0, 5, size=(16, 4))  # many repeated indices
    grads = tape_gradients(base, MSE, ids, Y[:16])
    model = gradmon.monitor(base, transform=T.clip_by_norm(0.01), grouping="variable", stats="all")
    model.compile(optimizer="sgd", loss="mse")
    model.fit(ids, Y[:16], batch_size=16, verbose=0)
    snap = latest_snapshot(model)
    path = base.trainable_variables[0].path
    assert snap[tags.group_stat("raw", "norm", path)] == pytest.approx(np.linalg.norm(grads[0]), rel=1e-5)
    assert snap[tags.group_stat("raw", "zero_fraction", path)] == pytest.approx(np.mean(grads[0] == 0), rel=1e-6)
    assert snap[tags.global_norm("raw")] == pytest.approx(global_norm(grads), rel=1e-5)


def test_histograms_and_every_statistic_under_xla(tmp_path):
    base = mlp(seed=5)
    grads = tape_gradients(base, MSE, X[:8], Y[:8])
    model = gradmon.monitor(base, transform=T.clip_by_value(0.05), noise_scale=True, grouping="variable",
                            penalties=[gradmon.penalties.WeightPenalty(l2=0.0)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=True)
    model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path), histogram_freq=2)])
    events = read_events(os.path.join(str(tmp_path), "train"))
    path = model.trainable_variables[0].path
    assert sorted(events[tags.histogram("raw", path)]) == [2, 4, 6]
    assert sorted(events[tags.histogram("transformed", path)]) == [2, 4, 6]
    assert sorted(events[tags.NOISE_SCALE]) == list(range(1, 7))
    assert events[tags.group_stat("raw", "norm", path)][1] == pytest.approx(np.linalg.norm(grads[0]), rel=1e-5)
    assert np.max(np.abs(events[tags.histogram("transformed", path)][2][:, :2])) <= 0.05 + 1e-7
