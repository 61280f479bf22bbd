"""gradmon.gradcheck against closed-form gradients and known-wrong factors.

The references are independent of the code under test: numpy closed forms
(sigmoid for softplus, the polynomial's derivative, the normal equations'
gradient of a linear least-squares model), or a custom gradient that is wrong
by a known factor, whose relative error must come out as that factor.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradmon.gradcheck import (
    DEFAULT_TOLERANCES,
    GradientCheckReport,
    assert_gradients_close,
    check_gradients,
)

pytestmark = pytest.mark.tensorflow_only  # tf.custom_gradient; other backends: test_gradcheck_backends

WRONG_FACTOR = 0.9  # a custom gradient scaled by this has relative error 0.1


def softplus_loss(z):
    return tf.reduce_sum(tf.math.softplus(z))


def numpy_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


@tf.custom_gradient
def scaled_grad_softplus(z):
    def grad(upstream):
        return upstream * WRONG_FACTOR * tf.sigmoid(z)

    return tf.math.softplus(z), grad


@tf.custom_gradient
def flipped_grad_softplus(z):
    def grad(upstream):
        return -upstream * tf.sigmoid(z)

    return tf.math.softplus(z), grad


@tf.custom_gradient
def matmul_scaled_kernel_grad(x, kernel):
    def grad(upstream):
        return (
            tf.matmul(upstream, kernel, transpose_b=True),
            WRONG_FACTOR * tf.matmul(x, upstream, transpose_a=True),
        )

    return tf.matmul(x, kernel), grad


class ScaledGradDense(keras.layers.Layer):
    """A bias-free Dense whose kernel gradient is WRONG_FACTOR times the truth."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel"
        )

    def call(self, x):
        return matmul_scaled_kernel_grad(x, tf.convert_to_tensor(self.kernel))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class ForgetfulDense(keras.layers.Dense):
    """A Dense whose config cannot be turned back into a layer."""

    def get_config(self):
        config = super().get_config()
        del config["units"]
        return config


def data(n=6, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)).astype("float32"),
            rng.standard_normal((n, 1)).astype("float32"))


def tanh_mlp(regularizer=None, output_layer=None):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(3, activation="tanh", kernel_regularizer=regularizer, name="hidden"),
        output_layer or keras.layers.Dense(1, name="out"),
    ])
    model.compile(optimizer="sgd", loss="mse")
    return model


def weights_of(model):
    return [np.array(w, copy=True) for w in model.get_weights()]


def assert_same_weights(before, model):
    after = model.get_weights()
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Functions.


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softplus_matches_sigmoid(dtype):
    z = np.array([-3.0, -0.5, 0.0, 0.7, 2.5], dtype=np.float64)
    report = check_gradients(softplus_loss, z, manual=lambda t: numpy_sigmoid(t), dtype=dtype)
    assert isinstance(report, GradientCheckReport)
    assert report.passed and report.failed == []
    (check,) = report.variables
    assert check.name == "inputs" and check.shape == (5,)
    assert check.method == "elementwise" and check.num_checks == 5
    if dtype == "float64":
        assert check.fd_max_abs_error < 1e-9
        assert check.manual_max_abs_error < 1e-12
        assert (report.rtol, report.atol) == DEFAULT_TOLERANCES["float64"]
    else:
        assert check.fd_max_abs_error < 1e-3
        assert check.manual_max_abs_error < 1e-6
    assert "passed" in str(report)


def test_polynomial_with_known_gradient():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(4), rng.standard_normal((2, 3))

    def poly(a, b):
        return tf.reduce_sum(a**3) + tf.reduce_sum(a) * tf.reduce_sum(b) + 2.0 * tf.reduce_sum(b**2)

    def manual(a, b):
        a, b = a.numpy(), b.numpy()
        return [3 * a**2 + b.sum(), a.sum() + 4 * b]

    report = assert_gradients_close(poly, [a, b], manual=manual)
    assert [v.name for v in report.variables] == ["inputs[0]", "inputs[1]"]
    assert [v.shape for v in report.variables] == [(4,), (2, 3)]
    for check in report.variables:
        assert check.fd_max_abs_error < 1e-8
        assert check.manual_max_abs_error < 1e-12


