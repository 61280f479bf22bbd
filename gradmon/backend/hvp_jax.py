"""The Hessian side on JAX: `jax.grad` / `jax.jvp` of a stateless loss under `jax.jit`.

The loss reads every model variable from a `keras.StatelessScope` whose
values are arguments of the jitted function (the trainable values and the
non-trainable state, e.g. BatchNormalization's moving statistics), so a
compiled HVP never holds stale weights as constants. See
`gradmon.backend.hvp` for the interface.
"""

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from gradmon.backend.hvp import add_in_turn as add_n  # noqa: F401
from gradmon.backend.hvp import data_errors, dataset_kind  # noqa: F401
from gradmon.backend.hvp import host_cond as cond  # noqa: F401
from gradmon.backend.hvp import host_switch as switch  # noqa: F401
from gradmon.backend.hvp import dtype_name, host_random_vector


# The HVP is compiled (traced once per block): per-layer operators share a few
# (`gradmon.hessian.per_layer.LAYER_SEGMENTS`).
COMPILED = True


class Derivatives:
    """The HVP and gradient of `batch_loss` as jitted functions.

    Forward-over-reverse is `jax.jvp` of `jax.grad`; reverse-over-reverse is
    `jax.grad` of `<jax.grad, v>`. Only the variables `block` indexes are
    differentiated; the others enter as values.
    """

    def __init__(self, model, variables, block, hvp_mode, dtype, batch_loss):
        model_ref = weakref.ref(model)  # the per-model cache must not keep models alive
        self._variables, self._block = variables, block
        self._dtype = dtype_name(dtype)
        self._state = [v for v in model.variables
                       if not any(v is t for t in variables)]
        self._shapes = [tuple(variables[i].shape) for i in block]
        self._traces = 0

        def loss(block_params, params, state, x, y, sample_weight):
            full = list(params)
            for i, p in zip(block, block_params):
                full[i] = p
            return batch_loss(model_ref(), variables, full, x, y, sample_weight, False,
                              list(zip(self._state, state)))

        self._grad = jax.grad(loss)
        self._forward = hvp_mode == "forward_over_reverse"
        self._hvp_fn = jax.jit(self._flat_hvp)
        self._grad_fn = jax.jit(jax.value_and_grad(loss))

    @property
    def trace_count(self):
        """How many times the jitted HVP has been traced."""
        return self._traces

    def product_function(self, x, y, sample_weight, vector):
        """`H v` of one batch as `f(x, y, sample_weight, vector)`, a flat
        vector in and out."""
        return self.hvp

    def hvp(self, x, y, sample_weight, vector):
        """`H v` on one batch, a flat array in and out."""
        params, state = self._values()
        return self._hvp_fn(params, state, x, y, sample_weight, vector)

    def gradient(self, x, y, sample_weight):
        """`(loss, [gradient of each block variable])`."""
        params, state = self._values()
        block_params = [params[i] for i in self._block]
        return self._grad_fn(block_params, params, state, x, y, sample_weight)

    def _values(self):
        return ([v.value for v in self._variables], [v.value for v in self._state])

    def _flat_hvp(self, params, state, x, y, sample_weight, vector):
        self._traces += 1  # runs while tracing only
        sizes = [int(np.prod(s)) for s in self._shapes]
        parts = jnp.split(vector, np.cumsum(sizes)[:-1])
        block_params = [params[i] for i in self._block]
        tangents = [p.reshape(s).astype(b.dtype)
                    for p, s, b in zip(parts, self._shapes, block_params)]

        def grad(bp):
            return self._grad(bp, params, state, x, y, sample_weight)

        if self._forward:
            hv = jax.jvp(grad, (block_params,), (tangents,))[1]
        else:
            hv = jax.grad(lambda bp: sum(
                jnp.vdot(g.astype(t.dtype), t) for g, t in zip(grad(bp), tangents)))(block_params)
        return jnp.concatenate([h.reshape(-1).astype(self._dtype) for h in hv])


def is_chief(model):
    """Whether this process probes and writes: JAX's process 0."""
    return jax.process_index() == 0


# Eager: the basis parts are passed as they are, no padding.
PADDED_LAYOUTS = False


def layout_count(count):
    return count


def compile_layout(fn, example_args):
    """`fn` itself, run op by op (see `gradmon.backend.hvp`)."""
    return fn


def random_vector(rng, n, dtype, rademacher=False):
    """A vector seeded from `rng`, drawn on the host and sent to the device once."""
    return to_tensor(host_random_vector(rng, n, rademacher), dtype)


def dot64(a, b):
    """`a.b` accumulated in float64 (on the host: JAX runs float32 unless x64 is on)."""
    return float(np.dot(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def host_array(tensor):
    return np.asarray(tensor)


def to_tensor(array, dtype):
    """A host array as a device array in `dtype`."""
    return jnp.asarray(np.asarray(array).astype(dtype_name(dtype)))


def vector_dtype(numpy_dtype):
    """The dtype of flat vectors: Keras' name for it."""
    return dtype_name(numpy_dtype)


def read_values(variables):
    return [v.value for v in variables]


# Full float32 products: on GPUs JAX's default precision may round matrix
# products' inputs to TF32 / bfloat16, far above the orthogonality Lanczos needs.
_HIGHEST = jax.lax.Precision.HIGHEST


def matvec(matrix, vector, transpose=False):
    if transpose:
        return jnp.matmul(vector, matrix, precision=_HIGHEST)
    return jnp.matmul(matrix, vector, precision=_HIGHEST)


def vdot(a, b):
    return jnp.vdot(a, b, precision=_HIGHEST)[None]


def matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)
