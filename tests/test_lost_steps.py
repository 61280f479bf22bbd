"""No scheduled step is lost without a warning, and none in the documented use (issue 16).

Custom loops that never call `flush()`, a ring that must hold `buffer_steps` *logged* steps
whatever `update_freq` is, overflows warned with their count every time, an observed
optimizer fitted without `GradientMonitor`, one optimizer applied from two `tf.function`s,
re-running a notebook cell, plain `tf.Variable`s, and bad arguments refused before the first
step. Expected gradient norms come from an independent tape (`helpers.tape_gradients`).
"""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon import tags
from gradmon.measure import transforms as T
from gradmon.measure.observer import observer_of
from gradmon.publish.writer import MemoryWriter
from helpers import global_norm, read_events, tape_gradients

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(16)
X = RNG.normal(size=(64, 4)).astype(np.float32)
Y = RNG.normal(size=(64, 2)).astype(np.float32)
MSE = keras.losses.MeanSquaredError()
NORM = tags.global_norm(tags.RAW)


def net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"),
                             keras.layers.Dense(2)])


def compiled_step(model, optimizer, variables=None):
    """The article's loop body as a `tf.function` (the variables: all, or a subset)."""
    @tf.function
    def step(x, y):
        chosen = model.trainable_variables if variables is None else variables
        with tf.GradientTape() as tape:
            loss = MSE(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, chosen), chosen))

    return step


def batch(i):
    i %= 8
    return X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8]


def lost_warnings(caught):
    return [str(w.message) for w in caught if "overwritten on the device" in str(w.message)]


# -- flush at exit ------------------------------------------------------------------------

EXIT_SCRIPT = r'''
import json, sys
import keras, numpy as np, tensorflow as tf
import gradmon

cfg = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
x, y = rng.normal(size=(640, 4)).astype(np.float32), rng.normal(size=(640, 2)).astype(np.float32)
mse = keras.losses.MeanSquaredError()
norms = {}
for name, steps in (("loop10", 10), ("loop40", 40)):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    opt = gradmon.observe(keras.optimizers.SGD(0.05), log_dir=cfg[name], update_freq=1)

    @tf.function
    def step(a, b):
        with tf.GradientTape() as tape:
            loss = mse(b, model(a, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))

    norms[name] = []
    for i in range(steps):
        a, b = x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]
        with tf.GradientTape() as tape:  # an independent tape, before the step
            loss = mse(b, model(a, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        norms[name].append(float(np.sqrt(sum(np.sum(g.numpy().astype(np.float64) ** 2) for g in grads))))
        step(a, b)
# an observed optimizer fitted without GradientMonitor: 48 steps
keras.utils.set_random_seed(2)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
model.compile(optimizer=gradmon.observe(keras.optimizers.SGD(0.05), log_dir=cfg["fit"]), loss="mse")
model.fit(x[:384], y[:384], batch_size=8, epochs=1, shuffle=False, verbose=0)
print("NORMS " + json.dumps(norms))
# no flush(), no close(): the process just ends
'''


