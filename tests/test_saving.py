"""What a monitored model saves opens without gradmon; gradmon's own state comes back with it.

Issue 16, item 5 ("Portable files") and item 7's first two bullets. The subprocess tests load
files in a fresh interpreter where `import gradmon` fails (checked there), as on a machine
without gradmon.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon.publish.writer import MemoryWriter
from helpers import tiny_functional, tiny_regression

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X, Y = tiny_regression()
functional = tiny_functional  # the model the saving tests save


@keras.saving.register_keras_serializable(package="test_saving")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, activation="tanh")
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


def fitted(model, steps=3, **monitor_kwargs):
    m = gradmon.monitor(model, **monitor_kwargs)
    m.compile(keras.optimizers.Adam(1e-2), "mse")
    m.fit(X, Y, batch_size=16, epochs=max(1, steps // 3), verbose=0)
    return m


def written_steps(writer):
    return sorted({step for series in writer.scalars.values() for step, _ in series})


def run_python(code, tmp_path):
    """Runs `code` in a fresh interpreter outside the repository; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# -- item 1: a .keras file opens with plain Keras, and as the monitored model with gradmon ----

def test_keras_files_load_with_plain_keras_where_gradmon_is_not_installed(tmp_path):
    paths = {}
    for kind, model in (("functional", functional()), ("subclassed", Subclassed())):
        m = fitted(model, transform=gradmon.transforms.clip_by_global_norm(0.5), on_spike="warn")
        paths[kind] = str(tmp_path / f"{kind}.keras")
        m.save(paths[kind])
        np.save(tmp_path / f"{kind}_expected.npy", m.predict(X, verbose=0))
    np.save(tmp_path / "x.npy", X)
    out = run_python(f"""
        import sys
        sys.modules["gradmon"] = None  # gradmon is installed editable in the venv: block it
        try:
            import gradmon
        except ImportError:
            pass
        else:
            raise SystemExit("gradmon importable")
        import json
        import keras
        import numpy as np

        @keras.saving.register_keras_serializable(package="test_saving")
        class Subclassed(keras.Model):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.hidden = keras.layers.Dense(5, activation="tanh")
                self.out = keras.layers.Dense(2)

            def call(self, x):
                return self.out(self.hidden(x))

        x, result = np.load("x.npy"), {{}}
        for kind in ("functional", "subclassed"):
            m = keras.saving.load_model({paths!r}[kind])
            diff = np.max(np.abs(m.predict(x, verbose=0) - np.load(kind + "_expected.npy")))
            result[kind] = [type(m).__module__, float(diff)]
        print(json.dumps(result))
        """, tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["functional"] == ["keras.src.models.functional", 0.0]
    assert result["subclassed"] == ["keras.src.models.sequential", 0.0]


@pytest.mark.parametrize("first", ["gradmon", "keras"])
def test_keras_file_after_a_bare_import_restores_configuration_and_state(tmp_path, first):
    m = fitted(functional(), steps=6, transform=gradmon.transforms.clip_by_global_norm(0.5),
               on_spike="warn", on_nonfinite="skip")
    path = str(tmp_path / "m.keras")
    m.save(path)
    step = m.gradient_observer.step
    norm_state = m.gradient_observer.spikes.norm_state.numpy().tolist()
    second = "keras" if first == "gradmon" else "gradmon"
    out = run_python(f"""
        import json
        import {first}
        import {second}
        m = keras.saving.load_model({path!r})
        observer = m._gradmon_observer
        m.fit(*[__import__("numpy").zeros(s, "float32") for s in ((16, 4), (16, 2))], verbose=0)
        print(json.dumps({{"monitored": isinstance(m, gradmon.GradientMonitorMixin),
                          "config": m.gradient_config.get_config(), "step": observer.step,
                          "norm_state": observer.spikes.norm_state.numpy().tolist()}}))
        """, tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["monitored"]
    assert result["config"]["transform"] == {"class_name": "clip_by_global_norm", "config": {"max_norm": 0.5}}
    assert result["config"]["on_spike"] == "warn" and result["config"]["on_nonfinite"] == "skip"
    assert result["step"] == step + 1  # the loaded model's one fit step continues the axis
    assert result["norm_state"][0] == norm_state[0] + 1  # the detector's statistics came back


# -- item 2: the weights load into the plain model; gradmon adds no model/optimizer variable ----

@pytest.mark.parametrize("kind", ["functional", "sequential", "unbuilt_sequential"])
def test_weights_file_loads_into_the_original_plain_model(tmp_path, kind):
    keras.utils.set_random_seed(4)
    if kind == "functional":
        base = functional()
    elif kind == "sequential":
        base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    else:  # monitor() wraps it (not functional yet)
        base = keras.Sequential([keras.layers.Dense(5), keras.layers.Dense(2)])
    plain = keras.models.clone_model(base)
    plain.compile(keras.optimizers.Adam(1e-2), "mse")
    plain.fit(X, Y, batch_size=16, verbose=0)  # builds the optimizer: its variables are compared
    m = fitted(base, transform=gradmon.transforms.clip_by_global_norm(0.5), on_spike="warn")
    path = str(tmp_path / "m.weights.h5")
    m.save_weights(path)
    # the optimizer of the monitored model holds exactly what a plain one does
    def layout(optimizer):  # (a slot's name follows its variable's path, which may differ)
        return [tuple(v.shape) for v in optimizer.variables]

    assert layout(m.optimizer) == layout(plain.optimizer)
    assert len(m.weights) == len(base.weights)
    plain.load_weights(path)  # raised "expected 0 variables, but received 1" (vars/gradmon_step)
    for a, b in zip(plain.weights, m.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(plain.optimizer.variables, m.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# -- item 3: gradmon's state comes back, through Keras files and tf.train.Checkpoint ----------

def test_weights_file_restores_the_step_axis_and_spike_statistics(tmp_path):
    m = fitted(functional(), steps=6, on_spike="warn")
    path = str(tmp_path / "m.weights.h5")
    m.save_weights(path)
    observer = m.gradient_observer
    fresh = gradmon.monitor(functional(), on_spike="warn")
    fresh.compile(keras.optimizers.Adam(1e-2), "mse")
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(path)
    writer = MemoryWriter()
    fresh.fit(X, Y, batch_size=16, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    assert written_steps(writer) == [observer.step + 1, observer.step + 2, observer.step + 3]
    # the detector resumed from the saved statistics: 3 more values folded in
    assert fresh.gradient_observer.spikes.norm_state.numpy()[0] == observer.spikes.norm_state.numpy()[0] + 3


def test_checkpoint_resumes_the_step_axis(tmp_path):
    m = fitted(functional(), steps=6, on_spike="warn")
    saved_step = m.gradient_observer.step
    saved_norm = m.gradient_observer.spikes.norm_state.numpy()
    assert saved_step == 6
    prefix = tf.train.Checkpoint(model=m, optimizer=m.optimizer).save(str(tmp_path / "ckpt"))

    fresh = gradmon.monitor(functional(), on_spike="warn")
    fresh.compile(keras.optimizers.Adam(1e-2), "mse")
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(prefix)
    writer = MemoryWriter()
    fresh.fit(X, Y, batch_size=16, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    # before: the restored run started again at step 1 and overwrote steps 1..3
    assert written_steps(writer) == [7, 8, 9]
    np.testing.assert_array_equal(fresh.gradient_observer.spikes.norm_state.numpy()[0], saved_norm[0] + 3)


def test_checkpoint_resumes_the_spike_detectors_largest_batch(tmp_path):
    m = fitted(functional(), steps=3, on_spike="warn")  # batches of 16
    saved = m.gradient_observer.spikes
    assert int(saved.largest_batch.numpy()) == 16
    prefix = tf.train.Checkpoint(model=m, optimizer=m.optimizer).save(str(tmp_path / "ckpt"))

    fresh = gradmon.monitor(functional(), on_spike="warn")
    fresh.compile(keras.optimizers.Adam(1e-2), "mse")
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(prefix)
    # the first batch after resuming is a partial one (8 < 16): it is neither judged nor folded in
    fresh.fit(X[:8], Y[:8], batch_size=8, verbose=0)
    tracker = fresh.gradient_observer.spikes
    # before: the resumed tracker's largest batch started at 0, so the 8 were judged and folded in
    assert int(tracker.largest_batch.numpy()) == 16
    assert tracker.norm_state.numpy()[0] == saved.norm_state.numpy()[0]


# -- item 4: clone_model keeps the configuration ------------------------------------------------

def clipped(grads, params):
    return [tf.clip_by_value(g, -1e-3, 1e-3) for g in grads]


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_clone_model_keeps_the_configuration(kind):
    model = functional() if kind == "functional" else Subclassed()
    penalty = gradmon.penalties.WeightPenalty(1e-3) if hasattr(gradmon.penalties, "WeightPenalty") else None
    m = gradmon.monitor(model, transform=gradmon.transforms.clip_by_global_norm(0.5), on_spike="skip",
                        on_nonfinite="stop", penalties=[penalty] if penalty else None)
    m(X[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clone = keras.models.clone_model(m)
    assert isinstance(clone, gradmon.GradientMonitorMixin)
    assert clone.gradient_config.get_config() == m.gradient_config.get_config()
    assert clone.gradient_observer is not m.gradient_observer


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_clone_model_keeps_a_plain_callable_transform(kind):
    m = gradmon.monitor(functional() if kind == "functional" else Subclassed(), transform=clipped)
    m(X[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing is lost: no "cannot be saved"
        clone = keras.models.clone_model(m)
    assert clone.gradient_observer.transform.fn is clipped


# -- item 5: a transform that cannot be saved is a warning at save time -------------------------

def test_saving_a_plain_callable_transform_warns_naming_it(tmp_path):
    m = fitted(functional(), transform=clipped)
    with pytest.warns(UserWarning, match=r"gradient transform `clipped` \(a plain callable\) cannot be saved"):
        m.save(str(tmp_path / "m.keras"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a built-in transform is saved: no warning
        fitted(functional(), transform=gradmon.transforms.clip_by_value(1.0)).save(str(tmp_path / "n.keras"))


# -- item 6: GradientMonitor on a model whose compiled optimizer never applies -------------------

class TwoOptimizers(keras.Model):
    """A GAN-like model: its train_step applies optimizers of its own; compiled without one."""

    def __init__(self):
        super().__init__()
        self.a, self.b = keras.layers.Dense(2), keras.layers.Dense(2)
        self.opt_a, self.opt_b = keras.optimizers.SGD(1e-2), keras.optimizers.SGD(1e-2)

    def call(self, x):
        return self.b(self.a(x))

    def train_step(self, data):
        x, y = data
        for layer, opt in ((self.a, self.opt_a), (self.b, self.opt_b)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((self(x) - y) ** 2)
            opt.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))
        return {"loss": loss}


def test_gradient_monitor_warns_when_the_compiled_optimizer_applies_nothing():
    model = TwoOptimizers()
    model.compile()
    model(X[:2])
    writer = MemoryWriter()
    with pytest.warns(UserWarning, match=r"applied no update.*gradmon\.observe"):
        model.fit(X[:, :4], Y, batch_size=16, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    assert written_steps(writer) == []
    plain = functional()
    plain.compile("sgd", "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an optimizer that applies: nothing to say
        plain.fit(X, Y, batch_size=16, epochs=2, verbose=0,
                  callbacks=[gradmon.GradientMonitor(writer=MemoryWriter(), update_freq=2)])


# -- item 7: fitting the model monitor() wrapped -------------------------------------------------

def test_fitting_the_original_after_monitor_warns_once():
    base = functional()
    m = gradmon.monitor(base, transform=gradmon.transforms.clip_by_global_norm(1e-3))
    m.compile(keras.optimizers.SGD(0.1), "mse")
    base.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.warns(UserWarning, match=r"fitting 'functional.*without the gradient transform "
                                         r"clip_by_global_norm\(max_norm=0\.001\)"):
        base.fit(X, Y, batch_size=16, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        base.fit(X, Y, batch_size=16, verbose=0)  # warned once
        m.fit(X, Y, batch_size=16, verbose=0)  # the monitored model: nothing to say


def test_fitting_the_original_without_a_transform_does_not_warn():
    base = functional()
    gradmon.monitor(base).compile("sgd", "mse")
    base.compile("sgd", "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        base.fit(X, Y, batch_size=16, verbose=0)
