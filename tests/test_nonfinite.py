"""Non-finite values are never missed or misnamed: a device counter sees every step (logged or
not), the policies judge what would be applied (after the transform), and the report says NaN
where a NaN poisoned a layer, not DEAD."""

import os
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon.publish.publisher import Publisher
from gradmon.measure import recorder as recorder_module
from gradmon.summary import report
from gradmon import tags
from helpers import read_events

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(16)
BATCH = 16
X = RNG.normal(size=(10 * BATCH, 8)).astype(np.float32)
Y = RNG.normal(size=(10 * BATCH, 1)).astype(np.float32)
NAN_BATCHES = (2, 4, 7)  # 1-based: steps of the first epoch
WRITES = (5, 10)  # logged steps of GradientMonitor(update_freq=5) over 10 steps


def relu(x):
    """ReLU with ReLU(NaN) = 0 whatever the kernels (oneDNN's gives 0, Eigen's NaN)."""
    return keras.ops.where(x > 0, x, 0.0)


def relu_mlp():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation=relu),
                             keras.layers.Dense(1)])


def with_nan_rows(batches):
    x = X.copy()
    for b in batches:
        x[(b - 1) * BATCH + 5] = np.nan  # one row of batch b
    return x


def gradmon_warnings(caught):
    return [str(c.message) for c in caught if str(c.message).startswith("gradmon:")]


def reference_nonfinite_steps(x):
    """The steps whose gradient has a NaN/inf entry, by a plain tape loop (no gradmon)."""
    model = relu_mlp()
    opt = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.MeanSquaredError()
    bad = []
    for step in range(1, len(x) // BATCH + 1):
        xb, yb = x[(step - 1) * BATCH:step * BATCH], Y[(step - 1) * BATCH:step * BATCH]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        if not all(np.isfinite(g.numpy()).all() for g in grads):
            bad.append(step)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    return bad


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    """A ReLU MLP fitted with NaN rows in batches 2, 4 and 7 under the default policy ("warn"),
    written every 5 steps: no NaN step is a logged step."""
    logdir = str(tmp_path_factory.mktemp("relu_nan"))
    model = relu_mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(with_nan_rows(NAN_BATCHES), Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[gradmon.GradientMonitor(logdir, update_freq=5)])
    return logdir, model, gradmon_warnings(caught)


def test_the_reference_sees_the_injected_steps_and_relu_hides_the_nan_afterwards():
    # guards the scenario: after step 2 the first kernel is NaN, and only the NaN rows (NaN x 0)
    # make a later gradient non-finite; ReLU(NaN) = 0 keeps the others finite
    assert reference_nonfinite_steps(with_nan_rows(NAN_BATCHES)) == list(NAN_BATCHES)
    assert reference_nonfinite_steps(X) == []


def test_warn_names_the_count_and_steps_of_unlogged_nonfinite_updates(relu_run):
    logdir, model, messages = relu_run
    assert np.isnan(model.layers[0].kernel.numpy()).all()  # the poisoned layer
    expected = reference_nonfinite_steps(with_nan_rows(NAN_BATCHES))
    # each warning names a count and a range; together they name every injected step once
    # (when the device is read, i.e. how many warnings there are, is the callback's business)
    named = []
    for m in messages:
        one = re.fullmatch(r"gradmon: non-finite gradients at step (\d+) \(on_nonfinite='warn'\): "
                           r"the update was applied.*", m)
        some = re.fullmatch(r"gradmon: non-finite gradients at step (\d+) and (\d+) more steps? up to "
                            r"step (\d+) \(on_nonfinite='warn'\): the update was applied each time.*", m)
        assert one or some, m
        count, first, last = (1, int(one[1]), int(one[1])) if one else (int(some[2]) + 1, int(some[1]),
                                                                          int(some[3]))
        inside = [s for s in expected if first <= s <= last]
        assert count == len(inside) and inside[0] == first and inside[-1] == last
        named += inside
    assert named == expected == list(NAN_BATCHES)
    # the counter is written with each logged step: cumulative non-finite updates so far
    events = read_events(os.path.join(logdir, "train"))
    assert events[tags.NONFINITE_STEPS] == {w: float(sum(s <= w for s in expected)) for w in WRITES}


def test_the_report_says_nan_not_dead_for_a_layer_poisoned_by_nan(relu_run):
    logdir, model, _ = relu_run
    rep = report.health_report(report.load_run(logdir))
    by_layer = {(f.kind, f.subject) for f in rep.flags}
    first, second = (layer.kernel.path.rsplit("/", 1)[0] for layer in model.layers)
    assert (report.NONFINITE, first) in by_layer
    assert (report.DEAD, first) not in by_layer
    # the output layer's weights stayed finite (its kernel gets h = ReLU(NaN) = 0): not flagged
    assert all(np.isfinite(v.numpy()).all() for v in model.layers[1].weights)
    assert not any(f.subject == second for f in rep.flags)
    exploding = [f for f in rep.flags if f.kind == report.EXPLODING]
    assert len(exploding) == 1 and "3 update(s) with NaN/inf values" in exploding[0].detail
    assert rep.summary.nonfinite_updates == 3
    text = report.format_table(rep)
    assert f"NONFINITE [{first}]" in text and "DEAD" not in text


def test_flush_warns_of_the_nonfinite_steps_of_a_custom_loop():
    """Custom loops: nothing logged (update_freq=100); `flush()` still names them."""
    variable = keras.Variable(np.zeros(3, np.float32))
    opt = gradmon.observe(keras.optimizers.SGD(0.1), update_freq=100)

    @tf.function
    def step(g):
        opt.apply_gradients([(g, variable)])

    def run(poisoned, steps):
        for s in steps:
            g = np.ones(3, np.float32)
            if s in poisoned:
                g[1] = poisoned[s]
            step(tf.constant(g))

    def flushed():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert opt.flush() == []  # no logged step
        return [m.split(" (on_nonfinite")[0] for m in gradmon_warnings(caught)]

    run({3: np.nan, 5: np.inf}, range(1, 7))
    assert flushed() == ["gradmon: non-finite gradients at step 3 and 1 more step up to step 5"]
    assert flushed() == []  # idempotent
    run({9: np.nan}, range(7, 11))
    assert flushed() == ["gradmon: non-finite gradients at step 9"]
    assert opt.gradmon.recorder.read_nonfinite()[0] == 3


def test_the_counter_is_read_only_where_the_records_are(tmp_path, monkeypatch):
    """The counter costs no device-to-host read of its own on a step that writes nothing."""
    reads = []
    original_records = Publisher.read
    monkeypatch.setattr(Publisher, "read", lambda self, *args, **kwargs: reads.append(
        "records") or original_records(self, *args, **kwargs))
    original_counter = recorder_module.Recorder.read_nonfinite
    monkeypatch.setattr(recorder_module.Recorder, "read_nonfinite",
                        lambda self: reads.append("counter") or original_counter(self))
    model = relu_mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path), update_freq=7)])  # 20 steps
    # the counter is read with the records (when and how often is the callback's business)
    assert reads.count("counter") == reads.count("records") > 0


