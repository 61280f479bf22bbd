"""gradmon's state saved with the model on the suite's Keras backend (JAX and PyTorch included).

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_backends_saving.py`);
tests/test_saving.py holds the TensorFlow-only rest (tf.train.Checkpoint, the spike detector,
clone_model). A monitored model's `.keras` and `.weights.h5` files hold gradmon's step counter
and counters in a `gradmon_state` entry: a model loaded with gradmon continues the step axis
and the non-finite count; plain Keras, in an interpreter where gradmon cannot be imported, opens
the `.keras` file as the plain Functional with the same predictions, and the weights file loads
into the plain model (gradmon adds no model or optimizer variable to the files).
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

import gradmon
from gradmon.publish.writer import MemoryWriter
from helpers import tiny_functional, tiny_regression

X, Y = tiny_regression()
functional = tiny_functional  # the model the saving tests save


def fitted(x=X, epochs=2):
    m = gradmon.monitor(functional(), transform=gradmon.transforms.clip_by_global_norm(0.5))
    m.compile(keras.optimizers.SGD(1e-2), "mse")
    m.fit(x, Y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
          callbacks=[gradmon.GradientMonitor(writer=MemoryWriter())])
    return m


def written(writer, tag):
    return dict(writer.scalars[tag])


def test_keras_file_continues_the_step_axis_and_the_nonfinite_count(tmp_path):
    x = X.copy()
    x[20, 0] = np.nan  # step 2 of each epoch: non-finite (weights NaN from then on)
    m = fitted(x)
    assert m.gradient_observer.step == 6
    path = str(tmp_path / "m.keras")
    m.save(path)
    loaded = keras.saving.load_model(path)  # gradmon imported: the monitored model, its state
    writer = MemoryWriter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.fit(X[:16], Y[:16], batch_size=16, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    # steps 2..6 were non-finite (5), and the loaded model's NaN weights make step 7 the 6th
    assert written(writer, "gradients/nonfinite_steps") == {7: 6.0}
    assert loaded.gradient_observer.step == 7
    # the saving process warned of steps 2..6: this one warns of step 7 alone
    assert nonfinite_warnings(caught) == ["gradmon: non-finite gradients at step 7 (on_nonfinite='warn')"]


def nonfinite_warnings(caught):
    return [str(w.message).split(":", 2)[0] + ":" + str(w.message).split(":", 2)[1] for w in caught
            if "non-finite gradients" in str(w.message)]


def test_weights_loaded_into_the_same_model_warn_of_the_next_nonfinite_step(tmp_path):
    """Loading an earlier state into a model that had counted more non-finite steps since: the
    next non-finite step is still warned of (the count went back with the loaded state)."""
    x = X.copy()
    x[20, 0] = np.nan  # step 2 of each epoch: non-finite (weights NaN from then on)
    m = fitted(x, epochs=1)  # steps 2, 3 non-finite
    path = str(tmp_path / "m.weights.h5")
    m.save_weights(path)
    m.fit(x, Y, batch_size=16, verbose=0, shuffle=False, callbacks=[gradmon.GradientMonitor(writer=MemoryWriter())])
    m.load_weights(path)  # back to step 3, two non-finite steps counted
    writer = MemoryWriter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.fit(X[:16], Y[:16], batch_size=16, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    assert written(writer, "gradients/nonfinite_steps") == {4: 3.0}
    assert nonfinite_warnings(caught) == ["gradmon: non-finite gradients at step 4 (on_nonfinite='warn')"]


def test_weights_file_restores_the_step_axis_and_loads_into_the_plain_model(tmp_path):
    m = fitted()
    path = str(tmp_path / "m.weights.h5")
    m.save_weights(path)
    fresh = gradmon.monitor(functional(), transform=gradmon.transforms.clip_by_global_norm(0.5))
    fresh.compile(keras.optimizers.SGD(1e-2), "mse")
    fresh.load_weights(path)
    writer = MemoryWriter()
    fresh.fit(X, Y, batch_size=16, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    assert sorted(written(writer, "gradients/raw/global_norm")) == [7, 8, 9]
    plain = functional()
    plain.compile(keras.optimizers.SGD(1e-2), "mse")
    plain.load_weights(path)  # no gradmon variable among the model's or optimizer's
    for a, b in zip(plain.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(keras.ops.convert_to_numpy(plain.optimizer.iterations)) == 6


def test_a_monitored_model_pickles_with_its_state():
    """Keras pickles models (e.g. for distributed computing frameworks): a monitored one too."""
    m = fitted()
    copied = pickle.loads(pickle.dumps(m))
    assert type(copied) is type(m) and copied.gradient_observer.step == m.gradient_observer.step == 6
    np.testing.assert_array_equal(copied.predict(X, verbose=0), m.predict(X, verbose=0))


def test_keras_file_loads_with_plain_keras_where_gradmon_is_not_installed(tmp_path):
    m = fitted()
    path = str(tmp_path / "m.keras")
    m.save(path)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "expected.npy", m.predict(X, verbose=0))
    (tmp_path / "m.pickle").write_bytes(pickle.dumps(m))  # a pickle holds the same saved bytes
    code = textwrap.dedent(f"""
        import json, pickle, sys
        sys.modules["gradmon"] = None  # gradmon is installed editable in the venv: block it
        import keras
        import numpy as np

        m = keras.saving.load_model({path!r})
        diff = np.max(np.abs(m.predict(np.load("x.npy"), verbose=0) - np.load("expected.npy")))
        with open("m.pickle", "rb") as f:
            p = pickle.load(f)
        pdiff = np.max(np.abs(p.predict(np.load("x.npy"), verbose=0) - np.load("expected.npy")))
        print(json.dumps([type(m).__module__, float(diff), type(p).__module__, float(pdiff)]))
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["keras.src.models.functional", 0.0] * 2


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX: a functional loop's optimizer state")
def test_an_observed_optimizer_saves_without_gradmon_state(tmp_path):
    """observe() builds gradmon's variables with the optimizer; its saved variables leave them out."""
    opt = gradmon.observe(keras.optimizers.SGD(1e-2))
    model = functional()
    opt.build(model.trainable_variables)
    store = {}
    opt.save_own_variables(store)
    plain = keras.optimizers.SGD(1e-2)
    plain.build(model.trainable_variables)
    assert len(store) == len(plain.variables) < len(opt.variables)
    plain.load_own_variables(store)
