"""gradmon.check_gradients on the suite's Keras backend, and on JAX and PyTorch from TensorFlow.

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_gradcheck_backends.py`),
it checks, against references independent of the code under test: the gradient of a linear
least-squares loss (numpy closed form) for a function and for a Keras model, in float64 to 1e-12
(a check that fell back to float32, or Keras' float64 -> float32 demotion on JAX and PyTorch,
leaves errors of 1e-8 to 1e-7); a manual gradient with a sign error, and an autodiff gradient
made wrong by a known factor with the backend's own custom-gradient mechanism
(`tf.custom_gradient`, `jax.custom_vjp`, `torch.autograd.Function`), each caught and named.
Under TensorFlow, `test_backend_in_subprocess` runs this module under JAX and PyTorch in the
TensorFlow-free interpreters of `helpers.backend_python` (skipped when absent, and under `make
test`, which runs every backend's suite itself).
"""

import contextlib
import os
import sys

import keras
import numpy as np
import pytest
from keras import ops

from gradmon.gradcheck import assert_gradients_close, check_gradients
from helpers import finish_module_run, runs_from_the_tensorflow_suite

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKEND = keras.backend.backend()
WRONG_FACTOR = 0.9  # a gradient scaled by this has relative error 1 - 0.9 = 0.1


def scaled_matmul(x, kernel):
    """`x @ kernel`, whose gradient for `kernel` is WRONG_FACTOR times the truth."""
    if BACKEND == "tensorflow":
        return _tf_scaled_matmul(x, tf.identity(kernel))  # a tensor, not a variable read inside
    if BACKEND == "jax":
        return _jax_scaled_matmul()(x, kernel)
    return _TorchScaledMatmul.apply(x, kernel)


def _jax_scaled_matmul():
    import jax

    @jax.custom_vjp
    def forward(x, kernel):
        return x @ kernel

    def fwd(x, kernel):
        return x @ kernel, (x, kernel)

    def bwd(saved, upstream):
        x, kernel = saved
        return upstream @ kernel.T, WRONG_FACTOR * (x.T @ upstream)

    forward.defvjp(fwd, bwd)
    return forward


if BACKEND == "tensorflow":
    import tensorflow as tf

    @tf.custom_gradient
    def _tf_scaled_matmul(x, kernel):
        def grad(upstream):
            return (tf.matmul(upstream, kernel, transpose_b=True),
                    WRONG_FACTOR * tf.matmul(x, upstream, transpose_a=True))

        return tf.matmul(x, kernel), grad


if BACKEND == "torch":
    import torch

    class _TorchScaledMatmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, kernel):
            ctx.save_for_backward(x, kernel)
            return x @ kernel

        @staticmethod
        def backward(ctx, upstream):
            x, kernel = ctx.saved_tensors
            return upstream @ kernel.T, WRONG_FACTOR * (x.T @ upstream)


