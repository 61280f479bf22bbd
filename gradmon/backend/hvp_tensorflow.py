"""The Hessian side on TensorFlow: tapes in a `tf.function`, stateless random ops.

See `gradmon.backend.hvp` for the interface.
"""

import functools
import weakref

import numpy as np
import tensorflow as tf


def _dense(g, like):
    if g is None:
        return tf.zeros_like(like)
    return tf.convert_to_tensor(g)


def _dot(a, b):
    return tf.add_n(
        [tf.reduce_sum(tf.cast(x, b_.dtype) * b_) for x, b_ in zip(a, b)]
    )


# The HVP is compiled (traced once per block): per-layer operators share a few
# (`gradmon.hessian.per_layer.LAYER_SEGMENTS`).
COMPILED = True


class Derivatives:
    """The HVP and gradient of `batch_loss` as `tf.function`s, each traced once.

    `block`: indices of the variables differentiated (all of them, or a
    diagonal block of the Hessian); the others enter the loss as constants.
    Only the block is watched, so the backward passes stop where it ends.
    """

    def __init__(self, model, variables, block, hvp_mode, dtype, batch_loss):
        model_ref = weakref.ref(model)  # the per-model cache must not keep models alive
        self._variables, self._block, self._dtype = variables, block, dtype
        self._wrt = [variables[i] for i in block]
        self._loss = lambda params, x, y, sw: batch_loss(
            model_ref(), variables, params, x, y, sw, False)
        hvp = self._hvp_reverse if hvp_mode == "reverse_over_reverse" else self._hvp_forward
        self._hvp_fn = tf.function(functools.partial(self._flat_hvp, hvp), reduce_retracing=True,
                                   autograph=False)
        self._grad_fn = tf.function(self._gradient, reduce_retracing=True, autograph=False)

    @property
    def trace_count(self):
        """How many times the HVP `tf.function` has been traced."""
        return self._hvp_fn.experimental_get_tracing_count()

    def product_function(self, x, y, sample_weight, vector):
        """The concrete HVP function of arguments like these: `H v` for a
        flat `v`, called as `f(x, y, sample_weight, vector)`."""
        return self._hvp_fn.get_concrete_function(x, y, sample_weight, vector)

    def gradient(self, x, y, sample_weight):
        """`(loss, [gradient of each block variable])`."""
        return self._grad_fn(x, y, sample_weight)

    def _read_params(self):
        return [tf.convert_to_tensor(v.value) for v in self._variables]

    def _watched(self, params):
        return [params[i] for i in self._block]

    def _loss_and_gradient(self, params, x, y, sample_weight):
        # Recorded by any enclosing tape or accumulator: the HVPs differentiate it again.
        with tf.GradientTape() as tape:
            tape.watch(self._watched(params))
            loss = self._loss(params, x, y, sample_weight)
        grads = tape.gradient(loss, self._watched(params))
        return loss, [_dense(g, p) for g, p in zip(grads, self._watched(params))]

    def _gradient(self, x, y, sample_weight):
        return self._loss_and_gradient(self._read_params(), x, y, sample_weight)

    def _hvp_reverse(self, x, y, sample_weight, vector):
        params = self._read_params()
        with tf.GradientTape() as outer:
            outer.watch(self._watched(params))
            _, grads = self._loss_and_gradient(params, x, y, sample_weight)
            grad_dot_v = _dot(grads, vector)
        hv = outer.gradient(grad_dot_v, self._watched(params))
        return [_dense(h, p) for h, p in zip(hv, self._watched(params))]

    def _hvp_forward(self, x, y, sample_weight, vector):
        params = self._read_params()
        with tf.autodiff.ForwardAccumulator(self._watched(params), vector) as acc:
            _, grads = self._loss_and_gradient(params, x, y, sample_weight)
        hv = acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return list(hv)

    def _flat_hvp(self, hvp, x, y, sample_weight, vector):
        # Flat in, flat out: the caller's vectors stay one device tensor each,
        # with no per-variable host conversion.
        shapes = [tuple(v.shape) for v in self._wrt]
        parts = tf.split(vector, [int(np.prod(s)) for s in shapes])
        tangents = [
            tf.cast(tf.reshape(p, s), v.dtype)
            for p, s, v in zip(parts, shapes, self._wrt)
        ]
        hv = hvp(x, y, sample_weight, tangents)
        return tf.concat(
            [tf.cast(tf.reshape(h, [-1]), self._dtype) for h in hv], axis=0
        )


