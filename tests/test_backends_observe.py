"""`gradmon.observe` custom loops on the suite's Keras backend, against a NumPy replay.

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_backends_observe.py`).
Each loop is the backend's own way to write one (docs/guide/custom-loops.md):

- JAX, functional: a `jax.jit` step over `model.stateless_call`, `jax.value_and_grad` and
  `optimizer.stateless_apply`, carrying the optimizer variables; `opt.flush(optimizer_variables=...)`
  reads gradmon's state from them (or they are assigned back and `opt.flush()` reads the variables);
- JAX, stateful: `jax.grad`, then `optimizer.apply` outside jit (written as it goes);
- PyTorch: `backward()`, then `optimizer.apply` under `no_grad` (written as it goes);
- TensorFlow: a `tf.function` over a `GradientTape` and `apply_gradients`, then `opt.flush()`.

The reference is independent of every framework: a two-layer tanh MLP with an MSE loss whose
gradients are written out by hand in NumPy (float64) and replayed step by step with SGD, from
the same weights (set from NumPy) and batches. The logged raw and clipped global and per-layer
norms, the clip ratio and the update ratios equal the replay's to float32 precision, and the loop
ends on the replay's weights. Under TensorFlow, `test_backend_in_subprocess` runs this module
under JAX and PyTorch (`helpers.backend_python`; skipped when absent, and under `make test`).
"""

import os

import keras
import numpy as np
import pytest

import gradmon
from helpers import finish_module_run, read_events, runs_from_the_tensorflow_suite

BACKEND = keras.backend.backend()
LR, BATCH, STEPS, HIDDEN, CLIP = 0.1, 8, 4, 8, 0.5
LAYERS = ("dense", "dense_1")
LOOPS = {"jax": ["jit", "jit_assigned_back", "eager"], "torch": ["eager"], "tensorflow": ["tf_function"]}


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH * STEPS, 4)).astype("float32")
    y = rng.normal(size=(BATCH * STEPS, 1)).astype("float32")
    weights = [rng.normal(size=(4, HIDDEN)).astype("float32"), 0.1 * rng.normal(size=HIDDEN).astype("float32"),
               rng.normal(size=(HIDDEN, 1)).astype("float32"), 0.1 * rng.normal(size=1).astype("float32")]
    return x, y, weights


def _model(weights):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="dense")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense_1")(hidden))
    model.set_weights(weights)
    return model


def _replay(weights, x, y):
    """Per step: what gradmon logs, from hand-written gradients clipped to CLIP; the final weights."""
    w = [np.asarray(v, np.float64) for v in weights]
    logged = []
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH].astype(np.float64), y[step * BATCH:(step + 1) * BATCH]
        h = np.tanh(xb @ w[0] + w[1])
        d = 2.0 * (h @ w[2] + w[3] - yb) / yb.size
        dh = (d @ w[2].T) * (1.0 - h ** 2)
        g = [xb.T @ dh, dh.sum(0), h.T @ d, d.sum(0)]
        norm = np.sqrt(sum(np.sum(a ** 2) for a in g))
        clipped = [a * CLIP / max(norm, CLIP) for a in g]
        new = [v - LR * a for v, a in zip(w, clipped)]
        layer = lambda arrays, i: np.sqrt(np.sum(arrays[2 * i] ** 2) + np.sum(arrays[2 * i + 1] ** 2))  # noqa: E731
        deltas = [a - b for a, b in zip(new, w)]
        out = np.sqrt(sum(np.sum(a ** 2) for a in clipped))
        logged.append({
            "gradients/raw/global_norm": norm, "gradients/transformed/global_norm": out,
            "gradients/clip/ratio": out / norm,
            **{f"gradients/raw/norm/{LAYERS[i]}": layer(g, i) for i in range(2)},
            **{f"gradients/transformed/norm/{LAYERS[i]}": layer(clipped, i) for i in range(2)},
            **{f"gradients/update_ratio/{LAYERS[i]}": layer(deltas, i) / layer(w, i) for i in range(2)},
        })
        w = new
    return logged, w


def _mse(pred, y):
    return keras.ops.mean(keras.ops.square(pred - y))


def _jax_loop(model, opt, x, y, loop):
    import jax

    opt.build(model.trainable_variables)  # gradmon's state is built with the optimizer's
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    optimizer_variables = [v.value for v in opt.variables]

    def loss_fn(trainable, non_trainable, xb, yb):
        pred, non_trainable = model.stateless_call(trainable, non_trainable, xb)
        return _mse(pred, yb), non_trainable

    @jax.jit
    def step(trainable, non_trainable, optimizer_variables, xb, yb):
        (_, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, xb, yb)
        trainable, optimizer_variables = opt.stateless_apply(optimizer_variables, grads, trainable)
        return trainable, non_trainable, optimizer_variables

    for i in range(STEPS):
        rows = slice(i * BATCH, (i + 1) * BATCH)
        if loop == "eager":  # the stateful loop: the optimizer's variables hold the state
            grads = jax.grad(lambda t: loss_fn(t, non_trainable, x[rows], y[rows])[0])(
                [v.value for v in model.trainable_variables])
            opt.apply(grads, model.trainable_variables)
        else:
            trainable, non_trainable, optimizer_variables = step(
                trainable, non_trainable, optimizer_variables, x[rows], y[rows])
    if loop == "eager":
        return
    for v, value in zip(model.trainable_variables, trainable):
        v.assign(value)
    if loop == "jit":
        assert opt.gradmon.step == 0  # the variables are not the loop's state...
        with opt.gradmon.reading(optimizer_variables):  # ...these are
            assert opt.gradmon.step == STEPS
        opt.flush(optimizer_variables=optimizer_variables)
        return
    for v, value in zip(opt.variables, optimizer_variables):
        v.assign(value)
    assert opt.gradmon.step == STEPS
    opt.flush()


