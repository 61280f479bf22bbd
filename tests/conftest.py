"""The suite on every Keras backend: `KERAS_BACKEND=tensorflow|jax|torch python -m pytest -q`.

The backend is Keras' own (`keras.backend.backend()`: KERAS_BACKEND, else keras.json).
A test module that needs TensorFlow says so on one line near its top:

    pytestmark = pytest.mark.tensorflow_only

Under JAX or PyTorch such a module is reported skipped as a whole *before it is imported*
(its `import tensorflow` would fail in a TensorFlow-free environment): `pytest_pycollect_makemodule`
reads the assignment from the module's source (ast) and hands pytest a module that skips.
An unmarked module is imported and run on every backend, so one that still imports
TensorFlow fails loudly there (an ImportError), instead of being skipped silently.
A single test can carry the same mark (`@pytest.mark.tensorflow_only`), or be named in
TENSORFLOW_ONLY_TESTS below (a TensorFlow-only test in a module that otherwise runs
everywhere, until its module's owner ports or marks it); it is skipped under JAX or PyTorch.
Under TensorFlow the mark and the list change nothing.
"""

import ast
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # deterministic CPU kernels for exact comparisons


import pytest

TENSORFLOW_ONLY = "tensorflow_only"  # the marker, registered in setup.cfg
_BACKEND = pytest.StashKey[str]()
# "file::test" (any parametrization) -> what in it still needs TensorFlow.
TENSORFLOW_ONLY_TESTS = {
    "test_writer.py::test_gradient_monitor_on_a_full_disk_finishes_training_as_without_it":
        "GradientMonitor and monitor() run on TensorFlow only so far",
    "test_writer.py::test_gradient_monitor_flushes_each_file_once_per_batch_of_steps":
        "GradientMonitor and monitor() run on TensorFlow only so far",
    "test_docs.py::test_the_cited_public_names_exist":
        "it imports every cited name, and the measuring side still imports TensorFlow",
}


def _backend():
    try:
        import keras
    except ModuleNotFoundError as error:  # e.g. the default backend, TensorFlow, not installed
        raise pytest.UsageError(
            f"Keras could not load its backend ({error}). Set KERAS_BACKEND to one installed here: "
            f"tensorflow, jax or torch. Received: KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}") from error
    return keras.backend.backend()


def pytest_configure(config):
    config.stash[_BACKEND] = _backend()


def _marked_tensorflow_only(path):
    """Whether the module at `path` assigns a `pytestmark` naming `tensorflow_only` at top level."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "pytestmark" for target in node.targets):
            if any(isinstance(n, ast.Attribute) and n.attr == TENSORFLOW_ONLY for n in ast.walk(node.value)):
                return True
    return False


class _SkippedModule(pytest.Module):
    """A TensorFlow-only module under another backend: collected as one skip, never imported."""

    def collect(self):
        backend = self.config.stash[_BACKEND]
        pytest.skip(f"needs TensorFlow (marked {TENSORFLOW_ONLY}); Keras runs on {backend}")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    if parent.config.stash[_BACKEND] != "tensorflow" and _marked_tensorflow_only(module_path):
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config, items):
    backend = config.stash[_BACKEND]
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"needs TensorFlow (marked {TENSORFLOW_ONLY}); Keras runs on {backend}")
    for item in items:
        listed = TENSORFLOW_ONLY_TESTS.get(f"{item.path.name}::{item.originalname}")
        if listed:
            item.add_marker(pytest.mark.skip(reason=f"needs TensorFlow: {listed}; Keras runs on {backend}"))
        elif item.get_closest_marker(TENSORFLOW_ONLY):
            item.add_marker(skip)


@pytest.fixture
def hvp_counter(monkeypatch):
    """`(built, applied)`: every HVP operator built and every product applied while the test runs."""
    from gradmon import hessian

    built, applied = [], []
    init, apply = hessian.HessianVectorProduct.__init__, hessian.HessianVectorProduct.apply

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    def counting_apply(self, vector):
        applied.append(1)
        return apply(self, vector)

    monkeypatch.setattr(hessian.HessianVectorProduct, "__init__", counting_init)
    monkeypatch.setattr(hessian.HessianVectorProduct, "apply", counting_apply)
    return built, applied
