"""gradmon.hessian on the running Keras backend, beside an explicit Hessian of the same loss.

Run by `tests/test_hessian_backends.py`: imported under the suite's own backend, and as
a script (`python tests/hessian_backend_check.py`, `KERAS_BACKEND=jax|torch`) in a
TensorFlow-free interpreter, where it prints its results as one JSON line.

The reference Hessian is computed by the backend's own autodiff (`jax.hessian`,
`torch.autograd.functional.hessian`, nested `tf.GradientTape`s) of the loss written out
by hand (no Keras, no gradmon): the mean squared error of a 3-4-2 tanh MLP plus an L2
kernel penalty on the first layer. The model's weights and data are fixed NumPy
arrays, so every backend sees the same Hessian.
"""

import json
import sys

import numpy as np

L2 = 0.01
SIZES = [(3, 4), (4,), (4, 2), (2,)]


def weights_and_data():
    """The fixed weights `[W1, b1, W2, b2]` and 16 examples `(x, y)`."""
    rng = np.random.default_rng(7)
    weights = [(0.8 * rng.standard_normal(s)).astype(np.float32) for s in SIZES]
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.standard_normal((16, 2)).astype(np.float32)
    return weights, x, y


def build_model(weights):
    import keras

    model = keras.Sequential([  # named: the per-layer tags are the same in every process
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.L2(L2),
                           name="hidden"),
        keras.layers.Dense(2, name="out"),
    ], name="net")
    model.set_weights(weights)
    model.compile(loss="mse")
    return model


def _unflatten(flat, split, reshape):
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in SIZES])
    return [reshape(split(flat, int(a), int(b)), s) for a, b, s in zip(offsets[:-1], offsets[1:], SIZES)]


def explicit_hessian(weights, x, y):
    """The dense Hessian (float64 NumPy) of the hand-written loss, by the backend's autodiff."""
    import keras

    backend = keras.backend.backend()
    flat = np.concatenate([w.reshape(-1) for w in weights])
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss(w):
            w1, b1, w2, b2 = _unflatten(w, lambda v, a, b: v[a:b], jnp.reshape)
            out = jnp.tanh(x @ w1 + b1) @ w2 + b2
            return jnp.mean((out - y) ** 2) + L2 * jnp.sum(w1 ** 2)

        return np.asarray(jax.jit(jax.hessian(loss))(jnp.asarray(flat)), np.float64)
    if backend == "torch":
        import torch

        xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)

        def loss(w):
            w1, b1, w2, b2 = _unflatten(w, lambda v, a, b: v[a:b], torch.reshape)
            out = torch.tanh(xt @ w1 + b1) @ w2 + b2
            return torch.mean((out - yt) ** 2) + L2 * torch.sum(w1 ** 2)

        return torch.autograd.functional.hessian(loss, torch.tensor(flat, dtype=torch.float64)).numpy()
    import tensorflow as tf

    xt, yt = tf.constant(x, tf.float64), tf.constant(y, tf.float64)
    w = tf.Variable(flat.astype(np.float64))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            w1, b1, w2, b2 = _unflatten(w, lambda v, a, b: v[a:b], tf.reshape)
            out = tf.tanh(xt @ w1 + b1) @ w2 + b2
            loss = tf.reduce_mean((out - yt) ** 2) + L2 * tf.reduce_sum(w1 ** 2)
        grad = inner.gradient(loss, w)
    return outer.jacobian(grad, w).numpy()


