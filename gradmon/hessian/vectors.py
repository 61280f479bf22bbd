"""Vectors over the parameters, on the model's device: the Lanczos basis and its algebra.

`_Basis` holds orthonormal vectors as immutable device tensors in blocks;
projections, norms without underflow and the Lanczos update run as graph code,
one traced function per basis layout (`_for_layout`); random probes are drawn
by stateless ops seeded from a NumPy generator, so no vector passes through
the host.
"""

import functools
import math

import numpy as np
import tensorflow as tf


def _random_vector(rng, n, dtype, rademacher=False):
    """A device vector drawn by a stateless op seeded from `rng`.

    Stateless ops touch neither TensorFlow's global generator nor Keras'
    seed generators, and the vector never passes through the host.
    """
    seed = tf.constant(rng.integers(0, 2**31 - 1, size=2), tf.int64)
    if rademacher:
        bits = tf.random.stateless_uniform([n], seed, maxval=2, dtype=tf.int32)
        return tf.cast(2 * bits - 1, dtype)
    return tf.random.stateless_normal([n], seed, dtype=dtype)


class _Basis:
    """Orthonormal vectors as immutable device tensors, in blocks.

    Vectors are appended one by one and stacked into a `[block, n]` matrix
    every `block` appends, so projections are a few matrix-vector products
    and no tensor is ever written in place (a partly assigned `tf.Variable`
    switches to copy-on-read: every later read copied the whole basis, 0.3 s
    a step at 6.3 M parameters). Memory is the vectors plus, briefly, one
    block being stacked.
    """

    def __init__(self, block=4):
        self.block = block
        self.blocks, self.pending = [], []

    def __len__(self):
        return sum(int(b.shape[0]) for b in self.blocks) + len(self.pending)

    def __getitem__(self, index):
        for b in self.blocks:
            if index < b.shape[0]:
                return b[index]
            index -= int(b.shape[0])
        return self.pending[index]

    def append(self, vector):
        self.pending.append(vector)
        if len(self.pending) == self.block:
            self.blocks.append(tf.stack(self.pending))
            self.pending = []

    def combine(self, coefficients):
        """`coefficients @ basis` for a `[k, len(self)]` tensor, `[k, n]`."""
        parts = self.blocks + [p[None] for p in self.pending]
        starts = np.cumsum([0] + [int(b.shape[0]) for b in parts])
        terms = (tf.matmul(coefficients[:, a:z], b)
                 for a, z, b in zip(starts[:-1], starts[1:], parts))
        if coefficients.shape[0] == 1:
            return tf.add_n(list(terms))  # one pass over narrow terms
        out = next(terms)
        for term in terms:  # wide terms one at a time: bounded memory
            out = out + term
        return out

    def rebuilt(self, coefficients):
        """A new `_Basis` of the rows `coefficients @ basis`, built a block
        at a time so the temporaries stay a block wide."""
        new = _Basis(self.block)
        for start in range(0, int(coefficients.shape[0]), self.block):
            rows = self.combine(coefficients[start:start + self.block])
            for row in tf.unstack(rows):
                new.append(row)
        return new

    def project_out(self, w):
        """`w` minus its projection on the basis, in two passes.

        Returns `(w, coefficients, ||w||)`, `coefficients` float64 NumPy.
        """
        w, h, norm = _for_layout(_two_passes, self.blocks, self.pending, w)
        return w, h.numpy().astype(np.float64), float(norm)


def _project(blocks, pending, w):
    """One classical Gram-Schmidt pass (graph code): `(w - Q^T h, h = Q w)`."""
    h = tf.concat([tf.linalg.matvec(b, w) for b in blocks]
                  + [_vdot(p, w) for p in pending], 0)
    terms, start = [], 0
    for b in blocks:
        size = int(b.shape[0])
        terms.append(tf.linalg.matvec(b, h[start:start + size], transpose_a=True))
        start += size
    terms += [h[start + i] * p for i, p in enumerate(pending)]
    return w - tf.add_n(terms), h


def _vdot(a, b):
    # `[a.b]` as a matrix product: tf.tensordot of two long vectors is
    # single-threaded here (6.4 ms vs 1.5 ms at 6.3 M entries).
    return tf.matmul(a[None], b[None], transpose_b=True)[0]


# One tf.function per basis layout (number and sizes of blocks, pending
# vectors): each is traced once, for any vector length (the per-layer
# operators of a model have as many lengths as layers: per-length traces
# cost as much as their HVPs' own), where one function would retrace at
# every new layout and warn of frequent retracing.
_LAYOUT_FUNCTIONS = {}