class ScaledGradDense(keras.layers.Layer):
    """A bias-free Dense whose kernel gradient is WRONG_FACTOR times the truth."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")

    def call(self, x):
        return scaled_matmul(x, ops.convert_to_tensor(self.kernel))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def regression_data(n=8, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ np.array([[0.5], [-1.0], [2.0]]) + 0.1 * rng.standard_normal((n, 1))
    return x, y


def least_squares_gradient(x, y, w, b):
    """d/dw, d/db of mean((x w + b - y)^2), by hand."""
    r = x @ w + b - y
    return 2 / len(x) * x.T @ r, 2 / len(x) * r.sum(axis=0)


def least_squares(w, b, x, y):
    return ops.mean(ops.square(ops.matmul(x, w) + b - y))


def numpy_of(tensor):
    if isinstance(tensor, keras.Variable):
        tensor = tensor.value
    return np.asarray(ops.convert_to_numpy(tensor), np.float64)


def test_least_squares_function_matches_closed_form_in_float64():
    x, y = regression_data()
    w0, b0 = np.array([[0.3], [0.1], [-0.7]]), np.array([0.25])
    report = assert_gradients_close(
        lambda w, b: least_squares(w, b, ops.convert_to_tensor(x, "float64"),
                                   ops.convert_to_tensor(y, "float64")),
        [w0, b0],
        manual=lambda w, b: list(least_squares_gradient(x, y, numpy_of(w), numpy_of(b))),
    )
    assert report.dtype == "float64"
    for check in report.variables:
        assert check.manual_max_abs_error < 1e-12, str(report)
        assert check.fd_max_abs_error < 1e-8, str(report)
    # The check leaves Keras' and JAX's precision settings as they were.
    assert keras.backend.result_type("float64", "float64") == (
        "float64" if BACKEND == "tensorflow" else "float32")
    if BACKEND == "jax":
        import jax

        assert not jax.config.jax_enable_x64


def test_wrong_manual_gradient_names_the_variable():
    x, y = regression_data()

    def loss(weights, bias):
        return least_squares(weights, bias, ops.convert_to_tensor(x, "float64"),
                             ops.convert_to_tensor(y, "float64"))

    def manual(weights, bias):
        grad_w, grad_b = least_squares_gradient(x, y, numpy_of(weights), numpy_of(bias))
        return {"weights": grad_w, "bias": -grad_b}  # sign error in d/db

    inputs = {"weights": np.array([[0.3], [0.1], [-0.7]]), "bias": np.array([0.25])}
    report = check_gradients(loss, inputs, manual=manual)
    assert report.failed == ["bias"]
    assert report["bias"].fd_passed and report["bias"].manual_passed is False
    assert report["bias"].manual_max_rel_error == pytest.approx(2.0)
    with pytest.raises(AssertionError, match="bias: autodiff vs manual"):
        assert_gradients_close(loss, inputs, manual=manual)


def test_wrong_custom_gradient_is_caught_by_finite_differences():
    x = np.random.default_rng(1).standard_normal((4, 3))

    def loss(good, bad):
        return ops.sum(ops.square(ops.matmul(x, good))) + ops.sum(
            ops.square(scaled_matmul(ops.convert_to_tensor(x, "float64"), bad)))

    kernel = np.linspace(-1.0, 1.0, 6).reshape(3, 2)
    report = check_gradients(loss, [kernel, kernel + 0.1])
    assert report.dtype == "float64"
    assert report.failed == ["inputs[1]"]
    assert report["inputs[0]"].fd_max_abs_error < 1e-8
    assert report["inputs[1]"].fd_max_rel_error == pytest.approx(1 - WRONG_FACTOR, abs=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit's limits")
def test_jax_function_that_jit_cannot_trace_runs_op_by_op():
    import jax.numpy as jnp

    z = np.array([-1.5, -0.2, 0.3, 2.0])
    # A boolean mask has a data-dependent shape: jax.grad runs it, jax.jit refuses it.
    report = assert_gradients_close(lambda t: jnp.sum(t[t > 0] ** 3), z,
                                    manual=lambda t: 3 * np.maximum(numpy_of(t), 0) ** 2)
    assert report.variables[0].manual_max_abs_error < 1e-12
    assert report.variables[0].fd_max_abs_error < 1e-8


def linear_model():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="linear")])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_linear_model_matches_closed_form_in_float64():
    model = linear_model()
    x, y = regression_data()
    before = [np.array(w, copy=True) for w in model.get_weights()]

    def manual(work_model, x, y):
        w, b = (numpy_of(v) for v in work_model.trainable_variables)
        return list(least_squares_gradient(numpy_of(x), numpy_of(y), w, b))

    report = assert_gradients_close(model, (x.astype("float32"), y.astype("float32")),
                                    manual=manual)
    assert report.dtype == "float64"
    assert [v.name for v in report.variables] == [v.path for v in model.trainable_variables]
    assert max(v.manual_max_abs_error for v in report.variables) < 1e-12, str(report)
    assert max(v.fd_max_abs_error for v in report.variables) < 1e-8, str(report)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert keras.config.floatx() == "float32"
    assert all(v.dtype == "float32" for v in model.weights)


@contextlib.contextmanager
def global_float(dtype):
    """Keras' floatx and global dtype policy set to `dtype`, restored on exit."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def test_float64_model_is_checked_in_float64():
    # Keras builds `loss="mse"` on first use in the floatx of that moment: a float64 model
    # whose loss was never used would compute it in float32 (FD errors ~1e-2 here).
    x, y = regression_data()
    for loss_built_in_float64 in (False, True):
        with global_float("float64"):
            keras.utils.set_random_seed(4)
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="tanh"),
                                      keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
            if loss_built_in_float64:
                model.compute_loss(x, y, model(x))
        report = assert_gradients_close(model, (x, y))
        assert report.dtype == "float64"
        assert report.eps == pytest.approx(np.finfo("float64").eps ** (1 / 3))
        assert max(v.fd_max_abs_error for v in report.variables) < 1e-8, str(report)
        # A float64 copy while the loss is unbuilt, the model itself once it is float64.
        assert any("copy" in note for note in report.notes) is not loss_built_in_float64