def run():
    """gradmon's numbers and the explicit Hessian's, as a dict of lists."""
    import keras

    from gradmon import hessian

    weights, x, y = weights_and_data()
    model = build_model(weights)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]  # the mean over both batches (one shape: one trace)
    out = {"backend": keras.backend.backend()}
    for mode in hessian.HVP_MODES:
        hvp = hessian.make_hvp(model, data, hvp_mode=mode)
        out[f"{mode}/matrix"] = np.stack([hvp(e) for e in np.eye(hvp.num_params)]).tolist()
    hvp = hessian.make_hvp(model, data)
    spec = hessian.spectrum(hvp, top_k=3, smallest=True, tol=1e-6, seed=0)
    power = hessian.spectrum(hvp, top_k=2, method="power", tol=1e-6, seed=0)
    diagonal = np.linspace(0.5, 2.0, hvp.num_params)
    pre = hessian.spectrum(hvp, top_k=2, tol=1e-6, seed=0, preconditioner=diagonal)
    estimate = hessian.trace(hvp, num_samples=64, seed=0)
    dens = hessian.density(hvp, num_probes=2, num_steps=10, seed=0)
    out.update({
        "eigenvalues": spec.eigenvalues.tolist(), "min_eigenvalue": spec.min_eigenvalue,
        "residuals": spec.residuals.tolist(), "converged": spec.converged,
        "power": power.eigenvalues.tolist(), "preconditioned": pre.eigenvalues.tolist(),
        "diagonal": diagonal.tolist(), "trace": [estimate.value, estimate.stderr],
        "density_nodes": dens.nodes.tolist(), "density_weight": float(dens.weights.sum()),
        "loss": hvp.gradient()[0], "trace_count": hvp.trace_count,
        "explicit": explicit_hessian(weights, x, y).tolist(),
        "monitor": _monitor_run(),
        "live_state_errors": _live_state_errors() if out["backend"] == "jax" else None,
        "tensorflow_imported": "tensorflow" in sys.modules,
    })
    return out


def _live_state_errors():
    """JAX: `|H v - explicit H v|` of a BatchNormalization + Dropout model before and after
    its moving statistics change (a jitted HVP must read them, not hold them as constants).
    The explicit Hessian is `jax.hessian` of Keras' `stateless_call` with the current state."""
    import jax
    import jax.numpy as jnp
    import keras

    from gradmon import hessian

    weights, x, y = weights_and_data()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.BatchNormalization(), keras.layers.Dropout(0.5),
                              keras.layers.Dense(2)])
    model.compile(loss="mse")
    hvp = hessian.make_hvp(model, (x, y))
    v = np.random.default_rng(3).standard_normal(hvp.num_params)

    def explicit_product():
        state = [w.value for w in model.non_trainable_variables]
        shapes = [tuple(w.shape) for w in model.trainable_variables]
        flat = jnp.concatenate([w.value.reshape(-1) for w in model.trainable_variables])

        def loss(w):
            parts = jnp.split(w, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
            out, _ = model.stateless_call([p.reshape(s) for p, s in zip(parts, shapes)], state, x,
                                          training=False)
            return jnp.mean((out - y) ** 2)

        return np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64) @ v

    errors = [float(np.abs(hvp(v) - explicit_product()).max())]
    norm = model.layers[1]
    norm.moving_mean.assign(np.full(4, 0.3, np.float32))
    norm.moving_variance.assign(np.full(4, 2.0, np.float32))
    errors.append(float(np.abs(hvp(v) - explicit_product()).max()))
    return errors + [hvp.trace_count]


def _monitor_run():
    """`HessianMonitor` in a 4-step Adam `fit` (probes at steps 2 and 4, per layer too):
    `{tag: value at step 4}` of what it wrote, read back by `gradmon.summary` (no
    TensorFlow), and the explicit Hessian's eigenvalues at the final weights."""
    import shutil
    import tempfile

    import keras

    import gradmon
    from gradmon.summary import load_run

    weights, x, y = weights_and_data()
    model = build_model(weights)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    log_dir = tempfile.mkdtemp()
    try:
        monitor = gradmon.HessianMonitor(log_dir, data=(x, y), every_n_steps=2, top_k=2,
                                         smallest=True, tol=1e-6, per_layer=True)
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        run = load_run(log_dir)
        written = {tag: [run[tag][0].tolist(), float(run[tag][1][-1])]
                   for tag in run if tag.startswith("hessian/")}
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    final = explicit_hessian(model.get_weights(), x, y)
    return {"written": written, "exact": np.linalg.eigvalsh(final)[::-1].tolist()}


if __name__ == "__main__":
    print(json.dumps(run()))
