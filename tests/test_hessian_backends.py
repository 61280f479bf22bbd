"""gradmon.hessian on every Keras backend, against an explicit Hessian and across backends.

`hessian_backend_check.run()` builds the same tiny model with the same NumPy weights and
data, and returns gradmon's HVP matrix (both modes), spectrum (Lanczos with the smallest
eigenvalue, power iteration, preconditioned), Hutchinson trace and SLQ nodes beside the
Hessian the backend's own autodiff computes from the loss written out by hand. It runs
here, on the suite's backend, and in the TensorFlow-free JAX and PyTorch interpreters
(`helpers.backend_python`: GRADMON_JAX_PYTHON / GRADMON_TORCH_PYTHON, else .venv-jax and
.venv-torch; skipped when absent), whose eigenvalues must equal this backend's. Under `make
test` each suite starts one of them (EVERY_BACKEND_OTHER): the three suites compare each pair once.
"""

import json
import os
import subprocess

import keras
import numpy as np
import pytest

import hessian_backend_check
from helpers import backend_env, backend_python
from gradmon import tags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Under `make test`, which runs all three suites (GRADMON_EVERY_BACKEND=1), each suite starts one
# other backend: every pair of backends is compared once, and each backend is `other` once.
EVERY_BACKEND_OTHER = {"tensorflow": "torch", "torch": "jax", "jax": "tensorflow"}
RTOL = 2e-5  # float32 HVPs of a Hessian of norm ~3: rounding ~1e-7 relative, spectrum tol 1e-6


@pytest.fixture(scope="module")
def here():
    """The check on this interpreter's backend."""
    return hessian_backend_check.run()


@pytest.fixture(scope="module", params=["jax", "tensorflow", "torch"])
def other(request):
    """The check in the interpreter of another backend (JAX and PyTorch ones TensorFlow-free;
    one at a time: on a shared 2-core machine overlapping them took longer)."""
    import keras

    backend, this = request.param, keras.backend.backend()
    if this == backend:
        pytest.skip(f"the suite runs on {backend} itself")
    if os.environ.get("GRADMON_EVERY_BACKEND") == "1" and EVERY_BACKEND_OTHER[this] != backend:
        pytest.skip(f"make test compares {backend} with {this} in its {backend} suite")
    done = subprocess.run([backend_python(backend), os.path.join(HERE, "hessian_backend_check.py")],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=backend_env(backend))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_matches_explicit(result):
    explicit = np.array(result["explicit"])
    scale = np.abs(np.linalg.eigvalsh(explicit)).max()
    exact = np.linalg.eigvalsh(explicit)[::-1]
    for mode in ("reverse_over_reverse", "forward_over_reverse"):
        np.testing.assert_allclose(np.array(result[f"{mode}/matrix"]), explicit, atol=RTOL * scale)
    np.testing.assert_allclose(result["eigenvalues"], exact[:3], rtol=RTOL)
    assert result["min_eigenvalue"] == pytest.approx(exact[-1], rel=RTOL, abs=RTOL * scale)
    assert result["converged"]
    np.testing.assert_allclose(result["power"], exact[:2], rtol=RTOL)
    root = 1.0 / np.sqrt(np.array(result["diagonal"]))
    preconditioned = np.linalg.eigvalsh(root[:, None] * explicit * root[None, :])[::-1]
    np.testing.assert_allclose(result["preconditioned"], preconditioned[:2], rtol=RTOL)
    value, stderr = result["trace"]
    assert abs(value - np.trace(explicit)) < 4 * stderr  # Hutchinson: unbiased, 64 probes
    nodes = np.array(result["density_nodes"])  # Ritz values: inside the spectrum, the largest near its top
    assert exact[-1] - RTOL * scale <= nodes.min() and nodes.max() <= exact[0] + RTOL * scale
    assert nodes.max() == pytest.approx(exact[0], rel=1e-3)
    assert result["density_weight"] == pytest.approx(1.0, abs=1e-9)


def test_this_backend_matches_the_explicit_hessian(here):
    _assert_matches_explicit(here)


def test_other_backend_matches_its_explicit_hessian(other):
    assert other["tensorflow_imported"] == (other["backend"] == "tensorflow")
    _assert_matches_explicit(other)
    # one trace, reused by every later product (JAX: per batch shape); PyTorch runs eagerly
    assert other["trace_count"] == (0 if other["backend"] == "torch" else 1)
    if other["backend"] == "jax":  # BatchNormalization's moving statistics read at each product
        before, after, traces = other["live_state_errors"]
        assert before < 1e-5 and after < 1e-5 and traces == 1