def test_dict_inputs_are_named_by_key():
    def fn(weights, bias):
        return tf.reduce_sum(weights**2) + 3.0 * bias

    report = check_gradients(
        fn, {"weights": np.arange(3.0), "bias": 1.5},
        manual=lambda weights, bias: {"weights": 2 * weights, "bias": 3.0},
    )
    assert report.passed
    assert [v.name for v in report.variables] == ["weights", "bias"]


@pytest.mark.parametrize(
    "wrong_fn, expected_rel_error",
    [(scaled_grad_softplus, 1 - WRONG_FACTOR), (flipped_grad_softplus, 2.0)],
)
def test_wrong_custom_gradient_is_caught(wrong_fn, expected_rel_error):
    z = np.linspace(-2.0, 2.0, 6)

    def loss(good, bad):
        return softplus_loss(good) + tf.reduce_sum(wrong_fn(bad))

    report = check_gradients(loss, [z, z + 0.1])
    assert not report.passed
    assert report.failed == ["inputs[1]"]
    assert report["inputs[0]"].fd_passed
    # |c g - g| / max(|c g|, |g|) is 1 - c for c = 0.9 and 2 for c = -1.
    assert report["inputs[1]"].fd_max_rel_error == pytest.approx(expected_rel_error, abs=1e-6)
    with pytest.raises(AssertionError, match=r"inputs\[1\]") as raised:
        assert_gradients_close(loss, [z, z + 0.1])
    assert "inputs[0]:" not in str(raised.value)
    assert "finite differences" in str(raised.value)


def test_wrong_manual_gradient_is_caught():
    a, b = np.array([0.5, -1.0, 2.0]), np.array([1.0, 3.0])

    def fn(a, b):
        return tf.reduce_sum(a**2) + tf.reduce_sum(tf.sin(b))

    def manual(a, b):
        return [2 * a.numpy(), -np.cos(b.numpy())]  # sign error in d/db sin(b)

    report = check_gradients(fn, [a, b], manual=manual)
    assert report.failed == ["inputs[1]"]
    bad = report["inputs[1]"]
    assert bad.fd_passed and bad.manual_passed is False
    assert bad.manual_max_abs_error == pytest.approx(2 * np.max(np.abs(np.cos(b))), rel=1e-12)
    assert bad.manual_max_rel_error == pytest.approx(2.0)
    with pytest.raises(AssertionError, match=r"inputs\[1\]: autodiff vs manual"):
        assert_gradients_close(fn, [a, b], manual=manual)


def test_large_tensor_uses_directions_and_catches_error():
    z = np.random.default_rng(0).standard_normal(10_000)
    good = check_gradients(softplus_loss, z, manual=lambda t: numpy_sigmoid(t), directions=4)
    assert good.passed
    assert good.variables[0].method == "directional" and good.variables[0].num_checks == 4

    report = check_gradients(lambda t: tf.reduce_sum(scaled_grad_softplus(t)), z, directions=4)
    (check,) = report.variables
    assert not report.passed and check.method == "directional"
    assert check.fd_max_rel_error == pytest.approx(1 - WRONG_FACTOR, abs=1e-5)
    with pytest.raises(AssertionError, match="inputs"):
        assert_gradients_close(lambda t: tf.reduce_sum(scaled_grad_softplus(t)), z, directions=2)


# --------------------------------------------------------------------------
# Models.


def test_model_in_float64_passes_and_keeps_weights():
    model = tanh_mlp(regularizer=keras.regularizers.L2(0.05))
    x, y = data()
    before = weights_of(model)
    report = check_gradients(model, (x, y))
    assert report.passed, str(report)
    assert report.dtype == "float64"
    assert [v.name for v in report.variables] == [v.path for v in model.trainable_variables]
    assert max(v.fd_max_abs_error for v in report.variables) < 1e-8
    assert_same_weights(before, model)
    assert keras.config.floatx() == "float32"
    assert keras.config.dtype_policy().name == "float32"
    assert all(v.dtype == "float32" for v in model.weights)


