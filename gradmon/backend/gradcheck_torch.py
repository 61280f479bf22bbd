"""`gradmon.gradcheck` on PyTorch: `torch.autograd.grad` on float64 tensors.

PyTorch computes in float64 natively, but Keras demotes float64 results (see
`gradcheck_common`: `ops.matmul` returns float32 on Keras 3.15), so a float64
check lifts that demotion for its duration. Other conversions:
`gradcheck_common`.
"""

import contextlib

import numpy as np
import torch

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

NAME = "torch"


@contextlib.contextmanager
def precision(dtype):
    """The scope a check in `dtype` runs in; yields notes on what it changed.

    Raises:
        Float64Unavailable: for float64, when Keras' demotion cannot be lifted.
    """
    if dtype != "float64":
        yield []
        return
    with undemoted_float64(NAME) as changed:
        yield [demotion_note(NAME)] if changed else []


def compile_loss(loss):
    """`loss` as it is: evaluated op by op."""
    return loss


def value_and_grad(loss, arrays):
    """(loss value, float64 gradients) at `arrays` by `torch.autograd.grad`.

    Inputs the loss does not use get zero gradients.
    """
    params = [constant(a).detach().clone().requires_grad_(True) for a in arrays]
    with torch.enable_grad():
        value = loss(params)
        grads = torch.autograd.grad(value, params, allow_unused=True)
    grads = [
        np.zeros(a.shape) if g is None else g.detach().cpu().numpy().astype(np.float64)
        for a, g in zip(arrays, grads)
    ]
    return float(value.detach()), grads
