"""Tests for gradmon.hessian against an explicit Hessian.

The reference is built independently of the code under test: the loss is
written out by hand with TensorFlow ops from `model(x, training=False)`, the
Hessian is `tape.jacobian` of the flat gradient, and eigenvalues come from
`numpy.linalg.eigvalsh` in float64.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradmon.hessian import vectors as hessian_vectors
from gradmon import hessian
from helpers import explicit_hessian

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RTOL = 1e-3


# --------------------------------------------------------------------------
# Reference.


def mse(pred, target):
    return tf.reduce_mean(tf.square(pred - target))


def sparse_ce(logits, labels):
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=logits
        )
    )


def flat_params(model):
    return np.concatenate(
        [np.ravel(v.numpy()) for v in model.trainable_variables]
    )


# --------------------------------------------------------------------------
# Models. Each builder returns (model, data, reference loss function).


def _rng(seed):
    return np.random.default_rng(seed)


def dense_tanh():
    keras.utils.set_random_seed(1)
    rng = _rng(1)
    x = rng.standard_normal((48, 6)).astype("float32")
    y = rng.standard_normal((48, 3)).astype("float32")
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(3),
    ])
    model.compile(optimizer="sgd", loss="mse")
    return model, (x, y), lambda m, x, y: mse(m(x, training=False), y)


def dense_relu():
    keras.utils.set_random_seed(2)
    rng = _rng(2)
    x = rng.standard_normal((48, 6)).astype("float32")
    y = rng.integers(0, 3, size=(48,)).astype("int32")
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(10, activation="relu"),
        keras.layers.Dense(3),
    ])
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, (x, y), lambda m, x, y: sparse_ce(m(x, training=False), y)


def conv():
    keras.utils.set_random_seed(3)
    rng = _rng(3)
    x = rng.standard_normal((16, 6, 6, 1)).astype("float32")
    y = rng.standard_normal((16, 2)).astype("float32")
    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(3, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])
    model.compile(optimizer="sgd", loss="mse")
    return model, (x, y), lambda m, x, y: mse(m(x, training=False), y)


def batchnorm_dropout():
    keras.utils.set_random_seed(4)
    rng = _rng(4)
    x = rng.standard_normal((32, 5)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("tanh"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    bn = model.layers[1]
    # Non-trivial inference statistics, so that using batch statistics
    # (training=True) would give a different Hessian.
    bn.moving_mean.assign(rng.standard_normal(8).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 8).astype("float32"))
    return model, (x, y), lambda m, x, y: mse(m(x, training=False), y)


def multi_output():
    keras.utils.set_random_seed(5)
    rng = _rng(5)
    u = keras.Input((3,), name="u")
    w = keras.Input((2,), name="w")
    h = keras.layers.Dense(6, activation="tanh")(
        keras.layers.Concatenate()([u, w])
    )
    a = keras.layers.Dense(2, name="a")(h)
    b = keras.layers.Dense(3, name="b")(h)
    model = keras.Model({"u": u, "w": w}, {"a": a, "b": b})
    model.compile(
        optimizer="adam",
        loss={
            "a": "mse",
            "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        },
        loss_weights={"a": 1.0, "b": 0.5},
    )
    x = {
        "u": rng.standard_normal((40, 3)).astype("float32"),
        "w": rng.standard_normal((40, 2)).astype("float32"),
    }
    y = {
        "a": rng.standard_normal((40, 2)).astype("float32"),
        "b": rng.integers(0, 3, size=(40,)).astype("int32"),
    }

    def loss(m, x, y):
        out = m(x, training=False)
        return mse(out["a"], y["a"]) + 0.5 * sparse_ce(out["b"], y["b"])

    return model, (x, y), loss


def regularized():
    keras.utils.set_random_seed(6)
    rng = _rng(6)
    x = rng.standard_normal((32, 4)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(
            6, activation="tanh",
            kernel_regularizer=keras.regularizers.L2(0.5),
        ),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer="sgd", loss="mse")

    def loss(m, x, y):
        kernel = m.layers[0].kernel
        return mse(m(x, training=False), y) + 0.5 * tf.reduce_sum(
            tf.square(kernel)
        )

    return model, (x, y), loss


BUILDERS = {
    "dense_tanh": dense_tanh,
    "dense_relu": dense_relu,
    "conv": conv,
    "batchnorm_dropout": batchnorm_dropout,
    "multi_output": multi_output,
    "regularized": regularized,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request):
    model, data, loss = BUILDERS[request.param]()
    matrix = explicit_hessian(model, loss, *data)
    return {
        "model": model,
        "data": data,
        "hessian": matrix,
        "eigenvalues": np.linalg.eigvalsh(matrix),  # ascending
    }


def assert_close(actual, expected, rtol=RTOL):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0)


# --------------------------------------------------------------------------
# Spectrum.


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top3_and_smallest_match_eigvalsh(case, method):
    spec = hessian.spectrum(
        case["model"], case["data"], top_k=3, method=method, smallest=True,
        seed=0,
    )
    expected = case["eigenvalues"]
    assert spec.converged
    assert_close(spec.eigenvalues, expected[::-1][:3])
    assert_close(spec.min_eigenvalue, expected[0])
    n = case["hessian"].shape[0]
    assert spec.eigenvectors.shape == (3, n)
    # Residuals as reported agree with the explicit Hessian.
    matrix = case["hessian"]
    for value, vector, residual in zip(
        spec.eigenvalues, spec.eigenvectors, spec.residuals
    ):
        explicit = np.linalg.norm(matrix @ vector - value * vector)
        assert residual == pytest.approx(explicit, abs=1e-4 * expected[-1])
        assert residual <= 1e-4 * abs(expected).max() * 1.01
    assert spec.min_residual <= 1e-4 * abs(expected).max() * 1.01


def test_hvp_modes_match_explicit_product():
    model, data, loss = dense_tanh()
    matrix = explicit_hessian(model, loss, *data)
    v = _rng(7).standard_normal(matrix.shape[0])
    for mode in hessian.HVP_MODES:
        hvp = hessian.make_hvp(model, data, hvp_mode=mode)
        hv = hvp(v)
        np.testing.assert_allclose(
            hv, matrix @ v, rtol=0, atol=1e-5 * np.abs(matrix @ v).max()
        )
        as_list = hvp(hvp.unflatten(v))
        np.testing.assert_allclose(hvp.flatten(as_list), hv, atol=1e-12)
        assert hvp.count == 2


def test_sharpness_is_largest_algebraic_eigenvalue():
    # Negating the loss negates the Hessian, so its most negative eigenvalue
    # dominates in magnitude; the largest algebraic one must be returned.
    model, data, _ = dense_tanh()

    def negative_mse(y_true, y_pred):
        return -tf.reduce_mean(tf.square(y_pred - y_true), axis=-1)

    model.compile(optimizer="sgd", loss=negative_mse)
    matrix = explicit_hessian(
        model, lambda m, x, y: -mse(m(x, training=False), y), *data
    )
    expected = np.linalg.eigvalsh(matrix)
    assert -expected[0] > expected[-1] > 0
    for method in ("lanczos", "power"):
        spec = hessian.spectrum(
            model, data, top_k=2, method=method, smallest=True, seed=1
        )
        assert_close(spec.eigenvalues, expected[::-1][:2])
        assert_close(spec.min_eigenvalue, expected[0])


def test_linear_regression_closed_form():
    rng = _rng(8)
    n, d = 40, 4
    x = rng.standard_normal((n, d)).astype("float32") * [1.0, 2.0, 0.5, 3.0]
    x = x.astype("float32")
    y = rng.standard_normal((n, 1)).astype("float32")
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    augmented = np.hstack([x, np.ones((n, 1))]).astype(np.float64)
    closed = 2.0 / n * augmented.T @ augmented
    expected = np.linalg.eigvalsh(closed)[::-1]

    spec = hessian.spectrum(model, (x, y), top_k=d + 1, seed=0)
    assert_close(spec.eigenvalues, expected)
    # The eigenvectors diagonalise the closed-form Hessian.
    vectors = spec.eigenvectors
    np.testing.assert_allclose(
        vectors @ closed @ vectors.T, np.diag(expected), atol=1e-4 * expected[0]
    )
    assert_close(spec.eigenvalues.sum(), np.trace(closed))

    estimate = hessian.trace(model, (x, y), num_samples=200, seed=0)
    assert estimate.hvp_count == 200
    assert abs(estimate.value - np.trace(closed)) <= 3 * estimate.stderr


def test_trace_within_three_standard_errors(case):
    estimate = hessian.trace(case["model"], case["data"], num_samples=60,
                             seed=3)
    exact = np.trace(case["hessian"])
    assert estimate.hvp_count == 60
    assert estimate.stderr > 0
    assert abs(estimate.value - exact) <= 3 * estimate.stderr


def test_density_integrates_to_one_and_covers_spectrum():
    model, data, loss = dense_relu()
    matrix = explicit_hessian(model, loss, *data)
    expected = np.linalg.eigvalsh(matrix)
    dens = hessian.density(model, data, num_probes=3, num_steps=30, seed=0)
    assert np.trapezoid(dens.values, dens.grid) == pytest.approx(1.0, abs=1e-3)
    assert dens.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert dens.grid[0] <= expected[0]
    assert dens.grid[-1] >= expected[-1]
    assert np.all(dens.values >= 0)
    assert dens.hvp_count <= 3 * 30
    # Gauss quadrature is exact for degree 1: the mean of the estimated
    # density is the Hutchinson estimate tr(H)/n over the 3 probes, whose
    # standard error is sqrt(2 sum_{i != j} H_ij^2 / 3) / n.
    n = matrix.shape[0]
    off_diagonal = np.sum(matrix ** 2) - np.sum(np.diag(matrix) ** 2)
    stderr = np.sqrt(2.0 * off_diagonal / 3) / n
    mean = float(dens.nodes @ dens.weights)
    assert abs(mean - np.trace(matrix) / n) <= 3 * stderr


# --------------------------------------------------------------------------
# Data handling.


def test_list_of_batches_and_dataset_use_mean_loss():
    model, (x, y), loss = dense_tanh()
    matrix = explicit_hessian(model, loss, x, y)
    expected = np.linalg.eigvalsh(matrix)[::-1][:2]
    v = _rng(9).standard_normal(matrix.shape[0])
    reference = matrix @ v
    atol = 1e-5 * np.abs(reference).max()

    equal = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    # 48 = 20 + 20 + 8: batches must be weighted by size.
    unequal = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(48).batch(16)
    for data in (equal, unequal, shuffled):
        hv = hessian.make_hvp(model, data)(v)
        np.testing.assert_allclose(hv, reference, rtol=0, atol=atol)

    spec = hessian.spectrum(model, unequal, top_k=2, seed=0)
    assert_close(spec.eigenvalues, expected)

    # Sample weights of one are the same as none.
    weighted = (x, y, np.ones(48, "float32"))
    np.testing.assert_allclose(
        hessian.make_hvp(model, weighted)(v), reference, rtol=0, atol=atol
    )


def test_sample_weights_enter_the_loss():
    model, (x, y), _ = dense_tanh()
    weights = _rng(10).uniform(0.0, 2.0, 48).astype("float32")

    def weighted_loss(m, x, y):
        per_sample = tf.reduce_mean(tf.square(m(x, training=False) - y), -1)
        return tf.reduce_mean(per_sample * weights)  # sum_over_batch_size

    matrix = explicit_hessian(model, weighted_loss, x, y)
    v = _rng(11).standard_normal(matrix.shape[0])
    hv = hessian.make_hvp(model, (x, y, weights))(v)
    np.testing.assert_allclose(
        hv, matrix @ v, rtol=0, atol=1e-5 * np.abs(matrix @ v).max()
    )


# --------------------------------------------------------------------------
# A probe changes nothing.


def _state(model):
    return {
        "variables": [v.numpy().copy() for v in model.variables],
        "metrics": [v.numpy().copy() for v in model.metrics_variables],
        "optimizer": [v.numpy().copy() for v in model.optimizer.variables],
        "iterations": int(model.optimizer.iterations.numpy()),
    }


def _assert_same_state(before, after):
    assert before["iterations"] == after["iterations"]
    for key in ("variables", "metrics", "optimizer"):
        assert len(before[key]) == len(after[key]), key
        for a, b in zip(before[key], after[key]):
            np.testing.assert_array_equal(a, b, err_msg=key)


@pytest.mark.parametrize("builder", [batchnorm_dropout, multi_output])
def test_probe_changes_nothing(builder):
    model, (x, y), _ = builder()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # optimizer state
    model.evaluate(x, y, verbose=0)  # non-zero loss trackers
    before = _state(model)
    assert before["iterations"] > 0
    assert any(np.any(m != 0) for m in before["metrics"])
    seed_states = [
        v for v in model.variables if "seed_generator" in v.path
    ]
    if builder is batchnorm_dropout:
        assert seed_states  # the Dropout RNG state is among the variables

    hessian.spectrum(model, (x, y), top_k=2, smallest=True, seed=0)
    hessian.spectrum(model, (x, y), top_k=2, method="power", seed=0)
    hessian.trace(model, (x, y), num_samples=3, seed=0)
    hessian.density(model, (x, y), num_probes=1, num_steps=5, seed=0)
    for mode in hessian.HVP_MODES:
        hvp = hessian.make_hvp(model, [(x, y), (x, y)], hvp_mode=mode)
        hvp(np.ones(hvp.num_params))
        hvp.gradient()

    _assert_same_state(before, _state(model))


def test_unbuilt_compile_loss_is_built_without_side_effects():
    # A compiled model that never saw fit/evaluate: the probe must work and
    # leave the loss trackers at their initial zeros.
    model, (x, y), loss = multi_output()
    spec = hessian.spectrum(model, (x, y), top_k=1, seed=0)
    expected = np.linalg.eigvalsh(explicit_hessian(model, loss, x, y))[-1]
    assert_close(spec.eigenvalues[0], expected)
    for v in model.metrics_variables:
        np.testing.assert_array_equal(v.numpy(), 0)


# --------------------------------------------------------------------------
# Warm start.


def test_warm_start_uses_fewer_hvps_and_stays_accurate():
    model, (x, y), loss = dense_tanh()
    first = hessian.spectrum(model, (x, y), top_k=1, seed=0)
    model.fit(x, y, batch_size=16, epochs=10, verbose=0)  # 30 SGD steps
    expected = np.linalg.eigvalsh(explicit_hessian(model, loss, x, y))

    # One seed: the check for skipped eigenvalues starts from the same random vector in both.
    cold = hessian.spectrum(model, (x, y), top_k=1, seed=1)
    warm = hessian.spectrum(model, (x, y), top_k=1, init_vectors=first, seed=1)
    assert warm.converged
    assert warm.hvp_count < cold.hvp_count
    assert_close(warm.eigenvalues, expected[::-1][:1])

    # Power iteration warm-starts too.
    cold_power = hessian.spectrum(model, (x, y), method="power", seed=1)
    warm_power = hessian.spectrum(
        model, (x, y), method="power", init_vectors=first.eigenvectors
    )
    assert warm_power.hvp_count < cold_power.hvp_count
    assert_close(warm_power.eigenvalues, expected[::-1][:1])


def test_init_vectors_accepts_per_variable_lists():
    model, data, loss = dense_tanh()
    expected = np.linalg.eigvalsh(explicit_hessian(model, loss, *data))
    first = hessian.spectrum(model, data, top_k=2, seed=0)
    hvp = hessian.make_hvp(model, data)
    as_lists = [hvp.unflatten(v) for v in first.eigenvectors]
    again = hessian.spectrum(model, data, top_k=2, init_vectors=as_lists)
    assert_close(again.eigenvalues, expected[::-1][:2])
    assert again.hvp_count < first.hvp_count


def test_budget_exhaustion_warns_and_reports_unconverged():
    model, data, _ = dense_tanh()
    with pytest.warns(UserWarning, match="max_hvps"):
        spec = hessian.spectrum(model, data, top_k=1, max_hvps=2, seed=0)
    assert not spec.converged
    assert spec.hvp_count == 2  # the residual check costs no HVP


def test_seed_makes_results_reproducible():
    model, data, _ = dense_tanh()
    a = hessian.trace(model, data, num_samples=5, seed=4)
    b = hessian.trace(model, data, num_samples=5, seed=4)
    assert a == b


# --------------------------------------------------------------------------
# Bad arguments.


@pytest.fixture(scope="module")
def small():
    model, data, _ = dense_tanh()
    return model, data


@pytest.mark.parametrize("top_k", [0, -1])
def test_nonpositive_top_k(small, top_k):
    with pytest.raises(ValueError, match=f"top_k={top_k}"):
        hessian.spectrum(*small, top_k=top_k)


def test_top_k_above_parameter_count(small):
    model, data = small
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    with pytest.raises(ValueError, match=f"top_k={n + 1}"):
        hessian.spectrum(model, data, top_k=n + 1)


@pytest.mark.parametrize("data", [[], tf.data.Dataset.range(0)])
def test_empty_data(small, data):
    with pytest.raises(ValueError, match="`data`"):
        hessian.spectrum(small[0], data)


def test_uncompiled_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    data = (np.ones((4, 3), "float32"), np.ones((4, 1), "float32"))
    for call in (hessian.spectrum, hessian.trace, hessian.density):
        with pytest.raises(ValueError, match="`model`.*Expected.*Received"):
            call(model, data)


def test_bad_method_and_mode(small):
    with pytest.raises(ValueError, match="method='qr'"):
        hessian.spectrum(*small, method="qr")
    with pytest.raises(ValueError, match="hvp_mode='fast'"):
        hessian.make_hvp(*small, hvp_mode="fast")
    with pytest.raises(ValueError, match="num_samples=0"):
        hessian.trace(*small, num_samples=0)


# --------------------------------------------------------------------------
# At scale: bounded device basis, one operator, no host round trips.


def test_thick_restarts_bound_the_basis_and_stay_accurate(monkeypatch):
    model, data, loss = dense_tanh()
    matrix = explicit_hessian(model, loss, *data)
    expected = np.linalg.eigvalsh(matrix)
    sizes = []
    append = hessian_vectors._Basis.append

    def recording_append(self, vector):
        append(self, vector)
        sizes.append(len(self))

    monkeypatch.setattr(hessian_vectors._Basis, "append", recording_append)
    spec = hessian.spectrum(model, data, top_k=3, smallest=True, tol=1e-5,
                            max_vectors=8, seed=0)
    assert spec.converged
    assert max(sizes) <= 8
    assert spec.hvp_count > 8  # it did restart
    assert_close(spec.eigenvalues, expected[::-1][:3])
    assert_close(spec.min_eigenvalue, expected[0])
    for value, vector, residual in zip(
        spec.eigenvalues, spec.eigenvectors, spec.residuals
    ):
        explicit = np.linalg.norm(matrix @ vector - value * vector)
        assert residual == pytest.approx(explicit, abs=1e-5 * expected[-1])


def test_steps_already_orthogonal_skip_the_correction_and_stay_accurate(monkeypatch):
    # The coefficients of each new Lanczos vector on the basis are measured every step; the
    # correction pass runs only above a tenth of `tol` (at most ORTHOGONAL_ENOUGH) of its norm.
    from gradmon.hessian import lanczos as hessian_lanczos

    model, data, loss = dense_tanh()
    matrix = explicit_hessian(model, loss, *data)
    expected = np.linalg.eigvalsh(matrix)
    runs = {}
    step = hessian_lanczos._Lanczos.step

    def recording_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        runs[id(self)] = (self.skipped, self.m)
        return result

    monkeypatch.setattr(hessian_lanczos._Lanczos, "step", recording_step)
    skipped = {}
    for tol in (1e-3, 1e-7):
        runs.clear()
        spec = hessian.spectrum(model, data, top_k=3, smallest=True, tol=tol, seed=0,
                                max_hvps=2000)
        skipped[tol] = sum(s for s, _ in runs.values())
        assert_close(spec.eigenvalues, expected[::-1][:3])
        assert_close(spec.min_eigenvalue, expected[0])
        for value, vector, residual in zip(spec.eigenvalues, spec.eigenvectors, spec.residuals):
            explicit = np.linalg.norm(matrix @ vector - value * vector)
            assert residual == pytest.approx(explicit, abs=1e-5 * expected[-1])
    assert skipped[1e-3] > 0
    # at 1e-8 of the norm a float32 vector's coefficients rarely pass: fewer skips
    assert skipped[1e-7] < skipped[1e-3]


def test_lanczos_vectors_stay_on_device_in_the_model_dtype(monkeypatch):
    model, data, loss = dense_tanh()
    op = hessian.make_hvp(model, data)
    seen = []
    apply = op.apply

    def recording_apply(vector):
        seen.append(isinstance(vector, tf.Tensor) and vector.dtype == tf.float32)
        return apply(vector)

    def host_call(vector):
        raise AssertionError("a vector went through the host")

    monkeypatch.setattr(op, "apply", recording_apply)
    monkeypatch.setattr(hessian.HessianVectorProduct, "__call__", host_call)
    spec = hessian.spectrum(op, top_k=2, seed=0)
    hessian.trace(op, num_samples=3, seed=0)
    hessian.density(op, num_probes=1, num_steps=5, seed=0)
    assert len(seen) == spec.hvp_count + 3 + 5
    assert all(seen)
    expected = np.linalg.eigvalsh(explicit_hessian(model, loss, *data))
    assert_close(spec.eigenvalues, expected[::-1][:2])


def test_one_operator_serves_spectrum_trace_and_density_traced_once():
    model, data, loss = dense_relu()
    op = hessian.make_hvp(model, data)
    spec = hessian.spectrum(op, top_k=2, seed=0)
    est = hessian.trace(op, num_samples=4, seed=0)
    dens = hessian.density(op, num_probes=2, num_steps=6, seed=0)
    again = hessian.spectrum(op, top_k=2, init_vectors=spec)
    assert op.trace_count == 1
    assert op.count == spec.hvp_count + 4 + dens.hvp_count + again.hvp_count
    assert est.hvp_count == 4 and dens.hvp_count == 12
    expected = np.linalg.eigvalsh(explicit_hessian(model, loss, *data))
    assert_close(again.eigenvalues, expected[::-1][:2])
    with pytest.raises(ValueError, match="`data`"):
        hessian.trace(op, data, num_samples=2)


def test_slq_with_as_many_steps_as_parameters_finds_the_exact_spectrum():
    # Linear regression: the Hessian is 2/n X^T X in closed form; Lanczos run
    # to the dimension makes each probe's nodes its eigenvalues.
    rng = _rng(12)
    x = (rng.standard_normal((40, 3)) * [1.0, 2.0, 3.0]).astype("float32")
    y = rng.standard_normal((40, 1)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    augmented = np.hstack([x, np.ones((40, 1))]).astype(np.float64)
    exact = np.linalg.eigvalsh(2.0 / 40 * augmented.T @ augmented)
    dens = hessian.density(model, (x, y), num_probes=2, num_steps=10, seed=0)
    assert dens.hvp_count == 2 * 4
    for probe in np.split(dens.nodes, 2):
        np.testing.assert_allclose(np.sort(probe), exact, rtol=1e-4)
    assert dens.weights.sum() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------
# Argument and data checks, with Keras' wording.


@pytest.mark.parametrize("tol", [-1, 0, float("nan"), float("inf"), 1, "1e-3", True])
def test_bad_tol(small, tol):
    with pytest.raises(ValueError, match=(
            r"Invalid value for argument `tol`\. Expected a positive finite "
            r"number below 1\. Received: tol=")):
        hessian.spectrum(*small, tol=tol)


def test_tol_inf_message_is_keras_worded(small):
    with pytest.raises(ValueError) as error:
        hessian.spectrum(*small, tol=float("inf"))
    assert str(error.value) == (
        "Invalid value for argument `tol`. Expected a positive finite number "
        "below 1. Received: tol=inf")


@pytest.mark.parametrize("kwargs,argument", [
    (dict(seed="abc"), "seed"), (dict(seed=-1), "seed"),
    (dict(max_hvps=0), "max_hvps"), (dict(max_vectors=3, top_k=2), "max_vectors"),
    (dict(smallest="yes"), "smallest"), (dict(top_k=1.5), "top_k")])
def test_bad_spectrum_arguments(small, kwargs, argument):
    with pytest.raises(ValueError, match=rf"`{argument}`.*Received: {argument}="):
        hessian.spectrum(*small, **kwargs)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(sigma=float("inf")), "sigma"), (dict(sigma=0.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"), (dict(grid=[]), "grid"),
    (dict(grid=1), "grid"), (dict(grid=[1.0, 0.0]), "grid"),
    (dict(grid=[0.0, float("nan")]), "grid"), (dict(grid=np.zeros((2, 2))), "grid"),
    (dict(num_probes=0), "num_probes"), (dict(num_steps=-2), "num_steps"),
    (dict(seed="abc"), "seed")])
def test_bad_density_arguments(small, kwargs, argument):
    with pytest.raises(ValueError, match=rf"`{argument}`.*Received: {argument}="):
        hessian.density(*small, **kwargs)


def test_numpy_integers_are_accepted(small):
    model, data = small
    spec = hessian.spectrum(model, data, top_k=np.int64(2), seed=np.int64(0),
                            max_hvps=np.int32(200))
    assert spec.eigenvalues.shape == (2,)
    est = hessian.trace(model, data, num_samples=np.int64(3), seed=np.int64(1))
    assert est.hvp_count == 3
    dens = hessian.density(model, data, num_probes=np.int64(1),
                           num_steps=np.int64(4), grid=np.int64(50))
    assert dens.grid.shape == (50,)


@pytest.mark.parametrize("bad", ["no_y", "nan_x", "inf_y", "nan_weight"])
def test_bad_data_names_data(small, bad):
    model, (x, y) = small
    x_nan = x.copy()
    x_nan[3, 1] = np.nan
    y_inf = y.copy()
    y_inf[0, 0] = np.inf
    weight = np.ones(len(x), "float32")
    weight[5] = np.nan
    data = {"no_y": (x,), "nan_x": (x_nan, y), "inf_y": [(x, y), (x, y_inf)],
            "nan_weight": (x, y, weight)}[bad]
    for call in (hessian.make_hvp, hessian.spectrum, hessian.trace,
                 hessian.density, hessian.prepare_data):
        with pytest.raises(ValueError, match=r"Invalid value for argument `data`"):
            call(data) if call is hessian.prepare_data else call(model, data)
