"""Independent references for the tests: plain Keras/TF and numpy, no gradmon code.

TensorFlow is imported where it is used, so backend-neutral tests import this module in
a TensorFlow-free environment (KERAS_BACKEND=jax or torch); there the event files are read
by TensorBoard's own TensorFlow-free record reader."""

import contextlib
import glob
import os
import socket
import subprocess
import sys
import time

import numpy as np


def tiny_regression():
    """(x, y): 48 rows of 4 normal inputs (seed 0) and 2 normal targets (seed 1), float32."""
    return (np.random.default_rng(0).normal(size=(48, 4)).astype("float32"),
            np.random.default_rng(1).normal(size=(48, 2)).astype("float32"))


def tiny_functional():
    """A seeded functional Dense(5, tanh) -> Dense(2) on 4 inputs (the data of `tiny_regression`)."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def tape_gradients(model, loss_fn, x, y, sample_weight=None):
    """Gradients of `loss_fn` (+ regularization) at `model`'s current weights, by a plain tape."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        pred = model(x, training=True)
        loss = loss_fn(y, pred, sample_weight=sample_weight)
        if model.losses:
            loss = loss + tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    return [None if g is None else tf.convert_to_tensor(g).numpy().astype(np.float64) for g in grads]


def bn_dropout_net(outputs):
    """A small functional net with BatchNormalization and Dropout (state a probe must not change)."""
    import keras

    keras.utils.set_random_seed(5)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(0.3)(h)
    return keras.Model(inputs, keras.layers.Dense(outputs)(h))


def numpy_stats(g):
    """[norm, max_abs, rms, zero_fraction, nonfinite] of one array, in float64."""
    g = np.asarray(g, dtype=np.float64)
    return np.array([np.linalg.norm(g.ravel()), np.max(np.abs(g)), np.sqrt(np.mean(g**2)),
                     np.mean(g == 0), np.sum(~np.isfinite(g))])


def tanh_mlp_gradients(w, x, y):
    """d mean((tanh(x W1 + b1) W2 + b2 - y)^2) / d(W1, b1, W2, b2), by hand (NumPy): the
    reference of the backend tests' two-layer tanh MLP."""
    w1, b1, w2, b2 = w
    h = np.tanh(x @ w1 + b1)
    d = 2.0 * (h @ w2 + b2 - y) / y.size
    dh = (d @ w2.T) * (1.0 - h ** 2)
    return [x.T @ dh, dh.sum(0), h.T @ d, d.sum(0)]


def clip_global_norm(grads, max_norm):
    """`grads` scaled to a global norm of at most `max_norm`, and [whether it clipped] (NumPy)."""
    norm = global_norm(grads)
    return [a * max_norm / max(norm, max_norm) for a in grads], [float(norm > max_norm)]


def _layer_stat(arrays, i, stat):
    """One statistic of layer `i` of the tanh MLP (its kernel and bias together)."""
    flat = np.concatenate([arrays[2 * i].ravel(), arrays[2 * i + 1].ravel()])
    return {"norm": np.linalg.norm(flat), "max_abs": np.max(np.abs(flat)),
            "rms": np.sqrt(np.mean(flat ** 2)), "zero_fraction": np.mean(flat == 0)}[stat]


def replay_tanh_mlp(weights, x, y, lr, batch, steps, clip=None, stats=("norm",), layers=("dense", "dense_1")):
    """The tanh MLP (`tanh_mlp_gradients`) trained by SGD(`lr`) on `steps` consecutive batches of
    `batch` rows, in float64: per step the numbers gradmon logs (global norms, clip ratio and
    fraction, each layer's `stats` of the raw and applied gradient, update ratios), and the final
    weights. `clip`: g -> (applied g, [fraction of each clip]), or None (nothing clipped)."""
    w = [np.asarray(v, np.float64) for v in weights]
    logged = []
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        g = tanh_mlp_gradients(w, x[rows].astype(np.float64), y[rows].astype(np.float64))
        applied, fractions = (g, [0.0]) if clip is None else clip(g)
        new = [v - lr * a for v, a in zip(w, applied)]
        deltas = [a - b for a, b in zip(new, w)]
        norm, out = global_norm(g), global_norm(applied)
        row = {"gradients/raw/global_norm": norm,
               "gradients/transformed/global_norm": out,
               "gradients/clip/ratio": out / norm,
               "gradients/clip/fraction": max(fractions)}
        for i, layer in enumerate(layers):
            for stat in stats:
                row[f"gradients/raw/{stat}/{layer}"] = _layer_stat(g, i, stat)
                row[f"gradients/transformed/{stat}/{layer}"] = _layer_stat(applied, i, stat)
            row[f"gradients/update_ratio/{layer}"] = _layer_stat(deltas, i, "norm") / _layer_stat(w, i, "norm")
        logged.append(row)
        w = new
    return logged, w


