"""tests/conftest.py's backend selection: what is skipped off TensorFlow, and only that.

Each check runs pytest in a subprocess on a small project whose conftest.py is the suite's,
behind a stand-in `keras` module naming the backend (so no framework is imported)."""

import ast
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

MARKED_MODULE = """\
import pytest
import a_module_that_does_not_exist  # an ImportError if this module were imported

pytestmark = pytest.mark.tensorflow_only


def test_never_collected_off_tensorflow():
    pass
"""

NEUTRAL_MODULE = """\
import pytest


def test_runs_everywhere():
    pass


@pytest.mark.tensorflow_only
def test_marked_alone():
    pass
"""


def _run_suite(tmp_path, backend):
    """Outcome counts of pytest on the small project, Keras naming `backend`."""
    with open(os.path.join(HERE, "conftest.py"), encoding="utf-8") as f:
        conftest = f.read()
    stand_in = ("import sys, types\n"
                "sys.modules['keras'] = types.SimpleNamespace(\n"
                f"    backend=types.SimpleNamespace(backend=lambda: {backend!r}))\n")
    (tmp_path / "conftest.py").write_text(stand_in + conftest)
    (tmp_path / "test_marked.py").write_text(MARKED_MODULE)
    (tmp_path / "test_neutral.py").write_text(NEUTRAL_MODULE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    tensorflow_only: test\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return done


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_off_tensorflow_a_marked_module_is_skipped_whole_without_being_imported(tmp_path, backend):
    done = _run_suite(tmp_path, backend)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed, 2 skipped" in done.stdout
    assert f"needs TensorFlow (marked tensorflow_only); Keras runs on {backend}" in done.stdout
    assert "a_module_that_does_not_exist" not in done.stdout


def test_on_tensorflow_the_mark_skips_nothing(tmp_path):
    done = _run_suite(tmp_path, "tensorflow")
    assert done.returncode != 0  # the marked module is imported, and its import fails
    assert "a_module_that_does_not_exist" in done.stdout
    assert "2 passed, 1 error" in done.stdout and "skipped" not in done.stdout


def test_every_listed_tensorflow_only_test_exists():
    """A stale TENSORFLOW_ONLY_TESTS entry (a renamed or moved test) would skip nothing."""
    import conftest

    assert conftest.TENSORFLOW_ONLY_TESTS
    for entry in conftest.TENSORFLOW_ONLY_TESTS:
        file, name = entry.split("::")
        with open(os.path.join(HERE, file), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, entry
