"""HessianMonitor: the written spectrum against an explicit Hessian; probing changes nothing."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon import hessian, tags
from helpers import bn_dropout_net, explicit_hessian, read_events

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(11)
X = RNG.normal(size=(48, 4)).astype(np.float32)
Y = RNG.normal(size=(48, 1)).astype(np.float32)
LR = 0.05


def mse(model, x, y):
    return tf.reduce_mean(tf.square(model(x, training=False) - y))


def small_model(monitored=True):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(1)])
    if monitored:
        model = gradmon.monitor(model)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


@pytest.mark.parametrize("monitored", [True, False])
def test_written_spectrum_matches_explicit_hessian(tmp_path, monitored):
    model = small_model(monitored)
    probe = (X[:32], Y[:32])
    cb = gradmon.HessianMonitor(str(tmp_path), data=probe, every_n_steps=4, top_k=2, trace=True,
                                trace_samples=200, density=True, smallest=True, tol=1e-6)
    model.fit(X, Y, batch_size=6, epochs=1, shuffle=False, verbose=0, callbacks=[cb])  # 8 steps
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.eigenvalue(1)]) == [4, 8]
    # the probe at step 8 saw the final weights
    exact = np.linalg.eigvalsh(explicit_hessian(model, mse, *probe))
    top = exact[::-1]
    assert events[tags.eigenvalue(1)][8] == pytest.approx(top[0], rel=1e-3)
    assert events[tags.eigenvalue(2)][8] == pytest.approx(top[1], rel=1e-3)
    assert events[tags.HESSIAN_MIN_EIGENVALUE][8] == pytest.approx(exact[0], rel=1e-3, abs=1e-4 * top[0])
    assert events[tags.EDGE_OF_STABILITY][8] == pytest.approx(top[0] * LR / 2, rel=1e-3)
    assert events[tags.residual(1)][8] <= 1e-4 * top[0]
    trace, stderr = events[tags.HESSIAN_TRACE][8], events[tags.HESSIAN_TRACE_STDERR][8]
    assert abs(trace - exact.sum()) <= 3 * stderr
    assert events[tags.HESSIAN_HVP_COUNT][8] >= 200
    dens = events[tags.HESSIAN_DENSITY][8]
    assert dens[:, 2].sum() == pytest.approx(1.0, abs=1e-3)
    assert dens[0, 0] <= exact[0] and dens[-1, 1] >= exact[-1]


def bn_dropout_model():
    model = gradmon.monitor(bn_dropout_net(1))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def test_probing_changes_nothing(tmp_path):
    """A fit with HessianMonitor ends exactly where the same fit without it ends."""
    finals = []
    for with_probe in (False, True):
        model = bn_dropout_model()
        keras.utils.set_random_seed(9)
        callbacks = [gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=2, top_k=2,
                                            trace=True, trace_samples=5)] if with_probe else []
        model.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
        finals.append(([v.numpy() for v in model.weights],
                       [v.numpy() for v in model.optimizer.variables],
                       int(model.gradient_observer.step)))
    (w0, o0, s0), (w1, o1, s1) = finals
    assert s0 == s1 == 12
    for a, b in zip(w0 + o0, w1 + o1):  # BN moving stats are in model.weights
        np.testing.assert_array_equal(a, b)


def test_warm_start_reuses_the_previous_eigenvectors(tmp_path):
    model = small_model()
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=1000, top_k=1, tol=1e-6)
    cb.set_model(model)
    cb.on_train_begin()
    cold = cb.probe(1)
    warm = cb.probe(2)  # same weights: the previous eigenvector is exact
    assert warm[tags.HESSIAN_HVP_COUNT] < cold[tags.HESSIAN_HVP_COUNT]
    assert warm[tags.eigenvalue(1)] == pytest.approx(cold[tags.eigenvalue(1)], rel=1e-6)


NAN_X = X.copy()
NAN_X[2, 2] = np.nan


@pytest.mark.parametrize("kwargs,argument", [
    (dict(top_k=0), "top_k"), (dict(every_n_steps=0), "every_n_steps"), (dict(data=None), "data"),
    (dict(trace_samples=-3), "trace_samples"), (dict(every_n_steps=2.5), "every_n_steps"),
    (dict(tol=-1), "tol"), (dict(tol=0), "tol"), (dict(tol=float("nan")), "tol"),
    (dict(tol=float("inf")), "tol"), (dict(tol=1.0), "tol"), (dict(seed="abc"), "seed"),
    (dict(seed=-2), "seed"), (dict(log_dir=None), "log_dir"), (dict(log_dir=""), "log_dir"),
    (dict(trace="no"), "trace"), (dict(density=1), "density"), (dict(smallest="yes"), "smallest")])
def test_invalid_arguments(tmp_path, kwargs, argument):
    args = dict(log_dir=str(tmp_path), data=(X, Y))
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"Invalid value for argument `{argument}`\..*Received: {argument}="):
        gradmon.HessianMonitor(**args)
    assert not os.path.exists("None")


def test_tol_message_is_keras_worded(tmp_path):
    with pytest.raises(ValueError) as error:
        gradmon.HessianMonitor(str(tmp_path), data=(X, Y), tol=float("inf"))
    assert str(error.value) == ("Invalid value for argument `tol`. Expected a positive finite number "
                                "below 1. Received: tol=inf")


@pytest.mark.parametrize("data", [(X,), (NAN_X, Y), [(X, Y), (X, Y * np.inf)]])
def test_bad_probe_data_fails_at_construction(tmp_path, data):
    with pytest.raises(ValueError, match="Invalid value for argument `data`"):
        gradmon.HessianMonitor(str(tmp_path), data=data)


def test_numpy_integers_are_accepted(tmp_path):
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=np.int64(10), top_k=np.int32(2),
                                trace_samples=np.int64(5), seed=np.int64(3), trace=np.bool_(True))
    assert (cb.every_n_steps, cb.top_k, cb.trace_samples, cb.seed, cb.trace) == (10, 2, 5, 3, True)
    assert type(cb.every_n_steps) is int


def test_one_operator_per_fit_traced_once(tmp_path, hvp_counter):
    """Spectrum, trace and density of every probe share one HVP operator and one trace."""
    built, applied = hvp_counter
    model = small_model()
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=2, top_k=2, trace=True,
                                trace_samples=4, density=True)
    model.fit(X, Y, batch_size=6, epochs=1, shuffle=False, verbose=0, callbacks=[cb])  # 8 steps, 4 probes
    assert len(built) == 1
    assert built[0].trace_count == 1
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.HESSIAN_HVP_COUNT]) == [2, 4, 6, 8]
    assert sum(events[tags.HESSIAN_HVP_COUNT].values()) == len(applied) == built[0].count


def test_too_many_eigenvalues_fail_before_training(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="`top_k`.*Received: top_k=1000"):
        model.fit(X, Y, verbose=0, callbacks=[gradmon.HessianMonitor(str(tmp_path), data=(X, Y), top_k=1000)])
    assert int(model.gradient_observer.step) == 0


def test_steps_per_execution_probes_at_the_first_due_step(tmp_path, monkeypatch):
    """With 3 steps per call the step counter is read only when a probe may be due."""
    from gradmon.hessian import monitor as hessian_monitor

    reads = []
    real = hessian_monitor.training_step

    def counting_step(model):
        reads.append(1)
        return real(model)

    monkeypatch.setattr(hessian_monitor, "training_step", counting_step)
    model = small_model(monitored=False)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", steps_per_execution=3)
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=4, top_k=1)
    model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[cb])  # 12 steps, 4 calls
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.eigenvalue(1)]) == [6, 9, 12]
    assert len(reads) == 1 + 3  # on_train_begin, then the calls ending at steps 6, 9, 12


def test_a_nan_step_does_not_end_the_fit(tmp_path):
    """Keras applies a NaN step (no policy): the weights are NaN, no Hessian is defined; the probe
    used to raise LinAlgError and end the fit. It is skipped, warned once; the fit finishes."""
    import warnings

    x = X.copy()
    x[6] = np.nan  # batch 2
    model = small_model(monitored=False)
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X[:16], Y[:16]), every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, Y, batch_size=6, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 2  # the run finished
    skipped = [str(c.message) for c in caught if "HessianMonitor skipped its probe" in str(c.message)]
    assert len(skipped) == 1 and "at step 2:" in skipped[0] and "not finite" in skipped[0]
    assert tags.eigenvalue(1) not in read_events(os.path.join(str(tmp_path), "train"))


def test_adam_without_epsilon_on_a_dead_layer_does_not_end_the_fit(tmp_path):
    """Adam(epsilon=0) on a dead layer (its gradients always 0): Keras' update is 0/0, the weights
    NaN; the probe used to raise and end the fit."""
    import warnings

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, activation="relu", kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant(-1.0)),  # relu(-1): dead
        keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01, epsilon=0.0), loss="mse")
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X[:16], Y[:16]), every_n_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(X, Y, batch_size=6, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 2
    assert any("HessianMonitor skipped its probe" in str(c.message) for c in caught)


def test_a_preconditioner_that_is_not_positive_skips_only_the_preconditioned_spectrum(
        tmp_path, monkeypatch):
    import warnings

    from gradmon.hessian import preconditioner

    diagonal = preconditioner.diagonal
    monkeypatch.setattr(preconditioner, "diagonal", lambda opt, variables: [
        np.where(np.arange(p.size).reshape(p.shape) == 0, 0.0, p) for p in diagonal(opt, variables)])
    model = small_model(monitored=False)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X[:16], Y[:16]), every_n_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, Y, batch_size=6, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert sum("skipped the preconditioned spectrum" in str(c.message) for c in caught) == 1
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.eigenvalue(1)]) == [4, 8] and tags.GD_EDGE_OF_STABILITY in events
    assert tags.preconditioned_eigenvalue(1) not in events and tags.EDGE_OF_STABILITY not in events


def _traced_functions(model):
    """`(HVP traces, gradient traces, Lanczos basis functions)` of the process for `model`."""
    from gradmon.hessian import operator as hessian_operator, vectors as hessian_vectors

    derivatives = list(hessian_operator._FUNCTION_CACHE[model].values())
    return (sum(d.trace_count for d in derivatives),
            sum(d._grad_fn.experimental_get_tracing_count() for d in derivatives),
            len(hessian_vectors._LAYOUT_FUNCTIONS))


def test_a_new_monitor_traces_nothing_new(tmp_path, monkeypatch):
    """A new HessianMonitor per fit (as in notebooks) reuses every traced function of the first:
    the HVP, the gradient and the Lanczos basis algebra, itself at most two functions for any
    basis size (the first probe's tracing was 9 basis layouts on a Transformer)."""
    from gradmon.hessian import vectors as hessian_vectors

    monkeypatch.setattr(hessian_vectors, "_LAYOUT_FUNCTIONS", {})  # none traced by earlier tests
    model = small_model(monitored=False)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")  # the preconditioned spectrum too
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    written = []
    for run in range(2):
        cb = gradmon.HessianMonitor(str(tmp_path / str(run)), data=(X, Y), top_k=2, smallest=True, tol=1e-6)
        cb.set_model(model)
        cb.on_train_begin()
        written.append(cb.probe(1))
        cb.on_train_end()
        if run == 0:
            traced = _traced_functions(model)
    assert _traced_functions(model) == traced
    assert traced[0] == traced[1] == 1 and 1 <= traced[2] <= 2
    exact = np.linalg.eigvalsh(explicit_hessian(model, mse, X, Y))
    for scalars in written:
        assert scalars[tags.eigenvalue(1)] == pytest.approx(exact[-1], rel=1e-5)
        assert scalars[tags.eigenvalue(2)] == pytest.approx(exact[-2], rel=1e-5)
        assert tags.preconditioned_eigenvalue(2) in scalars
