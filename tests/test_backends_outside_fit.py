"""The optimizer of a monitored model applied outside the model's `fit` (a custom loop after
`gradmon.monitor`): gradmon writes nothing there, and says so once, on every backend.

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_backends_outside_fit.py`).
"""

import warnings

import keras
import numpy as np

import gradmon
from gradmon.publish.writer import MemoryWriter

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = np.random.default_rng(1).normal(size=(32, 2)).astype("float32")


def compiled():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(3, activation="tanh")(inputs)))
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    return model


def loop_steps(model, steps=3):
    """A custom loop's updates: the model's optimizer applied to gradients of ones (gradmon's
    warning does not depend on the gradient)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            grads = [keras.ops.ones(v.shape) for v in model.trainable_variables]
            model.optimizer.apply(grads, model.trainable_variables)
    return [str(w.message) for w in caught if "outside the model's `fit`" in str(w.message)]


def fit_warnings(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, Y, batch_size=16, verbose=0, **kwargs)
    return [str(w.message) for w in caught if "outside the model's `fit`" in str(w.message)]


def test_a_loop_before_any_fit_is_warned_of_once_and_fit_is_not():
    original = compiled()
    m = gradmon.monitor(original)  # compiled: the same optimizer instance
    before = [v.numpy() if hasattr(v, "numpy") else keras.ops.convert_to_numpy(v) for v in m.trainable_variables]
    said = loop_steps(original)  # the original model's optimizer: the monitored model's
    assert len(said) == 1 and f"model {m.name!r} applied" in said[0] and "does not observe" in said[0]
    after = [keras.ops.convert_to_numpy(v) for v in m.trainable_variables]
    for b, a in zip(before, after):  # the guard applies the update as Keras does: 3 SGD steps
        np.testing.assert_allclose(a, b - 3 * 1e-2, rtol=1e-6, atol=1e-6)
    assert fit_warnings(m, callbacks=[gradmon.GradientMonitor(writer=MemoryWriter())]) == []


def test_a_loop_after_a_fit_without_a_gradient_monitor_is_warned_of():
    m = gradmon.monitor(compiled())
    assert fit_warnings(m) == []
    said = loop_steps(m)
    assert len(said) == 1 and "transforms and measures these updates" in said[0]


def test_a_loop_after_a_fit_with_a_gradient_monitor_writes_on_flush_and_is_not_warned_of():
    m = gradmon.monitor(compiled())
    writer = MemoryWriter()
    assert fit_warnings(m, callbacks=[gradmon.GradientMonitor(writer=writer, update_freq=1)]) == []
    assert loop_steps(m, steps=2) == []
    m.gradient_observer.flush()  # to the monitor's run, on the same step axis
    assert sorted(dict(writer.scalars["gradients/raw/global_norm"])) == [1, 2, 3, 4]


def test_an_observed_optimizer_in_a_loop_is_not_warned_of(tmp_path):
    m = gradmon.monitor(compiled())
    opt = gradmon.observe(m.optimizer, log_dir=str(tmp_path))
    assert loop_steps(m) == []
    opt.gradmon.close()


def test_steps_measured_after_a_monitored_fit_and_never_flushed_are_written_at_exit():
    from gradmon.measure.observer import _WRITE_AT_EXIT

    m = gradmon.monitor(compiled())
    writer = MemoryWriter()
    fit_warnings(m, callbacks=[gradmon.GradientMonitor(writer=writer, update_freq=1)])  # steps 1, 2
    observer = m.gradient_observer
    assert observer in _WRITE_AT_EXIT
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        observer.host.finish()  # what the end of the process runs: nothing left, nothing said
    assert [str(w.message) for w in caught if "gradmon" in str(w.message)] == []
    loop_steps(m, steps=3)  # steps 3..5, measured; the loop never flushes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        observer.host.finish()
    said = [str(w.message) for w in caught if "written only at" in str(w.message)]
    assert len(said) == 1 and "3 measured steps" in said[0] and "up to step 5" in said[0]
    assert sorted(dict(writer.scalars["gradients/raw/global_norm"])) == [1, 2, 3, 4, 5]