def replay_spike_detector(values, threshold, alpha=0.97, warmup=25, log=True, batches=None):
    """z-scores, spikes [(step, z)] and counts of the on_spike detector: of the log of each value
    (`log`: the norm's; the loss's is taken as it is), a zero value having no log; only the steps
    whose batch is as large as the largest so far (`batches`: sizes, or None: every step); the
    first `warmup` finite values set mean / population variance, then EMAs; a spike is folded in
    at mean + thr * std; nothing is judged while the variance is exactly 0."""
    buffer, mean, var, zs, found, counts = [], None, None, [], [], []
    largest = 0
    for step, x in enumerate(values, 1):
        z = float("nan")
        if batches is not None:
            largest = max(largest, batches[step - 1])
            if batches[step - 1] < largest:
                x = float("nan")  # a partial batch: neither judged nor folded in
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.log(x)
        if np.isfinite(x):
            if mean is None:
                buffer.append(x)
                if len(buffer) == warmup:
                    mean, var = np.mean(buffer), np.var(buffer)
            else:
                std = np.sqrt(var)
                if var > 0:
                    z = (x - mean) / (std + 1e-12)
                if z > threshold:
                    found.append((step, z))
                    x = mean + threshold * std
                mean = alpha * mean + (1 - alpha) * x
                var = alpha * var + (1 - alpha) * (x - mean) ** 2
        zs.append(z)
        counts.append(len(found))
    return np.array(zs), found, counts


def global_norm(arrays):
    return np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays if a is not None))


def event_files(logdir):
    """The event files of a run directory, then those of the runs below it (gradmon writes each
    group's series into `train/<group>`), as `gradmon.events.load_run` reads them."""
    return sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) + sorted(
        glob.glob(os.path.join(logdir, "*", "**", "events.out.tfevents.*"), recursive=True),
        key=lambda p: (os.path.basename(p), p))


def _summary_iterator(path):
    """The events of one file: TensorFlow's reader, or TensorBoard's where TensorFlow is absent."""
    try:
        import tensorflow as tf
    except ModuleNotFoundError:
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        return LegacyEventFileLoader(path).Load()
    return tf.compat.v1.train.summary_iterator(path)


def _make_ndarray(tensor_proto):
    try:
        import tensorflow as tf
    except ModuleNotFoundError:
        from tensorboard.util import tensor_util

        return tensor_util.make_ndarray(tensor_proto)
    return tf.make_ndarray(tensor_proto)


def read_events(logdir):
    """{tag: {step: value}} from every event file under `logdir` (scalars as floats, others as arrays)."""
    out = {}
    for path in event_files(logdir):
        for event in _summary_iterator(path):
            for value in event.summary.value:
                array = _make_ndarray(value.tensor) if value.HasField("tensor") else np.array(value.simple_value)
                if array.dtype.kind not in "biuf":
                    continue  # e.g. the custom-scalars layout
                out.setdefault(value.tag, {})[event.step] = float(array) if array.shape == () else array
    return out


def read_descriptions(logdir):
    """{tag: description} as TensorBoard would read them (first metadata seen)."""
    out = {}
    for path in event_files(logdir):
        for event in _summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("metadata") and value.tag not in out:
                    out[value.tag] = value.metadata.summary_description
    return out