@pytest.fixture(scope="module")
def exited_without_flush(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exit")
    cfg = {name: str(tmp / name) for name in ("loop10", "loop40", "fit")}
    script = tmp / "exit_without_flush.py"
    script.write_text(EXIT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    done = subprocess.run([sys.executable, str(script), json.dumps(cfg)], env=env, cwd=str(tmp),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    norms = json.loads([line for line in done.stdout.splitlines() if line.startswith("NORMS ")][0][6:])
    return cfg, norms, done.stderr


def test_a_compiled_loop_that_never_flushes_is_written_at_exit(exited_without_flush):
    cfg, norms, stderr = exited_without_flush
    assert "Traceback" not in stderr
    events = read_events(os.path.join(cfg["loop10"], "train"))
    assert sorted(events[NORM]) == list(range(1, 11))  # all 10 measured steps, none lost
    for step, expected in enumerate(norms["loop10"], start=1):
        assert events[NORM][step] == pytest.approx(expected, rel=1e-5)
    # gradmon's own reader finds a gradmon run there (the report said "not a gradmon run")
    from gradmon.summary import events as gradmon_events

    assert gradmon_events.is_gradmon_run(gradmon_events.load_run(os.path.join(cfg["loop10"], "train")))


def test_steps_lost_before_exit_are_counted_and_the_cause_named(exited_without_flush):
    cfg, norms, stderr = exited_without_flush
    events = read_events(os.path.join(cfg["loop40"], "train"))
    # the ring holds the last 16 measured steps: those are written, the 24 before are reported
    assert sorted(events[NORM]) == list(range(25, 41))
    assert events[NORM][40] == pytest.approx(norms["loop40"][39], rel=1e-5)
    assert "24 measured steps (steps 1, 2, ..., 24) were overwritten" in stderr
    assert "flush() was never called" in stderr


def test_an_observed_optimizer_fitted_without_a_monitor_is_not_silent(exited_without_flush):
    cfg, _, stderr = exited_without_flush
    events = read_events(os.path.join(cfg["fit"], "train"))
    assert sorted(events[NORM]) == list(range(33, 49))
    assert "32 measured steps (steps 1, 2, ..., 32) were overwritten" in stderr
    assert "nothing wrote the measured steps" in stderr and "before the end of the process" in stderr
    assert "gradmon.GradientMonitor(log_dir)" in stderr


def test_an_observer_dropped_before_exit_writes_what_it_measured(tmp_path):
    import gc

    def run():
        model = net(seed=11)
        opt = gradmon.observe(keras.optimizers.SGD(0.05), log_dir=str(tmp_path))
        step = compiled_step(model, opt)
        for i in range(5):
            step(*batch(i))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()  # no flush: the optimizer, its observer and the trace are dropped here
        gc.collect()
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[NORM]) == [1, 2, 3, 4, 5]
    assert any("before its optimizer was dropped: 5 were written then" in str(w.message) for w in caught)


def test_an_observed_optimizer_in_fit_with_a_monitor_keeps_its_transform():
    """`observe(opt, transform=...)` then `fit` with a GradientMonitor: the monitor writes for
    that observer (it was refused as "already observed", and must not drop the transform)."""
    model = net(seed=3)
    opt = gradmon.observe(keras.optimizers.SGD(0.05), transform=T.clip_by_global_norm(1e-3))
    observer = opt.gradmon
    model.compile(optimizer=opt, loss="mse")
    writer = MemoryWriter()
    first = tape_gradients(model, MSE, X[:32], Y[:32])
    model.fit(X[:32], Y[:32], batch_size=32, epochs=1, verbose=0,
              callbacks=[gradmon.GradientMonitor(writer=writer)])
    assert observer_of(opt) is observer
    ratio = dict(writer.scalars[tags.CLIP_RATIO])
    assert ratio[1] == pytest.approx(1e-3 / global_norm(first), rel=1e-4)


def test_an_observer_with_its_own_log_dir_fitted_with_a_monitor_loses_nothing(tmp_path):
    """`observe(opt, log_dir=A)`, a loop, then `fit` with `GradientMonitor(B)`, then the loop
    again: the loop's steps before the fit are in A, whose event file the fit closes; the fit's
    steps and a later `opt.flush()`'s are in B (before: A's file stayed open, and the flush after
    the fit wrote nowhere)."""
    from gradmon.publish.writer import SummaryWriter

    loop_dir, fit_dir = str(tmp_path / "loop"), str(tmp_path / "fit")
    model = net(seed=12)
    opt = gradmon.observe(keras.optimizers.SGD(0.05), log_dir=loop_dir)
    step = compiled_step(model, opt)
    expected = {}
    for i in range(2):  # measured, not flushed
        expected[i + 1] = global_norm(tape_gradients(model, MSE, *batch(i)))
        step(*batch(i))
    model.compile(optimizer=opt, loss="mse")
    model.fit(X[:32], Y[:32], batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(fit_dir)])
    own = SummaryWriter.shared(loop_dir, "train")
    assert own.path is None  # its event file is closed
    expected[7] = global_norm(tape_gradients(model, MSE, *batch(6)))
    step(*batch(6))
    written = opt.flush()
    assert [s.step for s in written] == [7]
    loop_events = read_events(os.path.join(loop_dir, "train"))
    fit_events = read_events(os.path.join(fit_dir, "train"))
    assert sorted(loop_events[NORM]) == [1, 2]
    assert sorted(fit_events[NORM]) == [3, 4, 5, 6, 7]
    for s in (1, 2):
        assert loop_events[NORM][s] == pytest.approx(expected[s], rel=1e-5)
    assert fit_events[NORM][7] == pytest.approx(expected[7], rel=1e-5)


# -- the ring ---------------------------------------------------------------------------

def test_the_ring_holds_buffer_steps_logged_steps_whatever_update_freq():
    """update_freq=16 with the default buffer_steps=16: a ring indexed by `step % 16` held one
    logged step (5 of 20 written, flushing every 64 steps); indexed by the logged count, all."""
    model = net()
    opt = gradmon.observe(keras.optimizers.SGD(0.01), update_freq=16)
    step = compiled_step(model, opt)
    written = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(10 * 16):
            step(*batch(i))
            if (i + 1) % 64 == 0 or i + 1 == 160:  # every 4 logged steps: well inside the ring
                written += [s.step for s in opt.flush()]
    assert written == [16 * k for k in range(1, 11)]
    assert not lost_warnings(caught)


def test_every_overflow_is_warned_with_its_count_and_steps():
    model = net()
    opt = gradmon.observe(keras.optimizers.SGD(0.01), buffer_steps=4)
    step = compiled_step(model, opt)
    written = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(30):
            step(*batch(i))
            if (i + 1) % 10 == 0:
                written += [s.step for s in opt.flush()]
    assert written == [7, 8, 9, 10, 17, 18, 19, 20, 27, 28, 29, 30]
    lost = lost_warnings(caught)
    assert len(lost) == 3  # the first one (before any flush) too, and each later one
    for message, first in zip(lost, (1, 11, 21)):
        assert message.startswith(f"gradmon: 6 measured steps (steps {first}, {first + 1}, ..., "
                                  f"{first + 5}) were overwritten")
        assert "buffer_steps=4" in message


def test_lost_steps_are_named_at_the_schedule():
    model = net()
    opt = gradmon.observe(keras.optimizers.SGD(0.01), update_freq=3, buffer_steps=2)
    step = compiled_step(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(15):  # measured: 3, 6, 9, 12, 15; the ring keeps 12 and 15
            step(*batch(i))
        assert [s.step for s in opt.flush()] == [12, 15]
    (message,) = lost_warnings(caught)
    assert message.startswith("gradmon: 3 measured steps (steps 3, 6 and 9) were overwritten")


# -- one recorder per optimizer ------------------------------------------------------------

def test_one_optimizer_applied_from_two_functions_writes_every_step():
    a, b = net(seed=4), net(seed=5)
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(a.trainable_variables + b.trainable_variables)
    opt = gradmon.observe(optimizer)
    steps = {a: compiled_step(a, opt), b: compiled_step(b, opt)}
    expected = {}
    for i in range(20):
        model = a if i % 2 == 0 else b
        x, y = batch(i)
        expected[i + 1] = global_norm(tape_gradients(model, MSE, x, y))
        steps[model](x, y)
    assert opt.gradmon.step == 20
    snapshots = opt.flush()
    assert [s.step for s in snapshots] == list(range(1, 21))
    for s in snapshots:
        assert s[NORM] == pytest.approx(expected[s.step], rel=1e-5)


def test_a_subset_then_all_variables_share_one_step_axis():
    model = net(seed=6)
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(model.trainable_variables)
    opt = gradmon.observe(optimizer)
    head = model.trainable_variables[2:]
    subset, full = compiled_step(model, opt, head), compiled_step(model, opt)
    expected = {}
    for i in range(12):
        x, y = batch(i)
        grads = tape_gradients(model, MSE, x, y)
        expected[i + 1] = global_norm(grads[2:] if i % 2 == 0 else grads)
        (subset if i % 2 == 0 else full)(x, y)
    snapshots = opt.flush()
    assert opt.gradmon.step == 12
    assert [s.step for s in snapshots] == list(range(1, 13))
    for s in snapshots:
        assert s[NORM] == pytest.approx(expected[s.step], rel=1e-5)


# -- re-running a notebook cell -----------------------------------------------------------

def test_observing_an_optimizer_again_replaces_the_observer(tmp_path):
    model = net(seed=7)
    opt = gradmon.observe(keras.optimizers.SGD(0.05), log_dir=str(tmp_path))
    first = opt.gradmon
    step = compiled_step(model, opt)
    expected = {}
    for i in range(3):
        expected[i + 1] = global_norm(tape_gradients(model, MSE, *batch(i)))
        step(*batch(i))
    opt = gradmon.observe(opt, log_dir=str(tmp_path))  # the cell, run again (no flush before)
    assert opt.gradmon is not first and observer_of(opt) is opt.gradmon
    step = compiled_step(model, opt)
    for i in range(3, 6):
        expected[i + 1] = global_norm(tape_gradients(model, MSE, *batch(i)))
        step(*batch(i))
    opt.gradmon.close()
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[NORM]) == list(range(1, 7))  # the old observer's 3 steps, then 3 more
    for s, value in expected.items():
        assert events[NORM][s] == pytest.approx(value, rel=1e-5)


def test_monitoring_again_and_fitting_the_original_are_not_refused(tmp_path):
    base = net(seed=8)
    base.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    for _ in range(2):  # `m = gradmon.monitor(base)` in a cell run twice
        m = gradmon.monitor(base)
        m.fit(X[:32], Y[:32], batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    expected = global_norm(tape_gradients(base, MSE, X[:8], Y[:8]))
    base.fit(X[:32], Y[:32], batch_size=8, epochs=1, shuffle=False, verbose=0,
             callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[NORM]) == list(range(1, 13))  # one step axis: the optimizer's updates
    assert events[NORM][9] == pytest.approx(expected, rel=1e-5)


# -- plain tf.Variable ----------------------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True])
def test_a_plain_tf_variable_is_observed(compiled):
    v = tf.Variable([1.0, 2.0, 2.0])
    g = tf.constant([0.5, -1.0, 2.0])
    opt = gradmon.observe(keras.optimizers.SGD(0.1))

    def apply():
        opt.apply_gradients([(g, v)])

    (tf.function(apply) if compiled else apply)()
    np.testing.assert_allclose(v.numpy(), [0.95, 2.1, 1.8], rtol=1e-6)
    (snapshot,) = opt.flush()
    assert snapshot[NORM] == pytest.approx(np.linalg.norm([0.5, -1.0, 2.0]), rel=1e-6)
    # update ratio |dw| / |w| on the variable's own group (it needs the pre-update weights)
    ratio = [value for tag, value in snapshot.values.items() if tag.startswith("gradients/update_ratio/")]
    assert ratio == [pytest.approx(0.1 * np.linalg.norm([0.5, -1.0, 2.0]) / 3.0, rel=1e-5)]


# -- bad inputs, before the first step -----------------------------------------------------

def test_the_optimizer_class_is_refused_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"`optimizer`.*instance.*not the class.*Received: optimizer=<class"):
        gradmon.observe(keras.optimizers.Adam, log_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "train")  # a refused observe writes no event file


def test_a_huge_buffer_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`buffer_steps`.*at most 65536.*Received: buffer_steps=10000000"):
        gradmon.observe(keras.optimizers.Adam(), log_dir=str(tmp_path), buffer_steps=10 ** 7)
    assert not os.path.exists(tmp_path / "train")
    # the ring's bytes are bounded too: 65536 rows of a wide row is refused at the first step
    model = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(4) for _ in range(80)])
    opt = gradmon.observe(keras.optimizers.SGD(0.01), buffer_steps=65536, stats="all")
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"`buffer_steps`.*at most \d+ logged steps.*MiB"):
        compiled_step(model, opt)(X[:8], np.zeros((8, 4), np.float32))
    for a, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(a, v.numpy())  # refused before the update


