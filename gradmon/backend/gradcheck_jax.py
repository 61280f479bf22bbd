"""`gradmon.gradcheck` on JAX: `jax.value_and_grad`, float64 through `jax_enable_x64`.

JAX stores float64 as float32 unless `jax_enable_x64` is on, and Keras
demotes float64 results besides (see `gradcheck_common`). A float64 check
therefore runs with x64 switched on (`jax.enable_x64`, a context local to the
calling thread) and Keras' demotion lifted, for its duration only; tensors it
makes are plain `jax.Array`s. Other conversions: `gradcheck_common`.
"""

import contextlib

import jax
import numpy as np

from gradmon.backend.gradcheck_common import (  # noqa: F401  (the interface)
    Float64Unavailable,
    cast_float,
    constant,
    demotion_note,
    dtype_name,
    is_tensor,
    num_elements,
    to_numpy,
    to_tensor,
    undemoted_float64,
)

NAME = "jax"


@contextlib.contextmanager
def precision(dtype):
    """The scope a check in `dtype` runs in; yields notes on what it changed.

    Raises:
        Float64Unavailable: for float64, when x64 or Keras' float64 cannot be had.
    """
    if dtype != "float64":
        yield []
        return
    notes = []
    enable_x64 = getattr(jax, "enable_x64", None)
    if not jax.config.jax_enable_x64:
        if enable_x64 is None:
            raise Float64Unavailable(
                f"jax {jax.__version__} has `jax_enable_x64` off and no `jax.enable_x64` scope",
                "call `jax.config.update('jax_enable_x64', True)` at start-up (or set "
                "JAX_ENABLE_X64=1)",
            )
        notes.append(
            "jax: `jax_enable_x64` is off; it was switched on for this check only "
            "(jax.enable_x64), so JAX kept float64 values"
        )
    scope = enable_x64(True) if enable_x64 is not None else contextlib.nullcontext()
    with scope, undemoted_float64(NAME) as changed:
        if changed:
            notes.append(demotion_note(NAME))
        yield notes


# What `jax.jit` raises for a function that needs concrete values but that
# `jax.grad` runs (boolean masks: `z[z > 0]`, NumPy on traced arrays); such a
# function runs op by op.
_NOT_TRACEABLE = (
    jax.errors.NonConcreteBooleanIndexError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _jit_or_eager(function):
    """`function` under `jax.jit`, or op by op once jit could not trace it.

    Compiled once per shape, a check's ~2 evaluations per element cost far less
    than dispatching (and on first use compiling) each operation of a Keras loss.
    """
    jitted = jax.jit(function)
    eager = []

    def run(*args):
        if not eager:
            try:
                return jitted(*args)
            except _NOT_TRACEABLE:
                eager.append(True)
        return function(*args)

    return run


def compile_loss(loss):
    """`loss` (list of tensors -> scalar) for the finite-difference evaluations."""
    return _jit_or_eager(lambda params: loss(list(params)))


def value_and_grad(loss, arrays):
    """(loss value, float64 gradients) at `arrays` by `jax.value_and_grad`."""
    params = [constant(a) for a in arrays]
    value, grads = _jit_or_eager(jax.value_and_grad(lambda p: loss(list(p))))(params)
    return float(value), [np.asarray(g, dtype=np.float64) for g in grads]