def _any_length(t):
    """`t`'s `TensorSpec` with the vector length (last dimension) unknown."""
    shape = list(t.shape)
    if shape:
        shape[-1] = None
    return tf.TensorSpec(shape, t.dtype)


def _for_layout(fn, blocks, pending, w, *args):
    """Runs the graph of `fn` for this basis layout.

    Each layout gets a `tf.function` of its own, traced once, and its
    concrete function is called directly (a fifth less call overhead: it
    matters for small models).
    """
    key = (fn.__name__, tuple(int(b.shape[0]) for b in blocks), len(pending),
           w.dtype.name)
    if key not in _LAYOUT_FUNCTIONS:
        # A partial of its own: TensorFlow counts retraces per code object
        # (closures share one), a partial is counted by itself.
        _LAYOUT_FUNCTIONS[key] = tf.function(
            functools.partial(fn)
        ).get_concrete_function(
            *tf.nest.map_structure(_any_length, (blocks, pending, w, *args))
        )
    return _LAYOUT_FUNCTIONS[key](blocks, pending, w, *args)


def _norm(w):
    """`||w||` without underflow (graph code).

    A float32 sum of squares loses entries below ~1e-19 (their squares are
    subnormal): a tiny operator (a deep layer's Hessian block at
    initialisation, ~1e-20) then gave non-unit Lanczos vectors, a wrong
    eigenvalue and a residual of 0. Below the threshold the norm is
    recomputed on `w / max|w|`; above it a single `tf.norm`.
    """
    norm = tf.norm(w)
    # bfloat16 (no np.finfo) has float32's exponent range
    info = np.finfo({tf.float16: np.float16, tf.float64: np.float64}.get(w.dtype, np.float32))
    threshold = tf.constant(math.sqrt(info.tiny) / info.eps, w.dtype)

    def rescaled():
        scale = tf.reduce_max(tf.abs(w))
        safe = tf.where(scale > 0, scale, tf.ones_like(scale))
        return safe * tf.norm(w / safe)

    return tf.cond(norm < threshold, rescaled, lambda: norm)


def _two_passes(blocks, pending, w):
    w, first = _project(blocks, pending, w)
    w, second = _project(blocks, pending, w)
    return w, first + second, _norm(w)


def _lanczos_update(blocks, pending, w, q, previous, coupling):
    """Orthogonalises `w = H q` against the basis, in one graph call.

    The local recurrence first (`alpha q` and the known `coupling` to the
    previous vector), then one full pass, which removes only rounding-level
    components (folding the local terms into that pass instead leaves the
    dot-product errors of the large `H q`, ~eps ||H q||, along every
    vector: measured, it stalled residuals near 3e-4 ||H||). A second pass
    runs only when the first removed most of what was left ("twice is
    enough": Parlett, The Symmetric Eigenvalue Problem, 1980, sec. 6.9).
    Returns `(w, h, alpha, ||w||)` where `h` sums the full passes, so
    `H q = alpha q + coupling previous + Q^T h + w` to rounding. Graph code
    (see `_for_layout`).
    """
    alpha = _vdot(q, w)[0]
    w = w - alpha * q - coupling * previous
    w, h = _project(blocks, pending, w)
    norm = _norm(w)

    def again():
        w2, h2 = _project(blocks, pending, w)
        return w2, h + h2, _norm(w2)

    # ||w before the pass||^2 = norm^2 + ||h||^2 for an orthonormal basis, so
    # norm < ||w before|| / sqrt(2) is norm < ||h|| (no squares to underflow).
    w, h, norm = tf.cond(norm < _norm(h), again, lambda: (w, h, norm))
    return w, h, alpha, norm


def _ritz_pair(y, hy, theta):
    """A unit Ritz vector, its Rayleigh quotient and residual, on the device.

    `y` is a Ritz vector and `hy` its product `H y` (both combinations of
    stored vectors); `theta` is its Ritz value, so the quotient is computed
    as a small correction to it.
    """
    yy = tf.reduce_sum(y * y)
    theta = tf.constant(theta, y.dtype)
    quotient = theta + tf.reduce_sum(y * (hy - theta * y)) / yy
    residual = _norm(hy - quotient * y) / tf.sqrt(yy)
    return y / tf.sqrt(yy), quotient, residual


@tf.function(reduce_retracing=True)
def _dot64(a, b):
    # float64 accumulation: a float32 sum over millions of terms loses digits.
    return tf.reduce_sum(tf.cast(a, tf.float64) * tf.cast(b, tf.float64))