def _torch_loop(model, opt, x, y):
    import torch

    for i in range(STEPS):
        rows = slice(i * BATCH, (i + 1) * BATCH)
        loss = _mse(model(x[rows]), torch.from_numpy(y[rows]))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            opt.apply([v.value.grad for v in model.trainable_variables], model.trainable_variables)


def _tensorflow_loop(model, opt, x, y):
    import tensorflow as tf

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = _mse(model(xb, training=True), yb)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    for i in range(STEPS):
        step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
    opt.flush()


def _logged(events, tag):
    found = [t for t in events if t == tag or t.replace(t.split("/")[-2] + "/", "", 1) == tag]
    assert len(found) == 1, (tag, sorted(events))
    return events[found[0]]


@pytest.mark.parametrize("loop", LOOPS[BACKEND])
def test_a_custom_loop_logs_the_numbers_of_a_numpy_replay(tmp_path, loop):
    x, y, weights = _data()
    model = _model(weights)
    opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=str(tmp_path), update_freq=2,
                          transform=gradmon.transforms.clip_by_global_norm(CLIP))
    if BACKEND == "jax":
        _jax_loop(model, opt, x, y, loop)
    else:
        {"torch": _torch_loop, "tensorflow": _tensorflow_loop}[BACKEND](model, opt, x, y)
    events = read_events(os.path.join(str(tmp_path), "train"))  # before close(): flushed or eager
    expected, final = _replay(weights, x, y)
    for tag in expected[0]:
        values = _logged(events, tag)
        assert sorted(values) == [2, 4], (tag, values)
        np.testing.assert_allclose([values[2], values[4]], [expected[1][tag], expected[3][tag]],
                                   rtol=2e-5, atol=1e-7, err_msg=tag)
    assert min(row["gradients/clip/ratio"] for row in expected) < 0.9  # the clip acted
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    opt.gradmon.close()


@pytest.mark.skipif(BACKEND != "jax", reason="JAX: a functional loop carries the optimizer variables")
def test_flush_writes_what_it_reports_back_into_the_carried_variables(tmp_path):
    """Non-finite steps are reported once per run of them: the host's mark (reported up to step 2)
    reaches the loop's next steps through the list `flush` was given, so steps 3 and 4 (NaN weights
    since step 2) are a run that went on, not warned of again from step 2."""
    import warnings

    import jax

    x, y, weights = _data()
    x[BATCH, 0] = np.nan  # step 2's gradient is NaN, and so are the weights after it
    model = _model(weights)
    opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=str(tmp_path))
    opt.build(model.trainable_variables)
    trainable = [v.value for v in model.trainable_variables]
    carried = [v.value for v in opt.variables]

    @jax.jit
    def step(trainable, carried, xb, yb):
        def loss(t):
            return _mse(model.stateless_call(t, [], xb)[0], yb)
        return opt.stateless_apply(carried, jax.grad(loss)(trainable), trainable)

    warned = []
    for i in range(STEPS):
        trainable, carried = step(trainable, carried, x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
        if i in (1, 3):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.flush(optimizer_variables=carried)
            warned.append([str(w.message) for w in caught if "non-finite" in str(w.message)])
    assert len(warned[0]) == 1 and "at step 2 " in warned[0][0], warned
    assert warned[1] == [], warned
    assert _logged(read_events(os.path.join(str(tmp_path), "train")), "gradients/nonfinite_steps") == \
        {1: 0.0, 2: 1.0, 3: 2.0, 4: 3.0}
    opt.gradmon.close(optimizer_variables=carried)


def test_flush_refuses_optimizer_variables_of_another_length():
    x, y, weights = _data()
    opt = gradmon.observe(keras.optimizers.SGD(LR))
    opt.build(_model(weights).trainable_variables)
    count = len(opt.variables)
    with pytest.raises(ValueError, match=rf"`optimizer_variables`. Expected a list of the {count} values of "
                                         r"`optimizer.variables`.*Received: optimizer_variables=<tuple of 1 values>"):
        opt.flush(optimizer_variables=(0,))


@pytest.fixture(scope="module")
def subprocess_runs():
    """This module under JAX and under PyTorch (`helpers.runs_from_the_tensorflow_suite`)."""
    yield from runs_from_the_tensorflow_suite(os.path.abspath(__file__), ["-k", "not subprocess"])


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_in_subprocess(subprocess_runs, backend):
    output = finish_module_run(subprocess_runs, backend)
    last = output.strip().splitlines()[-1]
    assert {"jax": "6 passed", "torch": "3 passed"}[backend] in last and "failed" not in last, output[-2000:]


def test_the_unflushed_loop_warnings_name_this_backends_flush():
    """A jitted JAX loop holds gradmon's state in the optimizer variables its step returns:
    the warnings about unwritten steps tell it to hand them to `flush` / `close`; the other
    backends' loops call them bare."""
    from gradmon.publish import alerts

    flush, close = alerts.in_a_loop_flush(), alerts.loop_close()
    if BACKEND == "jax":
        assert "`opt.flush(optimizer_variables=...)`" in flush and "optimizer_variables=" in close
    else:
        assert "`opt.flush()`" in flush and close == "`opt.gradmon.close()`"
        assert ("tf.function" in flush) == (BACKEND == "tensorflow")