def test_linear_model_matches_closed_form_with_regularizer_and_sample_weight():
    # L(W, b) = sum_i s_i r_i^2 / n + lam * |W|^2 with r = x W + b - y, so
    # dL/dW = 2/n x^T (s r) + 2 lam W and dL/db = 2/n sum(s r).
    lam = 0.125  # exact in float32: Keras' L2 casts its factor via float32 even for float64 weights
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(lam),
                           bias_initializer="ones"),
    ])
    model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    s = np.linspace(0.5, 1.5, len(x))

    def manual(work_model, x, y, sample_weight):
        w, b = (np.asarray(v.numpy(), np.float64) for v in work_model.trainable_variables)
        x, y, s = (np.asarray(t, np.float64) for t in (x, y, sample_weight))
        r = (x @ w + b - y) * s[:, None]
        return [2 / len(x) * x.T @ r + 2 * lam * w, 2 / len(x) * r.sum(axis=0)]

    before = weights_of(model)
    report = assert_gradients_close(model, (x, y, s), manual=manual)
    assert max(v.manual_max_abs_error for v in report.variables) < 1e-12
    assert_same_weights(before, model)


def test_model_with_wrong_custom_gradient_names_the_variable():
    model = tanh_mlp(output_layer=ScaledGradDense(1, name="scaled"))
    x, y = data()
    before = weights_of(model)
    report = check_gradients(model, (x, y))
    assert report.dtype == "float64"
    name = model.get_layer("scaled").kernel.path
    assert name.endswith("scaled/kernel")
    assert report.failed == [name]
    assert report[name].fd_max_rel_error == pytest.approx(1 - WRONG_FACTOR, abs=1e-6)
    with pytest.raises(AssertionError, match=name):
        assert_gradients_close(model, (x, y))
    assert_same_weights(before, model)


def test_model_without_float64_copy_falls_back_to_its_dtype():
    model = tanh_mlp(output_layer=ForgetfulDense(1, name="out"))
    x, y = data()
    before = weights_of(model)
    with pytest.warns(UserWarning, match="float64 copy"):
        report = check_gradients(model, (x, y))
    assert report.dtype == "float32"
    assert (report.rtol, report.atol) == DEFAULT_TOLERANCES["float32"]
    assert report.notes and "float64 copy" in report.notes[0]
    assert report.passed, str(report)
    assert_same_weights(before, model)


# --------------------------------------------------------------------------
# Arguments.


def test_invalid_directions_message():
    with pytest.raises(ValueError) as raised:
        check_gradients(softplus_loss, np.zeros(3), directions=0)
    assert str(raised.value) == (
        "Invalid value for argument `directions`. Expected a positive integer. "
        "Received: directions=0"
    )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(directions=-2), "directions"),
        (dict(directions=2.5), "directions"),
        (dict(directions=True), "directions"),
        (dict(dtype="float16"), "dtype"),
        (dict(dtype="no-such-dtype"), "dtype"),
        (dict(eps=0.0), "eps"),
        (dict(rtol=-1e-3), "rtol"),
        (dict(atol=float("nan")), "atol"),
        (dict(seed=-1), "seed"),
        (dict(manual="sigmoid"), "manual"),
        (dict(manual=lambda z: [tf.sigmoid(z), tf.sigmoid(z)]), "manual"),
        (dict(manual=lambda z: tf.sigmoid(z)[:2]), "manual"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"Invalid value for argument `{argument}`"):
        check_gradients(softplus_loss, np.zeros(3), **kwargs)


def test_invalid_function_and_model_arguments():
    with pytest.raises(ValueError, match="argument `fn_or_model`"):
        check_gradients(42, np.zeros(3))
    with pytest.raises(ValueError, match="argument `fn_or_model`.*scalar"):
        check_gradients(lambda z: z * 2.0, np.zeros(3))
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="argument `fn_or_model`.*compiled"):
        check_gradients(uncompiled, data())
    model = tanh_mlp()
    with pytest.raises(ValueError, match="argument `inputs`"):
        check_gradients(model, data()[0])
    with pytest.raises(ValueError, match="argument `manual`.*4 gradient"):
        check_gradients(model, data(), manual=lambda m, x, y: [None])


def test_report_table_lists_every_variable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check_gradients(
            lambda a, b: tf.reduce_sum(scaled_grad_softplus(a)) + tf.reduce_sum(b),
            [np.ones(2), np.ones(3)],
        )
    text = str(report)
    assert "FAILED for inputs[0]" in text
    lines = text.splitlines()
    assert any(line.startswith("inputs[0]") and line.endswith("FAIL") for line in lines)
    assert any(line.startswith("inputs[1]") and line.endswith("ok") for line in lines)
