"""The Hessian side on PyTorch: double backward, or `torch.func.jvp` over `torch.func.grad`, eager.

See `gradmon.backend.hvp` for the interface.
"""

import contextlib

import numpy as np
import torch

from gradmon.backend.hvp import add_in_turn as add_n  # noqa: F401
from gradmon.backend.hvp import data_errors, dataset_kind  # noqa: F401
from gradmon.backend.hvp import host_cond as cond  # noqa: F401
from gradmon.backend.hvp import host_switch as switch  # noqa: F401
from gradmon.backend.hvp import dtype_name, host_random_vector


def _torch_dtype(dtype):
    return getattr(torch, dtype_name(dtype))


# Nothing is compiled: each per-layer operator's HVP stops at its own layer.
COMPILED = False


class Derivatives:
    """The HVP and gradient of `batch_loss`, eager (nothing is compiled).

    Reverse-over-reverse is `torch.autograd.grad` of `<grad, v>` with the
    first gradient's graph kept; forward-over-reverse is `torch.func.jvp` of
    `torch.func.grad`. Only the variables `block` indexes are differentiated;
    the others enter as their current values.
    """

    trace_count = 0  # nothing is traced

    def __init__(self, model, variables, block, hvp_mode, dtype, batch_loss):
        self._model = model
        self._variables, self._block = variables, block
        self._dtype = _torch_dtype(dtype)
        self._batch_loss = batch_loss
        self._forward = hvp_mode == "forward_over_reverse"
        self._shapes = [tuple(variables[i].shape) for i in block]

    def _loss(self, block_params, params, x, y, sample_weight):
        full = list(params)
        for i, p in zip(self._block, block_params):
            full[i] = p
        return self._batch_loss(self._model, self._variables, full, x, y, sample_weight, False)

    def _values(self):
        params = [v.value.detach() for v in self._variables]
        return params, [params[i] for i in self._block]

    def gradient(self, x, y, sample_weight):
        """`(loss, [gradient of each block variable])`."""
        params, block_params = self._values()
        block_params = [p.clone().requires_grad_(True) for p in block_params]
        with torch.enable_grad():
            loss = self._loss(block_params, params, x, y, sample_weight)
            grads = torch.autograd.grad(loss, block_params, allow_unused=True)
        return loss.detach(), [torch.zeros_like(p) if g is None else g
                               for g, p in zip(grads, block_params)]

    def product_function(self, x, y, sample_weight, vector):
        """`H v` of one batch as `f(x, y, sample_weight, vector)`, a flat
        vector in and out."""
        return self.hvp

    def hvp(self, x, y, sample_weight, vector):
        """`H v` on one batch, a flat tensor in and out."""
        params, block_params = self._values()
        sizes = [int(np.prod(s)) for s in self._shapes]
        tangents = [p.reshape(s).to(b.dtype) for p, s, b in
                    zip(torch.split(vector, sizes), self._shapes, block_params)]
        with torch.enable_grad(), _twice_differentiable_attention():
            if self._forward:
                hv = self._jvp_of_grad(params, block_params, tangents, x, y, sample_weight)
            else:
                hv = self._double_backward(params, block_params, tangents, x, y, sample_weight)
        return torch.cat([h.reshape(-1).to(self._dtype) for h in hv]).detach()

    def _double_backward(self, params, block_params, tangents, x, y, sample_weight):
        block_params = [p.clone().requires_grad_(True) for p in block_params]
        loss = self._loss(block_params, params, x, y, sample_weight)
        grads = torch.autograd.grad(loss, block_params, create_graph=True, allow_unused=True)
        dot = sum((g * t).sum() for g, t in zip(grads, tangents) if g is not None)
        if not torch.is_tensor(dot) or not dot.requires_grad:  # the loss is at most linear
            return [torch.zeros_like(p) for p in block_params]
        hv = torch.autograd.grad(dot, block_params, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, block_params)]

    def _jvp_of_grad(self, params, block_params, tangents, x, y, sample_weight):
        def grad(bp):
            return torch.func.grad(
                lambda b: self._loss(b, params, x, y, sample_weight))(bp)

        return torch.func.jvp(grad, (block_params,), (tangents,))[1]


def _twice_differentiable_attention():
    """Keras' attention on PyTorch calls `scaled_dot_product_attention`, whose fused CPU
    kernels have no derivative of their backward: an HVP through them fails. Within this,
    torch picks its math kernel (plain ops, differentiable twice; the same numbers)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # an older torch: its default kernels are used
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def is_chief(model):
    """Whether this process probes and writes: rank 0 under `torch.distributed`, else the one."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0


# Eager: the basis parts are passed as they are, no padding.
PADDED_LAYOUTS = False


def layout_count(count):
    return count


def compile_layout(fn, example_args):
    """`fn` itself: eager PyTorch runs it as it is."""
    return fn


def random_vector(rng, n, dtype, rademacher=False):
    """A vector seeded from `rng`, drawn on the host and sent to the device once."""
    return to_tensor(host_random_vector(rng, n, rademacher), dtype)


def dot64(a, b):
    """`a.b` accumulated in float64, as a Python float."""
    return float(torch.dot(a.to(torch.float64), b.to(torch.float64)))


def host_array(tensor):
    return tensor.detach().cpu().numpy()


def to_tensor(array, dtype):
    """A host array as a tensor in `dtype` on Keras' device."""
    import keras

    return keras.ops.convert_to_tensor(np.asarray(array).astype(dtype_name(dtype)))


def vector_dtype(numpy_dtype):
    """The dtype of flat vectors: Keras' name for it."""
    return dtype_name(numpy_dtype)


def read_values(variables):
    return [v.value.detach() for v in variables]


def matvec(matrix, vector, transpose=False):
    return torch.matmul(vector, matrix) if transpose else torch.matmul(matrix, vector)


def vdot(a, b):
    return torch.dot(a, b)[None]


def matmul(a, b):
    return torch.matmul(a, b)