@pytest.mark.parametrize("transform, match", [
    (lambda g, p: [tf.reshape(x, [-1]) for x in g], r"shape \(12,\) dtype float32 for the gradient of"),
    (lambda g, p: [tf.cast(x, tf.float64) for x in g], r"shape \(4, 3\) dtype float64 for the gradient of"),
    (lambda g, p: (g, {"mine": tf.constant(0.5)}), r"returning only the gradients.*GradientTransform"),
], ids=["shape", "dtype", "pair"])
def test_a_transform_that_breaks_the_gradients_is_a_clear_error(transform, match):
    model = net(seed=9)
    opt = gradmon.observe(keras.optimizers.SGD(0.05), transform=transform)
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"`transform`") as error:
        compiled_step(model, opt)(*batch(0))
    assert "Received: transform=" in str(error.value)
    assert any(__import__("re").search(match, line) for line in str(error.value).splitlines())
    for a, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(a, v.numpy())


class Reshaping(T.GradientTransform):
    name = "reshaping"

    def __call__(self, grads, params):
        return [tf.reshape(g, [-1]) for g in grads], {}


def test_a_transform_class_that_changes_shapes_is_a_clear_error():
    model = net(seed=10)
    opt = gradmon.observe(keras.optimizers.SGD(0.05), transform=Reshaping())
    with pytest.raises(ValueError, match=r"`transform`.*Received: transform='reshaping'.*shape \(12,\)"):
        compiled_step(model, opt)(*batch(0))
