"""What `gradmon.gradcheck` needs from JAX and PyTorch beside autodiff.

`keras.ops` conversions shared by `gradcheck_jax` and `gradcheck_torch`, and
`undemoted_float64()`: outside TensorFlow, Keras' type promotion
(`keras.backend.result_type`) turns every float64 result into float32 "to be
aligned with JAX's default behavior" (a table in
`keras/src/backend/common/dtypes.py`), so some float64 layers compute in
float32 (on Keras 3.15: `ops.matmul` on PyTorch, `ops.tanh` on JAX; a float64
Dense layer is then exact to 1e-8..1e-7 instead of 1e-16). A gradient check in
float64 needs every operation in float64, so the check lifts that one entry for
its duration. The entry is global to the process: a model trained in another
thread while a check runs would see float64 results too.
"""

import contextlib

import keras
import numpy as np


class Float64Unavailable(Exception):
    """Raised by a backend's `precision` when it cannot compute in float64.

    Args:
        reason: why, naming the backend.
        fix: what the user can do, as "for a float64 check, <fix>".
    """

    def __init__(self, reason, fix):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def dtype_name(dtype):
    """The dtype's Keras name, or `None` when Keras does not know it."""
    try:
        return keras.backend.standardize_dtype(dtype)
    except (TypeError, ValueError, AttributeError):
        return None


def is_tensor(value):
    return keras.ops.is_tensor(value) or isinstance(value, keras.Variable)


def to_tensor(value, dtype):
    """`value` (a tensor, variable or array-like) as a tensor of `dtype`."""
    if is_tensor(value):
        return keras.ops.cast(keras.ops.convert_to_tensor(value), dtype)
    return keras.ops.convert_to_tensor(np.asarray(value, dtype=dtype), dtype=dtype)


def cast_float(value, dtype):
    """A floating-point tensor / array as a tensor of `dtype`; others unchanged in kind."""
    if is_tensor(value):
        tensor = keras.ops.convert_to_tensor(value)
        is_float = "float" in keras.backend.standardize_dtype(tensor.dtype)
        return keras.ops.cast(tensor, dtype) if is_float else tensor
    array = np.asarray(value)
    return keras.ops.convert_to_tensor(array.astype(dtype) if array.dtype.kind == "f" else array)


def constant(array):
    """A tensor holding `array`, in the array's dtype."""
    return keras.ops.convert_to_tensor(array, dtype=array.dtype.name)


def to_numpy(value):
    """A tensor, variable, array or number as a NumPy array (its own dtype)."""
    if isinstance(value, keras.Variable):
        value = value.value
    return np.asarray(keras.ops.convert_to_numpy(value))


def num_elements(tensor):
    return int(np.prod(tuple(tensor.shape), dtype=np.int64))


@contextlib.contextmanager
def undemoted_float64(backend):
    """Keras' float64 results stay float64 inside (see the module docstring).

    Yields:
        Whether Keras demoted float64 before (so that this scope changed it).

    Raises:
        Float64Unavailable: when this Keras version has no such table entry.
    """
    try:
        from keras.src.backend.common import dtypes as keras_dtypes

        table = keras_dtypes.BIT64_TO_BIT32_DTYPE
        previous = table["float64"]
    except (ImportError, AttributeError, KeyError) as error:
        raise Float64Unavailable(
            f"Keras {keras.version()} on {backend} demotes float64 results to float32 "
            f"and gradmon found no way to turn that off ({type(error).__name__})",
            "run it with KERAS_BACKEND=tensorflow",
        ) from error
    table["float64"] = "float64"
    try:
        yield previous != "float64"
    finally:
        table["float64"] = previous


def demotion_note(backend):
    return (
        f"Keras on {backend} demotes float64 results to float32 "
        "(`keras.backend.result_type`); that was turned off for this check, so "
        "it ran in float64 throughout"
    )