def _assert_monitor_wrote_the_spectrum(result):
    written, exact = result["monitor"]["written"], result["monitor"]["exact"]
    steps, value = written[tags.eigenvalue(1)]
    assert steps == [2, 4]  # the probe at step 4 saw the final weights
    assert value == pytest.approx(exact[0], rel=RTOL)
    assert written[tags.eigenvalue(2)][1] == pytest.approx(exact[1], rel=RTOL)
    assert written[tags.HESSIAN_MIN_EIGENVALUE][1] == pytest.approx(exact[-1], rel=RTOL, abs=RTOL * exact[0])
    assert {tags.preconditioned_eigenvalue(1), tags.layer_eigenvalue("net/hidden")} <= set(written)


def test_hessian_monitor_writes_the_spectrum_here(here):
    _assert_monitor_wrote_the_spectrum(here)


def test_hessian_monitor_writes_the_spectrum_on_another_backend(other):
    _assert_monitor_wrote_the_spectrum(other)


def test_the_same_model_gives_the_same_spectrum_on_every_backend(here, other):
    assert other["backend"] != here["backend"]
    for key in ("eigenvalues", "power", "preconditioned"):
        np.testing.assert_allclose(other[key], here[key], rtol=RTOL)
    assert other["min_eigenvalue"] == pytest.approx(here["min_eigenvalue"], rel=RTOL, abs=1e-6)
    assert other["loss"] == pytest.approx(here["loss"], rel=1e-6)
    # the same Adam fit, probed: every number HessianMonitor wrote (preconditioned, edge of
    # stability, per layer); the trajectories differ by float32 rounding only
    mine, theirs = here["monitor"]["written"], other["monitor"]["written"]
    assert set(theirs) == set(mine)
    for tag, (steps, value) in mine.items():
        if "residual" not in tag and tag != tags.HESSIAN_HVP_COUNT:
            assert theirs[tag][0] == steps
            assert theirs[tag][1] == pytest.approx(value, rel=1e-4, abs=1e-6), tag
    np.testing.assert_allclose(other["explicit"], here["explicit"], atol=1e-5)


def test_an_unsupported_backend_is_named(monkeypatch):
    import keras

    from gradmon.backend import hvp

    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(NotImplementedError, match="Keras backend 'numpy'"):
        hvp.current()


def _attention_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3, 4))
    h = keras.layers.MultiHeadAttention(num_heads=1, key_dim=2, name="attention")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(keras.layers.GlobalAveragePooling1D()(h)))
    model.compile(loss="mse")
    rng = np.random.default_rng(5)
    return model, rng.standard_normal((8, 3, 4)).astype("float32"), rng.standard_normal((8, 1)).astype("float32")


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's fused attention kernels")
def test_attention_has_a_hessian_on_torch():
    """Keras' attention on PyTorch runs `scaled_dot_product_attention`, whose fused CPU kernel
    has no derivative of its backward: the HVP failed there (RuntimeError), and ended the fit of
    a Transformer under `HessianMonitor`. The spectrum now equals the eigenvalues of the
    Hessian that `torch.func.hessian` takes of the same loss through `stateless_call`."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import gradmon

    model, x, y = _attention_model()
    values = [v.value for v in model.trainable_variables]
    sizes = [int(np.prod(v.shape)) for v in values]
    others = [v.value for v in model.non_trainable_variables]

    def loss(flat):
        parts = [p.reshape(v.shape) for p, v in zip(torch.split(flat, sizes), values)]
        out, _ = model.stateless_call(parts, others, torch.as_tensor(x))
        return torch.mean((out - torch.as_tensor(y)) ** 2)

    flat = torch.cat([v.detach().reshape(-1) for v in values])
    with sdpa_kernel([SDPBackend.MATH]):  # the reference's own way through attention
        explicit = torch.func.hessian(loss)(flat).double().cpu().numpy()
    exact = np.linalg.eigvalsh((explicit + explicit.T) / 2)[::-1]
    found = gradmon.hessian.spectrum(model, (x, y), top_k=2, tol=1e-6)
    np.testing.assert_allclose(found.eigenvalues, exact[:2], rtol=1e-4)


def test_a_probe_that_raises_leaves_the_fit_running(tmp_path, monkeypatch):
    """Whatever a probe raises (an op with no second derivative, a framework error), the
    probe is skipped with one warning naming the error, and training goes on to its end."""
    import gradmon
    from gradmon.hessian import operator

    model, x, y = _attention_model()
    model.compile(optimizer="sgd", loss="mse")

    def broken(*args, **kwargs):
        raise RuntimeError("derivative for some_op_backward is not implemented")

    monkeypatch.setattr(operator.HessianVectorProduct, "apply", broken)
    with pytest.warns(UserWarning, match=r"skipped its probe at step 2: its Hessian-vector product "
                                         r"raised RuntimeError \(derivative for some_op_backward"):
        model.fit(x, y, batch_size=2, epochs=1, verbose=0,
                  callbacks=[gradmon.HessianMonitor(str(tmp_path), (x, y), every_n_steps=2)])
    assert int(model.optimizer.iterations) == 4