def _any_shape(t):
    """`t`'s `TensorSpec` with every dimension unknown (vector lengths,
    rows of basis parts), a Python number's a scalar's."""
    if not isinstance(t, tf.Tensor):
        t = tf.convert_to_tensor(t)
    return tf.TensorSpec([None] * t.shape.rank, t.dtype)


def is_chief(model):
    """Whether this process probes and writes: the chief of the model's strategy."""
    from gradmon.backend import distribute

    return distribute.is_chief(model.distribute_strategy)


# Lanczos basis parts are padded with empty ones to a few sizes
# (`gradmon.hessian.vectors._for_layout`): each size is one trace.
PADDED_LAYOUTS = True


def compile_layout(fn, example_args):
    """The concrete function of `fn` for arguments like `example_args`, any
    vector length and rows per basis part (called directly: a fifth less
    call overhead, which matters for small models). No AutoGraph: the
    basis algebra branches with `cond` and `switch` (AutoGraph's conversion
    was most of a trace's time)."""
    # A partial of its own: TensorFlow counts retraces per code object
    # (closures share one), a partial is counted by itself.
    return tf.function(functools.partial(fn), autograph=False).get_concrete_function(
        *tf.nest.map_structure(_any_shape, tuple(example_args)))


def layout_count(count):
    """The number of filled basis parts as a compiled layout takes it."""
    return tf.constant(count, tf.int32)


def cond(pred, true_fn, false_fn):
    return tf.cond(pred, true_fn, false_fn)


def switch(index, branches):
    """`branches[index]()` in a graph: only that branch runs."""
    return tf.switch_case(index, branches)


def random_vector(rng, n, dtype, rademacher=False):
    """A device vector drawn by a stateless op seeded from `rng`.

    Stateless ops touch neither TensorFlow's global generator nor Keras'
    seed generators, and the vector never passes through the host.
    """
    seed = tf.constant(rng.integers(0, 2**31 - 1, size=2), tf.int64)
    if rademacher:
        bits = tf.random.stateless_uniform([n], seed, maxval=2, dtype=tf.int32)
        return tf.cast(2 * bits - 1, dtype)
    return tf.random.stateless_normal([n], seed, dtype=dtype)


@tf.function(reduce_retracing=True, autograph=False)
def _dot64(a, b):
    # float64 accumulation: a float32 sum over millions of terms loses digits.
    return tf.reduce_sum(tf.cast(a, tf.float64) * tf.cast(b, tf.float64))


def dot64(a, b):
    """`a.b` accumulated in float64, as a Python float."""
    return float(_dot64(a, b))


def host_array(tensor):
    return tensor.numpy()


def to_tensor(array, dtype):
    """A host array as a device tensor in `dtype`."""
    return tf.constant(array, dtype=dtype)


def vector_dtype(numpy_dtype):
    """The dtype of flat vectors: a `tf.DType`."""
    return tf.as_dtype(numpy_dtype)


def read_values(variables):
    """The variables' current values, as tensors."""
    return [tf.convert_to_tensor(v.value) for v in variables]


def matvec(matrix, vector, transpose=False):
    """`matrix @ vector` (or `matrix^T @ vector`) for a `[k, n]` matrix.

    As row products: `tf.linalg.matvec` of a `[1, n]` matrix takes a slow
    path (2M entries, one thread: 4.9 ms against 1.6 ms; 2.9 vs 3.4 ms for
    4 rows), and the Lanczos basis passes its pending vectors as such rows.
    """
    row = tf.reshape(vector, [1, -1])  # reshapes, not slices: eager slicing is Python-heavy
    if transpose:
        return tf.reshape(tf.matmul(row, matrix), [-1])
    return tf.reshape(tf.matmul(matrix, row, transpose_b=True), [-1])


def vdot(a, b):
    """`[a.b]` as a matrix product: tf.tensordot of two long vectors is
    single-threaded here (6.4 ms vs 1.5 ms at 6.3 M entries)."""
    return tf.reshape(tf.matmul(tf.reshape(a, [1, -1]), tf.reshape(b, [1, -1]), transpose_b=True), [1])


def matmul(a, b):
    return tf.matmul(a, b)


def add_n(tensors):
    return tf.add_n(list(tensors))


def data_errors():
    """Errors a model raises on data it cannot take, beside Python's own."""
    return (tf.errors.InvalidArgumentError,)


def dataset_kind(data):
    """`None` if `data` is no `tf.data.Dataset`; else `"finite"`, `"infinite"`
    or `"unknown"` (a generator's, possibly endless) by its cardinality."""
    if not isinstance(data, tf.data.Dataset):
        return None
    cardinality = int(data.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        return "infinite"
    if cardinality == tf.data.UNKNOWN_CARDINALITY:
        return "unknown"
    return "finite"