class ForgetfulDense(keras.layers.Dense):
    """A Dense whose config cannot be turned back into a layer: no float64 copy."""

    def get_config(self):
        config = super().get_config()
        del config["units"]
        return config


def test_model_without_float64_copy_is_checked_in_its_dtype():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((3,)), ForgetfulDense(1, name="out")])
    model.compile(optimizer="sgd", loss="mse")
    x, y = regression_data()
    with pytest.warns(UserWarning, match="No float64 copy"):
        report = check_gradients(model, (x, y))
    assert report.dtype == "float32" and report.passed, str(report)
    assert report.eps == pytest.approx(np.finfo("float32").eps ** (1 / 3))
    assert len(report.notes) == 1 and "float32 default tolerances" in report.notes[0]


def test_model_with_wrong_custom_gradient_names_the_variable():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="tanh"),
                              ScaledGradDense(1, name="scaled")])
    model.compile(optimizer="sgd", loss="mse")
    x, y = regression_data()
    report = check_gradients(model, (x, y))
    name = model.get_layer("scaled").kernel.path
    assert report.dtype == "float64"
    assert report.failed == [name]
    assert report[name].fd_max_rel_error == pytest.approx(1 - WRONG_FACTOR, abs=1e-6)
    assert max(report[v.path].fd_max_abs_error for v in model.trainable_variables
               if v.path != name) < 1e-8, str(report)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow does not demote float64")
def test_without_float64_the_check_warns_and_runs_in_float32(monkeypatch):
    from keras.src.backend.common import dtypes as keras_dtypes

    # A Keras whose demotion cannot be lifted.
    monkeypatch.setattr(keras_dtypes, "BIT64_TO_BIT32_DTYPE", {"uint64": "uint32"})
    x, y = regression_data()
    with pytest.warns(UserWarning, match=f"float64 on Keras' {BACKEND} backend") as caught:
        report = check_gradients(lambda w, b: least_squares(w, b, ops.convert_to_tensor(x, "float32"),
                                                            ops.convert_to_tensor(y, "float32")),
                                 [np.array([[0.3], [0.1], [-0.7]]), np.array([0.25])])
    message = str(caught[0].message)
    assert "float32 tolerances" in message and "KERAS_BACKEND=tensorflow" in message
    assert report.dtype == "float32" and report.passed, str(report)
    assert report.notes[0] == message


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's x64 switch")
def test_jax_without_x64_scope_warns_with_the_fix(monkeypatch):
    import jax

    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on for the whole process")
    monkeypatch.delattr(jax, "enable_x64")  # an older jax
    with pytest.warns(UserWarning, match=r"float64 check, call `jax\.config\.update\('jax_enable_x64', True\)`"):
        report = check_gradients(lambda z: ops.sum(z ** 3), np.array([0.5, -1.0], "float32"),
                                 manual=lambda z: 3 * numpy_of(z) ** 2)
    assert report.dtype == "float32" and report.passed, str(report)
    assert report.eps == pytest.approx(np.finfo("float32").eps ** (1 / 3))


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow is the backend")
def test_checks_import_no_tensorflow():
    # Every test above has run `check_gradients` on this backend by now.
    assert "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def subprocess_runs():
    """This module under JAX and under PyTorch (`helpers.runs_from_the_tensorflow_suite`)."""
    yield from runs_from_the_tensorflow_suite(os.path.abspath(__file__), ["-W", "ignore::DeprecationWarning"])


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_in_subprocess(subprocess_runs, backend):
    output = finish_module_run(subprocess_runs, backend)
    # Everything but the two subprocess tests, which only the TensorFlow suite runs.
    expected = {"jax": "11 passed, 2 skipped", "torch": "9 passed, 4 skipped"}[backend]
    assert expected in output.strip().splitlines()[-1], output[-2000:]