# -- the policies judge what would be applied -----------------------------------------------

def dead_layer_mlp():
    """Its first layer is dead (zero kernel, bias -1): its gradient is exactly 0."""
    keras.utils.set_random_seed(4)
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(4, activation="relu", kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant(-1.0)),
        keras.layers.Dense(1)])


def unit_normalised(grads, params):
    """g / ||g|| per variable: 0 / 0 = NaN for a dead layer's zero gradient."""
    return [g / tf.norm(g) for g in grads]


def test_a_transform_that_makes_nan_is_refused_under_skip(tmp_path):
    base = dead_layer_mlp()
    initial = [v.numpy().copy() for v in base.trainable_variables]
    raw = [g for g in reference_gradients(base)]
    assert all(np.isfinite(g).all() for g in raw) and not np.any(raw[0]) and not np.any(raw[1])
    model = gradmon.monitor(base, transform=unit_normalised, on_nonfinite="skip")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X[:3 * BATCH], Y[:3 * BATCH], batch_size=BATCH, shuffle=False, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    for v, w in zip(model.trainable_variables, initial):
        np.testing.assert_array_equal(v.numpy(), w)  # every update refused; still finite
    assert int(model.optimizer.iterations.numpy()) == 0
    messages = gradmon_warnings(caught)
    assert messages[0].startswith(
        "gradmon: non-finite gradients at step 1 (the raw gradient was finite: the transform made "
        "it non-finite) (on_nonfinite='skip')")
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert events[tags.SKIPPED_STEPS] == {1: 1.0, 2: 2.0, 3: 3.0}
    assert events[tags.NONFINITE_STEPS] == {1: 1.0, 2: 2.0, 3: 3.0}
    assert all(v == 0 for v in events[tags.nonfinite_total("raw")].values())
    # the report: the layer is dead (finite weights, zero gradient), not poisoned by NaN
    rep = report.health_report(report.load_run(str(tmp_path)))
    kinds = {(f.kind, f.subject) for f in rep.flags}
    assert (report.DEAD, model.trainable_variables[0].path.rsplit("/", 1)[0]) in kinds
    assert not any(f.kind == report.NONFINITE for f in rep.flags)


def test_a_transform_that_makes_nan_stops_under_stop():
    base = dead_layer_mlp()
    initial = [v.numpy().copy() for v in base.trainable_variables]
    model = gradmon.monitor(base, transform=unit_normalised, on_nonfinite="stop")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(X[:3 * BATCH], Y[:3 * BATCH], batch_size=BATCH, epochs=2, shuffle=False,
                            verbose=0)
    assert len(history.history["loss"]) == 1 and int(model.optimizer.iterations.numpy()) == 0
    for v, w in zip(model.trainable_variables, initial):
        np.testing.assert_array_equal(v.numpy(), w)
    assert gradmon_warnings(caught)[0].startswith(
        "gradmon: non-finite gradients at step 1 (on_nonfinite='stop')")


def reference_gradients(model):
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(Y[:BATCH], model(X[:BATCH], training=True))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