def explicit_hessian(model, loss_fn, x, y):
    """Dense float64 Hessian of `loss_fn(model, x, y)` wrt trainable vars."""
    import tensorflow as tf

    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = loss_fn(model, x, y)
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    jacobians = outer.jacobian(flat, variables)
    n = int(flat.shape[0])
    matrix = np.concatenate(
        [np.reshape(j.numpy(), (n, -1)) for j in jacobians], axis=1
    ).astype(np.float64)
    return 0.5 * (matrix + matrix.T)


def latest_snapshot(model):
    """The last measured step of a monitored model (gradmon's own reading of its device state)."""
    observer = model.gradient_observer if hasattr(model, "gradient_observer") else model._gradmon_observer
    snapshots = observer.recorder.read() if observer.recorder is not None else []
    return snapshots[-1] if snapshots else None


def group_row(snapshot, kind, path):
    """[norm, max_abs, rms, zero_fraction, nonfinite] as written for one group."""
    from gradmon import tags

    return np.array([snapshot[tags.group_stat(kind, s, path)] for s in tags.GROUP_STATS])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_tensorboard(log_dir, ready, timeout=90):
    """A real `tensorboard` serving `log_dir` on 127.0.0.1; yields its port once `ready(port)` is
    true (an `OSError` from it means not yet), fails the test after `timeout` s; always stopped."""
    import pytest

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", log_dir, "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1", "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if ready(port):
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                pytest.fail(f"tensorboard did not serve the run in {timeout} s")
            time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


# -- other Keras backends, from this suite ----------------------------------------------------
# `make test` points GRADMON_{TENSORFLOW,JAX,TORCH}_PYTHON at .venv, .venv-jax and .venv-torch.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND_PYTHONS = {
    "jax": ("GRADMON_JAX_PYTHON", os.path.join(ROOT, ".venv-jax", "bin", "python")),
    "tensorflow": ("GRADMON_TENSORFLOW_PYTHON", os.path.join(ROOT, ".venv", "bin", "python")),
    "torch": ("GRADMON_TORCH_PYTHON", os.path.join(ROOT, ".venv-torch", "bin", "python")),
}


def backend_python(backend):
    """The interpreter of `backend` (its variable, else the venv `make test` creates), or a skip."""
    import pytest

    variable, default = BACKEND_PYTHONS[backend]
    path = os.environ.get(variable) or default
    if not os.path.exists(path):
        pytest.skip(f"no {backend} interpreter: {path} does not exist (set {variable} to a Python "
                    f"with Keras 3 and {backend})")
    return path


def backend_env(backend):
    return dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)


def start_module_on_backends(module, backends, pytest_args=()):
    """`module`'s tests run under each of `backends`, started together: `{backend: Popen}`.

    A backend without an interpreter is left out (`finish_module_run` skips it). Under `make
    test`, which runs every backend's suite itself (GRADMON_EVERY_BACKEND=1), none is started.
    """
    if os.environ.get("GRADMON_EVERY_BACKEND") == "1":
        return {}
    runs = {}
    for backend in backends:
        variable, default = BACKEND_PYTHONS[backend]
        path = os.environ.get(variable) or default
        if os.path.exists(path):
            runs[backend] = subprocess.Popen(
                [path, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, module],
                cwd=ROOT, env=backend_env(backend), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)
    return runs


def runs_from_the_tensorflow_suite(module, pytest_args=()):
    """The body of a module-scoped fixture (`yield from` it): `module` started under JAX and
    PyTorch together (their imports dominate) from the TensorFlow suite, stopped after its
    tests; skipped under the other backends, whose own suites run the module."""
    import keras
    import pytest

    if keras.backend.backend() != "tensorflow":
        pytest.skip("run from the TensorFlow suite")
    runs = start_module_on_backends(module, ("jax", "torch"), pytest_args)
    yield runs
    stop_module_runs(runs)


def finish_module_run(runs, backend, timeout=180):
    """The output of `runs[backend]` once it passed; a skip when it was not started."""
    import pytest

    if backend not in runs:
        if os.environ.get("GRADMON_EVERY_BACKEND") == "1":
            pytest.skip(f"make test runs this module on {backend} in its own suite")
        backend_python(backend)  # skips, naming the missing interpreter
    output, _ = runs[backend].communicate(timeout=timeout)
    assert runs[backend].returncode == 0, output[-5000:]
    return output


def stop_module_runs(runs):
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.wait()
